"""``judge``: LLM-as-a-judge, pointwise: a score on a rubric for each response."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

from ..config import option
from ..errors import ParseError
from ..llm.schema import read_reply
from .drops import InvalidRow
from .json_replies import json_params, reasoning_first, verdict_only
from .llm_step import AnswerStepConfig, LLMStep

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


_VERDICT = re.compile(r"(?:verdict|judg(?:e)?ment|answer is|response is)\s*[:=]?\s*[*_\"']*\s*"
                      r"(incorrect|not correct|correct|wrong|right|yes|no)\b", re.I)
_BARE_VERDICT = re.compile(r"\b(incorrect|not correct|correct|wrong|right)\b", re.I)
_NEGATIVE = {"incorrect", "not correct", "wrong", "no"}


def parse_verdict(reply: str) -> bool:
    """True for "Verdict: correct", False for "Verdict: incorrect" (and yes/no, right/wrong).

    The last explicit verdict wins; failing that, the last bare "correct"/"incorrect" in the
    reply's final line.

    Raises:
        ParseError: no verdict in the reply.
    """
    matches = _VERDICT.findall(reply)
    if not matches:
        lines = [line for line in reply.strip().splitlines() if line.strip()]
        matches = _BARE_VERDICT.findall(lines[-1]) if lines else []
    if not matches:
        raise ParseError("no verdict found (expected 'Verdict: correct' or 'Verdict: incorrect')")
    return matches[-1].lower() not in _NEGATIVE


@dataclass
class JudgeConfig(AnswerStepConfig):
    mode: Literal["score", "binary"] = option(
        "score", help="`score`: a score from 1 to `scale` on the rubric; `binary`: a correct/incorrect verdict "
                      "(into `correct_column`), shown the reference answer when `reference_column` is set.")
    scale: int = option(10, help="Scores run from 1 to `scale`.", min=2, max=100)
    rubric: str = option(DEFAULT_RUBRIC, help="What each end of the scale means; shown to the judge.")
    reasoning: bool = option(True, help="Ask for a short justification before the score (chain of thought); "
                                        "false asks for the score alone (at most 8 tokens, one line; as JSON, "
                                        "at most 32), which is faster and parses better with small models.")
    reference_column: str | None = option(None, help="A reference answer to show the judge (binary mode).")
    output_column: str = option("score", help="Where the score goes (score mode).")
    correct_column: str = option("judge_correct", help="Where the verdict goes (binary mode).")
    judgement_column: str = option("judgement", help="Where the judge's full reply goes.")
    guided: bool = option(False, help="Constrain the reply to end in a valid score or verdict with structured "
                                      "decoding (vLLM backends and vLLM servers; other backends ignore it). "
                                      "Where the backend enforces JSON Schemas the judge asks for JSON instead, "
                                      "which supersedes this.")
    max_tokens: int = option(192, help="Most tokens per judgement.", min=1)
    conversation: Literal["whole", "last"] | None = option(
        None, hashed_when_set=True, help="Judge a multi-turn chat from `messages_column` instead of instruction and response: `whole` "
                   "rates every assistant turn of the transcript, `last` the last assistant reply to the last user "
                   "message, with the earlier turns shown as context. Unset: instruction and response.")
    messages_column: str | None = option(None, hashed_when_set=True, help="The chat a `conversation` judge reads (default `messages`).")


def template_name(c: JudgeConfig) -> str:
    """The judge's default template file (without ``.j2``)."""
    return "judge_conversation" if c.conversation else "judge_binary" if c.mode == "binary" else "judge"


def chat_variables(row: dict, c) -> dict:
    """What a ``conversation`` judge's template shows of the chat: the ``transcript`` (whole), the
    earlier turns as ``context`` (last), and the last user message and reply (``task``, ``response``)."""
    turns = chat_turns(row, c.messages_column or "messages")
    return {"transcript": turns, "context": turns[:-2] if c.conversation == "last" else [],
            "task": turns[-2]["content"], "response": turns[-1]["content"]}


def chat_turns(row: dict, column: str) -> list[dict]:
    """The chat in ``row[column]`` as ``{role, content}`` messages, system ones left out.

    Raises:
        InvalidRow: no chat there, or one without a user message followed by an assistant reply at its end.
    """
    value = row.get(column)
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise InvalidRow(f"column '{column}' is {type(value).__name__ if value is not None else 'missing'}, "
                         "not a list of {role, content} messages")
    turns = [{"role": m.get("role"), "content": m.get("content") or ""} for m in value if m.get("role") != "system"]
    if len(turns) < 2 or turns[-1]["role"] != "assistant" or turns[-2]["role"] != "user":
        raise InvalidRow(f"column '{column}' does not end with a user message and the assistant's reply to it")
    return turns


