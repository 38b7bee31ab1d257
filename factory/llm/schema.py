"""Structured output: JSON Schemas for replies, from a recipe's short field list or a full schema,
and the reading of a reply against one.

A recipe may give a schema in two forms:

* a short field list, ``{topic: str, difficulty: [easy, medium, hard], steps: [str]}``:
  types ``str``, ``int``, ``float``, ``bool``, ``list[T]`` (or ``[T]``, which also reads
  inside a one-line YAML mapping, where ``list[str]`` needs quotes), a list of allowed
  values (an enum), a nested mapping (an object), or a JSON Schema of the field's own
  (``{type: array, items: {type: string}, maxItems: 3}``); a name ending in ``?`` is optional;
* a JSON Schema of an object (``{type: object, properties: {...}, required: [...]}``), or a
  ``.json`` file holding one.

Backends enforce the schema while decoding where their engine can (a grammar for
transformers, guided decoding for vLLM, ``response_format`` on servers that take it); every
reply is read and validated here either way, so a backend that cannot enforce it still
yields only valid rows (the LLM path re-asks a few times, then the row drops as
``schema_error``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import ParseError

SCHEMA_ERROR = "schema_error"

_SHORT = {"str": "string", "string": "string", "text": "string", "int": "integer", "integer": "integer",
          "float": "number", "number": "number", "bool": "boolean", "boolean": "boolean"}
_LIST = re.compile(r"^(?:list|array)\[\s*(\w+)\s*\]$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SchemaSpecError(ValueError):
    """A schema in a recipe that cannot be used (the message says why and how to write it)."""


def is_json_schema(spec: Any) -> bool:
    """Whether a mapping is a JSON Schema (rather than a short field list)."""
    return isinstance(spec, dict) and (spec.get("type") == "object" or "properties" in spec or "$schema" in spec)


def to_json_schema(spec: Any) -> dict:
    """The JSON Schema of an object from a short field list or a JSON Schema.

    Raises:
        SchemaSpecError: the spec is neither, or a field's type is unknown.
    """
    if is_json_schema(spec):
        if spec.get("type", "object") != "object" or not isinstance(spec.get("properties"), dict) \
                or not spec["properties"]:
            raise SchemaSpecError("a JSON Schema here must describe an object with `properties` (each property "
                                  "becomes a column)")
        _check_json_schema(spec)
        return spec
    if not isinstance(spec, dict) or not spec:
        raise SchemaSpecError("expected a mapping of field names to types, such as {topic: str, difficulty: "
                              "[easy, medium, hard], steps: list[str]}, or a JSON Schema of an object")
    schema = _object(spec, "")
    _check_json_schema(schema)  # fields given as JSON Schemas of their own
    return schema


def _object(fields: dict, where: str) -> dict:
    properties, required = {}, []
    for raw, kind in fields.items():
        name = str(raw)
        optional = name.endswith("?")
        name = name.rstrip("?")
        if not _NAME.match(name):
            raise SchemaSpecError(f"field name '{where}{name}' must be letters, digits and '_' (it becomes a column)")
        properties[name] = _field(kind, f"{where}{name}")
        if not optional:
            required.append(name)
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


_JSON_TYPES = {"string", "integer", "number", "boolean", "array", "object", "null"}


def _field(kind: Any, where: str) -> dict:
    if isinstance(kind, dict) and (kind.get("type") in _JSON_TYPES or "enum" in kind or "anyOf" in kind):
        return kind  # a JSON Schema of its own (bounds such as maxItems, maxLength)
    if isinstance(kind, dict):
        return _object(kind, where + ".")
    if isinstance(kind, list) and len(kind) == 1 and isinstance(kind[0], str) and \
            (kind[0].strip().lower() in _SHORT or _LIST.match(kind[0].strip().lower())):
        return {"type": "array", "items": _field(kind[0], where + "[]")}  # [str]: a list of texts
    if isinstance(kind, list):
        if not kind or not all(isinstance(v, (str, int, float, bool)) for v in kind):
            raise SchemaSpecError(f"field '{where}': a list of allowed values must hold plain values, such as "
                                  "[easy, medium, hard]")
        return {"enum": list(kind)}
    if isinstance(kind, str):
        text = kind.strip().lower()
        if text in _SHORT:
            return {"type": _SHORT[text]}
        found = _LIST.match(text)
        if found and found.group(1) in _SHORT:
            return {"type": "array", "items": {"type": _SHORT[found.group(1)]}}
    raise SchemaSpecError(f"field '{where}' has type {kind!r}; use str, int, float, bool, list[str] (or list[int], "
                          "list[float]), a list of allowed values, or a mapping of fields")


def _check_json_schema(schema: dict) -> None:
    try:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError
    except ImportError:  # validation of the schema itself is a nicety; replies are still checked
        return
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as err:
        raise SchemaSpecError(f"not a valid JSON Schema: {err.message}") from None


def schema_text(schema: dict) -> str:
    """The schema as compact JSON text (what requests and cache keys carry). Keys keep their
    order: the order of the properties is the order the model writes the fields in."""
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def describe(schema: dict) -> str:
    """The schema in words for the prompt: what fields the JSON reply must have."""
    return ("Reply with only a JSON object, no other text, with these fields:\n"
            + "\n".join(f"- {name}: {_kind_words(prop)}" + ("" if name in schema.get("required", ()) else
                                                             " (optional)")
                        for name, prop in schema.get("properties", {}).items()))


def _kind_words(prop: dict) -> str:
    if "enum" in prop:
        return "one of " + ", ".join(json.dumps(v) for v in prop["enum"])
    kind = prop.get("type")
    words = {"string": "text", "integer": "a whole number", "number": "a number", "boolean": "true or false"}
    if kind == "array":
        return "a list of " + _kind_words(prop.get("items") or {}).removeprefix("a ").replace("text", "texts")
    if kind == "object":
        return "an object with " + ", ".join(prop.get("properties", {}))
    text = words.get(kind, "a JSON value")
    return f"{text} ({prop['description']})" if prop.get("description") else text


_FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.S)


def extract_json(text: str) -> Any:
    """The JSON object in a reply: the whole reply, a fenced block, or the first ``{...}`` that parses.

    Raises:
        ParseError: (``schema_error``) no JSON object in the reply.
    """
    stripped = text.strip()
    candidates = [stripped] + [m.group(1).strip() for m in _FENCE.finditer(text)]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            pass
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            return decoder.raw_decode(text, start)[0]
        except ValueError:
            continue
    raise ParseError("the reply holds no JSON object" + (" (it ends mid-object: raise max_tokens)"
                                                          if "{" in text else ""), reason=SCHEMA_ERROR)


def problems(value: Any, schema: dict) -> list[str]:
    """Why ``value`` does not match ``schema`` (empty when it does)."""
    from jsonschema import Draft202012Validator

    return [(f"{'.'.join(str(p) for p in err.absolute_path)}: " if err.absolute_path else "") + err.message
            for err in sorted(Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.absolute_path))]


def read_reply(text: str, schema: dict) -> dict:
    """The fields of a JSON reply that matches ``schema``, numbers typed as the schema says.

    Raises:
        ParseError: (``schema_error``) no JSON object, or one that does not validate.
    """
    value = extract_json(text)
    if not isinstance(value, dict):
        raise ParseError(f"the reply is JSON but not an object ({type(value).__name__})", reason=SCHEMA_ERROR)
    found = problems(value, schema)
    if found:
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        raise ParseError("the reply does not match the schema: " + "; ".join(found[:3]) + more, reason=SCHEMA_ERROR)
    return {name: coerce(value.get(name), prop) for name, prop in schema.get("properties", {}).items()}


def valid(text: str, schema: dict) -> bool:
    """Whether a reply reads as a JSON object that matches ``schema``."""
    try:
        read_reply(text, schema)
    except ParseError:
        return False
    return True


def coerce(value: Any, prop: dict) -> Any:
    """A validated value in the type its column has (JSON's 3 for a ``number`` field is 3.0)."""
    if value is None:
        return None
    kind = prop.get("type")
    if kind == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind == "array" and isinstance(value, list):
        return [coerce(v, prop.get("items") or {}) for v in value]
    if kind == "object" and isinstance(value, dict):
        return {k: coerce(value.get(k), p) for k, p in prop.get("properties", {}).items()}
    return value


def polars_dtype(prop: dict):
    """The polars type of a column holding values of ``prop`` (None: let polars infer it)."""
    import polars as pl

    kind = prop.get("type")
    if "enum" in prop:
        values = prop["enum"]
        if all(isinstance(v, str) for v in values):
            return pl.String
        if all(isinstance(v, bool) for v in values):
            return pl.Boolean
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return pl.Int64
        return None
    simple = {"string": pl.String, "integer": pl.Int64, "number": pl.Float64, "boolean": pl.Boolean}
    if kind in simple:
        return simple[kind]
    if kind == "array":
        inner = polars_dtype(prop.get("items") or {})
        return pl.List(inner) if inner is not None else None
    if kind == "object" and prop.get("properties"):
        fields = {k: polars_dtype(p) for k, p in prop["properties"].items()}
        if all(v is not None for v in fields.values()):
            return pl.Struct(fields)
    return None
