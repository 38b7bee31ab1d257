"""A spending limit for a run: checked before each request goes, never passed.

``budget: {max_usd: X}`` (or ``factory run --max-usd X``) caps what one run spends on the
requests it sends, priced with the recipe's ``prices:`` (a reply from the cache costs nothing).
Before a request goes, the LLM path reserves the most it can cost -- its prompt (estimated from
its size, corrected by the usage that comes back) and ``max_tokens`` per sample, at the batch
price when it goes through a Batch API -- and the run lets it go only while what was spent plus
what is reserved for the requests in flight stays within the budget. When a request's reply
comes back, its reservation becomes what it actually cost. A request that does not fit waits
for the requests in flight; when none is left and it still does not fit, the run stops with one
line (:class:`BudgetReached`), writes no version, and every reply paid for is in the cache: the
same command with a larger budget goes on and pays only for what is new.
"""

from __future__ import annotations

import json
import threading

from .errors import BackendError

INITIAL_TOKENS_PER_BYTE = 1 / 3  # a prompt's tokens before any usage came back (English ~1/4, CJK ~1/3)


class BudgetReached(BackendError):
    """The next request could pass the budget; the run stops before it (exit 1)."""

    def __init__(self, budget: "Budget", next_cost: float):
        self.budget, self.next_cost = budget, next_cost
        self.where = ""
        super().__init__(self.text())

    def text(self) -> str:
        b = self.budget
        alone = (" (more than the whole budget: lower the step's max_tokens, or raise the budget)"
                 if self.next_cost > b.max_usd else "")
        return (f"budget reached: ${b.spent:.4f} spent of budget.max_usd ${b.max_usd:.2f} on {b.sent} requests; the "
                f"next could cost up to ${self.next_cost:.4f}{alone}{self.where}. Stopped before passing it: nothing was written, and every reply paid for is "
                "cached, so the same command with a larger budget (budget.max_usd, or --max-usd) sends and pays only "
                "for the requests not yet answered")

    def at(self, where: str) -> "BudgetReached":
        """The same stop, saying where in the recipe it came (the driver adds the step and its rows)."""
        self.where = f" ({where})"
        self.args = (self.text(),)
        return self


def usd(prompt_tokens: float, completion_tokens: float, price, batched: bool = False) -> float:
    """What tokens sent to and made by a model cost at ``price`` (``prices:``, USD per million tokens);
    a Batch API request pays ``price.batch`` of it. Not rounded: a budget adds up millions of these."""
    scale = price.batch if batched else 1.0
    return (prompt_tokens * price.input + completion_tokens * price.output) * scale / 1_000_000


class Budget:
    """What a run may still spend, shared by every step and batch of it (thread-safe).

    Args:
        max_usd: the most the run may spend.
        prices: model name -> its price (the recipe's ``prices:``: input, output, batch).
    """

    def __init__(self, max_usd: float, prices: dict):
        self.max_usd = max_usd
        self.prices = prices
        self.spent = 0.0
        self.reserved = 0.0  # the most the requests in flight can still cost
        self.sent = 0
        self.tokens_per_byte = INITIAL_TOKENS_PER_BYTE
        self.per_sample: dict[str, float] = {}  # model -> the most one sample has cost so far
        self._changed = threading.Condition()

    @classmethod
    def for_recipe(cls, recipe) -> "Budget | None":
        config = getattr(recipe, "budget", None)
        if config is None or config.max_usd is None:
            return None
        return cls(config.max_usd, recipe.prices)

    def cost(self, model: str, prompt_tokens: float, completion_tokens: float, batched: bool) -> float:
        """What ``model``'s tokens cost (:func:`usd` at its price)."""
        price = self.prices.get(str(model))
        if price is None:  # recipe validation asks for a price of every model a budgeted recipe uses
            raise BackendError(f"budget.max_usd is set and model '{model}' has no price; add it under `prices:`")
        return usd(prompt_tokens, completion_tokens, price, batched)

    def worst_case(self, request, model: str, batched: bool) -> tuple[float, int, int]:
        """The most a request can cost as its parameters say -- its prompt's tokens (estimated from its
        size) and max_tokens per sample --, its size in bytes and its samples."""
        params = request.params
        size = len(json.dumps(request.messages, ensure_ascii=False).encode("utf-8"))
        n = max(1, params.n)
        return self.cost(model, size * self.tokens_per_byte, params.max_tokens * n, batched), size, n

    def reserve(self, model: str, asks: list[tuple[float, int]]) -> list[float]:
        """What to reserve for each of the next requests that may go now (at least one): each
        request's worst case (``asks``: its estimate and its samples), or the most a sample of this
        model has cost so far times its samples when that is more (a server whose usage passes
        max_tokens, a prompt larger than its size says). Waits while none fits but requests are in
        flight (their replies may cost less than reserved); raises :class:`BudgetReached` when none
        fits and none is in flight."""
        with self._changed:
            while True:
                room = self.max_usd - self.spent - self.reserved
                seen = self.per_sample.get(model, 0.0)
                reserved: list[float] = []
                total = 0.0
                for estimate, n in asks:
                    cost = max(estimate, seen * n)
                    if total + cost > room + 1e-12:
                        break
                    reserved.append(cost)
                    total += cost
                if reserved:
                    self.reserved += total
                    self.sent += len(reserved)
                    return reserved
                if self.reserved <= 1e-12:
                    raise BudgetReached(self, max(asks[0][0], seen * asks[0][1]))
                self._changed.wait()

    def settle(self, model: str, reserved: float, cost: float, n: int = 1, prompt_tokens: int = 0,
               prompt_bytes: int = 0) -> None:
        """A request's reply came back (or it failed): what was reserved for it becomes what it cost."""
        with self._changed:
            self.reserved = max(0.0, self.reserved - reserved)
            self.spent += cost
            self.per_sample[model] = max(self.per_sample.get(model, 0.0), cost / max(1, n))
            if prompt_tokens and prompt_bytes:
                # Learn the tokens per byte upwards at once and downwards slowly: a budget errs on the safe side.
                seen = prompt_tokens / prompt_bytes
                self.tokens_per_byte = max(seen, 0.9 * self.tokens_per_byte + 0.1 * seen)
            self._changed.notify_all()

    def charge(self, cost: float) -> None:
        """Spending that happened elsewhere (a Ray worker's share of the budget)."""
        with self._changed:
            self.spent += cost
            self._changed.notify_all()

    def share(self, fraction: float) -> "Budget":
        """A budget of ``fraction`` of what is left, for a worker in another process."""
        part = Budget(max(0.0, self.max_usd - self.spent - self.reserved) * fraction, self.prices)
        part.tokens_per_byte, part.per_sample = self.tokens_per_byte, dict(self.per_sample)
        return part

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_changed"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._changed = threading.Condition()
