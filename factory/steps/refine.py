"""``refine``: SELF's self-refinement (Lu et al., 2023) -- the model rewrites an answer using
feedback on it (from ``feedback``); ``self_refine`` repeats feedback and refinement."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option
from ..errors import ParseError
from .llm_step import AnswerStepConfig, LLMStep


@dataclass
class RefineConfig(AnswerStepConfig):
    feedback_column: str = option("feedback", help="The feedback to use.")
    output_column: str = option("refined_response", help="Where the improved answer goes.")
    replace_response: bool = option(True, help="Also put the improved answer in `response`, keeping the "
                                               "original in `initial_response`.")
    max_tokens: int = option(512, help="Most tokens per improved answer.", min=1)


class Refine(LLMStep):
    """The model rewrites an answer using feedback on it (SELF's self-refinement).

    Requires: ``instruction``, ``response`` and ``feedback``.
    Produces: ``refined_response``; with ``replace_response`` (default) also the new
    ``response`` and the old one in ``initial_response``.

    Example:
        - feedback: {}
        - refine: {}
    """

    name = "refine"
    Config = RefineConfig

    def requires(self):
        c = self.config
        return [c.column, c.response_column, c.feedback_column]

    def produces(self):
        c = self.config
        return [c.output_column] + (["initial_response"] if c.replace_response else [])

    def build_messages(self, row):
        c = self.config
        return self.messages(self.render(row, **self.task_variables(row), response=self.text(row, c.response_column),
                                         feedback=self.text(row, c.feedback_column)))

    def parse(self, reply, row):
        c = self.config
        text = reply.strip()
        if not text:
            raise ParseError("empty refined answer")
        columns = {c.output_column: text}
        if c.replace_response:
            columns[c.response_column] = text
            columns["initial_response"] = row.get("initial_response") or row[c.response_column]
        return columns
