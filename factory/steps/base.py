"""Base classes of recipe steps: :class:`Step`, and :class:`RowStep` and :class:`GlobalStep` by what they see.

A step has one small method to write:

* :class:`RowStep` -- ``process(batch, ctx)`` on a batch of rows (a polars DataFrame); the
  executor decides the batches. Rows may be added, changed, expanded or dropped.
* :class:`GlobalStep` -- ``process(table, ctx)`` on the whole table (generators that need
  the pool, majority votes), with optional hooks that let an executor spread the work.

Their kin live beside what they serve: the LLM step in :mod:`factory.steps.llm_step` (its
prompts in :mod:`factory.steps.prompts`), the filter bases in :mod:`filters.base`. A step
marks a row as dropped as :mod:`factory.steps.drops` says; what it gets while it runs is a
:class:`~factory.steps.context.StepContext`. Steps never know how they are scheduled and
hold no state between runs beside caches of what their config implies (compiled templates),
which are rebuilt wherever a copy of the step runs.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, ClassVar

import polars as pl

from ..config import to_dict
from ..errors import format_path
from ..hashing import fingerprint
from .context import StepContext


class Step:
    """Base of every step. Subclasses set ``name`` (the recipe key) and ``Config``."""

    name: ClassVar[str]
    Config: ClassVar[type]
    kind: ClassVar[str] = "row"
    version: ClassVar[str] = "1"  # bump when a change in behaviour must invalidate cached results
    uses_llm: ClassVar[bool] = False
    # Other models an LLM step asks beside its own: name -> the option that holds that model's `llm:`
    # (resolved, with its own, into ``extra_llm_configs``; see :class:`~factory.llm.requests.ToLLM`).
    extra_llms: ClassVar[dict[str, str]] = {}

    def __init__(self, config: Any, *, index: int = 0, seed: int = 0, base_dir: Path | None = None):
        self.config = config
        self.index = index
        self.seed = seed
        self.base_dir = base_dir or Path.cwd()
        self.extra_llm_configs: dict = {}  # the validated configs of its extra_llms, by name
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

    def check_llm(self, llm) -> list[tuple[str, str | tuple | None, str | None]]:
        """What an LLM step cannot do with its validated backend config ``llm``, as :meth:`check`
        reports it: checked with the recipe, before any model loads."""
        return []

    def check_backend(self, backend, llm: str | None = None) -> None:
        """Raises :class:`~factory.errors.FactoryError` when ``backend`` (checked, a server probed)
        cannot serve an LLM step, as its own model (``llm`` None) or as the other model ``llm``:
        before the run sends any request."""

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
