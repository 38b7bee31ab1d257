"""Base classes of recipe steps.

A step has one method to override:

* :class:`RowStep` -- ``process(batch)`` on a batch of rows (a polars DataFrame); the runner
  decides the batches. Rows may be added, changed, expanded or dropped.
* :class:`GlobalStep` -- ``process(table)`` on the whole table (dedup, majority vote,
  generators that need the whole pool).
* :class:`Filter` -- ``keep(row)`` returning True, False or ``(False, "reason")``.
* :class:`LLMStep` -- ``build_messages(row)`` and ``parse(reply, row)``; the base class
  batches the calls, expands samples and drops unparseable replies with reason
  ``parse_error`` (the raw reply is kept in ``rejected/``).

A step marks a row as dropped by setting the ``_drop_reason`` column; the runner moves
such rows to the rejected table and counts them per reason. Steps never know how they
are scheduled, hold no global state and pickle without their backend, so the local and
the Ray runner can both run them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import polars as pl

from ..config import option, to_dict
from ..errors import ParseError
from ..llm.base import Completion, Conversation, GenerationParams, fingerprint

DROP = "_drop_reason"
RAW_REPLY = "_raw_reply"
DROP_DETAIL = "_drop_detail"
INTERNAL_PREFIX = "_"

TEMPLATE_DIR = Path(__file__).parent / "templates"


class InvalidRow(ValueError):
    """A row lacks what a step needs (missing or non-text field): dropped as ``invalid_input``."""


class _NoProgress:
    def update(self, n=1):
        pass

    def reset(self, total=None):
        pass

    def set_postfix_str(self, text, refresh=True):
        pass


class Step:
    """Base of every step. Subclasses set ``name`` (the recipe key) and ``Config``."""

    name: ClassVar[str]
    Config: ClassVar[type]
    kind: ClassVar[str] = "row"
    version: ClassVar[str] = "1"  # bump when a change in behaviour must invalidate cached results
    uses_llm: ClassVar[bool] = False

    def __init__(self, config: Any, *, index: int = 0, seed: int = 0, base_dir: Path | None = None):
        self.config = config
        self.index = index
        self.seed = seed
        self.base_dir = base_dir or Path.cwd()
        self.llm = None  # an LLMClient, set by the runner for LLM steps
        self.progress = _NoProgress()
        # Facts a step wants in the manifest (e.g. which eval items matched). Global steps'
        # reports are cached with their output; row steps' reports cover the batches they ran.
        self.report: dict = {}

    def requires(self) -> list[str]:
        """Columns that must exist before this step (checked when the recipe is validated)."""
        return []

    def produces(self) -> list[str]:
        """Columns this step adds."""
        return []

    def output_columns(self, columns: list[str]) -> list[str]:
        """The columns after this step, given those before it (for validating column flow)."""
        return columns + [c for c in self.produces() if c not in columns]

    def check(self) -> list[tuple[str, str | None, str | None]]:
        """Static checks beyond types (files exist, templates compile): ``(message, key, fix)``."""
        return []

    def process(self, data: pl.DataFrame) -> pl.DataFrame:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Identity of what this step computes (part of every cache key)."""
        parts = [type(self).__module__, type(self).__qualname__, self.version, to_dict(self.config), self.seed]
        if self.llm is not None:
            parts.append(self.llm.backend.model_id)
        return fingerprint(parts)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["llm"] = None
        state["progress"] = _NoProgress()
        state["report"] = {}
        return state


class RowStep(Step):
    """A step over batches of rows: override :meth:`process`."""

    kind = "row"


class GlobalStep(Step):
    """A step that sees the whole table at once: override :meth:`process`.

    Two optional hooks let a distributed runner spread the work without the step knowing
    how it is scheduled:

    * :meth:`group_key` -- the step's output for a row depends only on the rows sharing
      its value in this column (a majority vote per task), so groups can run apart;
    * :meth:`partial` / :meth:`combine` -- the step has a row-parallel first phase
      (``partial`` on any slice of rows, in order) and a final phase that needs the
      whole table (``combine``); ``process`` must equal ``combine(table, [partial(table)])``.
    """

    kind = "global"

    def group_key(self) -> str | None:
        return None

    def partial(self, rows: pl.DataFrame):
        raise NotImplementedError

    def combine(self, table: pl.DataFrame, partials: list) -> pl.DataFrame:
        raise NotImplementedError

    @property
    def splits(self) -> bool:
        """Whether the step implements :meth:`partial` and :meth:`combine`."""
        return type(self).partial is not GlobalStep.partial


class Filter(RowStep):
    """Keeps or drops each row: override :meth:`keep`.

    ``keep`` returns True to keep the row, False to drop it with the filter's
    ``default_reason``, ``(False, "reason")``, or ``(False, "reason", "detail")``.
    Vectorised filters may override :meth:`process` instead and set the
    ``_drop_reason`` column themselves.
    """

    default_reason: ClassVar[str] = "filtered"

    def keep(self, row: dict) -> bool | tuple:
        raise NotImplementedError

    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        reasons, details = [], []
        for row in batch.iter_rows(named=True):
            verdict = self.keep(row)
            if not isinstance(verdict, tuple):
                verdict = (True,) if verdict else (False, self.default_reason)
            kept = bool(verdict[0])
            reasons.append(None if kept else verdict[1])
            details.append(verdict[2] if not kept and len(verdict) > 2 else None)
        return batch.with_columns(pl.Series(DROP, reasons, dtype=pl.String),
                                  pl.Series(DROP_DETAIL, details, dtype=pl.String))


