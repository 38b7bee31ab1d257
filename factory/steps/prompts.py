"""The prompt side of an LLM step: its Jinja templates, their variables, and the conversation it sends.

:class:`TemplatedStep` renders a step's template options (default files in ``templates/``)
with a row's columns, checks that they compile, makes their text part of the step's identity,
and wraps a prompt in the conversation sent (system message, prefill, or the JSON fields asked for).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import ClassVar

from ..hashing import fingerprint
from ..llm.base import Conversation
from ..llm.schema import describe
from .base import Step
from .drops import InvalidRow

TEMPLATE_DIR = Path(__file__).parent / "templates"


def is_template_path(value: str) -> bool:
    """A template option names a file (``prompts/judge.j2``) rather than holding the text."""
    return value.endswith(".j2") and "\n" not in value


def compile_template(source: str):
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False,
                             autoescape=False)
    return env.from_string(source)


class Prompt:
    """A compiled template that renders as ``Template.render`` does, less the copy of the
    template's globals (a ChainMap, slow to walk) that makes on every call: :attr:`globals` is
    that copy, taken once, and callers pass ``{**globals, **variables}``."""

    def __init__(self, template):
        self.template = template
        self.globals = dict(template.globals)

    def render(self, variables: dict) -> str:
        """The text for ``variables``, which start with :attr:`globals` (``{**globals, **vars}``)."""
        t = self.template
        env = t.environment
        context = env.context_class(env, variables, t.name, t.blocks, globals=self.globals)
        try:
            return env.concat(t.root_render_func(context))
        except Exception:
            env.handle_exception()


class TemplatedStep(Step):
    """A step whose prompts are Jinja templates over a row's columns.

    ``templates`` maps the step's template options to their default files in ``templates/``;
    a step with several prompts lists each. An option left unset uses its default file; one
    that ends in ``.j2`` names a file beside the recipe; any other value is the template.
    """

    templates: ClassVar[dict[str, str]] = {}  # option -> default template file; default {"template": name}
    # True on the copy of an LLM step that asks for JSON in a run (see LLMStep.for_client); the
    # templates see it as `structured`, and the conversation describes the JSON fields asked for.
    asks_json: bool = False

    # -- templates -----------------------------------------------------------------------
    def template_options(self) -> dict[str, str]:
        """Each template option and the default template file it falls back on."""
        return self.templates or {"template": self.name}

    def template_source(self, option: str = "template") -> str:
        value = getattr(self.config, option)
        if value is None:
            return (TEMPLATE_DIR / f"{self.template_options()[option]}.j2").read_text(encoding="utf-8")
        if is_template_path(value):
            return self.path(value).read_text(encoding="utf-8")
        return value

    @functools.cached_property
    def _compiled(self) -> dict:
        return {}

    def render(self, row: dict, option: str = "template", **extra) -> str:
        template = self._compiled.get(option)
        if template is None:
            template = self._compiled[option] = Prompt(compile_template(self.template_source(option)))
        # `structured`: the reply is asked for as JSON (the default templates leave out their
        # "end with Score: N" wording then; the fields are described after the prompt).
        return template.render({**template.globals, **row, "structured": self.asks_json, **extra,
                                "config": self.config}).strip()

    def check(self):
        problems = []
        for name in self.template_options():
            value = getattr(self.config, name)
            if value is not None and is_template_path(value) and not self.path(value).is_file():
                problems.append((f"template file '{value}' does not exist", name,
                                 "give a path relative to the recipe file, or inline the template text"))
                continue
            try:
                compile_template(self.template_source(name))
            except Exception as err:  # jinja2.TemplateSyntaxError and friends
                problems.append((f"the template does not compile: {err}", name, "fix the Jinja syntax"))
        return problems

    def fingerprint(self) -> str:
        return fingerprint([super().fingerprint(), [self.template_source(o) for o in self.template_options()]])

    # -- variables -----------------------------------------------------------------------
    def task_variables(self, row: dict) -> dict:
        """The task and its optional input as the templates name them (``task``, ``task_input``),
        for steps whose config has ``column`` and ``input_column``."""
        task_input = row.get(self.config.input_column)
        return {"task": self.text(row, self.config.column), "task_input": task_input if isinstance(task_input, str)
                else ""}

    def text(self, row: dict, column: str) -> str:
        """``row[column]`` as non-empty text, or :class:`InvalidRow`."""
        value = row.get(column)
        if not isinstance(value, str):
            raise InvalidRow(f"column '{column}' is {type(value).__name__ if value is not None else 'missing'}, "
                             "not text")
        if not value.strip():
            raise InvalidRow(f"column '{column}' is empty")
        return value

    # -- the conversation ----------------------------------------------------------------
    def messages(self, prompt: str, prefill: str | None = None) -> Conversation:
        conv = []
        if self.config.system:
            conv.append({"role": "system", "content": self.config.system})
        conv.append({"role": "user", "content": prompt})
        if prefill is not None:
            conv.append({"role": "assistant", "content": prefill})
        return conv

    def conversation(self, prompt: str, schema: dict | None, prefill: str | None = None) -> Conversation:
        """The conversation that asks ``prompt``: in a run that asks for JSON (:attr:`asks_json`),
        for a JSON reply that matches ``schema`` (its fields described after the prompt, no
        prefill); else with ``prefill``, the start of a text reply."""
        if self.asks_json and schema is not None:
            return self.messages(f"{prompt}\n\n{describe(schema)}")
        return self.messages(prompt, prefill=prefill)
