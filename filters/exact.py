"""``exact``: drop exact duplicates after normalisation."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from factory.config import option
from factory.steps.context import StepContext

from .base import TableFilter


def normalized(column: str, lowercase: bool, punctuation: bool) -> pl.Expr:
    text = pl.col(column).cast(pl.String).fill_null("")
    if lowercase:
        text = text.str.to_lowercase()
    if punctuation:
        text = text.str.replace_all(r"[^\p{L}\p{N}\s]", "")
    return text.str.replace_all(r"\s+", " ").str.strip_chars()


@dataclass
class ExactConfig:
    columns: list[str] = option(default_factory=lambda: ["instruction"],
                                help="Rows are duplicates when all these columns match after normalisation "
                                     "(`column: x` for one column).")
    lowercase: bool = option(True, help="Ignore case.")
    ignore_punctuation: bool = option(False, help="Ignore punctuation.")


class ExactDedup(TableFilter):
    """Keeps the first of each group of rows whose columns match after normalisation.

    Whitespace is always collapsed; case and punctuation are ignored as configured.

    Requires: the ``columns`` (default ``instruction``).
    Drops the later copies as ``duplicate``; in ``rejected/`` they carry ``duplicate_of``,
    the kept row's text (first column).

    Example:
        - exact: {columns: [instruction, response]}
        - exact: {column: response}
    """

    name = "exact"
    Config = ExactConfig

    def requires(self):
        return list(self.config.columns)

    def keep(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        c = self.config
        keys = [normalized(col, c.lowercase, c.ignore_punctuation).alias(f"_key{i}") for i, col in enumerate(c.columns)]
        key_names = [f"_key{i}" for i in range(len(c.columns))]
        with_keys = table.with_row_index("_position").with_columns(keys)
        first = pl.col("_position").min().over(key_names)
        kept_text = pl.col(c.columns[0]).cast(pl.String).gather(first)
        is_copy = first != pl.col("_position")
        verdicts = with_keys.select(pl.when(is_copy).then(kept_text).otherwise(None).alias("_duplicate_of"),
                                    pl.when(is_copy).then(pl.lit("duplicate")).alias("reason"))
        ctx.report["duplicates"] = int(verdicts["reason"].is_not_null().sum())
        return verdicts
