"""The one LLM path: every request of every step, on every executor, goes through here.

A step says what to ask and how to read the answer; :class:`LLMClient` does the rest:

* **seeds** -- each request gets a sampling seed derived from the recipe seed, its
  conversation and parameters, and how many identical requests the step asked before it
  in the same run (so a repeated question is a new sample, not the same one). Seeds do not
  depend on batching, the executor or what else is asked, so the local and the Ray
  executor sample alike;
* **cache** -- a round of requests has a journal in the cache; every reply is appended the
  moment it arrives, so a run stopped mid-round (crash, Ctrl-C, SIGTERM) resends only the
  replies that had not arrived. A failed request is never written, so a re-run asks again;
* **usage** -- requests, cache hits, tokens and the backend's retries, per step;
* **cut replies** -- a reply that ended at ``max_tokens`` is asked to go on (up to
  ``params.continuations`` times, where the backend truly continues a prefill) and the
  parts joined; the replies still cut are counted per option that set the token limit
  (``params.max_tokens_option``: :attr:`LLMClient.truncation`);
* **structured output** -- a request with a JSON Schema (``params.json_schema``) that the backend
  cannot enforce while decoding has each reply checked; a reply that does not match is shown
  back to the model with what is wrong, up to :data:`SCHEMA_REASKS` times;
* **rounds** -- :meth:`LLMClient.run` drives a step's exchange (a generator that yields
  requests and receives their completions), so generators that plan several rounds over
  the whole pool go through the same path as a one-request-per-row step;
* **more than one model** -- a step may ask other models beside its own (a simulated user, a
  tool simulator: the step's ``extra_llm_configs``); each has a client of its own with the same
  cache, seeds, retries and budget (:attr:`LLMClient.others`), a round for one of them is
  yielded as :class:`ToLLM`, and :meth:`LLMClient.total_usage` counts them all, each model's
  part under its name.

Turning a failed request or an unreadable reply into a dropped row is the step base's
part (:func:`factory.steps.truncation.rows_from_completion`), the same for every step.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ..cache import Cache, NullCache
from ..config import to_dict
from ..errors import ParseError
from ..hashing import canonical, digest, fingerprint, seed_of
from .base import (
    Backend,
    Completion,
    Conversation,
    GenerationParams,
    LENGTH,
    Request,
    continued,
    counting_call,
    split_prefill,
)
from .schema import read_reply

SCHEMA_REASKS = 2  # how often a reply that does not match its JSON Schema is sent back to be fixed

# A step's conversation with the model: yields lists of requests, receives their
# completions (in order), returns the step's output rows.
Exchange = Generator["list[Request] | ToLLM", list[Completion], Any]


@dataclass
class ToLLM:
    """A round of requests an exchange yields for one of the step's other models (its
    ``extra_llm_configs``, by name) rather than its own."""

    llm: str
    requests: list[Request]


@dataclass
class Usage:
    """What a step asked of its model (reported per step in the manifest).

    Attributes:
        calls: batches of requests sent to the backend (none when every reply was cached).
        conversations: requests the step made, cached or not.
        cached_conversations: of those, the ones answered from the cache.
        prompt_tokens, completion_tokens: tokens of the requests sent to the backend.
        retries, retry_reasons: the backend's retries while answering them, by reason.
        throttled: requests the server refused for its rate limits (429) and that went again
            (throttling: neither a retry nor a failure).
        failures: requests that failed in the backend (after its retries); never cached.
        last_error: the last of those failures' errors (server, status, message).
        reasks: replies sent back because they did not match their JSON Schema (backends
            that cannot enforce one), and ``reasks_fixed``: of those, the ones fixed.
    """

    calls: int = 0
    conversations: int = 0
    cached_conversations: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    retry_reasons: dict[str, int] = field(default_factory=dict)
    throttled: int = 0
    failures: int = 0
    last_error: str | None = None
    reasks: int = 0
    reasks_fixed: int = 0
    # The part of the above that the step's other models used (by their name in the step's
    # ``extra_llm_configs``); the step's own model used the rest. Empty for a step with one model.
    llms: dict[str, "Usage"] = field(default_factory=dict)

    def add(self, other: "Usage | dict") -> None:
        other = other if isinstance(other, dict) else dataclasses.asdict(other)
        for name, value in other.items():
            if name == "llms":
                for llm, usage in value.items():
                    self.llms.setdefault(llm, Usage()).add(usage)
            elif name == "retry_reasons":
                for reason, count in value.items():
                    self.retry_reasons[reason] = self.retry_reasons.get(reason, 0) + count
            elif name == "last_error":
                self.last_error = value or self.last_error
            else:
                setattr(self, name, getattr(self, name) + value)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        if not self.llms:
            del out["llms"]  # a step with one model reports as it always did
        for part in out.get("llms", {}).values():
            del part["llms"]
        return out


class LLMClient:
    """Sends a step's requests to its backend through the reply cache, counting usage.

    Args:
        backend: the backend that answers.
        cache: where replies are journaled (None: nowhere).
        seed: the recipe seed, from which every request's sampling seed is derived.
        on_progress: called with a count of requests answered, as they are (progress bars
            move within a batch).
        budget: the run's spending limit (:class:`factory.budget.Budget`): a request goes only when
            its worst-case cost fits.
        ledger: where the tokens of every reply go, cached or not (``factory estimate``).

    Attributes:
        others: the clients of the step's other models, by name (see :class:`ToLLM`).
    """

    def __init__(self, backend: Backend, cache: Cache | None = None, seed: int = 0,
                 on_progress: Callable[[int], None] | None = None, budget=None, ledger: list | None = None):
        self.backend = backend
        self.cache = cache or NullCache()
        self.seed = seed
        self.on_progress = on_progress
        self.budget = budget
        self.ledger = ledger  # where the tokens of every reply go, cached or not (factory estimate)
        self.usage = Usage()
        # Replies received (cached or not), those that ended cut at max_tokens (by the config option
        # that set the limit), and continuations asked for: the step's report carries them to the manifest.
        self.truncation: dict = {"replies": 0, "cut": 0, "limits": {}, "continued": 0}
        self.others: dict[str, LLMClient] = {}

    def run(self, exchange: Exchange):
        """Drives a step's exchange: each list of requests it yields is answered and sent back,
        by the step's own model, or by the other model a :class:`ToLLM` names."""
        asked: dict[str | None, Counter] = {}  # per model: identical requests so far in this exchange
        try:
            requests = next(exchange)
            while True:
                if isinstance(requests, ToLLM):
                    client = self.other(requests.llm)
                    answered = client.ask(requests.requests, asked.setdefault(requests.llm, Counter()))
                else:
                    answered = self.ask(requests, asked.setdefault(None, Counter()))
                requests = exchange.send(answered)
        except StopIteration as finished:
            return finished.value

    def other(self, name: str) -> "LLMClient":
        """The client of the step's other model ``name`` (one of its ``extra_llm_configs``)."""
        client = self.others.get(name)
        if client is None:
            raise TypeError(f"the step asked model '{name}', and its client has only "
                            f"{sorted(self.others) or 'its own'}: declare it in the step's extra_llm_configs")
        return client

    def total_usage(self) -> Usage:
        """What the step asked of all its models: the sums, and each other model's part in ``llms``."""
        if not self.others:
            return self.usage
        total = Usage()
        total.add(self.usage)
        for name, client in self.others.items():
            total.add(client.usage)
            total.llms[name] = Usage()
            total.llms[name].add(client.usage)
        return total

    def total_truncation(self) -> dict:
        """The cut replies of all the step's models (each counted by the option that set its limit)."""
        if not self.others:
            return self.truncation
        total = {"replies": 0, "cut": 0, "limits": {}, "continued": 0}
        for counted in [self.truncation] + [c.truncation for c in self.others.values()]:
            for key in ("replies", "cut", "continued"):
                total[key] += counted[key]
            for option, count in counted["limits"].items():
                total["limits"][option] = total["limits"].get(option, 0) + count
        return total

    def chat(self, conversations: list[Conversation], params: GenerationParams) -> list[Completion]:
        """The same parameters for every conversation."""
        return self.ask([Request(c, params) for c in conversations])

    def ask(self, requests: list[Request], asked: Counter | None = None) -> list[Completion]:
        """The completions of ``requests``, in order: from the cache, or from the backend.

        Replies cut at ``max_tokens`` are continued when the request's parameters allow it
        (:meth:`continue_cut`), then counted.

        Args:
            requests: what to ask (their ``params.seed`` is replaced by the derived seed).
            asked: how often each request was asked before in the same exchange; updated.
        """
        asked = Counter() if asked is None else asked
        results = self.continue_cut(requests, self.fetch(requests, asked), asked)
        # Asked only when a request has a schema: an openai backend learns it from its server.
        if any(r.params.json_schema for r in requests) and not self.backend.enforces_schema:
            results = self.reask_invalid(requests, results, asked)
        truncation = self.truncation
        for request, completion in zip(requests, results):
            if completion.error is None:
                texts = len(completion.texts)
                truncation["replies"] += texts
                # Completion.cut(k) for each reply (a missing finish reason reads as `stop`).
                cut = completion.finish_reasons[:texts].count(LENGTH) if completion.finish_reasons else 0
                if cut:
                    truncation["cut"] += cut
                    option = request.params.max_tokens_option
                    truncation["limits"][option] = truncation["limits"].get(option, 0) + cut
        return results

    def continue_cut(self, requests: list[Request], results: list[Completion], asked: Counter) -> list[Completion]:
        """``results`` with each reply cut at ``max_tokens`` continued: the model is asked to go
        on from all it said so far (a prefill), up to ``params.continuations`` times, and the
        parts are joined. Each continuation is a request of its own (cached, seeded alike)."""
        for round_ in range(max((r.params.continuations for r in requests), default=0)):
            cut = [(i, k) for i, (request, completion) in enumerate(zip(requests, results))
                   if completion.error is None and request.params.continuations > round_
                   for k in range(len(completion.texts)) if completion.cut(k)]
            if not cut:
                break
            if not self.backend.continues_replies:
                if not getattr(self.backend, "_said_cannot_continue", False):
                    self.backend._said_cannot_continue = True
                    print(f"warning: {self.backend.name} backend cannot continue a reply (the server does not "
                          "continue a prefilled assistant turn): on_truncation: continue drops cut replies as "
                          "`truncated`; raise max_tokens instead", file=sys.stderr)
                break
            follow = [Request(continued(requests[i].messages, results[i].texts[k]),
                              dataclasses.replace(requests[i].params, n=1)) for i, k in cut]
            self.truncation["continued"] += len(follow)
            for (i, k), more in zip(cut, self.fetch(follow, asked)):
                if more.error is not None:
                    continue  # the reply stays as it was: cut
                first = results[i]
                texts, finishes = list(first.texts), [first.finish(j) for j in range(len(first.texts))]
                texts[k] += more.texts[0]
                finishes[k] = more.finish(0)
                results[i] = dataclasses.replace(first, texts=texts, finish_reasons=finishes,
                                                 completion_tokens=first.completion_tokens + more.completion_tokens)
        return results

    @property
    def enforces_schema(self) -> bool:
        """Whether the backend holds replies to their JSON Schema while decoding (steps that read
        fields ask for JSON then, and fall back on their prefill and parsing otherwise)."""
        return self.backend.enforces_schema

    def reask_invalid(self, requests: list[Request], results: list[Completion], asked: Counter) -> list[Completion]:
        """``results`` with each reply that does not match its request's JSON Schema sent back to
        the model with what is wrong, up to :data:`SCHEMA_REASKS` times (a cut reply is left as
        it is: asking again would cut it again). The step still reads every reply."""
        # Every reply is checked once; after that, only the replies that came back from a re-ask.
        checked = [(i, k) for i, (request, completion) in enumerate(zip(requests, results))
                   if request.params.json_schema and completion.error is None for k in range(len(completion.texts))]
        for _ in range(SCHEMA_REASKS):
            bad = []
            for i, k in checked:
                problem = None if results[i].cut(k) else _schema_problem(results[i].texts[k],
                                                                         requests[i].params.json_schema)
                if problem:
                    bad.append((i, k, problem))
            if not bad:
                break
            checked = []
            follow = []
            for i, k, problem in bad:
                messages, prefill = split_prefill(requests[i].messages)
                follow.append(Request(messages + [
                    {"role": "assistant", "content": (prefill or "") + results[i].texts[k]},
                    {"role": "user", "content": f"That reply is not valid: {problem}. Reply again with only the "
                                                "corrected JSON object."}],
                    dataclasses.replace(requests[i].params, n=1, continuations=0)))
            self.usage.reasks += len(follow)
            for (i, k, _), more in zip(bad, self.fetch(follow, asked)):
                if more.error is not None or not more.texts:
                    checked.append((i, k))  # the reply stays as it was: asked again next time
                    continue
                first = results[i]
                texts, finishes = list(first.texts), [first.finish(j) for j in range(len(first.texts))]
                texts[k], finishes[k] = more.texts[0], more.finish(0)
                fixed = _schema_problem(texts[k], requests[i].params.json_schema) is None
                self.usage.reasks_fixed += fixed
                if not fixed:
                    checked.append((i, k))
                results[i] = dataclasses.replace(first, texts=texts, finish_reasons=finishes,
                                                 completion_tokens=first.completion_tokens + more.completion_tokens)
        return results

    def fetch(self, requests: list[Request], asked: Counter) -> list[Completion]:
        """The completions of ``requests`` as they were first given: cached or asked for."""
        if not requests:
            return []
        model_id = self.backend.model_id
        keys, seeded = [], []
        native_tools = None  # asked of the backend at the first request with tools
        heads: dict[int, str] = {}  # per distinct parameters: the start of the JSON the request's key digests
        for request in requests:
            params = request.params
            head = heads.get(id(params))
            if head is None:
                head = heads[id(params)] = "[" + canonical(params.sampling_key()) + ","
            what = digest(head + canonical(request.messages) + "]")  # fingerprint([sampling key, messages])
            before = asked.get(what, 0)
            asked[what] = before + 1
            seed = seed_of(f"{self.seed}:{what}:{before}")
            keys.append(digest(f"{model_id}:{seed}:{what}"))
            messages = request.messages
            if params.tools:  # the cache key is of the chat as asked; the backend gets what it can read
                if native_tools is None:
                    native_tools = self.backend.takes_tools()
                if not native_tools:
                    messages = _tools_in_prompt(messages, params.tools)
            seeded.append(Request(messages, params.with_seed(seed)))
        journal = self.cache.journal("llm", fingerprint(keys))
        cached = journal.read()
        # A reply cached without its finish reasons (by an older version) cannot tell whether it
        # was cut: ask again.
        results = [Completion.from_json(cached[k]) if "finish_reasons" in cached.get(k, ()) else None
                   for k in keys] if cached else [None] * len(keys)
        missing = [i for i, c in enumerate(results) if c is None]
        # Asked in a round of other requests (a preview's rows)?
        for i, kept in zip(missing, self.cache.get_replies([keys[i] for i in missing])):
            results[i] = Completion.from_json(kept) if kept and "finish_reasons" in kept else None
        todo = [i for i, c in enumerate(results) if c is None]
        self.usage.conversations += len(requests)
        self.usage.cached_conversations += len(requests) - len(todo)
        self._progress(len(requests) - len(todo))
        if not todo:
            return self._noted(results)  # type: ignore[arg-type]

        budget = self.budget
        if budget is not None:
            model = str(getattr(self.backend.config, "model", self.backend.name))
            batched = self.backend.batched
            worst = {i: budget.worst_case(seeded[i], model, batched) for i in todo}
            reserved: dict[int, float] = {}

        def arrived(sent: list[int], ready: list[tuple[int, Completion]]) -> None:
            fresh = [(sent[j], completion) for j, completion in ready if results[sent[j]] is None]
            entries = []
            for i, completion in fresh:
                results[i] = completion
                self.usage.prompt_tokens += completion.prompt_tokens
                self.usage.completion_tokens += completion.completion_tokens
                self.backend.stats.completion_tokens += completion.completion_tokens  # the bar's tok/s
                if completion.error is None:  # a failure is never cached: a re-run asks again
                    entries.append((keys[i], completion.to_json()))
                elif completion.error_reason == "backend_error":
                    self.usage.failures += 1
                    self.usage.last_error = completion.error
                if budget is not None:
                    _, size, n = worst[i]
                    budget.settle(model, reserved.pop(i, 0.0), budget.cost(
                        model, completion.prompt_tokens, completion.completion_tokens, batched), n,
                        completion.prompt_tokens, size)
            journal.extend(entries)
            if self.cache.keep_each_reply:
                for key, value in entries:
                    self.cache.put_reply(key, value)
            journal.flush()
            self._progress(len(fresh))

        def send(sent: list[int]) -> None:
            self.usage.calls += 1
            replies = self.backend.generate([seeded[i] for i in sent], lambda ready: arrived(sent, ready))
            arrived(sent, list(enumerate(replies)))

        try:
            with counting_call() as call:
                if budget is None:
                    send(todo)
                else:
                    # Only as many requests as the budget has room for go at once (all of them, until it
                    # runs low); the rest wait for replies that cost less than reserved.
                    left = todo
                    while left:
                        amounts = budget.reserve(model, [(worst[i][0], worst[i][2]) for i in left])
                        reserved.update(zip(left, amounts))
                        send(left[:len(amounts)])
                        left = left[len(amounts):]
        finally:
            journal.close()
            if budget is not None and reserved:
                # Stopped with requests in flight (an error, Ctrl-C): count them as paid in full, so
                # that other batches waiting on the budget go on, never past it.
                for amount in reserved.values():
                    budget.settle(model, amount, amount)
            self.usage.add({"retries": call.retries, "throttled": call.throttled,
                            "retry_reasons": dict(call.retry_reasons)})
        return self._noted(results)  # type: ignore[arg-type]

    def _noted(self, results: list[Completion]) -> list[Completion]:
        if self.ledger is not None:
            self.ledger.extend((c.prompt_tokens, c.completion_tokens) for c in results if c.error is None)
        return results

    def _progress(self, count: int) -> None:
        if self.on_progress is not None and count:
            self.on_progress(count)


