"""``solve``: the model answers each task, ``samples`` times."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import polars as pl

from ..answers import extract_answer, split_after_answer
from ..config import option
from ..errors import ParseError
from .drops import DROP
from .llm_step import LLMStep, TaskStepConfig


@dataclass
class SolveConfig(TaskStepConfig):
    samples: int = option(1, help="Answers sampled per task (one row each, numbered in `sample`).", min=1)
    output_column: str = option("response", help="Where the answer goes.")
    temperature: float = option(0.7, help="Sampling temperature; 0 is greedy.", min=0.0, max=5.0)
    top_p: float = option(0.95, help="Nucleus sampling mass.", min=0.0, max=1.0)
    max_tokens: int = option(512, help="Most tokens per answer.", min=1)
    cot: bool = option(False, help="Ask the model to think step by step before its final answer.")
    answer_format: Literal["none", "number", "choice", "text", "math"] = option(
        "none", help="Extract a final answer into `prediction`: `number` (\\boxed{}, '#### n', 'the answer is n', "
                     "else the last number), `choice` (an option letter), `text` (after 'Answer:', else the last "
                     "line), `math` (the last \\boxed{}, else 'the answer is ...', else the last $...$ or "
                     "\\(...\\), else the last number, kept as written for `verify: {method: math}`); `none` "
                     "extracts nothing. A reply with no answer is dropped as `no_answer`.")
    prediction_column: str = option("prediction", help="Where the extracted answer goes.")
    after_answer: Literal["keep", "cut", "drop"] = option(
        "keep", help="A reply that goes on after its final answer (\"The answer is 3. It seems like you're...\"; "
                     "needs `answer_format`, and only a marked answer ends a reply: \\boxed{}, '####', 'the answer "
                     "is', 'Answer:'): `keep` it whole (counted in the run's summary), `cut` it after the answer's "
                     "sentence (what a stop at the answer would have returned; the answer read stays the same) with "
                     "the text cut in `after_answer_column`, or `drop` its row as `text_after_answer`.")
    after_answer_column: str = option("after_answer", help="With after_answer: cut, where the text cut goes "
                                                           "(null on a reply that ended with its answer).")

    def validate(self):
        if self.after_answer != "keep" and self.answer_format == "none":
            return [(f"after_answer: {self.after_answer} needs to know where the answer ends", "after_answer",
                     "set answer_format (number, choice, text or math), or leave after_answer at keep")]
        return []


class Solve(LLMStep):
    """Answers each task with the step's model.

    Requires: the task column (``instruction``); ``input`` is used when present.
    Produces: ``response`` (and ``sample`` when ``samples > 1``, ``prediction`` when
    ``answer_format`` is set).

    Example:
        - solve: {samples: 4, temperature: 0.8, cot: true, answer_format: number}
    """

    name = "solve"
    Config = SolveConfig

    def requires(self):
        return [self.config.column]

    def produces(self):
        columns = [self.config.output_column] + (["sample"] if self.samples > 1 else [])
        if self.config.answer_format != "none":
            columns.append(self.config.prediction_column)
        if self.config.after_answer == "cut":
            columns.append(self.config.after_answer_column)
        return columns

    def frame(self, rows, data):
        frame = super().frame(rows, data)
        column = self.config.after_answer_column  # text, also in a batch where no reply went on
        if self.config.after_answer == "cut" and frame.schema.get(column) == pl.Null:
            frame = frame.with_columns(pl.col(column).cast(pl.String))
        return frame

    def exchange(self, rows, ctx):
        out = yield from super().exchange(rows, ctx)
        if self.config.answer_format != "none":
            ctx.report["after_answer"] = after_answer_counts(self.config, out)
        return out

    def build_messages(self, row):
        return self.messages(self.render(row, **self.task_variables(row)))

    def parse(self, reply, row):
        answer = reply.strip()
        if not answer:
            raise ParseError("empty answer")
        c = self.config
        if c.answer_format == "none":
            return {c.output_column: answer}
        prediction = extract_answer(answer, c.answer_format)
        if prediction is None:
            raise ParseError(f"no {c.answer_format} answer found in the reply", reason="no_answer")
        columns = {c.output_column: answer, c.prediction_column: prediction}
        if c.after_answer != "keep":
            kept, after = split_after_answer(answer, c.answer_format)
            if after and c.after_answer == "drop":
                raise ParseError(f"the reply goes on after its answer ({_tail(kept)!r}): {_head(after)!r}",
                                 reason=TEXT_AFTER_ANSWER)
            if c.after_answer == "cut":
                columns.update({c.output_column: kept, c.after_answer_column: after or None})
        return columns


TEXT_AFTER_ANSWER = "text_after_answer"


def _head(text: str, width: int = 80) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _tail(text: str, width: int = 60) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def after_answer_counts(config: SolveConfig, rows: list[dict]) -> dict:
    """How many replies with an answer went on after it, and what became of them (the report's
    ``after_answer``: ``answered``, ``went_on``, the ``action`` taken and the cut text's ``column``)."""
    answered = went_on = 0
    for row in rows:
        if row.get(DROP) == TEXT_AFTER_ANSWER:
            answered, went_on = answered + 1, went_on + 1
        elif row.get(DROP) is None and row.get(config.prediction_column) is not None:
            answered += 1
            if config.after_answer == "cut":
                went_on += row.get(config.after_answer_column) is not None
            else:
                went_on += bool(split_after_answer(row[config.output_column], config.answer_format)[1])
    return {"answered": answered, "went_on": went_on, "action": config.after_answer,
            **({"column": config.after_answer_column} if config.after_answer == "cut" else {})}
