"""The recipe's rules across sections: recipe data built into a :class:`~factory.recipe_model.Recipe`.

Each section's own values are checked by its config dataclass (:func:`factory.config.build`);
what is here needs more than one: every step built with the recipe's model and seed, a price
only for a model a step uses, a budget that can price every model, model files and eval sets
that exist, and the columns each step needs coming from the source or an earlier step. Every
problem is collected, none stops the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import build, closest, suggest
from .errors import FactoryError, Problem
from .evolve.config import EvolveConfig, build_evolve
from .hubdata import HubError
from .llm import DEFAULT_LLM, build_llm_config, merge_llm
from .recipe_model import (TOP_LEVEL, BudgetConfig, OutputConfig, Price, Recipe, RecipeHeader, can_write_messages,
                           models_of)
from .registry import STEPS, step_class
from .sources import build_source
from .steps.base import Step


def build_recipe(data: dict, problems: list[Problem], base_dir: Path) -> Recipe | None:
    """Recipe data (a mapping, overrides applied) as a :class:`Recipe`, or None when any problem
    was found; each is appended to ``problems`` with its key path."""
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
    _check_reference_checks(recipe, problems)
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
        step.extra_llm_configs = build_extra_llms(step, llm_data, path, problems)
        for message, key, fix in step.check_llm(step.llm_config):
            key = key if isinstance(key, tuple) else (key,) if key else ()
            problems.append(Problem(message, path=path + key, fix=fix))
    return step if len(problems) == before else None


def build_extra_llms(step: Step, llm_data: dict, path: tuple, problems: list[Problem]) -> dict:
    """The step's other models, each validated as its own ``llm:`` is: a step class that asks more
    than one model names them in ``extra_llms`` (name -> the config option that holds that model's
    `llm:` mapping, e.g. ``{"user": "user_llm"}``); each option is merged over the recipe's ``llm``
    (unset: the recipe's model) and its errors are located at the option (``steps[i].key.user_llm``)."""
    extras = {}
    for name, key in step.extra_llms.items():
        override = getattr(step.config, key)
        config = build_llm_config(merge_llm(llm_data, override), path + (key,), problems)
        if config is not None:
            extras[name] = config
            if override:
                _check_model_files(config, path + (key,), problems)
    return extras


def _check_model_files(llm, path: tuple, problems: list[Problem]) -> None:
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


def _check_reference_checks(recipe: Recipe, problems: list[Problem]) -> None:
    """A `select` (or an `evolve.compare` entry, which sets the first `select`'s verifier) that names
    the `math` or `code` verifier reads the verdicts of a `verify` step with that method, which
    must come before it."""
    selects = [s for s in recipe.steps if s.name == "select"]
    for n, select in enumerate(selects):
        methods = {s.config.method for s in recipe.steps[:select.index] if s.name == "verify"}
        wanted = [(select.config.verifier, ("steps", select.index, "select", "verifier"))]
        if recipe.evolve is not None and n == 0:
            wanted += [(v, ("evolve", "compare", i)) for i, v in enumerate(recipe.evolve.compare or [])]
        for verifier, path in wanted:
            if verifier in ("math", "code") and verifier not in methods:
                problems.append(Problem(f"the `{verifier}` verifier keeps what a `verify: {{method: {verifier}}}` "
                                        "step labels correct, and no such step comes before the `select` step",
                                        path=path, fix=f"add `- verify: {{method: {verifier}, ...}}` before "
                                                       "`select`, or pick another verifier"))


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
