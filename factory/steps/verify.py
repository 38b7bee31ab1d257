"""``verify``: check each prediction against a reference answer, programmatically."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import polars as pl

from ..answers import answers_match
from ..config import option
from .base import DROP, RowStep, StepContext


@dataclass
class VerifyConfig:
    reference: str = option("answer", help="The column with the reference answer.")
    prediction: str = option("prediction", help="The column with the extracted answer (from `solve` with "
                                                "`answer_format`).")
    method: Literal["auto", "exact", "numeric", "normalized", "choice"] = option(
        "auto", help="`numeric` compares as numbers within `tolerance`; `normalized` ignores case, punctuation "
                     "and articles; `choice` compares option letters; `exact` compares stripped text; `auto` is "
                     "numeric when both are numbers, else normalized.")
    tolerance: float = option(1e-6, help="Absolute or relative tolerance for numeric answers.", min=0.0)
    output_column: str = option("correct", help="Where the verdict (true/false) goes.")
    drop_incorrect: bool = option(False, help="Drop incorrect samples (reason `incorrect`) instead of only "
                                              "labelling them.")


class Verify(RowStep):
    """Labels each sample correct or not by comparing its prediction with the reference.

    Requires: ``answer`` (reference) and ``prediction``.
    Produces: ``correct`` (bool).

    Example:
        - verify: {reference: answer, method: numeric}
    """

    name = "verify"
    Config = VerifyConfig

    def requires(self):
        return [self.config.reference, self.config.prediction]

    def produces(self):
        return [self.config.output_column]

    def process(self, batch: pl.DataFrame, ctx: StepContext | None = None) -> pl.DataFrame:
        c = self.config
        correct = [answers_match(p, r, c.method, c.tolerance)
                   for p, r in zip(batch[c.prediction].cast(pl.String).to_list(),
                                   batch[c.reference].cast(pl.String).to_list())]
        out = batch.with_columns(pl.Series(c.output_column, correct, dtype=pl.Boolean))
        reason = pl.when(pl.col(c.output_column).not_()).then(pl.lit("incorrect")) if c.drop_incorrect else None
        return out.with_columns((reason.otherwise(None) if reason is not None
                                 else pl.lit(None, dtype=pl.String)).cast(pl.String).alias(DROP))
