"""``self_curate``: the model rates each (instruction, response) pair and keeps the good ones."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ...config import option
from ...llm.base import Completion, Conversation, Request
from ...llm.schema import read_reply
from ..drops import dropped
from ..json_replies import json_params, reasoning_first
from ..judge import parse_score
from ..llm_step import LLMStep, LLMStepConfig

_SCORE_LABEL = re.compile(r"[*_#\s]*\b(?:final\s+)?(?:score|rating)\s*(?:is|of|[:=])", re.I)
_REASONING_LABEL = re.compile(r"^[*_]*(?:reasoning|explanation|rationale)[*_]*\s*:[*_]*\s*", re.I)
# Only an explicit "Score: N" counts as the model having given its score: a reply that echoes
# the rubric ("1. It does not address ...") starts with a number that parse_score would take.
_EXPLICIT_SCORE = re.compile(r"\b(?:score|rating)\s*(?:is|of|[:=])?\s*[*_\"']*\s*\d", re.I)
SCORE_CUE = "\nScore:"


def split_rating(reply: str) -> tuple[float, str]:
    """The 1-5 score in a curation reply and the reasoning written before it.

    Raises:
        ParseError: no score in 1..5 (see :func:`factory.steps.judge.parse_score`).
    """
    text = reply.strip()
    score = parse_score(text, 5)
    labels = list(_SCORE_LABEL.finditer(text))
    reasoning = text[:labels[-1].start()] if labels else text
    return score, _REASONING_LABEL.sub("", reasoning.strip()).strip()


def rating_reply(config: "SelfCurateConfig") -> dict:
    """Where the backend enforces JSON Schemas, the reply a rating is asked for in: the reasoning,
    then the score (an enum: grammars do not enforce minimum and maximum)."""
    return reasoning_first("one or two sentences that explain the rating",
                           {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]}}, config.max_tokens)


@dataclass
class SelfCurateConfig(LLMStepConfig):
    min_score: float = option(4.0, help="Keep pairs rated at least this; lower ones are dropped as "
                                        "`below_min_score`.", min=1.0, max=5.0)
    force_score: bool = option(True, help="When the reasoning has no \"Score: N\", ask once more with the "
                                          "reasoning followed by \"Score:\" so that the model writes the number "
                                          "(a few tokens; small models rarely end with a score on their own). "
                                          "Not needed where the backend enforces JSON: the reply holds the score.")
    column: str = option("instruction", help="The instruction.")
    response_column: str = option("response", help="The response rated against it.")
    score_column: str = option("curation_score", help="Where the 1-5 score goes.")
    reasoning_column: str = option("curation_reasoning", help="Where the reasoning before the score goes.")
    max_tokens: int = option(96, help="Most tokens of reasoning (and score).", min=1)


class SelfCurate(LLMStep):
    """Self-curation: the model rates each pair on a 5-point rubric and keeps the good ones.

    The rubric asks how well the response answers the instruction as an AI assistant would:
    1 is irrelevant or incomplete, 3 answers but reads like an excerpt from elsewhere, 5 is a
    perfect, helpful, well-written answer. The model reasons first, then ends with "Score: N";
    with ``force_score``, a reasoning without an explicit "Score: N" is continued from
    "Score:" in a second, short round. Where the backend enforces JSON Schemas the model replies
    ``{"reasoning": ..., "score": N}`` instead, in one round (a JSON reply that does not match
    drops as ``schema_error``).

    Requires: ``instruction`` and ``response``.
    Produces: ``curation_score`` (1-5) and ``curation_reasoning``. Pairs below ``min_score``
    are dropped as ``below_min_score`` (with their score and reasoning); a reply without a
    score in 1..5 as ``parse_error``, its raw reply kept.

    Example:
        - self_curate: {min_score: 4}
    """

    name = "self_curate"
    reads_verdict = True  # a score or verdict read before a cut is kept
    reads_fields = True
    Config = SelfCurateConfig

    def requires(self):
        c = self.config
        return [c.column, c.response_column]

    def produces(self):
        c = self.config
        return [c.score_column, c.reasoning_column]

    def build_messages(self, row):
        c = self.config
        prompt = self.render(row, instruction=self.text(row, c.column), response=self.text(row, c.response_column))
        return self.conversation(prompt, rating_reply(c))

    def generation_params(self):
        params = super().generation_params()
        return json_params(params, rating_reply(self.config)) if self.asks_json else params

    def parse(self, reply, row):
        c = self.config
        if self.asks_json:
            fields = read_reply(reply, rating_reply(c))
            score, reasoning = float(fields["score"]), fields["reasoning"].strip()
        else:
            score, reasoning = split_rating(reply)
        columns = {c.score_column: score, c.reasoning_column: reasoning}
        if score < c.min_score:
            return dropped(columns, "below_min_score", f"score {score:g} is below min_score {c.min_score:g}")
        return columns

    def exchange(self, rows, ctx):
        asked, out = self.plan(rows)
        completions = yield [request for _, request in asked]
        if self.config.force_score and not self.asks_json:  # a JSON reply holds its score
            completions = yield from self.complete_scores([r.messages for _, r in asked], completions)
        return out + self.read(asked, completions)

    def complete_scores(self, conversations: list[Conversation], completions: list[Completion]):
        """Completions whose reasoning has no score, continued from "Score:" (the rest unchanged):
        a round of the exchange, which yields the follow-ups and returns the completions."""
        missing = [i for i, c in enumerate(completions) if c.error is None and not _EXPLICIT_SCORE.search(c.texts[0])]
        if not missing:
            return completions
        reasonings = [completions[i].texts[0].rstrip() + SCORE_CUE for i in missing]
        params = dataclasses.replace(self.generation_params(), n=1, max_tokens=4, stop=("\n",), continuations=0)
        scores = yield [Request(conversations[i] + [{"role": "assistant", "content": r}], params)
                        for i, r in zip(missing, reasonings)]
        completed = list(completions)
        for i, reasoning, score in zip(missing, reasonings, scores):
            first = completions[i]
            if score.error is None:
                completed[i] = dataclasses.replace(first, texts=[reasoning + score.texts[0]],
                                                   finish_reasons=score.finish_reasons,
                                                   completion_tokens=first.completion_tokens + score.completion_tokens)
        return completed
