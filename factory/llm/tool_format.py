"""The wire format of tool use: what a model is asked for and answers with, and how chats with tool calls are written.

A model that is not given the tools natively (by a server's ``tools`` field) gets them in its
system prompt (:func:`prompt_messages`) and answers with one JSON object, held while decoding to
:func:`reply_schema` where the backend can: ``{"tool_calls": [{"name": ..., "arguments": {...}},
...]}`` (several calls in one reply are parallel calls) or ``{"answer": "..."}``. A server that
takes ``tools`` answers with OpenAI's ``tool_calls``, which its backend writes as the same JSON
(:func:`native_reply_text`): steps read one format (:func:`read_reply`). Chats keep OpenAI's tool
layout (an assistant message with ``tool_calls``, each call's ``arguments`` JSON text; a ``tool``
message per result with its ``tool_call_id``). The tools themselves (definitions, implementations)
are :mod:`factory.tools`'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import ParseError

TOOL_CALLS = "tool_calls"
ANSWER = "answer"
FORMAT = "format"  # drop reason: a reply or call that does not parse, names no tool, or fails its schema
LONGEST_HELD = 64  # string lengths up to this are held while decoding (see for_decoding)
UNHELD = frozenset({"uniqueItems", "multipleOf", "minProperties", "maxProperties", "patternProperties",
                    "propertyNames", "dependentRequired", "dependentSchemas", "if", "then", "else", "not",
                    "contains", "minContains", "maxContains", "format", "unevaluatedProperties",
                    "unevaluatedItems"})


# -- replies ------------------------------------------------------------------------------------

def reply_schema(tools: list[dict], calls: bool = True, answer: bool = True, max_parallel: int = 4) -> dict:
    """The JSON Schema of a reply: calls to the tools (each call's arguments held to its tool's
    parameters; up to ``max_parallel`` in one reply) or an answer in text."""
    options = []
    if calls and tools:
        call_shapes = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                         "arguments": for_decoding(t["function"]["parameters"])},
                        "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        options.append({"type": "object", "properties": {TOOL_CALLS: {
            "type": "array", "minItems": 1, "maxItems": max_parallel,
            "items": call_shapes[0] if len(call_shapes) == 1 else {"anyOf": call_shapes}}},
            "required": [TOOL_CALLS], "additionalProperties": False})
    if answer or not options:
        options.append({"type": "object", "properties": {ANSWER: {"type": "string", "minLength": 1}},
                        "required": [ANSWER], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def for_decoding(schema: Any) -> Any:
    """A tool's parameters as held while decoding: without the keywords grammar engines do not
    implement (:data:`UNHELD`: xgrammar refuses a schema with ``uniqueItems``) and without string
    lengths over :data:`LONGEST_HELD` (a ``maxLength: 500`` takes outlines' automaton seconds and
    gigabytes to build). The format check still holds each call to its tool's whole schema."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in UNHELD or key == "maxLength" and isinstance(value, int) and value > LONGEST_HELD:
            continue
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: for_decoding(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = for_decoding(value)
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems") and isinstance(value, list):
            out[key] = [for_decoding(sub) for sub in value]
        else:
            out[key] = value
    return out


@dataclass
class Reply:
    """A model's reply read: the calls it makes (name, arguments: a mapping, or the raw text when
    it did not parse), or its answer."""

    calls: list[dict]
    answer: str | None = None


def read_reply(text: str) -> Reply:
    """The calls or the answer in a reply (see the module's docstring for the format). A reply
    with no JSON object at all is an answer in text (what models without tools write).

    Raises:
        ParseError: (``format``) JSON that is neither calls nor an answer.
    """
    from .schema import extract_json

    try:
        value = extract_json(text)
    except ParseError:
        if '"tool_calls"' in text or '"name"' in text:
            raise ParseError("the reply starts a tool call that is not valid JSON", reason=FORMAT) from None
        if not text.strip():
            raise ParseError("the reply is empty", reason=FORMAT) from None
        return Reply([], text.strip())
    if isinstance(value, dict) and TOOL_CALLS in value:
        calls = value[TOOL_CALLS]
        if not isinstance(calls, list) or not calls:
            raise ParseError("`tool_calls` is not a non-empty list of calls", reason=FORMAT)
        out = []
        for k, call in enumerate(calls):
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise ParseError(f"call {k} is not an object with a `name`", reason=FORMAT)
            out.append({"name": call["name"], "arguments": arguments_value(call.get("arguments", {}))})
        return Reply(out)
    if isinstance(value, dict) and isinstance(value.get(ANSWER), str):
        if not value[ANSWER].strip():
            raise ParseError("the answer is empty", reason=FORMAT)
        return Reply([], value[ANSWER].strip())
    raise ParseError("the reply is JSON but neither {\"tool_calls\": [...]} nor {\"answer\": ...}", reason=FORMAT)


def call_id(seed: str, turn: int, k: int) -> str:
    """A call's id (OpenAI's ``call_...``), stable for a row, turn and position."""
    from ..hashing import digest

    return "call_" + digest(f"{seed}:{turn}:{k}")[:16]


def assistant_message(calls: list[dict], ids: list[str], content: str | None = None) -> dict:
    """The assistant's turn that makes ``calls``, in OpenAI's layout (arguments as JSON text)."""
    return {"role": "assistant", "content": content or "", TOOL_CALLS: [
        {"id": i, "type": "function", "function": {
            "name": call["name"], "arguments": call["arguments"] if isinstance(call["arguments"], str) else
            json.dumps(call["arguments"], ensure_ascii=False)}} for call, i in zip(calls, ids)]}


def tool_message(call_id_: str, name: str, content: str) -> dict:
    """A call's result, in OpenAI's layout."""
    return {"role": "tool", "tool_call_id": call_id_, "name": name, "content": content}


# -- tools in the prompt, for models that are not given them natively ----------------------------

TOOLS_PROMPT = (
    "You can call these tools (JSON Schema of each one's arguments):\n{tools}\n\n"
    "Reply with one JSON object and nothing else. To call tools: "
    '{{"tool_calls": [{{"name": "<tool name>", "arguments": {{...}}}}]}} (several calls in the list run in '
    "parallel). You will get each result in a message that starts with \"Tool result\". When you can answer the "
    'user, or when no tool helps: {{"answer": "<your answer>"}}.')


def tools_prompt(tools: list[dict]) -> str:
    listed = "\n".join(json.dumps({"name": f["name"], "description": f["description"], "parameters": f["parameters"]},
                                  ensure_ascii=False) for f in (t["function"] for t in tools))
    return TOOLS_PROMPT.format(tools=listed)


def prompt_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """A chat in OpenAI's tool layout as plain messages: the tools and the reply format in the
    system prompt (after the chat's own), each assistant turn's calls as the JSON reply it was,
    and the results of each round of calls as one user message."""
    system = tools_prompt(tools)
    out: list[dict] = []
    results: list[str] = []

    def flush():
        if results:
            out.append({"role": "user", "content": "\n".join(results)})
            results.clear()

    for message in messages:
        role = message.get("role")
        if role == "tool":
            results.append(f"Tool result ({message.get('name') or 'tool'}, {message.get('tool_call_id')}): "
                           f"{message.get('content')}")
            continue
        flush()
        if role == "system":
            system = f"{message.get('content') or ''}\n\n{system}".strip()
        elif role == "assistant" and message.get(TOOL_CALLS):
            calls = [{"name": c["function"]["name"], "arguments": arguments_value(c["function"]["arguments"])}
                     for c in message[TOOL_CALLS]]
            out.append({"role": "assistant", "content": json.dumps({TOOL_CALLS: calls}, ensure_ascii=False)})
        else:
            out.append({"role": role, "content": message.get("content") or ""})
    flush()
    return [{"role": "system", "content": system}] + out


def arguments_value(arguments: Any) -> Any:
    """Arguments as OpenAI writes them (JSON text) as an object; text that does not parse is kept (the
    format check says what is wrong), empty text is no arguments."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return arguments
    return arguments


def native_reply_text(message: dict) -> str:
    """A server's assistant message (OpenAI's ``tool_calls``, or content) as the reply JSON the
    steps read."""
    calls = message.get(TOOL_CALLS) or []
    if calls:  # arguments as objects where they parse, as the reply schema has them
        return json.dumps({TOOL_CALLS: [{"name": (c.get("function") or {}).get("name"),
                                          "arguments": arguments_value((c.get("function") or {}).get("arguments"))}
                                         for c in calls]}, ensure_ascii=False)
    return json.dumps({ANSWER: message.get("content") or ""}, ensure_ascii=False)


def native_messages(messages: list[dict]) -> list[dict]:
    """A chat as a server that takes tools reads it: the keys each role has, nothing empty."""
    out = []
    for m in messages:
        role = m.get("role")
        msg = {"role": role, "content": m.get("content") if m.get("content") is not None else ""}
        if role == "assistant" and m.get(TOOL_CALLS):
            msg[TOOL_CALLS] = [{"id": c["id"], "type": "function", "function": dict(c["function"])}
                               for c in m[TOOL_CALLS]]
        if role == "tool":
            msg["tool_call_id"] = m.get("tool_call_id")
            if m.get("name"):
                msg["name"] = m["name"]
        out.append(msg)
    return out


def clean_messages(messages: list[dict]) -> list[dict]:
    """Messages read back from a table (every key of every message, missing ones None) with the
    keys each message really has: what exports and chat templates expect."""
    out = []
    for m in messages or []:
        m = {k: v for k, v in m.items() if v is not None}
        if m.get(TOOL_CALLS):
            m[TOOL_CALLS] = [{k: v for k, v in c.items() if v is not None} for c in m[TOOL_CALLS]]
        elif TOOL_CALLS in m:
            del m[TOOL_CALLS]
        if m.get("role") == "assistant" and TOOL_CALLS in m and "content" not in m:
            m["content"] = ""
        out.append(m)
    return out
