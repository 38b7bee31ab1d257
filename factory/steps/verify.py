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
from .verify_code import code_problems, code_produces, code_requires, verify_code


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
    drop_incorrect: bool = option(False, help="Drop incorrect samples (reason `incorrect`, or `false_calculation`; "
                                              "with `method: code`, the `code_result`) instead of only labelling "
                                              "them.")
    check_calculations: bool = option(False, help="Also read every calculation the reply writes (`12 + 5 = 17`, "
                                                  "`4 × 6 = 24`) and count the sample incorrect when one is false, "
                                                  "so a right answer reached by a wrong sum is not kept.")
    response: str = option("response", help="The reply whose calculations `check_calculations` reads; with "
                                            "`method: code`, the reply whose code runs: its last ```python block "
                                            "that defines the tested function (else its last block, else all of it).")
    tests: list[str] | None = option(None, help="`code`: the column with each row's tests, in any shape `test_format` "
                                                "reads; several columns add up (CodeContests: [public_tests, "
                                                "private_tests, generated_tests]).")
    test_format: Literal["auto", "humaneval", "asserts", "io"] = option(
        "auto", help="`code`: `humaneval` is test code defining check(candidate), called with the `entry_point`; "
                     "`asserts` a list of assert strings (MBPP test_list); `io` stdin/stdout pairs (APPS "
                     "input_output JSON, with fn_name: calls of that function; CodeContests {input, output}); "
                     "`auto` tells them apart by the value.")
    entry_point: str | None = option(None, help="`code`: the column naming the function the tests call (HumanEval "
                                                "`entry_point`); a row whose code lacks it is dropped "
                                                "(`no_entry_point`).")
    setup_code: list[str] = option(default_factory=list, help="`code`: columns with code run before the response's "
                                                              "(MBPP test_setup_code / test_imports; HumanEval's "
                                                              "`prompt` brings its imports).")
    time_limit: float = option(10.0, help="`code`: wall-clock (and CPU) seconds per run: a row's tests, or one "
                                          "stdin/stdout case.", min=0.1)
    memory_limit_mb: int = option(1024, help="`code`: address space per run, in MiB.", min=64)
    output_limit_kb: int = option(8192, help="`code`: what a run may print (and the size of a file it writes), "
                                             "in KiB.", min=1)
    max_tests: int | None = option(None, help="`code`: run only a row's first this many tests.", min=1)
    workers: int | None = option(None, help="`code`: runs at once (default: the cores).", min=1)

    def validate(self):
        return code_problems(self)


class Verify(RowStep):
    """Labels each sample correct or not by comparing its prediction with the reference.

    A reference is read like a prediction: ``... #### 18``, ``\\boxed{18}`` and "The answer is 18."
    give 18; a bare value stays itself. A reference without a value (empty, or no number for
    ``method: numeric``) stops the run with one line naming the row: it would never match.

    With ``check_calculations``, a sample whose reply writes a false calculation
    (``10 / 6 = 1``) is incorrect even when its final answer matches. ``method: math`` compares
    as mathematics (``\frac{14}{3}`` = ``4\frac{2}{3}``), each comparison within ``math_timeout``.
    ``method: code`` runs the response's code against the row's tests in the sandbox instead
    (:mod:`factory.steps.verify_code`), filling ``tests_passed``, ``tests_total``,
    ``code_result`` and ``code_detail`` too.

    Requires: ``answer`` (reference) and ``prediction`` (and ``response`` with ``check_calculations``);
    for ``code``: ``response`` and the ``tests`` columns.
    Produces: ``correct`` (bool).

    Example:
        - verify: {reference: answer, method: numeric}
        - verify: {reference: answer, method: math}
        - verify: {method: code, tests: [test_list], setup_code: [test_setup_code]}
    """

    name = "verify"
    Config = VerifyConfig
    version = "2"  # references are read with the prediction's extraction

    def requires(self):
        if self.config.method == "code":
            return code_requires(self.config)
        return [self.config.reference, self.config.prediction] + \
            ([self.config.response] if self.config.check_calculations else [])

    def produces(self):
        if self.config.method == "code":
            return code_produces(self.config)
        return [self.config.output_column]

    def process(self, batch: pl.DataFrame, ctx: StepContext | None = None) -> pl.DataFrame:
        c = self.config
        if c.method == "code":
            return verify_code(batch, c, ctx)
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
