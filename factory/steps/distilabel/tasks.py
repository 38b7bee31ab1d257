"""distilabel's task library, seen from the factory: which tasks run, their options, inputs and
outputs, their messages and the reading of a reply.

A distilabel task is a pydantic model that needs an ``llm``; here it gets :func:`stand_in_llm`,
which never generates: the factory sends the task's messages through its own LLM path (cache,
retries, samples, structured output) and hands each reply to the task's ``format_output``.
Only tasks whose ``process`` is distilabel's default (one generation per input row,
``format_input`` -> LLM -> ``format_output``) can run this way; the others are listed with why
not. Importing distilabel is slow (about 2 s) and noisy (pydantic warnings, a rich traceback
hook, a logged warning for every task built outside a ``Pipeline``), so it happens here,
once, quietly, and only for recipes and commands that name the step.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import json
import logging
import sys
import types
import typing
import warnings
from dataclasses import dataclass
from typing import Any

from ...config import closest
from ...errors import FactoryError, ParseError
from ...llm.base import Request
from ...llm.schema import describe, extract_json
from ..drops import InvalidRow
from ..json_replies import json_params

INSTALL = "pip install 'dataset-factory[distilabel]'"
# distilabel's own Step/Task fields: pipeline wiring the factory does its own way.
PIPELINE_FIELDS = {
    "num_generations": "use the step's `samples:` (each reply becomes a row, numbered in `sample`)",
    "group_generations": "each sample is its own row, numbered in `sample`",
    "input_mappings": "give `input_mappings:` on the step, beside `options:`",
    "output_mappings": "give `output_mappings:` on the step, beside `options:`",
    "llm": "the model is the recipe's `llm:` (or the step's `llm:`)",
}
# Tasks that look runnable but are not, and what to use instead where the factory has it.
NOT_RUNNABLE = {
    "TextGenerationWithImage": "sends images, which the factory's LLM path does not carry",
}
INSTEAD = {"EvolInstruct": "evol_instruct", "EvolComplexity": "evol_instruct", "EvolInstructGenerator": "self_instruct"}
JSON_OPTION = "use_default_structured_output"


class DistilabelUnavailable(FactoryError):
    """distilabel is not installed, or does not import."""

    exit_code = 2


@functools.cache
def tasks_module():
    """``distilabel.steps.tasks``, imported quietly (see the module docstring).

    Raises:
        DistilabelUnavailable: not installed, or an undeclared need of its is missing.
    """
    if importlib.util.find_spec("distilabel") is None:
        raise DistilabelUnavailable(f"the distilabel step needs distilabel, which is not installed; {INSTALL}")
    hook = sys.excepthook
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import distilabel.steps.tasks as module
    except ImportError as err:
        raise DistilabelUnavailable(f"distilabel is installed but does not import ({err}); install the versions the "
                                    f"factory was tested with: {INSTALL}") from err
    finally:
        sys.excepthook = hook  # distilabel installs rich's traceback printer, locals and all
    logging.getLogger("distilabel.step").setLevel(logging.ERROR)  # "hasn't received a pipeline", per task
    return module


@functools.cache
def version() -> str:
    """The installed distilabel's version."""
    tasks_module()
    from importlib.metadata import version as dist_version

    return dist_version("distilabel")


@functools.cache
def stand_in_llm():
    """The ``llm`` a task is built with: it names the model and holds the structured-output
    setting a task reads, and refuses to generate (the factory sends the requests)."""
    from distilabel.models.llms.base import LLM

    class FactoryLLM(LLM):
        structured_output: Any = None

        @property
        def model_name(self) -> str:
            return "factory"

        def generate(self, inputs, num_generations: int = 1, **kwargs):
            raise RuntimeError("the factory sends a distilabel task's requests through its own LLM path")

    return FactoryLLM


@dataclass(frozen=True)
class TaskClass:
    """A task class of ``distilabel.steps.tasks`` and why it cannot run here (None: it can)."""

    name: str
    cls: type
    reason: str | None

    def options(self) -> dict[str, Any]:
        """The task's own options (pydantic fields beyond distilabel's Task) and their fields."""
        base = tasks_module().Task.model_fields
        own = {k: f for k, f in self.cls.model_fields.items() if k not in base}
        return {**own, JSON_OPTION: self.cls.model_fields[JSON_OPTION]}

    def required(self) -> list[str]:
        return [k for k, f in self.options().items() if f.is_required()]

    def sample(self):
        """An instance with the default options (the first allowed value of a required one that
        lists its values), or None when a required option has no such value."""
        options = {}
        for name in self.required():
            choices = literal_values(self.options()[name].annotation)
            if not choices:
                return None
            options[name] = choices[0]
        try:
            return build_task(self, options)
        except TaskOptionsError:
            return None


