"""``distilabel``: a task of distilabel's library (UltraFeedback, PrometheusEval, Genstruct...)
as a step, its prompts and parsing run through the factory's own LLM path."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from ...config import option
from ...errors import FactoryError
from ...hashing import fingerprint
from ..drops import InvalidRow, dropped, rows_to_frame
from ..llm_step import LLMStep, LLMStepConfig
from . import tasks as lib


@dataclass
class DistilabelConfig(LLMStepConfig):
    task: str | None = option(None, help="The task: a class of distilabel.steps.tasks, by its name (UltraFeedback, "
                                         "TextGeneration, PrometheusEval...). Required.")
    options: dict[str, Any] = option(default_factory=dict, help="The task's own options, e.g. {aspect: honesty}; "
                                                                "`factory steps distilabel TASK` lists them.")
    input_mappings: dict[str, str] = option(default_factory=dict, help="Task input -> the column that holds it, "
                                                                       "e.g. {generations: responses}.")
    output_mappings: dict[str, str] = option(default_factory=dict, help="Task output -> the column it goes to.")
    samples: int = option(1, help="Replies per row (distilabel's num_generations); each becomes a row, numbered "
                                  "in `sample`.", min=1)
    template: str | None = option(None, help="Not used: the task builds its own messages (TextGeneration takes "
                                             "`template` among its options).")
    system: str | None = option(None, help="Not used: the task builds its own messages (TextGeneration takes "
                                           "`system_prompt` among its options).")
    max_tokens: int = option(1024, help="Most tokens per reply (the tasks' prompts ask for long ones).", min=1)


class Distilabel(LLMStep):
    """A task of distilabel's library, its prompt and parsing, on the factory's LLM path.

    The task's ``format_input`` builds each row's messages; replies go through the factory's
    cache, retries and samples; the task's ``format_output`` reads them into its output columns.
    A task that declares a JSON Schema asks for JSON where the backend enforces schemas (or
    always, with ``options: {use_default_structured_output: true}``). Needs
    ``pip install 'dataset-factory[distilabel]'``.

    Requires: the task's required inputs (renamed by ``input_mappings``).
    Produces: the task's outputs (renamed by ``output_mappings``); ``model_name`` is left to the
    manifest. A reply the task cannot read, or in which it finds none of its outputs, drops its
    row as ``parse_error`` with the raw reply; a row its ``format_input`` refuses, as ``invalid_input``.

    Example:
        - distilabel: {task: UltraFeedback, options: {aspect: honesty}}
    """

    name = "distilabel"
    Config = DistilabelConfig

    @functools.cached_property
    def task(self):  # the distilabel task, built with the step's options (JSON replies on a copy that asks_json)
        return lib.build_task(lib.find_task(self.config.task), self.config.options, True if self.asks_json else None)

    @property
    def reads_fields(self) -> bool:  # JSON where the backend enforces it, unless the options say no
        return self.config.options.get(lib.JSON_OPTION) is not False and self._task_or_none() is not None \
            and self.schema is not None

    def _task_or_none(self):
        try:
            return self.task
        except FactoryError:  # reported by check()
            return None

    def template_options(self):
        return {}

    def check(self):
        return lib.step_problems(self)

    def requires(self):
        return lib.columns(self, "inputs") if self._task_or_none() is not None else []

    def produces(self):
        return lib.columns(self, "outputs") if self._task_or_none() is not None else []

    def fingerprint(self) -> str:
        return fingerprint([super().fingerprint(), lib.version(), self.asks_json])

    def exchange(self, rows, ctx):
        ctx.report["distilabel"] = {"task": self.config.task, "version": lib.version(), "json": self.json_replies}
        return (yield from super().exchange(rows, ctx))

    def plan(self, rows):
        asked, out, params = [], [], self.generation_params()
        schema = self.schema if self.json_replies else None
        for row in rows:
            try:
                asked.append((row, lib.request(self, row, params, schema)))
            except InvalidRow as err:
                out.append(dropped(row, "invalid_input", str(err)))
        return asked, out

    @functools.cached_property
    def schema(self) -> dict | None:  # the task's declared JSON Schema (distilabel rebuilds it on every call)
        return lib.task_schema(self.task)

    @functools.cached_property
    def json_replies(self) -> bool:  # the task has a schema, and a copy that asks_json or its options ask for JSON
        return bool(getattr(self.task, lib.JSON_OPTION, False)) and self.schema is not None

    def parse(self, reply, row):
        columns = lib.read_output(self.task, reply, lib.inputs_of(self, row), self.json_replies)
        return {self.config.output_mappings.get(k, k): v for k, v in columns.items()}

    def frame(self, rows, data):
        frame = rows_to_frame(rows, like=data)
        return lib.with_columns(frame, self.produces())
