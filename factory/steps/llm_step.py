"""The LLM step (:class:`LLMStep`) and the options every LLM step has (:class:`LLMStepConfig` and kin).

An LLM step is two functions: the conversation for a row and the reading of a reply into
columns. Requests go through the one LLM path (:mod:`factory.llm.requests`); failures and
unreadable replies become drops here, the same way for every step. Its prompts are
templates (:mod:`factory.steps.prompts`); what becomes of a reply cut at the token limit is
:mod:`factory.steps.truncation`'s; the JSON asked for where the backend enforces schemas is
built with :mod:`factory.steps.json_replies`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar, Literal

import polars as pl

from ..config import option
from ..llm.base import Completion, Conversation, GenerationParams, Request
from . import truncation
from .context import StepContext
from .drops import TRUNCATED, InvalidRow, dropped, rows_to_frame
from .prompts import TemplatedStep


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


class LLMStep(TemplatedStep):
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

    A step that reads a score, a verdict, a list or fields sets :attr:`reads_fields`: where the
    backend holds replies to a JSON Schema while decoding it runs as a copy with :attr:`asks_json`
    set (:meth:`for_client`), which asks for JSON (:meth:`conversation`, no prefill;
    :func:`~factory.steps.json_replies.json_params`) and reads it with
    :func:`~factory.llm.schema.read_reply`; elsewhere it prefills and parses text. Its output
    differs with the backend's capability, which its batch cache key must therefore hold.
    """

    uses_llm = True
    Config = LLMStepConfig
    sample_column: ClassVar[str] = "sample"
    # The parse reads a verdict or a score and the rest of the reply is reasoning: a reply cut
    # after the verdict is still read (and counted as kept in the manifest's truncation).
    reads_verdict: ClassVar[bool] = False
    reads_fields: ClassVar[bool] = False  # the step reads a score, a verdict, a list or fields (see above)

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
        :attr:`asks_json` set when the step reads fields and the backend enforces JSON Schemas,
        else the step itself (never set on the step itself, which holds no state between runs)."""
        if not self.reads_fields or self.asks_json or not getattr(llm, "enforces_schema", False):
            return self
        step = copy.copy(self)  # without cached templates (see Step.__getstate__)
        step.asks_json = True
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

    @property
    def samples(self) -> int:
        return getattr(self.config, "samples", 1)

    def generation_params(self) -> GenerationParams:
        c = self.config
        return GenerationParams(n=self.samples, temperature=c.temperature, top_p=c.top_p,
                                max_tokens=c.max_tokens, stop=tuple(c.stop),
                                continuations=truncation.continuations(c))

    # -- cut replies (factory.steps.truncation) ------------------------------------------
    def rows_from_completion(self, row: dict, completion: Completion, parse=None,
                             option: str = "max_tokens") -> list[dict]:
        return truncation.rows_from_completion(self, row, completion, parse, option)

    def cut_dropped(self, row: dict, completion: Completion, k: int = 0, option: str = "max_tokens") -> dict | None:
        return truncation.cut_dropped(self, row, completion, k, option)

    def columns_after(self, columns: list[str]) -> list[str]:
        out = self.output_columns(columns)
        return out + [TRUNCATED] if self.config.on_truncation == "keep" and TRUNCATED not in out else out