def _tools_in_prompt(messages: list, tools_text: str) -> list:
    from .tool_format import prompt_messages

    return prompt_messages(messages, _schema(tools_text))


@lru_cache(maxsize=64)
def _schema(text: str) -> dict:
    return json.loads(text)


def _schema_problem(reply: str, schema_text: str) -> str | None:
    """Why a reply does not match the JSON Schema (canonical text), or None when it does."""
    try:
        read_reply(reply, _schema(schema_text))
    except ParseError as err:
        return str(err)
    return None


class BackendPool:
    """Backends by their config, built on first use and shared by the steps that use them.

    A copy sent to another process (a Ray worker) starts empty and builds its own.
    """

    def __init__(self, factory: Callable[[Any], Backend]):
        self.factory = factory
        self._open: dict[str, Backend] = {}
        self._lock = threading.Lock()  # batches running side by side ask for the same backend

    def get(self, config) -> Backend:
        key = fingerprint(to_dict(config))
        backend = self._open.get(key)
        if backend is None:
            with self._lock:
                backend = self._open.get(key)
                if backend is None:
                    backend = self._open[key] = self.factory(config)
        return backend

    def close(self) -> None:
        for backend in self._open.values():
            backend.close()
        self._open.clear()

    def __getstate__(self):
        return {"factory": self.factory, "_open": {}}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


