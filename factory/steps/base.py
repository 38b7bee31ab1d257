"""Base classes of recipe steps.

A step has one small method to write:

* :class:`RowStep` -- ``process(batch, ctx)`` on a batch of rows (a polars DataFrame); the
  executor decides the batches. Rows may be added, changed, expanded or dropped.
* :class:`GlobalStep` -- ``process(table, ctx)`` on the whole table (generators that need
  the pool, majority votes), with optional hooks that let an executor spread the work.
* :class:`Filter` -- ``keep(row)``: True, False or ``(False, "reason"[, "detail"])``.
* :class:`TableFilter` -- a vectorised ``keep(table, ctx)``: a frame with a ``reason`` per
  row (null keeps it), optionally a ``detail``, and any columns to add.
* :class:`LLMStep` -- ``build_messages(row)`` and ``parse(reply, row)``; steps that ask more
  than once per row, or plan rounds over the whole table, write ``exchange(rows)`` instead.
  Requests go through the one LLM path (:mod:`factory.llm.requests`); failures and
  unreadable replies become drops here, the same way for every step.

A step marks a row as dropped by setting the ``_drop_reason`` column (see :func:`dropped`);
the driver moves such rows to the rejected table and counts them per reason. Steps never
know how they are scheduled and hold no state between runs beside caches of what their
config implies (compiled templates), which are rebuilt wherever a copy of the step runs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import polars as pl

from ..config import option, to_dict
from ..errors import ParseError, format_path
from ..hashing import fingerprint
from ..llm.base import Completion, Conversation, GenerationParams, Request
from ..llm.schema import describe, schema_text

DROP = "_drop_reason"
RAW_REPLY = "_raw_reply"
DROP_DETAIL = "_drop_detail"
TRUNCATED = "truncated"  # the drop reason of a reply cut at max_tokens, and the column that marks kept ones
CUT = "_cut"  # marks, until the driver counts them, kept rows whose reply was cut
INTERNAL_PREFIX = "_"

TEMPLATE_DIR = Path(__file__).parent / "templates"


class InvalidRow(ValueError):
    """A row lacks what a step needs (missing or non-text field): dropped as ``invalid_input``."""


def dropped(row: dict, reason: str, detail: str | None = None, reply: str | None = None) -> dict:
    """``row`` marked as dropped with ``reason`` (and why, and the raw reply, when known)."""
    out = {**row, DROP: reason}
    if detail is not None:
        out[DROP_DETAIL] = detail
    if reply is not None:
        out[RAW_REPLY] = reply
    return out


class NoProgress:
    """A progress bar that shows nothing (the default outside the command line)."""

    def update(self, n=1):
        pass

    def reset(self, total=None):
        pass

    def set_postfix_str(self, text, refresh=True):
        pass


@dataclass
class StepContext:
    """What a step gets while it runs.

    Attributes:
        llm: the step's :class:`~factory.llm.requests.LLMClient` (LLM steps only).
        progress: a tqdm-like bar a global step may move.
        report: facts the step wants in the manifest (which eval items matched, clusters...).
    """

    llm: Any = None
    progress: Any = field(default_factory=NoProgress)
    report: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """No request of the step failed (its output may be cached as a result)."""
        return self.llm is None or not self.llm.usage.failures

    def full_report(self) -> dict:
        """The step's report, with what its LLM client counted of cut replies (``truncation``)
        when any reply was cut."""
        cut = self.llm.truncation if self.llm is not None else None
        return {**self.report, "truncation": cut} if cut and (cut["cut"] or cut["continued"]) else self.report

    def facts(self) -> dict:
        """The report and the LLM usage, as an executor sends them back to the driver."""
        return {"report": self.full_report(), "usage": self.llm.usage.to_json() if self.llm is not None else None}


def merge_reports(reports: Iterable[dict]) -> dict:
    """Step reports from parts of the table: numbers add up, lists concatenate, mappings merge."""
    merged: dict = {}
    for report in reports:
        for key, value in report.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[key] = merged.get(key, 0) + value
            elif isinstance(value, list):
                merged[key] = merged.get(key, []) + value
            elif isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = merge_reports([merged[key], value])
            else:
                merged[key] = value
    return merged


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
        # The step's key path in the recipe: what its stats, drops, errors and manifest entry are named by.
        self.label = format_path(("steps", index, self.name))

    def requires(self) -> list[str]:
        """Columns that must exist before this step (checked when the recipe is validated)."""
        return []

    def produces(self) -> list[str]:
        """Columns this step adds."""
        return []

    def output_columns(self, columns: list[str]) -> list[str]:
        """The columns after this step, given those before it (for validating column flow)."""
        return columns + [c for c in self.produces() if c not in columns]

    def columns_after(self, columns: list[str]) -> list[str]:
        """:meth:`output_columns` and the columns every step of its kind adds (the one place
        callers ask)."""
        return self.output_columns(columns)

    def check(self) -> list[tuple[str, str | None, str | None]]:
        """Static checks beyond types (files exist, templates compile): ``(message, key, fix)``."""
        return []

    def process(self, data: pl.DataFrame, ctx: StepContext | None = None) -> pl.DataFrame:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Identity of what this step computes (part of every cache key, with the model's)."""
        return fingerprint([type(self).__module__, type(self).__qualname__, self.version, to_dict(self.config),
                            self.seed])

    def path(self, value: str) -> Path:
        """A path option, relative to the recipe's folder unless absolute."""
        return Path(value) if Path(value).is_absolute() else self.base_dir / value

    def __getstate__(self):
        # Caches (functools.cached_property) are rebuilt where a copy of the step runs:
        # compiled templates do not pickle.
        cls = type(self)
        return {k: v for k, v in self.__dict__.items()
                if not isinstance(getattr(cls, k, None), functools.cached_property)}


