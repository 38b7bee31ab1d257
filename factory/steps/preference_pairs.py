"""``preference_pairs``: chosen/rejected pairs for DPO from several responses per task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import polars as pl

from ..config import option
from ..text import has_text
from .drops import DROP, dropped, rows_to_frame
from .llm_step import LLMStep, TaskStepConfig
from .pairwise import compare, judged_row

PAIR_COLUMNS = ("prompt", "chosen", "rejected", "chosen_score", "rejected_score")


@dataclass
class PreferencePairsConfig(TaskStepConfig):
    by: Literal["score", "pairwise"] = option(
        "score", help="`score`: chosen = the task's best-scored response, rejected = its worst; `pairwise`: "
                      "a round robin of LLM comparisons (both orders) among the task's responses, most wins "
                      "chosen, fewest rejected.")
    column: str = option("instruction", help="The task column; responses are grouped by it.")
    response_column: str = option("response", help="The candidate responses.")
    score_column: str = option("score", help="The score to rank by (`by: score`).")
    min_margin: float = option(1.0, help="Smallest gap between chosen and rejected (score points, or wins); "
                                         "smaller gaps drop the task as `small_margin`.", min=0.0)
    max_candidates: int = option(4, help="Most distinct responses per task in the round robin (`by: pairwise`).",
                                 min=2)
    reasoning: bool = option(True, help="Pairwise judge reasons before its verdict (`by: pairwise`).")
    max_tokens: int = option(192, help="Most tokens per pairwise judgement.", min=1)


class PreferencePairs(LLMStep):
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
    reads_fields = True  # its pairwise judgements ask for JSON where the backend enforces it
    Config = PreferencePairsConfig
    templates = {"template": "pairwise"}

    def requires(self):
        c = self.config
        return [c.column, c.response_column] + ([c.score_column] if c.by == "score" else [])

    def produces(self):
        return list(PAIR_COLUMNS)

    def output_columns(self, columns):
        c = self.config
        kept = [col for col in (c.column, c.input_column) if col in columns]
        return kept + self.produces()

    def exchange(self, rows, ctx):
        c = self.config
        tasks, out = [], []
        for group in _groups(rows, c.column):
            candidates = _distinct(group, c.response_column)
            if c.by == "score":
                candidates = [r for r in candidates if isinstance(r.get(c.score_column), (int, float))]
            if len(candidates) < 2:
                out += [dropped(r, "single_response") for r in group]
            else:
                tasks.append((group, candidates))
        failures: dict[int, dict] = {}
        if c.by == "score":
            scores = [[float(r[c.score_column]) for r in candidates] for _, candidates in tasks]
        else:
            scores, failures = yield from round_robins(self, [candidates[:c.max_candidates] for _, candidates in tasks])
        for t, ((group, candidates), task_scores) in enumerate(zip(tasks, scores)):
            out += [{**r, **failures[t]} for r in group] if t in failures else \
                self.pair_or_drop(group, candidates, task_scores)
        return out

    def pair_or_drop(self, group: list[dict], candidates: list[dict], scores: list[float]) -> list[dict]:
        """The task's pair (best and worst candidate), or its rows dropped with the reason."""
        pairwise = self.config.by == "pairwise"
        best = max(range(len(scores)), key=lambda k: (scores[k], -k))  # ties: the first
        # Ties: the first lowest score, or the last of the fewest wins.
        worst = min(range(len(scores)), key=lambda k: (scores[k], -k) if pairwise else scores[k])
        margin = scores[best] - scores[worst]
        if margin == 0 and pairwise:
            return [dropped(r, "tie") for r in group]
        if margin < self.config.min_margin or margin == 0:
            return [dropped(r, "small_margin") for r in group]
        return [pair_row(self.config, candidates[best], candidates[worst], scores[best], scores[worst])]

    def frame(self, rows, data):
        c = self.config
        schema = {c.column: pl.String, **{k: pl.String for k in PAIR_COLUMNS[:3]}, "chosen_score": pl.Float64,
                  "rejected_score": pl.Float64, DROP: pl.String}
        pairs = rows_to_frame([r for r in rows if r.get(DROP) is None], schema=schema)
        drops = [r for r in rows if r.get(DROP) is not None]
        return pl.concat([pairs, pl.from_dicts(drops, infer_schema_length=None, strict=False)],
                         how="diagonal_relaxed") if drops else pairs


def round_robins(step: LLMStep, tasks: list[list[dict]]):
    """Wins of each candidate of each task in a round robin of pairwise judgements by ``step``
    (a tie is half a win each), and for the tasks where a judgement failed, the drop it causes."""
    c = step.config
    matches, owners = [], []
    for t, candidates in enumerate(tasks):
        task_input = candidates[0].get(c.input_column)
        for i in range(len(candidates)):
            for j in range(i + 1, len(candidates)):
                matches.append((candidates[0][c.column], task_input if isinstance(task_input, str) else "",
                                candidates[i][c.response_column], candidates[j][c.response_column]))
                owners.append((t, i, j))
    results = yield from compare(step, matches, both_orders=True)
    wins = [[0.0] * len(candidates) for candidates in tasks]
    failures: dict[int, dict] = {}
    for (t, i, j), (verdict, replies, error) in zip(owners, results):
        if verdict is None:
            failures.setdefault(t, judged_row({}, None, replies, error))
        else:
            wins[t][i] += {"a": 1.0, "b": 0.0, "tie": 0.5}[verdict]
            wins[t][j] += {"a": 0.0, "b": 1.0, "tie": 0.5}[verdict]
    return wins, failures


def pair_row(c: PreferencePairsConfig, chosen: dict, rejected: dict, chosen_score: float,
             rejected_score: float) -> dict:
    """The DPO row of a task: its prompt (task and input), chosen and rejected answers, scores."""
    task_input = chosen.get(c.input_column)
    prompt = chosen[c.column] + (f"\n\n{task_input}" if has_text(task_input) else "")
    row = {c.column: chosen[c.column], "prompt": prompt, "chosen": chosen[c.response_column],
           "rejected": rejected[c.response_column], "chosen_score": chosen_score,
           "rejected_score": rejected_score}
    if isinstance(task_input, str):
        row[c.input_column] = task_input
    return row


def _groups(rows: list[dict], column: str) -> list[list[dict]]:
    """Rows grouped by ``column``, groups in order of first appearance."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(row.get(column), []).append(row)
    return list(groups.values())


def _distinct(rows: list[dict], column: str) -> list[dict]:
    """Rows with a distinct, non-empty response, first occurrence first."""
    seen, out = set(), []
    for row in rows:
        text = row.get(column)
        if has_text(text) and text.strip() not in seen:
            seen.add(text.strip())
            out.append(row)
    return out
