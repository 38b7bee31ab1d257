"""``score``: keep rows whose judge score clears a threshold."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from factory.config import option
from factory.steps.base import DROP, Filter


@dataclass
class ScoreConfig:
    min: float | None = option(None, help="Drop rows scoring below this (reason `below_min`).")
    max: float | None = option(None, help="Drop rows scoring above this (reason `above_max`).")
    column: str = option("score", help="The score column (from a judge step).")

    def validate(self):
        if self.min is None and self.max is None:
            return [("needs `min` or `max`", None, "add e.g. `min: 7`")]
        if self.min is not None and self.max is not None and self.min > self.max:
            return [(f"min {self.min} is above max {self.max}", "min", "swap them")]
        return []


class ScoreFilter(Filter):
    """Drops rows whose score is below ``min`` or above ``max``.

    Requires: ``score`` (or ``column``). Rows without a numeric score are dropped as
    ``missing_score``.

    Example:
        - score: {min: 7}
    """

    name = "score"
    Config = ScoreConfig

    def requires(self):
        return [self.config.column]

    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        c = self.config
        value = pl.col(c.column).cast(pl.Float64, strict=False)
        reason = pl.when(value.is_null() | value.is_nan()).then(pl.lit("missing_score"))
        if c.min is not None:
            reason = reason.when(value < c.min).then(pl.lit("below_min"))
        if c.max is not None:
            reason = reason.when(value > c.max).then(pl.lit("above_max"))
        return batch.with_columns(reason.otherwise(pl.lit(None, dtype=pl.String)).alias(DROP))
