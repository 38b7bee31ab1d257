"""``generate``: the user's own prompt as a step, with a text column or typed columns out."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any

import polars as pl

from ..config import option
from ..errors import ParseError
from ..hashing import fingerprint
from ..llm.schema import SchemaSpecError, describe, polars_dtype, read_reply, schema_text, to_json_schema
from .drops import rows_to_frame
from .llm_step import LLMStep, LLMStepConfig
from .prompts import compile_template, is_template_path


@dataclass
class GenerateConfig(LLMStepConfig):
    template: str | None = option(None, help="The prompt: a Jinja template (inline text or a .j2 file) over the "
                                             "row's columns, e.g. 'Write a {{ difficulty }} question about "
                                             "{{ topic }}.'. Required.")
    samples: int = option(1, help="Replies per row; each becomes a row, numbered in column `sample`.", min=1)
    output: str = option("text", help="The column that takes the reply (without `schema`).")
    schema: Any = option(None, help="Structured output: the reply is a JSON object whose fields become typed columns. "
                                    "A short field list such as {topic: str, difficulty: [easy, medium, hard], "
                                    "steps: [str], score: float} (types str, int, float, bool, [T] or list[T] -- "
                                    "quoted inside {...} -- a list of allowed values, a nested mapping; a name "
                                    "ending in `?` is optional), a JSON "
                                    "Schema of an object, or a .json file holding one. Enforced while decoding where "
                                    "the backend can; a reply that does not match drops its row as `schema_error`.")
    describe_schema: bool = option(True, help="Append the schema's fields, in words, to the prompt (the model "
                                              "writes better values when it knows what they are for).")


class Generate(LLMStep):
    """Your own prompt, over each row: a text column, or typed columns from a JSON reply.

    Requires: the columns the template names.
    Produces: ``output`` (default ``text``), or one column per field of ``schema``, typed
    (str -> String, int -> Int64, float -> Float64, bool -> Boolean, list[str] -> List(String)).
    A reply that does not match the schema drops its row as ``schema_error`` with the reason
    and the raw reply in ``rejected/``.

    Example:
        - generate:
            template: "Write one {{ difficulty }} exercise about {{ topic }}."
            schema: {question: str, answer: int, hints: [str]}
            temperature: 0.7
    """

    name = "generate"
    Config = GenerateConfig

    @functools.cached_property
    def json_schema(self) -> dict | None:
        return read_schema(self.config.schema, self.path)

    def check(self):
        if self.config.template is None:
            return [("the step needs the prompt", "template", "add `template:` with the prompt as a Jinja template "
                     "over the row's columns, e.g. template: 'Write a question about {{ topic }}.'")]
        return super().check() + schema_problems(self.config.schema, self.path)

    def template_options(self):
        return {"template": "generate"}

    def template_source(self, option: str = "template") -> str:
        value = self.config.template
        return self.path(value).read_text(encoding="utf-8") if is_template_path(value) else value

    def requires(self):
        return template_variables(self.template_source()) if self.config.template is not None else []

    def produces(self):
        schema = self._schema_or_none()
        return list(schema["properties"]) if schema else [self.config.output]

    def _schema_or_none(self) -> dict | None:
        try:
            return self.json_schema
        except (SchemaSpecError, ValueError, OSError):  # reported by check()
            return None

    def fingerprint(self) -> str:
        return fingerprint([super().fingerprint(), self._schema_or_none()])

    def build_messages(self, row):
        prompt = self.render(row)
        if self.json_schema is not None and self.config.describe_schema:
            prompt = f"{prompt}\n\n{describe(self.json_schema)}"
        return self.messages(prompt)

    def generation_params(self):
        params = super().generation_params()
        schema = self.json_schema
        return params if schema is None else dataclasses.replace(params, json_schema=schema_text(schema))

    def parse(self, reply, row):
        if self.json_schema is not None:
            return read_reply(reply, self.json_schema)
        if not reply.strip():
            raise ParseError("the reply is empty", reason="empty_reply")
        return {self.config.output: reply.strip()}

    def frame(self, rows, data):
        frame = rows_to_frame(rows, like=data)
        return typed_columns(frame, self.json_schema) if self.json_schema is not None else frame


def read_schema(spec: Any, path) -> dict | None:
    """The JSON Schema of a ``schema:`` option (a field list, a JSON Schema, or a .json file at ``path(spec)``)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = json.loads(path(spec).read_text(encoding="utf-8"))
    return to_json_schema(spec)


def schema_problems(spec: Any, path) -> list[tuple[str, str, str]]:
    """What is wrong with a ``schema:`` option, as a step's check reports it."""
    if spec is None:
        return []
    if isinstance(spec, str) and not (spec.endswith(".json") and path(spec).is_file()):
        return [(f"schema '{spec}' is not a .json file that exists", "schema", "give a field list such as "
                 "{topic: str, steps: list[str]}, a JSON Schema mapping, or the path of a .json file relative to "
                 "the recipe")]
    try:
        read_schema(spec, path)
    except (SchemaSpecError, ValueError) as err:
        return [(str(err), "schema", "see `factory steps generate` for the forms a schema takes")]
    return []


def template_variables(source: str) -> list[str]:
    """The row columns a template names (checked against the recipe's columns before any model loads)."""
    try:
        import jinja2.meta

        names = jinja2.meta.find_undeclared_variables(compile_template("").environment.parse(source))
    except Exception:  # noqa: BLE001 - a template that does not parse is reported by check()
        return []
    return sorted(names - {"config"})


def typed_columns(frame: pl.DataFrame, schema: dict) -> pl.DataFrame:
    """``frame`` with a column of its type for every field of ``schema``, on an empty table too (no
    later step misses one)."""
    for name, prop in schema["properties"].items():
        dtype = polars_dtype(prop)
        if name not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=dtype or pl.String).alias(name))
        elif dtype is not None and frame.schema[name] != dtype:
            frame = frame.with_columns(pl.col(name).cast(dtype, strict=False))
    return frame
