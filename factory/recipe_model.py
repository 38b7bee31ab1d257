"""The recipe as data: :class:`Recipe` and its sections (header, output, prices, budget), and what they imply.

:mod:`factory.recipe` reads a recipe file into these and :mod:`factory.recipe_rules` checks what
spans sections; each class here validates only its own values.

Example:
    name: my-dataset
    seed: 7
    llm: {backend: transformers, model: embedded}
    source: {path: data/seeds/tasks.jsonl}
    steps:
      - self_instruct: {num_tasks: 50}
      - solve: {samples: 1}
      - judge: {scale: 10}
      - score: {min: 7}
    output: {format: messages}
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import option, to_dict
from .errors import Problem, RecipeError
from .evolve.config import EvolveConfig
from .hashing import fingerprint
from .llm import build_llm_config, merge_llm
from .sources import Source
from .steps.base import Step

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class RecipeHeader:
    """The recipe's top-level scalar keys (``llm``, ``source``, ``steps``, ``output`` apart)."""

    name: str = option(help="Dataset name; versions are written to OUT/<name>/v<N>.")
    description: str = option("", help="What the dataset is for (goes into the dataset card).")
    seed: int = option(0, help="Seed for every sampling decision; same seed, same dataset.")
    batch_size: int = option(64, help="Rows per batch of a row step (the unit of caching and resume).", min=1)
    max_failure_rate: float = option(0.5, help="Stop the run when more than this share of a step's rows "
                                               "fail in the backend (rather than write a hollow dataset).",
                                     min=0.0, max=1.0)

    def validate(self):
        if not _NAME.match(self.name):
            return [(f"'{self.name}' is not a usable dataset name", "name",
                     "use letters, digits, '.', '_' and '-' only, e.g. my-dataset")]
        return []


@dataclass
class OutputConfig:
    format: Literal["auto", "messages", "raw"] = option(
        "auto", help="`messages`: add the chat column `messages` (user task, assistant response); "
                     "`raw`: write the columns as they are; `auto`: `messages` when the rows have a task and a "
                     "response (or a `messages` column), else `raw` -- a filter-only recipe writes its rows as is.")
    columns: list[str] | None = option(None, help="Keep only these columns (plus `messages`).")
    system_prompt: str | None = option(None, help="A system message put first in every `messages` row.")
    shard_rows: int = option(100_000, help="Rows per parquet shard.", min=1)
    license: str = option("other", help="License in the dataset card (an SPDX id such as apache-2.0).")
    tags: list[str] = option(default_factory=list, help="Extra tags for the dataset card.")
    rows: int | None = option(None, help="Make exactly this many rows: the run reads more and more of the source "
                                         "(the first k rows, k grown from the share that survived so far) until "
                                         "this many survive every step, keeps the first `rows` of them and writes "
                                         "what it got, with a warning, when the source or `max_candidates` runs "
                                         "out first. A generator source makes rows past its `num_rows` as needed.",
                              min=1)
    max_candidates: int | None = option(None, help="With `rows`: the most source rows fed into the steps before "
                                                   "the run gives up on reaching `rows` (default: 10 x rows).",
                                        min=1)

    def __post_init__(self):
        if self.rows is not None and self.max_candidates is None:
            self.max_candidates = CANDIDATES_PER_ROW * self.rows

    def validate(self):
        if self.rows is None and self.max_candidates is not None:
            return [("`max_candidates` caps the candidates of `rows`, which is not set", "max_candidates",
                     "add `rows: N` (the rows to make), or remove `max_candidates`")]
        if self.rows is not None and self.max_candidates < self.rows:
            return [(f"max_candidates {self.max_candidates} is below rows {self.rows}: the run could never reach "
                     "them", "max_candidates", f"set it to at least {self.rows} (default: 10 x rows)")]
        return []

    def resolved(self) -> dict:
        """As plain data; ``rows`` and ``max_candidates`` only when set (older recipes keep their hash)."""
        data = to_dict(self)
        if self.rows is None:
            del data["rows"], data["max_candidates"]
        return data


CANDIDATES_PER_ROW = 10  # the default max_candidates of `output.rows`


@dataclass
class Price:
    """What a model costs, in US dollars per million tokens (``prices: {MODEL: {input, output}}``)."""

    input: float = option(help="USD per 1M tokens sent to the model (the prompt).", min=0.0)
    output: float = option(help="USD per 1M tokens the model generates (the reply).", min=0.0)
    batch: float = option(0.5, help="What a request sent through a Batch API (`llm.batch: true`) pays, as a share "
                                    "of these prices (OpenAI, Anthropic: 0.5).", min=0.0, max=1.0)