@dataclass
class LLMSession:
    """What the batches of one LLM step need to reach its models, wherever they run.

    Executors hand it to the process that runs a batch and ask it for a client there; they
    never look at the backend behind it. ``extras`` are the step's other models (its
    ``extra_llm_configs``: name -> validated config), each reached through a client of its own
    beside the step's (:attr:`LLMClient.others`).
    """

    config: Any
    cache: Cache
    seed: int
    backends: BackendPool
    share: float = 1.0  # this process's share of the server's rate limits (1 / replicas on Ray)
    budget: Any = None  # the run's spending limit (factory.budget.Budget), shared by every step
    ledger: list | None = None  # (prompt, completion tokens) of every reply, cached or not (an estimate's)
    extras: dict[str, Any] = field(default_factory=dict)  # the step's other models: name -> llm config

    @property
    def model_id(self) -> str:
        return self.backends.get(self.config).model_id

    def extra_model_ids(self) -> dict[str, str]:
        """The model id of each of the step's other models (part of its batches' cache keys)."""
        return {name: self.backends.get(config).model_id for name, config in sorted(self.extras.items())}

    @property
    def batched(self) -> bool:
        """The backend answers a whole step at once, late (a Batch API): give it one batch of every row."""
        return self.backends.get(self.config).batched

    def batches_in_flight(self, rows_per_batch: int) -> int:
        """How many batches of the step are worth running side by side (1: one after the other)."""
        return self.backends.get(self.config).parallel_calls(rows_per_batch)

    def live(self) -> dict:
        """What the backend shows while it works: requests sent so far, and its own (throttling, the
        limits learned)."""
        backend = self.backends.get(self.config)
        return {"requests": backend.stats.requests, "completion_tokens": backend.stats.completion_tokens,
                **backend.live()}

    def cost_of(self, usage: dict) -> float:
        """What the tokens of a step's :class:`Usage` (as a dict) cost, at the budget's prices: each
        model's part (``usage["llms"]``) at its own price, the rest at the step's model's."""
        own_prompt, own_completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        cost = 0.0
        for name, part in (usage.get("llms") or {}).items():
            prompt, completion = part.get("prompt_tokens", 0), part.get("completion_tokens", 0)
            own_prompt, own_completion = own_prompt - prompt, own_completion - completion
            cost += self._cost(self.extras[name], prompt, completion)
        return cost + self._cost(self.config, own_prompt, own_completion)

    def _cost(self, config, prompt_tokens: int, completion_tokens: int) -> float:
        backend = self.backends.get(config)
        return self.budget.cost(getattr(config, "model", backend.name), prompt_tokens, completion_tokens,
                                backend.batched)

    @property
    def enforces_schema(self) -> bool:
        return self.backends.get(self.config).enforces_schema

    def describe(self) -> dict:
        return self.backends.get(self.config).describe()

    def describe_extras(self) -> dict[str, dict]:
        """What the manifest records of each of the step's other models, by name."""
        return {name: self.backends.get(config).describe() for name, config in self.extras.items()}

    def client(self, on_progress: Callable[[int], None] | None = None) -> LLMClient:
        client = self._client(self.config, on_progress)
        # The other models' replies do not move the bar: it counts rows, by the step's own replies.
        client.others = {name: self._client(config, None) for name, config in self.extras.items()}
        return client

    def _client(self, config, on_progress) -> LLMClient:
        backend = self.backends.get(config)
        backend.attach(self.cache)
        if self.share != 1.0:
            backend.set_share(self.share)
        return LLMClient(backend, self.cache, self.seed, on_progress, self.budget, self.ledger)
