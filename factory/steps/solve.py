"""``solve``: the model answers each task, ``samples`` times."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option
from ..errors import ParseError
from .base import LLMStep, LLMStepConfig


@dataclass
class SolveConfig(LLMStepConfig):
    samples: int = option(1, help="Answers sampled per task (one row each, numbered in `sample`).", min=1)
    column: str = option("instruction", help="The task text.")
    input_column: str = option("input", help="Optional extra input appended to the task when the row has it.")
    output_column: str = option("response", help="Where the answer goes.")
    temperature: float = option(0.7, help="Sampling temperature; 0 is greedy.", min=0.0, max=5.0)
    top_p: float = option(0.95, help="Nucleus sampling mass.", min=0.0, max=1.0)
    max_tokens: int = option(512, help="Most tokens per answer.", min=1)


class Solve(LLMStep):
    """Answers each task with the step's model.

    Requires: the task column (``instruction``); ``input`` is used when present.
    Produces: ``response`` (and ``sample`` when ``samples > 1``).

    Example:
        - solve: {samples: 4, temperature: 0.8}
    """

    name = "solve"
    Config = SolveConfig

    def requires(self):
        return [self.config.column]

    def produces(self):
        return [self.config.output_column] + (["sample"] if self.samples > 1 else [])

    def build_messages(self, row):
        task = self.text(row, self.config.column)
        task_input = row.get(self.config.input_column)
        task_input = task_input if isinstance(task_input, str) else ""
        return self.messages(self.render(row, task=task, task_input=task_input))

    def parse(self, reply, row):
        answer = reply.strip()
        if not answer:
            raise ParseError("empty answer")
        return {self.config.output_column: answer}