@dataclass
class LLMStepConfig:
    """Options every LLM step has."""

    llm: dict | None = option(None, help="Backend for this step; merged over the recipe's `llm` "
                                         "(e.g. a stronger judge model).")
    temperature: float = option(0.0, help="Sampling temperature; 0 is greedy.", min=0.0, max=5.0)
    top_p: float = option(1.0, help="Nucleus sampling mass.", min=0.0, max=1.0)
    max_tokens: int = option(256, help="Most tokens generated per reply.", min=1)
    stop: list[str] = option(default_factory=list, help="Strings that end a reply (not included in it).")
    template: str | None = option(None, help="The prompt as a Jinja template (inline text or a .j2 file); "
                                             "row columns are variables. Default: the step's own template.")
    system: str | None = option(None, help="A system message sent before the prompt.")


class LLMStep(RowStep):
    """A step that asks an LLM about each row: override ``build_messages`` and ``parse``.

    ``parse`` returns the new columns for one reply, or raises :class:`ParseError`; the row
    is then dropped with reason ``parse_error`` and its raw reply kept. A step with
    ``samples > 1`` in its config yields one row per sample, numbered in column ``sample``.
    """

    uses_llm = True
    Config = LLMStepConfig
    sample_column: ClassVar[str] = "sample"

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.llm_config = None  # the validated backend config, set when the recipe is resolved
        self._template = None

    # -- what subclasses override -------------------------------------------------------
    def build_messages(self, row: dict) -> Conversation:
        """The conversation for one row. Default: the step's template, rendered with the row."""
        return self.messages(self.render(row))

    def parse(self, reply: str, row: dict) -> dict:
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------
    @property
    def samples(self) -> int:
        return getattr(self.config, "samples", 1)

    def generation_params(self) -> GenerationParams:
        c = self.config
        return GenerationParams(n=self.samples, temperature=c.temperature, top_p=c.top_p,
                                max_tokens=c.max_tokens, stop=tuple(c.stop))

    def messages(self, prompt: str, prefill: str | None = None) -> Conversation:
        conv = []
        if self.config.system:
            conv.append({"role": "system", "content": self.config.system})
        conv.append({"role": "user", "content": prompt})
        if prefill is not None:
            conv.append({"role": "assistant", "content": prefill})
        return conv

    def template_source(self) -> str:
        t = self.config.template
        if t is None:
            return (TEMPLATE_DIR / f"{self.name}.j2").read_text(encoding="utf-8")
        if t.endswith(".j2") and "\n" not in t:
            path = Path(t) if Path(t).is_absolute() else self.base_dir / t
            return path.read_text(encoding="utf-8")
        return t

    def render(self, row: dict, **extra) -> str:
        if self._template is None:
            self._template = compile_template(self.template_source())
        return self._template.render({**row, **extra, "config": self.config}).strip()

    def check(self):
        problems = []
        t = self.config.template
        if t and t.endswith(".j2") and "\n" not in t:
            path = Path(t) if Path(t).is_absolute() else self.base_dir / t
            if not path.is_file():
                return [(f"template file '{t}' does not exist", "template",
                         "give a path relative to the recipe file, or inline the template text")]
        try:
            compile_template(self.template_source())
        except Exception as err:  # jinja2.TemplateSyntaxError and friends
            problems.append((f"the template does not compile: {err}", "template", "fix the Jinja syntax"))
        return problems

    def text(self, row: dict, column: str) -> str:
        """``row[column]`` as non-empty text, or :class:`InvalidRow`."""
        value = row.get(column)
        if not isinstance(value, str):
            raise InvalidRow(f"column '{column}' is {type(value).__name__ if value is not None else 'missing'}, "
                             "not text")
        if not value.strip():
            raise InvalidRow(f"column '{column}' is empty")
        return value

    def fingerprint(self) -> str:
        return fingerprint([super().fingerprint(), self.template_source()])

    # -- the batch loop -----------------------------------------------------------------
    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        rows = batch.to_dicts()
        out: list[dict] = []
        todo: list[tuple[dict, Conversation]] = []
        for row in rows:
            try:
                todo.append((row, self.build_messages(row)))
            except InvalidRow as err:
                out.append({**row, DROP: "invalid_input", DROP_DETAIL: str(err)})
        completions = self.llm.chat([conv for _, conv in todo], self.generation_params()) if todo else []
        for (row, _), completion in zip(todo, completions):
            out.extend(self.rows_from_completion(row, completion))
        return rows_to_frame(out, like=batch)

    def rows_from_completion(self, row: dict, completion: Completion) -> list[dict]:
        if completion.error is not None:
            return [{**row, DROP: completion.error_reason, DROP_DETAIL: completion.error}]
        out = []
        for k, reply in enumerate(completion.texts):
            extra = {self.sample_column: k} if self.samples > 1 else {}
            try:
                columns = self.parse(reply, row)
            except ParseError as err:
                out.append({**row, **extra, DROP: err.reason, RAW_REPLY: reply, DROP_DETAIL: str(err)})
                continue
            out.append({**row, **columns, **extra})
        return out


def compile_template(source: str):
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False,
                             autoescape=False)
    return env.from_string(source)


def rows_to_frame(rows: list[dict], like: pl.DataFrame | None = None) -> pl.DataFrame:
    """Rows (dicts) as a frame; with no rows, an empty frame with ``like``'s schema."""
    if not rows:
        frame = like.clear() if like is not None else pl.DataFrame()
        return frame.with_columns(pl.lit(None, dtype=pl.String).alias(DROP))
    return pl.from_dicts(rows, infer_schema_length=None, strict=False)