class RowStep(Step):
    """A step over batches of rows: override :meth:`process`."""

    kind = "row"


class GlobalStep(Step):
    """A step that sees the whole table at once: override :meth:`process`.

    Two optional hooks let a distributed executor spread the work without the step knowing
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

    def combine(self, table: pl.DataFrame, partials: list, ctx: StepContext | None = None) -> pl.DataFrame:
        raise NotImplementedError

    @property
    def splits(self) -> bool:
        """Whether the step implements :meth:`partial` and :meth:`combine`."""
        return type(self).partial is not GlobalStep.partial


class Filter(RowStep):
    """Keeps or drops each row: override :meth:`keep`.

    ``keep`` returns True to keep the row, False to drop it with the filter's
    ``default_reason``, ``(False, "reason")``, or ``(False, "reason", "detail")``.
    """

    default_reason: ClassVar[str] = "filtered"

    def keep(self, row: dict) -> bool | tuple:
        raise NotImplementedError

    def process(self, batch: pl.DataFrame, ctx: StepContext | None = None) -> pl.DataFrame:
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


class TableFilter(GlobalStep):
    """Keeps or drops rows with a view of the whole table: override :meth:`keep`.

    ``keep(table, ctx)`` returns a frame with one row per input row: ``reason`` (null keeps
    the row), optionally ``detail``, and any other columns, which are added to the table
    (columns named ``_x`` only to the rejected rows, as ``x``: why a row went).
    """

    def keep(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        raise NotImplementedError

    def process(self, table: pl.DataFrame, ctx: StepContext | None = None) -> pl.DataFrame:
        return self.apply(table, self.keep(table, ctx or StepContext()))

    @staticmethod
    def apply(table: pl.DataFrame, verdicts: pl.DataFrame) -> pl.DataFrame:
        """``table`` with the verdicts' columns; ``reason``/``detail`` become the drop columns."""
        verdicts = verdicts.with_columns(pl.col("reason").cast(pl.String))
        names = {"reason": DROP, "detail": DROP_DETAIL}
        return table.with_columns(verdicts.rename({k: v for k, v in names.items() if k in verdicts.columns})
                                  .get_columns())


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
    on_truncation: Literal["drop", "keep", "continue"] = option(
        "drop", help="A reply cut at max_tokens: `drop` its row as `truncated` (raw reply kept in rejected/; "
                     "a step that reads a score or verdict keeps it when that came before the cut), `keep` it and "
                     "mark it in a `truncated` column, or `continue`: ask the model to go on, up to "
                     "max_continuations times, and join the parts (dropped if still cut).")
    max_continuations: int = option(2, help="With on_truncation: continue, how many times a cut reply is continued.",
                                    min=1, max=16)