@functools.cache
def catalog() -> dict[str, TaskClass]:
    """Every task class ``distilabel.steps.tasks`` exports, by name, runnable ones first."""
    module = tasks_module()
    found = {}
    for name in sorted(set(module.__all__)):
        cls = getattr(module, name)
        if not inspect.isclass(cls) or not issubclass(cls, module.base._Task) or inspect.isabstract(cls):
            continue
        found[name] = TaskClass(name, cls, _why_not(name, cls, module))
    return dict(sorted(found.items(), key=lambda item: (item[1].reason is not None, item[0])))


def _why_not(name: str, cls: type, module) -> str | None:
    instead = f" (the factory's `{INSTEAD[name]}` step does this)" if name in INSTEAD else ""
    if name in NOT_RUNNABLE:
        return NOT_RUNNABLE[name]
    if issubclass(cls, module.GeneratorTask):
        return "a generator task: it makes rows from nothing in a loop of its own" + instead
    if not issubclass(cls, module.Task):
        return "not a text task (it generates images, or sees the whole table at once)"
    if cls.process is not module.Task.process:
        return "runs a loop of requests of its own (its process()), not one request per row" + instead
    try:
        with _quiet():
            cls(llm=stand_in_llm()())
    except Exception as err:  # noqa: BLE001 - pydantic's error, or the task's own validator
        if "Field required" not in str(err):
            return _first_line(err) + instead
    return None


class TaskOptionsError(FactoryError):
    """A task's options do not validate: ``problems`` are ``(message, key path, fix)``."""

    def __init__(self, problems: list[tuple[str, tuple, str | None]]):
        super().__init__("; ".join(f"{message}; {fix}" if fix else message for message, _, fix in problems))
        self.problems = problems


def find_task(name: str) -> TaskClass:
    """The task class named ``name``.

    Raises:
        TaskOptionsError: no such task, or one that cannot run here (at key ``task``).
    """
    tasks = catalog()
    if name not in tasks:
        runnable = [n for n, t in tasks.items() if t.reason is None]
        match = closest(name, tasks)
        fix = f"did you mean '{match}'?" if match else f"tasks that run here: {', '.join(runnable)}"
        raise TaskOptionsError([(f"distilabel {version()} has no task '{name}'", ("task",),
                                 fix + " (`factory steps distilabel` lists them)")])
    task = tasks[name]
    if task.reason is not None:
        raise TaskOptionsError([(f"distilabel's {name} cannot run as a factory step: {task.reason}", ("task",),
                                 "`factory steps distilabel` lists the tasks that can")])
    return task


def build_task(task: TaskClass, options: dict, json_mode: bool | None = None):
    """An instance of ``task`` with ``options``, loaded (templates read), its LLM the stand-in;
    ``json_mode`` sets ``use_default_structured_output`` (None: as ``options`` say, else the
    task's default).

    Raises:
        TaskOptionsError: an option the task does not take, or one its validation refuses.
    """
    known = task.options()
    problems = []
    for key in options:
        if key in known:
            continue
        if key in PIPELINE_FIELDS or key in tasks_module().Task.model_fields:
            fix = PIPELINE_FIELDS.get(key, "the factory runs the task itself; leave it out")
            problems.append((f"'{key}' is a distilabel pipeline setting, not an option of {task.name}",
                             ("options", key), fix))
            continue
        match = closest(key, known)
        problems.append((f"{task.name} has no option '{key}'", ("options", key),
                         f"did you mean '{match}'?" if match else f"its options: {', '.join(known)}"))
    if problems:
        raise TaskOptionsError(problems)
    options = dict(options)
    if json_mode is not None:
        options[JSON_OPTION] = json_mode
    llm = stand_in_llm()()
    if options.get(JSON_OPTION, known[JSON_OPTION].default):
        llm.structured_output = {"format": "json", "schema": {}}  # set: distilabel then looks for no outlines
    try:
        with _quiet():
            built = task.cls(llm=llm, **options)
            built.load()
    except Exception as err:  # noqa: BLE001 - pydantic.ValidationError or the task's own
        raise TaskOptionsError(_option_problems(task, err)) from err
    return built


