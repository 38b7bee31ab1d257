"""``feedback``: SELF's self-feedback (Lu et al., 2023) -- the model critiques an answer.

The critique ends with a verdict; ``refine`` then rewrites the answer with it, and
``self_refine`` repeats both. Rows keep the critique, so the meta-skill (critique) can be
trained on as well as the final answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option
from ..errors import ParseError
from .judge import parse_verdict
from .llm_step import AnswerStepConfig, LLMStep


def verdict_of(feedback: str) -> str:
    """``correct``, ``incorrect``, or ``unclear`` when the feedback gives no verdict."""
    try:
        return "correct" if parse_verdict(feedback) else "incorrect"
    except ParseError:
        return "unclear"


@dataclass
class FeedbackConfig(AnswerStepConfig):
    feedback_column: str = option("feedback", help="Where the critique goes.")
    verdict_column: str = option("verdict", help="Where the verdict goes: correct, incorrect or unclear.")
    max_tokens: int = option(256, help="Most tokens per critique.", min=1)


class Feedback(LLMStep):
    """The model critiques an answer and says whether it is correct (SELF's self-feedback).

    Requires: ``instruction`` and ``response``.
    Produces: ``feedback`` (text) and ``verdict`` (``correct``, ``incorrect``, or ``unclear``
    when the critique ends without one). An empty critique drops the row as ``parse_error``.

    Example:
        - feedback: {}
    """

    name = "feedback"
    Config = FeedbackConfig

    def requires(self):
        return [self.config.column, self.config.response_column]

    def produces(self):
        return [self.config.feedback_column, self.config.verdict_column]

    def build_messages(self, row):
        return self.messages(self.render(row, **self.task_variables(row),
                                         response=self.text(row, self.config.response_column)))

    def parse(self, reply, row):
        text = reply.strip()
        if not text:
            raise ParseError("empty feedback")
        return {self.config.feedback_column: text, self.config.verdict_column: verdict_of(text)}