@dataclass
class BudgetConfig:
    """The most a run may spend (``budget: {max_usd: X}``; ``factory run --max-usd X``)."""

    max_usd: float | None = option(None, help="Stop before the requests this run sends could cost more than this "
                                              "many US dollars, priced with `prices:` (replies from the cache cost "
                                              "nothing). The run writes no version then, and the same command with "
                                              "a larger budget goes on, paying only for what is new.", min=0.0)


def can_write_messages(columns) -> bool:
    """Whether rows with these columns can become chat ``messages`` (a task and a response, or messages)."""
    columns = set(columns)
    return "messages" in columns or {"instruction", "response"} <= columns


def output_format(output: OutputConfig, columns) -> str:
    """The format a run writes: ``auto`` resolved against the final columns."""
    if output.format != "auto":
        return output.format
    return "messages" if can_write_messages(columns) else "raw"


TOP_LEVEL = ("name", "description", "seed", "batch_size", "max_failure_rate", "llm", "source", "steps", "output",
             "prices", "budget", "evolve")


@dataclass
class Recipe:
    """A validated recipe, ready to run."""

    header: RecipeHeader
    llm: Any
    source: Source | None
    steps: list[Step]
    output: OutputConfig
    file: str = "<recipe>"
    base_dir: Path = field(default_factory=Path.cwd)
    overrides: list[str] = field(default_factory=list)
    evolve: EvolveConfig | None = None  # the `evolve:` section, when the recipe has one
    prices: dict[str, Price] = field(default_factory=dict)  # model name -> price (the `prices:` section)
    budget: BudgetConfig | None = None  # the `budget:` section

    @property
    def name(self) -> str:
        return self.header.name

    @property
    def seed(self) -> int:
        return self.header.seed

    def resolved(self) -> dict:
        """The recipe with every default filled in (what the manifest records and hashes)."""
        steps = []
        for step in self.steps:
            params = to_dict(step.config)
            if step.uses_llm:
                params["llm"] = to_dict(step.llm_config)
                for name, key in step.extra_llms.items():
                    params[key] = to_dict(step.extra_llm_configs[name])
            steps.append({step.name: params})
        return {
            **to_dict(self.header),
            "llm": to_dict(self.llm),
            "source": ({**to_dict(self.source.config), **(to_dict(self.source.generator_config) or {})}
                       if self.source else None),
            "steps": steps,
            "output": self.output.resolved(),
            **({"prices": to_dict(self.prices)} if self.prices else {}),
            **({"budget": to_dict(self.budget)} if self.budget is not None else {}),
            **({"evolve": to_dict(self.evolve)} if self.evolve is not None else {}),
        }

    @property
    def hash(self) -> str:
        return fingerprint(self.resolved())

    def with_llm(self, llm) -> "Recipe":
        """The recipe with another default model config (an evolve round's adapter, say); a
        step's own `llm:` is merged over it again, as when the recipe was read."""
        problems: list[Problem] = []
        steps = [step.with_llm_config(build_llm_config(merge_llm(to_dict(llm), step.config.llm),
                                                       ("steps", step.index, step.name, "llm"), problems))
                 if step.uses_llm else step for step in self.steps]
        for step in steps:
            if step.uses_llm and step.extra_llms:  # its other models are merged over the new default too
                step.extra_llm_configs = {
                    name: build_llm_config(merge_llm(to_dict(llm), getattr(step.config, key)),
                                           ("steps", step.index, step.name, key), problems)
                    for name, key in step.extra_llms.items()}
        if problems:
            raise RecipeError(problems)
        return dataclasses.replace(self, llm=llm, steps=steps)

    def first_step(self, kind: type) -> Step | None:
        """The recipe's first step of class ``kind``, or None."""
        return next((step for step in self.steps if isinstance(step, kind)), None)

    def models(self) -> list[str]:
        """The model names the recipe's LLM steps use (what ``prices`` is keyed by), in step order."""
        return models_of(self.steps)

    def columns_after(self) -> list[str]:
        """Columns present after the last step (source columns plus what steps produce)."""
        columns = list(self.source.columns()) if self.source else []
        for step in self.steps:
            columns = step.columns_after(columns)
        return columns


def models_of(steps: list[Step]) -> list[str]:
    """The model names (the ``model`` of each LLM step's llm config, and of its other models) the
    steps use, in step order."""
    return list(dict.fromkeys(str(getattr(config, "model", config.backend))
                              for step in steps if step.uses_llm and step.llm_config is not None
                              for config in [step.llm_config, *step.extra_llm_configs.values()]))

