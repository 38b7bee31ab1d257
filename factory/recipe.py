"""Loading a recipe: YAML read with the line of every key, ``--set`` overrides, and each problem located.

A recipe is data: ``yaml.safe_load``, then validation against the config dataclasses of the
recipe, its backend, its source and each step (:func:`factory.recipe_rules.build_recipe`).
Every problem names the file, the line, the key path (``steps[2].solve.samples``) and the fix,
and all problems are reported at once. ``--set key.path=value`` overrides any key from the
command line.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import Problem, RecipeError, format_path
from .recipe_model import Recipe
from .recipe_rules import build_recipe


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


# -- loading ---------------------------------------------------------------------------

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
    recipe = build_recipe(data, problems, base_dir)
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

