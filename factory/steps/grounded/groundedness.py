"""``groundedness``: an LLM judge of whether an answer is supported by the passages it cites."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...config import option
from ...errors import ParseError
from ...llm.schema import read_reply
from ..drops import InvalidRow, dropped
from ..json_replies import json_params, reasoning_first, verdict_only
from ..llm_step import LLMStep, LLMStepConfig
from .context import passage_list, passages_in


@dataclass
class GroundednessConfig(LLMStepConfig):
    column: str = option("instruction", help="The question.")
    response_column: str = option("response", help="The answer to check.")
    context_column: str = option("context", help="The passages, each under its id in square brackets.")
    chunk_ids_column: str = option("chunk_ids", help="The ids of all passages in the context.")
    citations_column: str = option("citations", help="The ids the answer cites; only their passages are shown "
                                                     "to the judge.")
    output_column: str = option("grounded", help="Where the verdict goes (true on every kept row).")
    judgement_column: str = option("groundedness_judgement", help="Where the judge's reply goes.")
    reasoning: bool = option(False, help="Ask for a short check before the verdict; false asks for the verdict "
                                         "alone (at most 8 tokens; as JSON, at most 32), which parses better with "
                                         "small models.")
    max_tokens: int = option(128, help="Most tokens per judgement.", min=1)


_SUPPORTED = re.compile(r"supported\s*(?:\?|:|=|-)?\s*[*_\"']*\s*(yes|no|true|false|partly|partially)\b", re.I)
_NOT_SUPPORTED = re.compile(r"\b(?:not (?:fully |entirely )?supported|unsupported|not grounded|ungrounded)\b", re.I)
_IS_SUPPORTED = re.compile(r"\b(?:is|are|fully|well) supported\b", re.I)
_LEADING_YES_NO = re.compile(r"^\s*[*_\"']*(yes|no)\b", re.I)


def parse_supported(reply: str) -> bool:
    """True for "Supported: yes", False for "Supported: no" (and "partly", "not supported").

    The last explicit "Supported: ..." wins; failing that, "not supported" /
    "unsupported" before "is supported"; failing that, a leading yes or no.

    Raises:
        ParseError: no verdict in the reply.
    """
    explicit = _SUPPORTED.findall(reply)
    if explicit:
        return explicit[-1].lower() in ("yes", "true")
    if _NOT_SUPPORTED.search(reply):
        return False
    if _IS_SUPPORTED.search(reply):
        return True
    leading = _LEADING_YES_NO.match(reply)
    if leading:
        return leading.group(1).lower() == "yes"
    raise ParseError("no verdict found (expected 'Supported: yes' or 'Supported: no')")


class Groundedness(LLMStep):
    """LLM judge: is the answer supported by the passages it cites?

    The judge sees the question, the answer and only the passages the answer cites, so
    an answer is not credited with facts from a passage it did not cite.

    Requires: ``instruction``, ``response``, ``context``, ``chunk_ids`` and ``citations``
    (from ``grounded_answer``).
    Produces: ``grounded`` (true on kept rows) and ``groundedness_judgement`` (the judge's
    reply). An answer judged unsupported is dropped as ``ungrounded`` (with its judgement); a
    reply without a verdict as ``parse_error``. Where the backend enforces JSON Schemas the judge
    replies ``{"reasoning": ..., "supported": true | false}`` (a JSON reply that does not match
    drops as ``schema_error``); elsewhere it writes "Supported: yes".

    Example:
        - groundedness: {llm: {backend: openai, model: judge, base_url: http://127.0.0.1:8000/v1}}
    """

    name = "groundedness"
    reads_verdict = True  # a score or verdict read before a cut is kept
    reads_fields = True
    Config = GroundednessConfig

    @property
    def prefill(self) -> str | None:
        return None if self.config.reasoning or self.asks_json else "Supported:"

    def reply_schema(self) -> dict:
        """The JSON reply asked for where the backend enforces it."""
        return reasoning_first("one or two sentences on what the passages support and what they do not"
                               if self.config.reasoning else None,
                               {"supported": {"type": "boolean", "description": "whether the passages support "
                                                                                "everything the answer claims"}},
                               self.config.max_tokens)

    def requires(self):
        c = self.config
        return [c.column, c.response_column, c.context_column, c.chunk_ids_column, c.citations_column]

    def produces(self):
        return [self.config.output_column, self.config.judgement_column]

    def build_messages(self, row):
        c = self.config
        cited = passage_list(row, c.citations_column)
        passages = passages_in(self.text(row, c.context_column), passage_list(row, c.chunk_ids_column))
        shown = [p for p in passages if p["chunk_id"] in cited]
        if len(shown) < len(set(cited)):
            raise InvalidRow(f"column '{c.citations_column}' names chunks that are not in "
                             f"'{c.chunk_ids_column}': {sorted(set(cited) - {p['chunk_id'] for p in shown})}")
        prompt = self.render(row, question=self.text(row, c.column), response=self.text(row, c.response_column),
                             passages=shown)
        return self.conversation(prompt, self.reply_schema(), self.prefill)

    def generation_params(self):
        params = super().generation_params()
        if self.asks_json:
            return json_params(params, self.reply_schema(), verdict=not self.config.reasoning)
        return params if self.config.reasoning else verdict_only(params)

    def parse(self, reply, row):
        c = self.config
        text = ((self.prefill or "") + reply).strip()
        supported = read_reply(reply, self.reply_schema())["supported"] if self.asks_json else parse_supported(text)
        if supported:
            return {c.output_column: True, c.judgement_column: text}
        return dropped({c.output_column: False, c.judgement_column: text}, "ungrounded",
                       "the judge found the answer unsupported by the passages it cites")
