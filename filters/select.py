"""``select``: keep the samples one verifier accepts -- the choice of training data in a self-evolution loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import polars as pl

from factory.config import option
from factory.steps.context import StepContext

from .base import TableFilter
from .consistency import Consistency, ConsistencyConfig

VERIFIERS = ("programmatic", "math", "code", "majority", "judge", "reward_model")
REFERENCE_CHECKS = ("programmatic", "math", "code")  # verifiers that read a `verify` step's `correct` column


@dataclass
class SelectConfig:
    verifier: Literal["programmatic", "math", "code", "majority", "judge", "reward_model"] = option(
        help="Who accepts a sample: `programmatic` (the `correct` column of a `verify` step: the environment's "
             "reward, as in STaR / ReST-EM; it uses reference answers; `math` and `code` name it after a "
             "`verify: {method: math}` or `{method: code}` step, which the recipe must have), `majority` (the sample gives its task's "
             "most common answer, reaching `min_agreement`: no labels), `judge` (the model's own judge scored "
             "it at least `min_score`: no labels) or `reward_model` (the best `per_task` samples by the reward a "
             "`reward_model` step gave, at least `min_reward` when set: best-of-n).")
    per_task: int | None = option(None, help="Keep at most this many accepted samples per task: distinct "
                                             "responses, the judge's (or reward model's) best first, else the "
                                             "shortest (the rest: reason `over_per_task`). Unset: all, but 1 for "
                                             "`reward_model` (best-of-n).", min=1)
    column: str = option("instruction", help="The task column; samples are grouped by it.")
    answer_column: str = option("prediction", help="`majority`: the extracted answer of each sample.")
    min_agreement: float = option(0.5, help="`majority`: the share of a task's samples its most common answer "
                                            "needs.", min=0.0, max=1.0)
    correct_column: str = option("correct", help="`programmatic`: the column a `verify` step fills.")
    score_column: str = option("score", help="`judge`: the column a `judge` step fills.")
    min_score: float = option(7.0, help="`judge`: the lowest accepted score (on the judge's scale, 1-10 by "
                                        "default).")
    reward_column: str = option("reward", help="`reward_model`: the column a `reward_model` step fills.")
    min_reward: float | None = option(None, help="`reward_model`: the lowest accepted reward (in the reward "
                                                 "model's units; reason `below_min_reward`). Unset: no floor.")

    @property
    def samples_per_task(self) -> int | None:
        """``per_task``, or 1 for the reward model's best-of-n when it is unset."""
        return self.per_task or (1 if self.verifier == "reward_model" else None)


class Select(TableFilter):
    """Keeps the samples that one verifier accepts, at most ``per_task`` per task.

    The three verifiers of "Mind the Gap" (Song et al.), so that one recipe can pick its
    training data by any of them (``factory evolve`` compares them with ``evolve.compare``):
    ``programmatic`` keeps ``correct`` samples (reason ``not_correct``), ``majority`` keeps
    the samples that agree with their task's majority answer (reasons as ``consistency``),
    ``judge`` keeps samples scored ``min_score`` or more (``below_min_score``;
    ``missing_score`` without one), ``reward_model`` keeps each task's best-rewarded samples
    (``per_task``, 1 by default), at ``min_reward`` or more when set (``below_min_reward``;
    ``missing_reward`` without one). Within a task, repeated responses count once
    (``duplicate``), and accepted samples past ``per_task`` (the judge's or reward model's best,
    else the shortest, kept) go as ``over_per_task``.

    Requires: the task column, and ``correct``, ``prediction``, ``score`` or ``reward`` by verifier.

    Example:
        - solve: {samples: 8, temperature: 0.8, answer_format: number}
        - verify: {reference: answer}
        - select: {verifier: programmatic, per_task: 2}
    """

    name = "select"
    Config = SelectConfig

    def requires(self):
        c = self.config
        needed = {"programmatic": c.correct_column, "math": c.correct_column, "code": c.correct_column,
                  "majority": c.answer_column, "judge": c.score_column, "reward_model": c.reward_column}
        return [c.column, needed[c.verifier]] + (["response"] if c.samples_per_task else [])

    def group_key(self):
        return self.config.column  # every verdict needs only the task's samples

    def keep(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        c = self.config
        if c.verifier == "majority":
            reasons = Consistency(ConsistencyConfig(column=c.column, answer_column=c.answer_column,
                                                    min_agreement=c.min_agreement)).keep(table, ctx)["reason"]
        else:
            reasons = table.select(verdict(c).otherwise(None).alias("reason"))["reason"]
        work = table.select(c.column).with_columns(reasons.cast(pl.String).alias("reason"))
        per_task = c.samples_per_task
        if per_task:
            work = work.with_row_index("_position").with_columns(table["response"].cast(pl.String).alias("_text"))
            accepted = pl.col("reason").is_null()
            repeat = accepted & (pl.col("_position").min().over(c.column, "_text", accepted) != pl.col("_position"))
            work = work.with_columns(pl.when(repeat).then(pl.lit("duplicate")).otherwise("reason").alias("reason"))
            # The best scored first; then the shortest: of accepted answers, the plainest teach the format best.
            order = [pl.col("_text").str.len_chars(), "_position"]
            ranked = {"judge": c.score_column, "reward_model": c.reward_column}.get(c.verifier)
            if ranked:
                work = work.with_columns((-table[ranked].cast(pl.Float64, strict=False)).alias("_rank_score"))
                order.insert(0, "_rank_score")
            rank = pl.struct(*order).rank("ordinal").over(c.column, pl.col("reason").is_null())
            work = work.with_columns(pl.when(pl.col("reason").is_null() & (rank > per_task))
                                     .then(pl.lit("over_per_task")).otherwise("reason").alias("reason"))
        kept = work.filter(pl.col("reason").is_null())
        ctx.report.update({"verifier": c.verifier, "tasks": table[c.column].n_unique(),
                           "tasks_kept": kept[c.column].n_unique()})
        return work.select("reason")


def verdict(c: SelectConfig) -> pl.Expr:
    """The reason a sample goes, by a reference check, the `judge` or the `reward_model` verifier (a `when`
    chain; no reason: accepted)."""
    if c.verifier in REFERENCE_CHECKS:
        return pl.when(~pl.col(c.correct_column).cast(pl.Boolean, strict=False).fill_null(False)) \
            .then(pl.lit("not_correct"))
    if c.verifier == "judge":
        score = pl.col(c.score_column).cast(pl.Float64, strict=False)
        return (pl.when(score.is_null() | score.is_nan()).then(pl.lit("missing_score"))
                .when(score < c.min_score).then(pl.lit("below_min_score")))
    reward = pl.col(c.reward_column).cast(pl.Float64, strict=False)
    rule = pl.when(reward.is_null() | reward.is_nan()).then(pl.lit("missing_reward"))
    return rule if c.min_reward is None else rule.when(reward < c.min_reward).then(pl.lit("below_min_reward"))
