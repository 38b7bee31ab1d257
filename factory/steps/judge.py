"""``judge``: LLM-as-a-judge, pointwise: a score on a rubric for each response."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..config import option
from ..errors import ParseError
from .base import LLMStep, LLMStepConfig

DEFAULT_RUBRIC = (
    "A top score means correct, complete and helpful. A middle score means partly correct or missing "
    "important details. The lowest score means wrong, off-topic or empty."
)

_NUMBER = r"(\d+(?:\.\d+)?)"
# Ordered by how explicit they are; the last match of the first pattern that matches wins,
# since small models often restate the scale ("1 to 10") before giving their score.
_SCORE_PATTERNS = [
    re.compile(rf"(?:score|rating|grade)\s*(?:is|of|[:=])?\s*[*_\"']*\s*{_NUMBER}\s*(?:/|out of)\s*{_NUMBER}", re.I),
    re.compile(rf"(?:score|rating|grade)\s*(?:is|of|[:=])\s*[*_\"']*\s*{_NUMBER}", re.I),
    re.compile(rf"(?:score|rating|grade)\s+[*_\"']*{_NUMBER}(?!\s*(?:to|-)\s*\d)", re.I),
    re.compile(rf"{_NUMBER}\s*(?:/|out of)\s*{_NUMBER}", re.I),
    re.compile(rf"^\s*[*_\"']*{_NUMBER}(?![\d.]*\s*(?:to|-)\s*\d)"),
]


def parse_score(reply: str, scale: int) -> float:
    """The score in a judge's reply, on a 1..``scale`` scale.

    Understands "Score: 7", "score of 7", "7/10", "7 out of 10" (rescaled when the
    denominator is not ``scale``) and a bare leading number.

    Raises:
        ParseError: no score, or one outside 1..scale.
    """
    for pattern in _SCORE_PATTERNS:
        matches = list(pattern.finditer(reply))
        if not matches:
            continue
        groups = matches[-1].groups()
        value = float(groups[0])
        if len(groups) == 2 and groups[1] is not None:
            denominator = float(groups[1])
            if denominator <= 0:
                raise ParseError(f"score {groups[0]}/{groups[1]} has a zero denominator")
            if denominator != scale:
                value = value * scale / denominator
        if not 1 <= value <= scale:
            raise ParseError(f"score {value:g} is outside 1..{scale}")
        return round(value, 2)
    raise ParseError(f"no score found (expected 'Score: N' with N in 1..{scale})")


@dataclass
class JudgeConfig(LLMStepConfig):
    scale: int = option(10, help="Scores run from 1 to `scale`.", min=2, max=100)
    rubric: str = option(DEFAULT_RUBRIC, help="What each end of the scale means; shown to the judge.")
    reasoning: bool = option(True, help="Ask for a short justification before the score (chain of thought); "
                                        "false asks for the score alone (at most 8 tokens, one line), which is "
                                        "faster and parses better with small models.")
    column: str = option("instruction", help="The task text.")
    input_column: str = option("input", help="Optional task input shown to the judge when present.")
    response_column: str = option("response", help="The answer to judge.")
    output_column: str = option("score", help="Where the score goes.")
    judgement_column: str = option("judgement", help="Where the judge's full reply goes.")
    max_tokens: int = option(192, help="Most tokens per judgement.", min=1)


class Judge(LLMStep):
    """Scores each response on a rubric, chain of thought first (unless ``reasoning: false``).

    Requires: ``instruction`` and ``response``.
    Produces: ``score`` (1..scale) and ``judgement`` (the judge's reply). A reply without a
    score in range drops the row as ``parse_error``.

    Example:
        - judge: {scale: 10, llm: {backend: openai, model: judge}}
    """

    name = "judge"
    Config = JudgeConfig

    def requires(self):
        return [self.config.column, self.config.response_column]

    def produces(self):
        return [self.config.output_column, self.config.judgement_column]

    def build_messages(self, row):
        c = self.config
        task_input = row.get(c.input_column)
        prompt = self.render(row, task=self.text(row, c.column), response=self.text(row, c.response_column),
                             task_input=task_input if isinstance(task_input, str) else "", rubric=c.rubric)
        return self.messages(prompt, prefill=None if c.reasoning else "Score:")

    def generation_params(self):
        params = super().generation_params()
        if self.config.reasoning:
            return params
        # The score alone: it ends at the line's end, and a few tokens hold it.
        return dataclasses.replace(params, stop=params.stop + ("\n",), max_tokens=min(params.max_tokens, 8))

    def parse(self, reply, row):
        text = reply if self.config.reasoning else "Score:" + reply
        return {self.config.output_column: parse_score(text, self.config.scale),
                self.config.judgement_column: text.strip()}