def judgement_schema(c: JudgeConfig) -> dict:
    """The JSON reply a judge asks for where the backend enforces it: the reasoning (unless
    ``reasoning: false``), then the score in 1..scale or the verdict."""
    if c.mode == "binary":
        return reasoning_first("one or two sentences that check the response" if c.reasoning else None,
                               {"verdict": {"enum": ["correct", "incorrect"]}}, c.max_tokens)
    # An enum rather than minimum/maximum, which grammars (outlines-core) do not enforce.
    return reasoning_first("one or two sentences that explain the rating" if c.reasoning else None,
                           {"score": {"type": "integer", "enum": list(range(1, c.scale + 1))}}, c.max_tokens)


class Judge(LLMStep):
    """LLM-as-a-judge, pointwise: a score on a rubric, or a correct/incorrect verdict.

    The judge reasons first (chain of thought) unless ``reasoning: false``. It may run on a
    different, stronger model than the solver (``llm:`` on the step). Where the backend
    enforces JSON Schemas it replies in JSON, ``{"reasoning": ..., "score": N}`` (or
    ``"verdict": "correct" | "incorrect"``; no reasoning with ``reasoning: false``); elsewhere its
    reply is started with "Score:" or "Verdict:" when it gives the verdict alone, and read as text.

    Requires: ``instruction`` and ``response`` (and ``reference_column`` when set); ``messages`` with ``conversation``.
    Produces: ``score`` (1..scale, a float) or, with ``mode: binary``, ``judge_correct`` (bool); and
    ``judgement`` (the judge's reply, as it wrote it). A reply without a score in range or a
    verdict drops the row as ``parse_error`` (``schema_error`` for a JSON reply), its raw reply kept.

    Example:
        - judge: {scale: 10, llm: {backend: openai, model: judge}}
        - judge: {mode: binary, reference_column: answer}
    """

    name = "judge"
    reads_verdict = True  # a score or verdict read before a cut is kept
    reads_fields = True
    Config = JudgeConfig

    @property
    def prefill(self) -> str | None:
        if self.config.reasoning or self.asks_json:
            return None
        return "Score:" if self.config.mode == "score" else "Verdict:"

    def requires(self):
        c = self.config
        return ([c.messages_column or "messages"] if c.conversation else [c.column, c.response_column]) + \
            ([c.reference_column] if c.reference_column else [])

    def produces(self):
        c = self.config
        return [c.output_column if c.mode == "score" else c.correct_column, c.judgement_column]

    def template_options(self):
        return {"template": template_name(self.config)}

    def build_messages(self, row):
        c = self.config
        reference = str(row.get(c.reference_column)) if c.reference_column else ""
        shown = chat_variables(row, c) if c.conversation else {**self.task_variables(row),
                                                               "response": self.text(row, c.response_column)}
        prompt = self.render(row, **shown, rubric=c.rubric, reference=reference)
        return self.conversation(prompt, judgement_schema(c) if self.asks_json else None, self.prefill)

    def answer_regex(self) -> str:
        """What a valid reply looks like, for structured decoding."""
        c = self.config
        value = "(" + "|".join(str(n) for n in range(c.scale, 0, -1)) + ")" if c.mode == "score" else \
            "(correct|incorrect)"
        label = "Score: " if c.mode == "score" else "Verdict: "
        return f" {value}" if not c.reasoning else f"[\\s\\S]{{0,2000}}{label}{value}"

    def generation_params(self):
        params = super().generation_params()
        if self.asks_json:
            return json_params(params, judgement_schema(self.config), verdict=not self.config.reasoning)
        if self.config.guided:
            params = dataclasses.replace(params, regex=self.answer_regex())
        return params if self.config.reasoning else verdict_only(params)

    def parse(self, reply, row):
        c = self.config
        if self.asks_json:  # the JSON reply is the judgement
            fields = read_reply(reply, judgement_schema(c))
            verdict = {c.correct_column: fields["verdict"] == "correct"} if c.mode == "binary" else \
                {c.output_column: float(fields["score"])}
            return {**verdict, c.judgement_column: reply.strip()}
        text = (self.prefill or "") + reply
        if c.mode == "binary":
            return {c.correct_column: parse_verdict(text), c.judgement_column: text.strip()}
        return {c.output_column: parse_score(text, c.scale), c.judgement_column: text.strip()}
