"""``verify``: check each prediction against a reference answer, programmatically."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import polars as pl

from ..answers import answers_match, false_calculations, read_references
from ..config import option
from ..math_answers import MATH_TIMEOUT_S, math_verdicts
from .base import RowStep
from .context import StepContext
from .drops import DROP, DROP_DETAIL


@dataclass
class VerifyConfig:
    reference: str = option("answer", help="The column with the reference answer: a bare value (330, B, Paris) or a "
                                           "worked solution ending in `#### 330`, `\\boxed{330}` or 'The answer "
                                           "is 330', read with the same extraction as predictions.")
    prediction: str = option("prediction", help="The column with the extracted answer (from `solve` with "
                                                "`answer_format`).")
    method: Literal["auto", "exact", "numeric", "normalized", "choice", "math", "code"] = option(
        "auto", help="`numeric` compares as numbers within `tolerance`; `math` compares as mathematics (LaTeX, "
                     "\\boxed{}, fractions, radicals, intervals, sets, tuples; through sympy, with a time limit); "
                     "`normalized` ignores case, punctuation and articles; `choice` compares option letters; "
                     "`exact` compares stripped text; `auto` is numeric when both are numbers, else normalized; "
                     "`code` runs the response's code against tests in a sandbox (see `tests`).")
    tolerance: float = option(1e-6, help="Absolute or relative tolerance for numeric answers.", min=0.0)
    math_timeout: float = option(MATH_TIMEOUT_S, help="Seconds per `math` comparison (parsing both answers "
                                                      "included); one that runs longer counts as incorrect and is "
                                                      "counted in the step's report (`math_timeouts`).",
                                 min=0.01, max=600.0)
    output_column: str = option("correct", help="Where the verdict (true/false) goes.")
    drop_incorrect: bool = option(False, help="Drop incorrect samples (reason `incorrect`, or `false_calculation`) "
                                              "instead of only labelling them.")
    check_calculations: bool = option(False, help="Also read every calculation the reply writes (`12 + 5 = 17`, "
                                                  "`4 × 6 = 24`) and count the sample incorrect when one is false, "
                                                  "so a right answer reached by a wrong sum is not kept.")
    response: str = option("response", help="The reply whose calculations `check_calculations` reads.")


class Verify(RowStep):
    """Labels each sample correct or not by comparing its prediction with the reference.

    A reference is read like a prediction: ``... #### 18``, ``\\boxed{18}`` and "The answer is 18."
    give 18; a bare value stays itself. A reference without a value (empty, or no number for
    ``method: numeric``) stops the run with one line naming the row: it would never match.

    With ``check_calculations``, a sample whose reply writes a false calculation
    (``10 / 6 = 1``) is incorrect even when its final answer matches.

    Requires: ``answer`` (reference) and ``prediction`` (and ``response`` with ``check_calculations``).
    Produces: ``correct`` (bool).

    Example:
        - verify: {reference: answer, method: numeric}
    """

    name = "verify"
    Config = VerifyConfig
    version = "2"  # references are read with the prediction's extraction

    def requires(self):
        return [self.config.reference, self.config.prediction] + \
            ([self.config.response] if self.config.check_calculations else [])

    def produces(self):
        return [self.config.output_column]

    def process(self, batch: pl.DataFrame, ctx: StepContext | None = None) -> pl.DataFrame:
        c = self.config
        references = read_references(batch[c.reference].cast(pl.String).to_list(), c.method, c.reference,
                                     lambda i: f"{self.label}: {describe_row(batch, i)}",
                                     "fix the reference or remove the row from the source")
        predictions = batch[c.prediction].cast(pl.String).to_list()
        details: list[str | None] = [None] * batch.height
        if c.method == "math":
            correct = check_math(predictions, references, c.math_timeout, details, ctx)
        else:
            correct = [answers_match(p, r, c.method, c.tolerance) for p, r in zip(predictions, references)]
        reasons = [None if ok else "incorrect" for ok in correct]
        if c.check_calculations:
            for i, reply in enumerate(batch[c.response].cast(pl.String).to_list()):
                wrong = false_calculations(reply or "", c.tolerance)
                if wrong and correct[i]:
                    correct[i], reasons[i] = False, "false_calculation"
                if wrong:
                    details[i] = "; ".join(filter(None, [details[i], "false: " + "; ".join(wrong[:3])]))
        out = batch.with_columns(pl.Series(c.output_column, correct, dtype=pl.Boolean))
        if not c.drop_incorrect:
            return out.with_columns(pl.lit(None, dtype=pl.String).alias(DROP))
        return out.with_columns(pl.Series(DROP, reasons, dtype=pl.String), pl.Series(DROP_DETAIL, details,
                                                                                     dtype=pl.String))


def check_math(predictions: list, references: list[str], seconds: float, details: list, ctx) -> list[bool]:
    """Verdicts of the ``math`` method; a comparison past ``seconds`` is incorrect, says so in its
    row's detail and is counted in the report (``math_timeouts``), so a slow run shows why."""
    verdicts = math_verdicts(list(zip(predictions, references)), seconds)
    late = [i for i, verdict in enumerate(verdicts) if verdict is None]
    for i in late:
        details[i] = f"the math comparison ran past its {seconds:g} s limit (math_timeout); counted as incorrect"
    if ctx is not None:
        ctx.report["math_timeouts"] = ctx.report.get("math_timeouts", 0) + len(late)
    return [bool(verdict) for verdict in verdicts]


def describe_row(batch: pl.DataFrame, i: int) -> str:
    """The row by its ``id`` when it has one, else by its task text, else by its place in the batch."""
    for column, what in (("id", "row id"), ("instruction", "the row with instruction")):
        if column in batch.columns and batch[column][i] is not None:
            text = str(batch[column][i])
            return f"{what} {(text[:60] + '...') if len(text) > 60 else text!r}"
    return f"row {i} of a batch of {batch.height}"
