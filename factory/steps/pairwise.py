"""``pairwise``: LLM-as-a-judge between two responses, asked in both orders to cancel position bias.

``compare`` is the judging itself; ``preference_pairs`` uses it for its round robins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import option
from ..errors import ParseError
from ..llm.base import Request
from ..llm.schema import read_reply
from .drops import InvalidRow, dropped
from .json_replies import json_params, reasoning_first, verdict_only
from .llm_step import LLMStep, TaskStepConfig
from .truncation import unparsed

_WINNER = re.compile(r"winner\s*(?:is)?\s*[:=]?\s*[*_\"']*\s*(?:response\s+)?(a|b|tie|neither|both|equal)\b", re.I)
_BETTER = re.compile(r"\bresponse\s+(a|b)\s+is\s+(?:better|stronger|more)", re.I)


def parse_winner(reply: str) -> str:
    """``"A"``, ``"B"`` or ``"tie"`` from a pairwise judgement (the last explicit winner wins).

    Raises:
        ParseError: no winner in the reply.
    """
    matches = _WINNER.findall(reply) or _BETTER.findall(reply)
    if not matches:
        raise ParseError("no winner found (expected 'Winner: A', 'Winner: B' or 'Winner: tie')")
    winner = matches[-1].lower()
    return winner.upper() if winner in ("a", "b") else "tie"


def combine_orders(first: str, second: str | None) -> str:
    """The verdict for (a, b) from the judgement of (a, b) and of (b, a).

    Each order votes; opposite votes cancel, so a judge that always prefers the first
    position yields a tie instead of a false win.
    """
    vote = {"A": 1, "B": -1, "tie": 0}[first]
    if second is not None:
        vote -= {"A": 1, "B": -1, "tie": 0}[second]
    return "a" if vote > 0 else "b" if vote < 0 else "tie"


def winner_schema(reasoning: bool, max_tokens: int) -> dict:
    """The JSON reply of a pairwise judgement where the backend enforces it: the comparison
    (with ``reasoning``), then the winner."""
    return reasoning_first("one or two sentences that compare the responses" if reasoning else None,
                           {"winner": {"enum": ["A", "B", "tie"]}}, max_tokens)


def read_winner(reply: str, schema: dict | None) -> str:
    """``"A"``, ``"B"`` or ``"tie"`` from a judgement: its JSON with ``schema``, else its text.

    Raises:
        ParseError: no winner (``schema_error`` for JSON that does not match).
    """
    return parse_winner(reply) if schema is None else read_reply(reply, schema)["winner"]


def compare(step: LLMStep, pairs: list[tuple[str, str, str, str]], both_orders: bool = True):
    """Judges ``(task, input, a, b)`` pairs with ``step``'s prompt (its config has ``reasoning``):
    an exchange that returns ``(verdict or None, replies, (reason, detail) or None)`` per pair.

    A step that asks for JSON (``asks_json``: its backend enforces schemas) asks for ``{"reasoning", "winner"}``
    JSON; else the verdict alone is started with "Winner:" and every reply is read as text."""
    reasoning = step.config.reasoning
    schema = winner_schema(reasoning, step.config.max_tokens) if step.asks_json else None
    prefill = None if reasoning or schema is not None else "Winner:"
    params = json_params(step.generation_params(), schema, verdict=not reasoning) if schema is not None \
        else step.generation_params() if reasoning else verdict_only(step.generation_params())
    requests = []
    for task, task_input, a, b in pairs:
        orders = [(a, b), (b, a)] if both_orders else [(a, b)]
        prompts = [step.render({}, task=task, task_input=task_input, response_a=first, response_b=second)
                   for first, second in orders]
        requests += [Request(step.conversation(prompt, schema, prefill), params) for prompt in prompts]
    completions = yield requests
    per_pair = 2 if both_orders else 1
    results = []
    for i in range(len(pairs)):
        group = completions[i * per_pair:(i + 1) * per_pair]
        failed = next((c for c in group if c.error is not None), None)
        if failed is not None:
            results.append((None, [], (failed.error_reason, failed.error)))
            continue
        replies = [(prefill or "") + c.texts[0] for c in group]
        try:
            verdicts = [read_winner(r, schema) for r in replies]
        except ParseError as err:
            results.append((None, replies, unparsed(step, err, any(c.cut() for c in group), params.max_tokens)))
            continue
        results.append((combine_orders(verdicts[0], verdicts[1] if both_orders else None), replies, None))
    return results


def judged_row(row: dict, verdict: str | None, replies: list[str], error: tuple[str, str] | None,
               **columns) -> dict:
    """A compared row: ``columns`` added, or dropped with ``error``'s reason and detail when
    the comparison failed (the judge answered without a winner, was cut, or did not answer)."""
    if verdict is None:
        reason, detail = error or ("parse_error", "no verdict")
        return dropped(row, reason, detail, "\n---\n".join(replies))
    return {**row, **columns}


@dataclass
class PairwiseConfig(TaskStepConfig):
    a_column: str = option("response", help="The first response.")
    b_column: str = option("response_b", help="The second response.")
    output_column: str = option("winner", help="Where the verdict goes: `a`, `b` or `tie`.")
    both_orders: bool = option(True, help="Ask twice, swapping A and B, to cancel position bias.")
    reasoning: bool = option(True, help="Ask for a short comparison before the verdict.")
    max_tokens: int = option(192, help="Most tokens per judgement.", min=1)


class Pairwise(LLMStep):
    """Compares two responses to each task, in both orders to cancel position bias.

    Where the backend enforces JSON Schemas the judge replies ``{"reasoning": ..., "winner": "A" |
    "B" | "tie"}`` (no reasoning with ``reasoning: false``); elsewhere it writes "Winner: A".

    Requires: ``instruction``, ``response`` and ``response_b``.
    Produces: ``winner`` (``a``, ``b`` or ``tie``) and ``pairwise_judgements`` (the replies).
    A reply without a winner drops the row as ``parse_error`` (``schema_error`` for a JSON reply).

    Example:
        - pairwise: {a_column: response, b_column: previous_response}
    """

    name = "pairwise"
    reads_fields = True
    Config = PairwiseConfig
    templates = {"template": "pairwise"}

    def requires(self):
        c = self.config
        return [c.column, c.a_column, c.b_column]

    def produces(self):
        return [self.config.output_column, "pairwise_judgements"]

    def exchange(self, rows, ctx):
        c = self.config
        out, todo = [], []
        for row in rows:
            try:
                todo.append((row, (*self.task_variables(row).values(), self.text(row, c.a_column),
                                   self.text(row, c.b_column))))
            except InvalidRow as err:
                out.append(dropped(row, "invalid_input", str(err)))
        results = yield from compare(self, [pair for _, pair in todo], c.both_orders)
        return out + [judged_row(row, verdict, replies, error, **{c.output_column: verdict,
                                                                  "pairwise_judgements": replies})
                      for (row, _), (verdict, replies, error) in zip(todo, results)]
