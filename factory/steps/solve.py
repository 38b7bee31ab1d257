"""``solve``: the model answers each task, ``samples`` times."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..answers import extract_answer
from ..config import option
from ..errors import ParseError
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
        return columns

    def build_messages(self, row):
        return self.messages(self.render(row, **self.task_variables(row)))

    def parse(self, reply, row):
        answer = reply.strip()
        if not answer:
            raise ParseError("empty answer")
        columns = {self.config.output_column: answer}
        if self.config.answer_format != "none":
            prediction = extract_answer(answer, self.config.answer_format)
            if prediction is None:
                raise ParseError(f"no {self.config.answer_format} answer found in the reply", reason="no_answer")
            columns[self.config.prediction_column] = prediction
        return columns
