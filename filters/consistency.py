"""``consistency``: self-consistency, a majority vote over each task's samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import polars as pl

from factory.answers import answer_keys
from factory.config import option
from factory.steps.context import StepContext

from .base import TableFilter


@dataclass
class ConsistencyConfig:
    column: str = option("instruction", help="The task column; samples are grouped by it.")
    answer_column: str = option("prediction", help="The extracted answer of each sample (from `solve` with "
                                                   "`answer_format`).")
    min_agreement: float = option(0.5, help="Keep a task when its most common answer has at least this share "
                                            "of the task's samples.", min=0.0, max=1.0)
    method: Literal["auto", "exact", "numeric", "normalized", "choice", "math"] = option(
        "auto", help="How answers are compared when voting (see `verify`): `auto` compares numbers as numbers "
                     "and text after normalisation; `math` puts answers equal as mathematics in one vote "
                     "(14/3, \\frac{14}{3} and 4\\frac{2}{3}; sets in any order).")


class Consistency(TableFilter):
    """Majority vote (self-consistency) over the samples of each task.

    A task's agreement is the share of its samples (answered or not) that give its most
    common answer; ties go to the answer seen first. Tasks below ``min_agreement`` are
    dropped whole (``low_agreement``); in the others, samples with another answer are
    dropped (``minority_answer``) and samples without one as ``no_answer``.

    Requires: ``instruction`` and ``prediction``.
    Produces: ``majority_answer``, ``agreement`` and ``votes`` (samples in the task).

    Example:
        - solve: {samples: 8, temperature: 0.8, answer_format: number}
        - consistency: {min_agreement: 0.5}
    """

    name = "consistency"
    Config = ConsistencyConfig

    def requires(self):
        return [self.config.column, self.config.answer_column]

    def produces(self):
        return ["majority_answer", "agreement", "votes"]

    def group_key(self):
        return self.config.column  # a task's vote needs only the task's samples

    def keep(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        c = self.config
        keys = answer_keys(table[c.answer_column].cast(pl.String).to_list(), c.method)
        work = table.select(c.column, c.answer_column).with_row_index("_position").with_columns(
            pl.Series("_key", keys, dtype=pl.String))
        counts = (work.filter(pl.col("_key").is_not_null())
                  .group_by(c.column, "_key").agg(pl.len().alias("_count"), pl.col("_position").min().alias("_first"))
                  .sort([c.column, "_count", "_first"], descending=[False, True, False])
                  .group_by(c.column, maintain_order=True).first()
                  .select(c.column, pl.col("_key").alias("_majority_key"), "_count"))
        work = work.join(counts, on=c.column, how="left", maintain_order="left")
        votes = pl.len().over(c.column)
        work = work.with_columns(votes.alias("votes"),
                                 (pl.col("_count").fill_null(0) / votes).alias("agreement"))
        majority_answer = (work.filter(pl.col("_key") == pl.col("_majority_key"))
                           .group_by(c.column).agg(pl.col(c.answer_column).first().cast(pl.String)
                                                   .alias("majority_answer")))
        work = work.join(majority_answer, on=c.column, how="left", maintain_order="left").sort("_position")
        reason = (pl.when(pl.col("agreement") < c.min_agreement).then(pl.lit("low_agreement"))
                  .when(pl.col("agreement") == 0).then(pl.lit("low_agreement"))
                  .when(pl.col("_key").is_null()).then(pl.lit("no_answer"))
                  .when(pl.col("_key") != pl.col("_majority_key")).then(pl.lit("minority_answer")))
        tasks = work.select(c.column, "agreement").unique(c.column)
        kept = (tasks["agreement"] >= c.min_agreement) & (tasks["agreement"] > 0)  # as `reason` keeps them
        ctx.report.update({"tasks": tasks.height, "tasks_kept": int(kept.sum()) if tasks.height else 0})
        return work.select("majority_answer", "agreement", "votes", reason.alias("reason"))