@dataclass
class TaskStepConfig(LLMStepConfig):
    """Options of an LLM step that shows the model a task."""

    column: str = option("instruction", help="The task text.")
    input_column: str = option("input", help="Optional task input, shown with the task when the row has it.")


@dataclass
class AnswerStepConfig(TaskStepConfig):
    """Options of an LLM step that shows the model a task and an answer to it."""

    response_column: str = option("response", help="The answer the step looks at.")


class LLMStep(Step):
    """A step that asks an LLM: override ``build_messages`` and ``parse``.

    ``build_messages(row)`` returns the conversation for a row (or raises :class:`InvalidRow`:
    the row is dropped as ``invalid_input``); ``parse(reply, row)`` returns the new columns
    for one reply, or raises :class:`ParseError` (the row is dropped with its reason, its
    raw reply kept). A step with ``samples > 1`` in its config yields one row per sample,
    numbered in column ``sample``. A step whose rows become several requests overrides
    :meth:`expand`; one that asks in several rounds, or plans over the whole table (a
    generator: ``kind = "global"``), overrides :meth:`exchange`, a generator that yields
    lists of requests and receives their completions (:meth:`plan` and :meth:`read` are the
    default's two halves). The step never calls the model itself.

    A step that reads a score, a verdict, a list or fields sets :attr:`structured_output`: it
    runs as a copy with :attr:`structured` set where the backend enforces JSON Schemas, and then
    asks for JSON (:meth:`conversation`, :func:`json_params`) and reads it with
    :func:`~factory.llm.schema.read_reply`; elsewhere it prefills and parses text.

    ``templates`` maps the step's template options to their default files in
    ``templates/``; a step with several prompts lists each.
    """

    uses_llm = True
    Config = LLMStepConfig
    sample_column: ClassVar[str] = "sample"
    # The parse reads a verdict or a score and the rest of the reply is reasoning: a reply cut
    # after the verdict is still read (and counted as kept in the manifest's truncation).
    reads_verdict: ClassVar[bool] = False
    templates: ClassVar[dict[str, str]] = {}  # option -> default template file; default {"template": name}
    # The step reads a score, a verdict, a list or fields: where the backend holds replies to a JSON
    # Schema while decoding (``ctx.llm.enforces_schema``) it asks for JSON (no prefill), else it
    # prefills and parses text. Its output differs with the backend's capability, which its batch
    # cache key must therefore hold.
    structured_output: ClassVar[bool] = False
    # True on the copy of a step that asks for JSON in a run (see :meth:`for_client`); never set
    # on the step itself, so that it holds no state between runs.
    structured: bool = False

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.llm_config = None  # the validated backend config, set when the recipe is resolved

    def with_llm_config(self, llm_config) -> "LLMStep":
        """A copy of the step that asks the model of ``llm_config``."""
        step = copy.copy(self)
        step.llm_config = llm_config
        return step

    def for_client(self, llm) -> "LLMStep":
        """The step as it asks ``llm`` (an :class:`~factory.llm.requests.LLMClient`): a copy with
        :attr:`structured` set when the step reads fields and the backend enforces JSON Schemas,
        else the step itself."""
        if not self.structured_output or self.structured or not getattr(llm, "enforces_schema", False):
            return self
        step = copy.copy(self)  # without cached templates (see Step.__getstate__)
        step.structured = True
        return step

    # -- what subclasses override -------------------------------------------------------
    def build_messages(self, row: dict) -> Conversation:
        """The conversation for one row. Default: the step's template, rendered with the row."""
        return self.messages(self.render(row))

    def parse(self, reply: str, row: dict) -> dict:
        raise NotImplementedError

    def expand(self, row: dict) -> list[dict]:
        """The items one input row asks about (default: the row itself)."""
        return [row]

    def exchange(self, rows: list[dict], ctx: StepContext):
        """The step's conversation with the model: yields lists of requests, receives their
        completions, returns the output rows. Default: one request per item of each row."""
        asked, out = self.plan(rows)
        completions = yield [request for _, request in asked]
        return out + self.read(asked, completions)

    def plan(self, rows: list[dict]) -> tuple[list[tuple[dict, Request]], list[dict]]:
        """One request per item of each row, and the rows that cannot be asked about, dropped."""
        asked, out = [], []
        params = None  # the config's, the same for every request: made once
        for row in rows:
            try:
                built = [(item, self.build_messages(item)) for item in self.expand(row)]
            except InvalidRow as err:
                out.append(dropped(row, "invalid_input", str(err)))
                continue
            if built and params is None:
                params = self.generation_params()
            asked += [(item, Request(messages, params)) for item, messages in built]
        return asked, out

    def read(self, asked: list[tuple[dict, Request]], completions: list[Completion]) -> list[dict]:
        """The rows the completions of the planned requests give (see :meth:`rows_from_completion`)."""
        return [out for (item, _), completion in zip(asked, completions)
                for out in self.rows_from_completion(item, completion)]

    def frame(self, rows: list[dict], data: pl.DataFrame) -> pl.DataFrame:
        """The output rows as a frame (generators override it to give an empty output its schema)."""
        return rows_to_frame(rows, like=data)

    # -- the batch -----------------------------------------------------------------------
    def process(self, data: pl.DataFrame, ctx: StepContext | None = None) -> pl.DataFrame:
        if ctx is None or ctx.llm is None:
            raise TypeError(f"{type(self).__name__}.process needs a StepContext with an LLM client")
        step = self.for_client(ctx.llm)
        return step.frame(ctx.llm.run(step.exchange(data.to_dicts(), ctx)), data)

    def rows_from_completion(self, row: dict, completion: Completion, parse=None,
                             option: str = "max_tokens") -> list[dict]:
        """The rows one completion gives: one per sample, its parsed columns added; a failed
        request, an unreadable reply or one cut at the token limit (the config's ``option``)
        drops the row with the reason and the raw reply (see ``on_truncation``)."""
        if completion.error is not None:
            return [dropped(row, completion.error_reason, completion.error)]
        parse = parse or self.parse
        keep_cut = self.config.on_truncation == "keep"
        out = []
        for k, reply in enumerate(completion.texts):
            extra = {self.sample_column: k} if self.samples > 1 else {}
            cut = completion.cut(k)
            if cut and not self.reads_verdict and not keep_cut:
                out.append(dropped({**row, **extra}, TRUNCATED, self.truncation_detail(option), reply))
                continue
            try:
                columns = parse(reply, row)
            except ParseError as err:
                out.append(dropped({**row, **extra}, *self.unparsed(err, cut, option=option), reply))
                continue
            if keep_cut:
                extra[TRUNCATED] = cut
            if cut:
                extra[CUT] = True  # counted as kept though cut (the column goes with the kept rows)
            out.append({**row, **columns, **extra})
        return out

    def unparsed(self, err: ParseError, cut: bool, limit: int | None = None,
                 option: str = "max_tokens") -> tuple[str, str]:
        """The drop reason and detail of a reply whose parse failed (``cut``: it ended at the
        token limit ``limit``, by default the step's own request's). A cut reply fails because it
        was cut -- unless the limit is a cap of the step's own below ``max_tokens`` (a verdict
        asked for in a few tokens): a reply that rambles past it gave no verdict, which no
        max_tokens would change."""
        if not cut:
            return err.reason, str(err)
        limit = self.generation_params().max_tokens if limit is None else limit
        if option == "max_tokens" and limit < self.config.max_tokens:
            return err.reason, f"{err} (the reply ran past the {limit} tokens a verdict gets)"
        return TRUNCATED, f"{self.truncation_detail(option)} ({err})"

    def columns_after(self, columns: list[str]) -> list[str]:
        out = self.output_columns(columns)
        return out + [TRUNCATED] if self.config.on_truncation == "keep" and TRUNCATED not in out else out

    def truncation_detail(self, option: str = "max_tokens") -> str:
        """Why a cut reply's row went, and the fix (``option``: the limit that cut it). A JSON reply
        (:attr:`structured`) is neither continued nor readable when cut: only the limit helps."""
        return (f"the reply stopped at the token limit ({option}: {getattr(self.config, option)} on {self.label}), "
                f"mid-text; raise {option}" + (" (a JSON reply cannot be continued)" if self.structured
                                               else ", or set on_truncation: continue (or keep)"))

    def cut_dropped(self, row: dict, completion: Completion, k: int = 0, option: str = "max_tokens") -> dict | None:
        """``row`` dropped as ``truncated`` when reply ``k`` was cut at the token limit (the
        config's ``option``) and the step does not keep cut replies; else None. For steps that
        read replies themselves."""
        if completion.cut(k) and self.config.on_truncation != "keep":
            return dropped(row, TRUNCATED, self.truncation_detail(option), completion.texts[k])
        return None

    # -- helpers ------------------------------------------------------------------------
    @property
    def samples(self) -> int:
        return getattr(self.config, "samples", 1)

    def generation_params(self) -> GenerationParams:
        c = self.config
        return GenerationParams(n=self.samples, temperature=c.temperature, top_p=c.top_p,
                                max_tokens=c.max_tokens, stop=tuple(c.stop),
                                continuations=self.continuations)

    @property
    def continuations(self) -> int:
        """How often a cut reply is asked to go on (``on_truncation: continue``), else 0."""
        c = self.config
        return c.max_continuations if c.on_truncation == "continue" else 0

    def messages(self, prompt: str, prefill: str | None = None) -> Conversation:
        conv = []
        if self.config.system:
            conv.append({"role": "system", "content": self.config.system})
        conv.append({"role": "user", "content": prompt})
        if prefill is not None:
            conv.append({"role": "assistant", "content": prefill})
        return conv

    def conversation(self, prompt: str, schema: dict | None, prefill: str | None = None) -> Conversation:
        """The conversation that asks ``prompt``: in a :attr:`structured` run, for a JSON reply
        that matches ``schema`` (its fields described after the prompt, no prefill); else with
        ``prefill``, the start of a text reply."""
        if self.structured and schema is not None:
            return self.messages(f"{prompt}\n\n{describe(schema)}")
        return self.messages(prompt, prefill=prefill)

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
        return template.render({**template.globals, **row, "structured": self.structured, **extra,
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


def rows_to_frame(rows: list[dict], like: pl.DataFrame | None = None, schema: dict | None = None) -> pl.DataFrame:
    """Rows (dicts) as a frame with a ``_drop_reason`` column; with no rows, an empty frame
    with ``schema``, else ``like``'s, so that no later step misses a column."""
    if not rows:
        frame = pl.DataFrame(schema=schema) if schema is not None else like.clear() if like is not None \
            else pl.DataFrame()
    else:
        frame = pl.from_dicts(rows, infer_schema_length=None, strict=False)
    return frame if DROP in frame.columns else frame.with_columns(pl.lit(None, dtype=pl.String).alias(DROP))
