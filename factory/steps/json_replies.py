"""Generation parameters and JSON Schemas for replies that hold a verdict, a score or fields.

A step that reads fields asks for a JSON object where the backend enforces schemas
(:func:`json_params` with a schema built by :func:`json_object` or :func:`reasoning_first`), and
for a short text verdict otherwise (:func:`verdict_only`).
"""

from __future__ import annotations

import dataclasses

from ..llm.base import GenerationParams
from ..llm.schema import schema_text


def verdict_only(params: GenerationParams) -> GenerationParams:
    """Parameters for a reply that is a verdict or a score alone: it ends at the line's end,
    and a few tokens hold it."""
    return dataclasses.replace(params, stop=params.stop + ("\n",), max_tokens=min(params.max_tokens, 8),
                               continuations=0)


VERDICT_JSON_TOKENS = (16, 32)  # the fewest and most tokens of a JSON object that holds a verdict alone


def json_params(params: GenerationParams, schema: dict, verdict: bool = False) -> GenerationParams:
    """Parameters for a reply that is a JSON object matching ``schema`` (structured output): the
    schema supersedes a regex; no stop at a line's end (JSON may hold line breaks between its
    fields); no continuation (a grammar starts a new object, it cannot go on with a cut one).
    ``verdict``: the object holds a verdict or a score alone (:func:`verdict_only`'s JSON
    counterpart): 16 to 32 tokens, braces, name, quotes and whitespace included."""
    max_tokens = params.max_tokens
    if verdict:
        low, high = VERDICT_JSON_TOKENS
        max_tokens = min(max(max_tokens, low), high)
    return dataclasses.replace(params, json_schema=schema_text(schema), regex=None, max_tokens=max_tokens,
                               stop=tuple(s for s in params.stop if s.strip()), continuations=0)


def json_object(properties: dict[str, dict]) -> dict:
    """The JSON Schema of an object with these properties, all required, in this order (the
    order the model writes them in: reasoning before the verdict it leads to)."""
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def text_field(description: str, max_tokens: int, overhead: int = 24) -> dict:
    """A text property no longer than ``max_tokens`` hold, less ``overhead`` tokens for the rest
    of the object (at 3 characters a token): a small model that rambles inside a JSON string is
    made to close it in time to write the fields after it, instead of being cut without them
    (grammars enforce ``maxLength``; SmolLM2-135M's reasoning otherwise runs to the limit)."""
    return {"type": "string", "description": description, "maxLength": max(32, (max_tokens - overhead) * 3)}


def reasoning_first(reasoning: str | None, properties: dict[str, dict], max_tokens: int = 256) -> dict:
    """:func:`json_object` of ``properties``, after a ``reasoning`` text described as
    ``reasoning`` when given (chain of thought before the verdict, within ``max_tokens``)."""
    first = {"reasoning": text_field(reasoning, max_tokens)} if reasoning else {}
    return json_object({**first, **properties})