def _option_problems(task: TaskClass, err: Exception) -> list[tuple[str, tuple, str | None]]:
    errors = getattr(err, "errors", None)
    if errors is None:
        return [(f"{task.name} refused its options: {_first_line(err)}", ("options",), None)]
    out = []
    for e in errors():
        key = str(e["loc"][0]) if e.get("loc") else None
        path = ("options", key) if key else ("options",)
        message = e["msg"].removeprefix("Value error, ")
        if e.get("type") == "missing" and key:
            out.append((f"{task.name} needs option '{key}'", path, f"add it under `options:` "
                        f"({type_words(task.options()[key].annotation)})"))
        else:
            out.append((f"{task.name}: {message}" if key is None else message, path,
                        f"`factory steps distilabel {task.name}` lists its options"))
    return out


def task_inputs(task) -> dict[str, bool]:
    """The task's input columns, each with whether it is required."""
    inputs = task.inputs
    return dict(inputs) if isinstance(inputs, dict) else {name: True for name in inputs}


def task_outputs(task) -> list[str]:
    """The task's output columns (less ``model_name``: the manifest records the model)."""
    outputs = task.outputs
    return [name for name in (list(outputs) if isinstance(outputs, (list, dict)) else []) if name != "model_name"]


def task_schema(task) -> dict | None:
    """The JSON Schema the task's replies follow when it asks for JSON, or None."""
    return task.get_structured_output()


def messages(task, inputs: dict) -> tuple[list[dict], dict | None]:
    """The conversation the task builds for ``inputs`` (its ``format_input``), and the JSON
    Schema of its reply when the task gives one per row (structured generation).

    Raises:
        InvalidRow: the task's format_input failed on these inputs, or built a message that is not text.
    """
    try:
        formatted = task.format_input(inputs)
    except Exception as err:  # noqa: BLE001 - whatever the task's own code raises on a row it cannot take
        raise InvalidRow(f"{type(task).__name__}.format_input failed on this row: {type(err).__name__}: "
                         f"{_first_line(err)}") from err
    schema = None
    if isinstance(formatted, tuple):
        formatted, structured = formatted
        if structured and structured.get("format", "json") == "json" and structured.get("schema"):
            schema = structured["schema"]
            schema = json.loads(schema) if isinstance(schema, str) else schema
    if isinstance(formatted, str):
        formatted = [{"role": "user", "content": formatted}]
    for message in formatted:
        if not isinstance(message.get("content"), str):
            raise InvalidRow(f"{type(task).__name__} built a {message.get('role')} message that is not text "
                             "(an image?); the factory's backends send text")
    return [{"role": m["role"], "content": m["content"]} for m in formatted], schema


def described(messages: list[dict], schema: dict) -> list[dict]:
    """``messages`` with the JSON reply's fields described after the last user message."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return [{**m, "content": f"{m['content']}\n\n{describe(schema)}"} if i == last else m
            for i, m in enumerate(messages)]


def read_output(task, reply: str, inputs: dict, json_reply: bool) -> dict:
    """The task's output columns from one reply (its ``format_output``); ``json_reply``: the reply
    was asked for as JSON, and the object in it is what the task reads.

    Raises:
        ParseError: the task's format_output failed, or found none of its outputs in the reply.
    """
    name = type(task).__name__
    if json_reply:
        reply = json.dumps(extract_json(reply), ensure_ascii=False)
    try:
        result = task.format_output(reply, inputs)
    except Exception as err:  # noqa: BLE001 - the task's parsing code, whatever it raises
        raise ParseError(f"{name}.format_output could not read the reply: {type(err).__name__}: "
                         f"{_first_line(err)}") from err
    outputs = task_outputs(task)
    columns = {k: result.get(k) for k in outputs} if isinstance(result, dict) else {}
    if all(_empty(v) for v in columns.values()):
        raise ParseError(f"{name}.format_output found none of its outputs ({', '.join(outputs)}) in the reply")
    return columns


def _empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple)):
        return all(_empty(v) for v in value)
    return False


def literal_values(annotation: Any) -> list:
    """The values a ``Literal`` annotation (or an Optional one) allows; empty for other types."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [v for a in typing.get_args(annotation) for v in literal_values(a)]
    return []


