"""Pairwise judging (A vs B, asked in both orders) and preference pairs for DPO."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

import polars as pl

from ..config import option
from ..errors import ParseError
from .base import DROP, DROP_DETAIL, RAW_REPLY, TEMPLATE_DIR, GlobalStep, InvalidRow, LLMStep, LLMStepConfig, rows_to_frame

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


@dataclass
class PairwiseConfig(LLMStepConfig):
    column: str = option("instruction", help="The task text.")
    input_column: str = option("input", help="Optional task input shown to the judge when present.")
    a_column: str = option("response", help="The first response.")
    b_column: str = option("response_b", help="The second response.")
    output_column: str = option("winner", help="Where the verdict goes: `a`, `b` or `tie`.")
    both_orders: bool = option(True, help="Ask twice, swapping A and B, to cancel position bias.")
    reasoning: bool = option(True, help="Ask for a short comparison before the verdict.")
    max_tokens: int = option(192, help="Most tokens per judgement.", min=1)


class PairwiseComparer:
    """What pairwise judging needs from an LLM step: prompts both ways, and the verdicts."""

    def pair_messages(self, task: str, task_input: str, first: str, second: str):
        prompt = self.render({}, task=task, task_input=task_input, response_a=first, response_b=second)
        return self.messages(prompt, prefill=None if self.config.reasoning else "Winner:")

    def pairwise_params(self):
        params = self.generation_params()
        if self.config.reasoning:
            return params
        return dataclasses.replace(params, n=1, stop=params.stop + ("\n",), max_tokens=min(params.max_tokens, 8))

    def compare(self, pairs: list[tuple[str, str, str, str]], both_orders: bool = True) -> list[tuple]:
        """Judges ``(task, input, a, b)`` pairs: ``(verdict or None, replies, error or None)`` each."""
        conversations = []
        for task, task_input, a, b in pairs:
            conversations.append(self.pair_messages(task, task_input, a, b))
            if both_orders:
                conversations.append(self.pair_messages(task, task_input, b, a))
        completions = self.llm.chat(conversations, self.pairwise_params())
        per_pair = 2 if both_orders else 1
        prefix = "" if self.config.reasoning else "Winner:"
        results = []
        for i in range(len(pairs)):
            group = completions[i * per_pair:(i + 1) * per_pair]
            failed = next((c for c in group if c.error is not None), None)
            if failed is not None:
                results.append((None, [], failed.error))
                continue
            replies = [prefix + c.texts[0] for c in group]
            try:
                verdicts = [parse_winner(r) for r in replies]
            except ParseError as err:
                results.append((None, replies, str(err)))
                continue
            results.append((combine_orders(verdicts[0], verdicts[1] if both_orders else None), replies, None))
        return results

    def template_source(self) -> str:
        if self.config.template is None:
            return (TEMPLATE_DIR / "pairwise.j2").read_text(encoding="utf-8")
        return LLMStep.template_source(self)


class Pairwise(PairwiseComparer, LLMStep):
    """Compares two responses to each task, in both orders to cancel position bias.

    Requires: ``instruction``, ``response`` and ``response_b``.
    Produces: ``winner`` (``a``, ``b`` or ``tie``) and ``pairwise_judgements`` (the replies).
    A reply without a winner drops the row as ``parse_error``.

    Example:
        - pairwise: {a_column: response, b_column: previous_response}
    """

    name = "pairwise"
    Config = PairwiseConfig

    def requires(self):
        c = self.config
        return [c.column, c.a_column, c.b_column]

    def produces(self):
        return [self.config.output_column, "pairwise_judgements"]

    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        c = self.config
        out, todo = [], []
        for row in batch.to_dicts():
            try:
                task_input = row.get(c.input_column)
                todo.append((row, (self.text(row, c.column), task_input if isinstance(task_input, str) else "",
                                   self.text(row, c.a_column), self.text(row, c.b_column))))
            except InvalidRow as err:
                out.append({**row, DROP: "invalid_input", DROP_DETAIL: str(err)})
        results = self.compare([pair for _, pair in todo], c.both_orders) if todo else []
        for (row, _), (verdict, replies, error) in zip(todo, results):
            if verdict is None:
                reason = "parse_error" if replies else "backend_error"
                out.append({**row, DROP: reason, RAW_REPLY: "\n---\n".join(replies), DROP_DETAIL: error})
            else:
                out.append({**row, c.output_column: verdict, "pairwise_judgements": replies})
        return rows_to_frame(out, like=batch)


@dataclass
class PreferencePairsConfig(LLMStepConfig):
    by: Literal["score", "pairwise"] = option(
        "score", help="`score`: chosen = the task's best-scored response, rejected = its worst; `pairwise`: "
                      "a round robin of LLM comparisons (both orders) among the task's responses, most wins "
                      "chosen, fewest rejected.")
    column: str = option("instruction", help="The task column; responses are grouped by it.")
    input_column: str = option("input", help="Optional task input, added to the prompt when present.")
    response_column: str = option("response", help="The candidate responses.")
    score_column: str = option("score", help="The score to rank by (`by: score`).")
    min_margin: float = option(1.0, help="Smallest gap between chosen and rejected (score points, or wins); "
                                         "smaller gaps drop the task as `small_margin`.", min=0.0)
    max_candidates: int = option(4, help="Most distinct responses per task in the round robin (`by: pairwise`).",
                                 min=2)
    reasoning: bool = option(True, help="Pairwise judge reasons before its verdict (`by: pairwise`).")
    max_tokens: int = option(192, help="Most tokens per pairwise judgement.", min=1)


class PreferencePairs(PairwiseComparer, GlobalStep, LLMStep):
    """Turns several responses per task into ``chosen``/``rejected`` pairs for DPO.

    Requires: ``instruction``, ``response`` and, with ``by: score``, ``score``.
    Produces: one row per task with ``prompt``, ``chosen``, ``rejected``, ``chosen_score``,
    ``rejected_score`` (scores, or pairwise wins). Tasks with a single distinct response,
    too small a margin, or a tie are dropped (``single_response``, ``small_margin``,
    ``tie``) with their samples. Use ``output: {format: raw}``.

    Example:
        - preference_pairs: {by: score, min_margin: 2}
    """

    name = "preference_pairs"
    kind = "global"
    Config = PreferencePairsConfig

    def requires(self):
        c = self.config
        return [c.column, c.response_column] + ([c.score_column] if c.by == "score" else [])

    def produces(self):
        return ["prompt", "chosen", "rejected", "chosen_score", "rejected_score"]

    def output_columns(self, columns):
        c = self.config
        kept = [col for col in (c.column, c.input_column) if col in columns]
        return kept + self.produces()

    def process(self, table: pl.DataFrame) -> pl.DataFrame:
        c = self.config
        if table.height == 0:
            return pl.DataFrame(schema={c.column: pl.String, **{k: pl.String for k in ("prompt", "chosen", "rejected")},
                                        "chosen_score": pl.Float64, "rejected_score": pl.Float64, DROP: pl.String})
        pairs, dropped, tasks = [], [], []
        for part in table.partition_by(c.column, maintain_order=True):
            rows = part.to_dicts()
            candidates = _distinct(rows, c.response_column)
            if len(candidates) < 2:
                dropped += [{**r, DROP: "single_response"} for r in rows]
                continue
            tasks.append((rows[0][c.column], rows, candidates))
        if c.by == "score":
            for task, rows, candidates in tasks:
                scored = [r for r in candidates if isinstance(r.get(c.score_column), (int, float))]
                if len(scored) < 2:
                    dropped += [{**r, DROP: "single_response"} for r in rows]
                    continue
                best = max(scored, key=lambda r: r[c.score_column])
                worst = min(scored, key=lambda r: r[c.score_column])
                margin = best[c.score_column] - worst[c.score_column]
                if margin < c.min_margin or margin == 0:
                    dropped += [{**r, DROP: "small_margin"} for r in rows]
                    continue
                pairs.append(self._pair(best, worst, float(best[c.score_column]), float(worst[c.score_column])))
        else:
            pairs, more_dropped = self._by_pairwise(tasks)
            dropped += more_dropped
        parts = [pl.from_dicts(pairs, infer_schema_length=None)] if pairs else []
        if dropped:
            parts.append(pl.from_dicts(dropped, infer_schema_length=None, strict=False))
        out = pl.concat(parts, how="diagonal_relaxed")
        return out if DROP in out.columns else out.with_columns(pl.lit(None, dtype=pl.String).alias(DROP))

    def _pair(self, chosen: dict, rejected: dict, chosen_score: float, rejected_score: float) -> dict:
        c = self.config
        task_input = chosen.get(c.input_column)
        prompt = chosen[c.column] + (f"\n\n{task_input}" if isinstance(task_input, str) and task_input.strip() else "")
        row = {c.column: chosen[c.column], "prompt": prompt, "chosen": chosen[c.response_column],
               "rejected": rejected[c.response_column], "chosen_score": chosen_score,
               "rejected_score": rejected_score}
        if isinstance(task_input, str):
            row[c.input_column] = task_input
        return row

    def _by_pairwise(self, tasks):
        c = self.config
        matches, owners = [], []
        for t, (task, rows, candidates) in enumerate(tasks):
            candidates = candidates[:c.max_candidates]
            task_input = candidates[0].get(c.input_column)
            task_input = task_input if isinstance(task_input, str) else ""
            for i in range(len(candidates)):
                for j in range(i + 1, len(candidates)):
                    matches.append((task, task_input, candidates[i][c.response_column],
                                    candidates[j][c.response_column]))
                    owners.append((t, i, j))
        results = self.compare(matches, both_orders=True) if matches else []
        wins: dict[int, list[float]] = {t: [0.0] * min(len(cands), c.max_candidates)
                                        for t, (_, _, cands) in enumerate(tasks)}
        failed: dict[int, tuple[str, list[str], str]] = {}
        for (t, i, j), (verdict, replies, error) in zip(owners, results):
            if verdict is None:
                failed.setdefault(t, ("parse_error" if replies else "backend_error", replies, error))
            elif verdict == "a":
                wins[t][i] += 1
            elif verdict == "b":
                wins[t][j] += 1
            else:
                wins[t][i] += 0.5
                wins[t][j] += 0.5
        pairs, dropped = [], []
        for t, (task, rows, candidates) in enumerate(tasks):
            if t in failed:
                reason, replies, error = failed[t]
                dropped += [{**r, DROP: reason, RAW_REPLY: "\n---\n".join(replies), DROP_DETAIL: error} for r in rows]
                continue
            score = wins[t]
            best = max(range(len(score)), key=lambda k: (score[k], -k))
            worst = min(range(len(score)), key=lambda k: (score[k], -k))
            margin = score[best] - score[worst]
            if margin == 0:
                dropped += [{**r, DROP: "tie"} for r in rows]
            elif margin < c.min_margin:
                dropped += [{**r, DROP: "small_margin"} for r in rows]
            else:
                pairs.append(self._pair(candidates[best], candidates[worst], score[best], score[worst]))
        return pairs, dropped


def _distinct(rows: list[dict], column: str) -> list[dict]:
    """Rows with a distinct, non-empty response, first occurrence first."""
    seen, out = set(), []
    for row in rows:
        text = row.get(column)
        if isinstance(text, str) and text.strip() and text.strip() not in seen:
            seen.add(text.strip())
            out.append(row)
    return out
