"""Recipes: YAML files that declare a dataset run, validated before any model loads.

A recipe is data: ``yaml.safe_load``, then validation against the config dataclasses of
the recipe, its backend, its source and each step. Every problem names the file, the line,
the key path (``steps[2].solve.samples``) and the fix, and all problems are reported at
once. ``--set key.path=value`` overrides any key from the command line.

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

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import build, closest, option, suggest, to_dict
from .errors import FactoryError, Problem, RecipeError, format_path
from .evolve.config import EvolveConfig, build_evolve
from .hubdata import HubError
from .hashing import fingerprint
from .llm import DEFAULT_LLM, build_llm_config, merge_llm
from .registry import STEPS, step_class
from .sources import Source, build_source
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
        if problems:
            raise RecipeError(problems)
        return dataclasses.replace(self, llm=llm, steps=steps)

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
    """The model names (the ``model`` of each LLM step's llm config) the steps use, in step order."""
    return list(dict.fromkeys(str(getattr(step.llm_config, "model", step.llm_config.backend))
                              for step in steps if step.uses_llm and step.llm_config is not None))


# -- YAML with line numbers ------------------------------------------------------------

def parse_yaml(text: str, file: str) -> tuple[Any, dict[tuple, int]]:
    """Loads YAML safely and maps each key path to its line (1-based)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else None
        problem = (err.problem or str(err)).strip()
        if err.context and err.context_mark and err.problem_mark and err.context_mark.line != err.problem_mark.line:
            problem += f" ({err.context} that starts on line {err.context_mark.line + 1})"
        raise RecipeError([Problem(f"YAML syntax error: {problem}", file=file, line=line,
                                   fix="check the indentation and quote values that contain ':' or '#'")]) from None
    except yaml.YAMLError as err:
        raise RecipeError([Problem(f"YAML error: {err}", file=file,
                                   fix="check the YAML syntax")]) from None
    lines: dict[tuple, int] = {}
    duplicates: list[Problem] = []
    if node is not None:
        _walk(node, (), lines, duplicates, file)
    if duplicates:
        raise RecipeError(duplicates)
    return data, lines


def _walk(node, path: tuple, lines: dict, duplicates: list, file: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                duplicates.append(Problem(f"duplicate key '{key}'", path=path + (key,), file=file,
                                          line=key_node.start_mark.line + 1,
                                          fix="remove one of them (YAML would keep only the last)"))
            seen.add(key)
            lines[path + (key,)] = key_node.start_mark.line + 1
            _walk(value_node, path + (key,), lines, duplicates, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines, duplicates, file)


# -- --set overrides ----------------------------------------------------------------------

_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def parse_key_path(text: str) -> tuple:
    """``steps[1].solve.samples`` or ``steps.1.solve.samples`` -> ``("steps", 1, "solve", "samples")``."""
    parts: list = []
    pos = 0
    for match in _PATH_PART.finditer(text):
        between = text[pos:match.start()].strip(".")
        if between:
            raise ValueError(f"cannot read key path '{text}'")
        name, index = match.groups()
        if index is not None:
            parts.append(int(index))
        elif name.isdigit():
            parts.append(int(name))
        else:
            parts.append(name)
        pos = match.end()
    if not parts or text[pos:].strip("."):
        raise ValueError(f"cannot read key path '{text}'")
    return tuple(parts)


def apply_override(data: dict, override: str) -> tuple:
    """Applies one ``key.path=value`` (value read as YAML) to ``data``; returns the path."""
    if "=" not in override:
        raise RecipeError([Problem(f"--set '{override}' has no '='", file="--set",
                                   fix="write --set key.path=value, e.g. --set steps[1].solve.samples=4")])
    key, _, value_text = override.partition("=")
    try:
        path = parse_key_path(key.strip())
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except (ValueError, yaml.YAMLError) as err:
        raise RecipeError([Problem(f"--set '{override}': {err}", file="--set",
                                   fix="write --set key.path=value, e.g. --set llm.model=embedded")]) from None
    target: Any = data
    for depth, part in enumerate(path[:-1]):
        nxt = path[depth + 1]
        if isinstance(part, int):
            if not isinstance(target, list) or part >= len(target):
                size = len(target) if isinstance(target, list) else 0
                raise RecipeError([Problem(f"--set {key}: there is no item {part} (the list has {size})",
                                           file="--set", path=path[:depth + 1],
                                           fix=f"use an index from 0 to {size - 1}" if size else "check the path")])
            target = target[part]
        else:
            if not isinstance(target, dict):
                raise RecipeError([Problem(f"--set {key}: '{format_path(path[:depth])}' is not a mapping",
                                           file="--set", fix="check the path")])
            if part not in target or target[part] is None:
                target[part] = [] if isinstance(nxt, int) else {}
            target = target[part]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(target, list) or last >= len(target):
            raise RecipeError([Problem(f"--set {key}: there is no item {last}", file="--set", path=path,
                                       fix="check the index")])
        target[last] = value
    elif isinstance(target, dict):
        target[last] = value
    else:
        raise RecipeError([Problem(f"--set {key}: '{format_path(path[:-1])}' is not a mapping", file="--set",
                                   fix="check the path")])
    return path


# -- validation ---------------------------------------------------------------------------

def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Reads, overrides and validates a recipe file.

    Raises:
        RecipeError: with every problem found, one per line.
    """
    file = str(path)
    p = Path(path)
    if not p.is_file():
        raise RecipeError([Problem(f"recipe file not found (working folder: {Path.cwd()})", file=file,
                                   fix="check the path, e.g. recipes/quickstart.yaml")])
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError([Problem(f"not UTF-8 text (byte {err.start})", file=file,
                                   fix="save the recipe as UTF-8")]) from None
    return recipe_from_text(text, file=file, base_dir=p.resolve().parent, overrides=overrides)


def recipe_from_text(text: str, *, file: str = "<recipe>", base_dir: Path | None = None,
                     overrides: list[str] | None = None) -> Recipe:
    data, lines = parse_yaml(text, file)
    return recipe_from_data(data, lines=lines, file=file, base_dir=base_dir, overrides=overrides)


def recipe_from_data(data: Any, *, lines: dict | None = None, file: str = "<recipe>", base_dir: Path | None = None,
                     overrides: list[str] | None = None) -> Recipe:
    """Validates recipe data (as loaded from YAML)."""
    lines = lines or {}
    base_dir = base_dir or Path.cwd()
    overrides = list(overrides or [])
    if data is None:
        raise RecipeError([Problem("the recipe is empty", file=file, line=1,
                                   fix="start with `name:`, `source:` and `steps:` (see recipes/quickstart.yaml)")])
    if not isinstance(data, dict):
        raise RecipeError([Problem("a recipe must be a mapping of keys (name, source, steps, ...)", file=file,
                                   line=1, fix="see recipes/quickstart.yaml for the shape")])
    data = copy.deepcopy(data)
    overridden = [apply_override(data, o) for o in overrides]
    problems: list[Problem] = []
    recipe = _validate(data, problems, base_dir)
    for p in problems:
        p.file = file
        _locate(p, lines, overridden, overrides)
    if problems:
        raise RecipeError(sorted(problems, key=lambda p: p.line or 0))
    recipe.file = file
    recipe.overrides = overrides
    return recipe


def _locate(problem: Problem, lines: dict, overridden: list[tuple], overrides: list[str]) -> None:
    for path, text in zip(overridden, overrides):
        if problem.path[:len(path)] == path or path[:len(problem.path)] == problem.path and problem.path:
            problem.file = f"{problem.file} (--set {text})"
            return
    for cut in range(len(problem.path), -1, -1):
        if problem.path[:cut] in lines:
            problem.line = lines[problem.path[:cut]]
            return


def _validate(data: dict, problems: list[Problem], base_dir: Path) -> Recipe | None:
    for key in data:
        if key not in TOP_LEVEL:
            problems.append(Problem(f"unknown top-level key '{key}'", path=(key,), fix=suggest(key, TOP_LEVEL)))
    header = build(RecipeHeader, {k: v for k, v in data.items() if k in TOP_LEVEL}, (), problems,
                   exclude=("llm", "source", "steps", "output", "prices", "budget", "evolve"))

    llm_data = data.get("llm") if data.get("llm") is not None else dict(DEFAULT_LLM)
    llm = build_llm_config(llm_data, ("llm",), problems)
    if llm is not None:
        _check_model_files(llm, ("llm",), problems)

    source = None
    if data.get("source") is not None:
        source = build_source(data["source"], ("source",), problems, base_dir)
        source_ok = source is not None
    else:
        source_ok = True

    output = build(OutputConfig, data.get("output"), ("output",), problems)
    if output is not None and output.rows is not None and data.get("source") is None:
        problems.append(Problem("`rows` reads the source until that many rows survive, and the recipe has no "
                                "`source:`", path=("output", "rows"),
                                fix="add a `source:` (a file, or e.g. `{generator: arithmetic}`), or remove `rows` "
                                    "and size the run with the steps' own options (e.g. num_tasks)"))
    prices = _build_prices(data.get("prices"), problems)
    budget = build(BudgetConfig, data.get("budget"), ("budget",), problems) if data.get("budget") is not None else None

    steps_data = data.get("steps")
    steps: list[Step] = []
    steps_ok = True
    if steps_data is None:
        problems.append(Problem("missing required key 'steps'", path=(),
                                fix="add `steps:` with a list such as `- solve: {samples: 1}`"))
        steps_ok = False
    elif not isinstance(steps_data, list):
        problems.append(Problem("`steps` must be a list of one-key mappings", path=("steps",),
                                fix="write each step as `- name: {options}`"))
        steps_ok = False
    else:
        seed = header.seed if header else 0
        for i, item in enumerate(steps_data):
            step = _build_step(i, item, llm_data if llm is not None else None, problems, seed, base_dir)
            if step is None:
                steps_ok = False
            else:
                steps.append(step)

    evolve = None
    if data.get("evolve") is not None:
        evolve = build_evolve(data["evolve"], ("evolve",), problems, llm)
        if evolve is not None:
            _check_eval_sets(evolve, problems, base_dir)
        if evolve is not None and evolve.compare and steps_ok and not any(s.name == "select" for s in steps):
            problems.append(Problem("evolve.compare runs the loop once per verifier through a `select` step, and "
                                    "the recipe has none", path=("evolve", "compare"),
                                    fix="add e.g. `- select: {verifier: majority, per_task: 2}` after the solve, "
                                        "verify and judge steps"))
    if steps_ok and isinstance(data.get("prices"), dict):
        _check_prices(data["prices"], models_of(steps), problems)
    if steps_ok and budget is not None and budget.max_usd is not None and prices is not None:
        _check_budget(prices, models_of(steps), problems)
    if header is None or llm is None or output is None or not steps_ok or not source_ok or prices is None:
        return None
    if data.get("evolve") is not None and evolve is None:
        return None
    if data.get("budget") is not None and budget is None:
        return None
    recipe = Recipe(header, llm, source, steps, output, base_dir=base_dir, evolve=evolve, prices=prices, budget=budget)
    _check_columns(recipe, problems)
    return recipe if not problems else None


def _build_prices(data: Any, problems: list[Problem]) -> dict[str, Price] | None:
    """Validates ``prices: {MODEL: {input: USD, output: USD}}`` (per million tokens)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(Problem("`prices` must map model names to prices", path=("prices",),
                                fix="write e.g. `prices: {gpt-4o-mini: {input: 0.15, output: 0.6}}` (USD per "
                                    "million tokens)"))
        return None
    prices, before = {}, len(problems)
    for model, price in data.items():
        built = build(Price, price, ("prices", str(model)), problems)
        if built is not None:
            prices[str(model)] = built
    return prices if len(problems) == before else None


def _check_prices(prices: dict, used: list[str], problems: list[Problem]) -> None:
    """A priced model must be one a step uses: a misspelt name would price nothing, silently."""
    for model in map(str, prices):
        if model in used:
            continue
        if not used:
            problems.append(Problem(f"price for model '{model}', and no step of the recipe uses a model",
                                    path=("prices", model), fix="remove `prices`"))
        else:
            problems.append(Problem(f"price for model '{model}', which no step uses (models in use: "
                                    f"{', '.join(used)})", path=("prices", model),
                                    fix=(f"did you mean '{match}'?" if (match := closest(model, used))
                                         else "price a model in use (the `model` of a step's llm), or remove it")))


def _check_budget(prices: dict, used: list[str], problems: list[Problem]) -> None:
    """A budget prices every request before it goes: every model a step uses needs a price."""
    unpriced = [model for model in used if model not in prices]
    if unpriced:
        problems.append(Problem(f"budget.max_usd needs the price of every model the steps use, and "
                                f"{', '.join(unpriced)} has none", path=("budget", "max_usd"),
                                fix="add e.g. `prices: {" + unpriced[0] + ": {input: 0.15, output: 0.6}}` (USD per "
                                    "million tokens), or remove the budget"))


def _build_step(i: int, item: Any, llm_data: dict | None, problems: list[Problem], seed: int,
                base_dir: Path) -> Step | None:
    path = ("steps", i)
    if isinstance(item, str):
        item = {item: {}}
    if not isinstance(item, dict) or len(item) != 1:
        got = f"{len(item)} keys ({', '.join(map(str, item))})" if isinstance(item, dict) else type(item).__name__
        problems.append(Problem(f"a step must be a one-key mapping `- name: {{options}}`, got {got}", path=path,
                                fix="put each step in its own list item; options go inside the braces"))
        return None
    name, params = next(iter(item.items()))
    if name not in STEPS:
        problems.append(Problem(f"unknown step '{name}'", path=path, fix=suggest(str(name), STEPS, "step")))
        return None
    cls = step_class(name)
    path = path + (name,)
    config = build(cls.Config, params, path, problems)
    if config is None:
        return None
    step = cls(config, index=i, seed=seed, base_dir=base_dir)
    before = len(problems)
    for message, key, fix in step.check():
        key = key if isinstance(key, tuple) else (key,) if key else ()
        problems.append(Problem(message, path=path + key, fix=fix))
    if step.uses_llm:
        if llm_data is None:
            return None  # the recipe-level llm is already reported
        override = getattr(config, "llm", None)
        step.llm_config = build_llm_config(merge_llm(llm_data, override), path + ("llm",), problems)
        if step.llm_config is None:
            return None
        if override:
            _check_model_files(step.llm_config, path + ("llm",), problems)
    return step if len(problems) == before else None


def _check_model_files(llm, path: tuple, problems: list[Problem]) -> None:
    from .errors import FactoryError
    from .models import check_adapter, resolve_model

    if llm.backend not in ("transformers", "vllm"):
        return
    try:
        resolve_model(llm.model)
    except FactoryError as err:
        problems.append(Problem(str(err), path=path + ("model",)))
    if llm.adapter:
        try:
            check_adapter(llm.adapter)
        except FactoryError as err:
            problems.append(Problem(str(err), path=path + ("adapter",)))


def _check_eval_sets(evolve: EvolveConfig, problems: list[Problem], base_dir: Path) -> None:
    """evolve.eval and evolve.win_rate exist and have their columns (a Hub dataset is resolved here,
    before any model loads)."""
    for key in ("eval", "win_rate"):
        section = getattr(evolve, key)
        if section is None:
            continue
        path = ("evolve", key)
        source = build_source(section.data(), path, problems, base_dir, what="eval set")
        if source is None:
            continue
        try:
            columns = source.columns()
        except FactoryError as err:
            problems.append(Problem(str(err), path=path))
            continue
        for key_name in ("column", "answer_column"):
            column = getattr(section, key_name, None)
            if column is not None and columns and column not in columns:
                problems.append(Problem(f"the eval set {section.name()} has no column '{column}' (it has "
                                        f"{', '.join(columns)})", path=path + (key_name,),
                                        fix=suggest(column, columns, "column")))


def _check_columns(recipe: Recipe, problems: list[Problem]) -> None:
    if recipe.source is not None:
        try:
            columns = list(recipe.source.columns())
        except HubError as err:  # a Hub dataset's download or its columns: the message says what to do
            problems.append(Problem(str(err), path=("source",)))
            return
        except Exception as err:  # an unreadable file: reported once, here
            problems.append(Problem(f"cannot read the source's columns: {err}", path=("source",),
                                    fix="check that the file is in the format its name says"))
            return
        if not columns:
            key = "hub" if recipe.source.hub_ref else "path"
            problems.append(Problem(f"source {recipe.source.name()} has no rows", path=("source", key),
                                    fix=f"point `source:` at a {'split' if key == 'hub' else 'file'} with data"))
            return
        origin = f"the source ({', '.join(columns)})"
    else:
        columns = []
        origin = "the recipe, which has no source"
    for step in recipe.steps:
        path = ("steps", step.index, step.name)
        missing = [c for c in step.requires() if c not in columns]
        for column in missing:
            match = closest(column, columns)
            problems.append(Problem(
                f"needs column '{column}', which neither {origin} nor an earlier step produces", path=path,
                fix=(f"did you mean '{match}'? (set the step's column option)" if match
                     else "add a step that produces it first, or a `source:` that has it")))
        columns = step.columns_after(columns)
    if recipe.output.format == "messages" and not can_write_messages(columns):
        problems.append(Problem("format 'messages' needs `instruction` and `response` columns (a solve step) or a "
                                "`messages` column in the source", path=("output", "format"),
                                fix="add a solve step, or leave `format` out (auto) or set it to `raw` to write "
                                    "the rows as they are"))
    if recipe.output.columns:
        for column in recipe.output.columns:
            if column not in columns and column != "messages":
                problems.append(Problem(f"column '{column}' does not exist at the end of the recipe",
                                        path=("output", "columns"), fix=suggest(column, columns, "column")))