def type_words(annotation: Any) -> str:
    """An option's type for people: its allowed values, or the type's short name."""
    values = literal_values(annotation)
    if values:
        return "one of " + ", ".join(map(str, values))
    text = getattr(annotation, "__name__", None) if typing.get_origin(annotation) is None else None
    return text or str(annotation).replace("typing.", "")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def _quiet():
    """Silences pydantic's warnings while a task is built (serialisation hints, not problems)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def step_problems(step) -> list[tuple[str, Any, str | None]]:
    """What is wrong with a distilabel step's config, as :meth:`Step.check` reports it (keys may
    be paths: ``("options", "aspect")``)."""
    c = step.config
    if c.task is None:
        return [("the step needs a task", "task", "add `task:` with the name of a class of distilabel.steps.tasks, "
                 "e.g. task: UltraFeedback (`factory steps distilabel` lists them)")]
    problems = [(f"`{key}` does not apply: a distilabel task builds its own messages", key,
                 "set the prompt through the task's options (TextGeneration takes `template` and `system_prompt`)")
                for key in ("template", "system") if getattr(c, key) is not None]
    try:
        task = step.task
    except DistilabelUnavailable as err:
        return problems + [(str(err), "task", None)]
    except TaskOptionsError as err:
        return problems + err.problems
    for option, names, kind in (("input_mappings", task_inputs(task), "inputs"),
                                ("output_mappings", task_outputs(task), "outputs")):
        for name in getattr(c, option):
            if name not in names:
                match = closest(name, names)
                problems.append((f"{c.task} has no {kind[:-1]} '{name}'", (option, name),
                                 f"did you mean '{match}'?" if match else f"its {kind}: {', '.join(names)}"))
    return problems


def columns(step, which: str) -> list[str]:
    """The columns a step's task reads (``which="inputs"``: the required ones) or writes
    (``"outputs"``), as the step's ``input_mappings`` / ``output_mappings`` name them."""
    if which == "inputs":
        return [step.config.input_mappings.get(n, n) for n, required in task_inputs(step.task).items() if required]
    return [step.config.output_mappings.get(n, n) for n in task_outputs(step.task)]


def request(step, row: dict, params, schema: dict | None):
    """The request for ``row``: the task's messages, and with a JSON Schema (the row's own, from a
    structured-generation task, else ``schema``) the reply's fields described after the prompt,
    as every step that asks for JSON does.

    Raises:
        InvalidRow: see :func:`inputs_of` and :func:`messages`.
    """
    conversation, own = messages(step.task, inputs_of(step, row))
    schema = own or schema
    return Request(described(conversation, schema), json_params(params, schema)) if schema \
        else Request(conversation, params)


def inputs_of(step, row: dict) -> dict:
    """What the task's format_input and format_output get for ``row``: the row, with each task
    input under its own name (``input_mappings`` names the column that holds it); an optional
    input that is missing or null is left out, as the tasks expect.

    Raises:
        InvalidRow: a required input is missing or null.
    """
    values = dict(row)
    for name, required in task_inputs(step.task).items():
        column = step.config.input_mappings.get(name, name)
        value = row.get(column)
        if value is not None:
            values[name] = value
        elif required:
            raise InvalidRow(f"column '{column}' (input '{name}' of {step.config.task}) is "
                             f"{'missing' if column not in row else 'null'}")
        else:
            values.pop(name, None)
    return values


def with_columns(frame, columns: list[str]):
    """``frame`` with every column of ``columns``, null where missing (an empty or all-dropped
    table keeps the step's schema)."""
    import polars as pl

    missing = [c for c in columns if c not in frame.columns]
    return frame.with_columns([pl.lit(None, dtype=pl.String).alias(c) for c in missing]) if missing else frame


def catalog_lines() -> list[str]:
    """``factory steps distilabel``: the tasks that run here with their inputs (``?``: optional)
    and outputs, then those that do not and why."""
    lines = [f"distilabel {version()} tasks (inputs -> outputs; ?: optional):"]
    for name, task in catalog().items():
        if task.reason is None:
            lines.append(f"  {name:<32} {_signature(task)}")
    lines.append("not runnable as a step:")
    lines += [f"  {name:<32} {task.reason}" for name, task in catalog().items() if task.reason is not None]
    return lines


def task_lines(name: str) -> list[str]:
    """``factory steps distilabel TASK``: the task's summary, inputs, outputs and options."""
    task = find_task(name)
    doc = inspect.cleandoc(task.cls.__doc__ or "").split("\n\n")[0]
    lines = [f"{name}: {doc}", f"  {_signature(task)}", "options:"]
    for option, field in task.options().items():
        default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
        if len(default) > 70:
            default = default[:67] + "..."
        lines.append(f"  {option} = {default}    [{type_words(field.annotation)}]")
    return lines


def _signature(task: TaskClass) -> str:
    built = task.sample()
    if built is None:
        return f"(inputs and outputs depend on options: {', '.join(task.required())})"
    inputs = ", ".join(n + ("" if required else "?") for n, required in task_inputs(built).items())
    outputs = ", ".join(task_outputs(built))
    schema = " [JSON schema]" if task_schema(built) is not None else ""
    needs = f" (needs options: {', '.join(task.required())})" if task.required() else ""
    return f"{inputs} -> {outputs}{schema}{needs}"
