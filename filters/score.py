"""``score``: keep rows by judge score: a threshold, a top quantile, or the top k, overall or per task."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from factory.config import option
from factory.steps.context import StepContext

from .base import TableFilter


@dataclass
class ScoreConfig:
    min: float | None = option(None, help="Drop rows scoring below this (reason `below_min`).")
    max: float | None = option(None, help="Drop rows scoring above this (reason `above_max`).")
    top_quantile: float | None = option(None, help="Keep the best-scored share of rows, e.g. 0.25 for the top "
                                                   "quarter (reason `below_quantile`); per task with `group_by`.",
                                        min=0.0, max=1.0)
    top_k: int | None = option(None, help="Keep the k best-scored rows (per task with `group_by`); ties go to "
                                          "the earlier row (reason `not_top_k`).", min=1)
    group_by: str | None = option(None, help="Apply `top_quantile` / `top_k` within groups of this column, "
                                             "e.g. `instruction` for best-of-n per task.")
    column: str = option("score", help="The score column (from a judge step).")

    def validate(self):
        if self.min is None and self.max is None and self.top_quantile is None and self.top_k is None:
            return [("needs `min`, `max`, `top_quantile` or `top_k`", None, "add e.g. `min: 7`")]
        if self.min is not None and self.max is not None and self.min > self.max:
            return [(f"min {self.min} is above max {self.max}", "min", "swap them")]
        if self.top_quantile == 0:
            return [("top_quantile 0 keeps nothing", "top_quantile", "use a share above 0, e.g. 0.25")]
        return []


class ScoreFilter(TableFilter):
    """Keeps rows by their judge score -- the verifier-filtering of "Mind the Gap".

    ``min``/``max`` are thresholds; ``top_quantile`` keeps rows at or above the
    (1 - q) quantile of their group's scores; ``top_k`` keeps the k best of each group.
    Rows without a numeric score are dropped as ``missing_score``.

    Requires: ``score`` (or ``column``), and ``group_by`` when set.

    Example:
        - score: {min: 7}
        - score: {top_k: 1, group_by: instruction}   # best-of-n per task
    """

    name = "score"
    Config = ScoreConfig

    def requires(self):
        return [self.config.column] + ([self.config.group_by] if self.config.group_by else [])

    def group_key(self):
        # Per-task quantiles and top-k need only the task's rows; a table-wide quantile needs all.
        c = self.config
        if c.group_by:
            return c.group_by
        return None

    def keep(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        c = self.config
        value = pl.col(c.column).cast(pl.Float64, strict=False)
        work = table.with_row_index("_position").with_columns(value.alias("_score"))
        missing = pl.col("_score").is_null() | pl.col("_score").is_nan()
        scored = pl.col("_score").filter(~missing)
        over = (lambda e: e.over(c.group_by)) if c.group_by else (lambda e: e)
        reason = pl.when(missing).then(pl.lit("missing_score"))
        if c.min is not None:
            reason = reason.when(pl.col("_score") < c.min).then(pl.lit("below_min"))
        if c.max is not None:
            reason = reason.when(pl.col("_score") > c.max).then(pl.lit("above_max"))
        if c.top_quantile is not None:
            cut = over(scored.quantile(1 - c.top_quantile, interpolation="higher"))
            reason = reason.when(pl.col("_score") < cut).then(pl.lit("below_quantile"))
        if c.top_k is not None:
            # Rank by score (high first), ties by position: a deterministic best-of-k.
            key = pl.when(missing).then(float("inf")).otherwise(-pl.col("_score"))
            order = pl.struct(key, pl.col("_position")).rank("ordinal")
            reason = reason.when(over(order) > c.top_k).then(pl.lit("not_top_k"))
        return work.select(reason.otherwise(None).alias("reason"))
