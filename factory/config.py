"""Config dataclasses with a help string per field, and their validation.

Every configurable thing (a step, a backend, the source, the output) is a dataclass whose
fields carry ``help`` and optional bounds in their metadata. :func:`build` turns a mapping
read from YAML into an instance, collecting every problem (unknown key with the closest
valid name, wrong type, value out of bounds, missing key) instead of stopping at the first.

Why by hand rather than with pydantic or transformers' HfArgumentParser (which the trainers
use for their flags): a recipe error must name the file, the line, the key path
(``steps[2].solve.samples``) and the fix (the closest valid key, the allowed range), and
report every problem at once. HfArgumentParser stops at the first unknown key; pydantic
knows neither the YAML line nor the closest key, and its messages speak of Python types.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import types
import typing
from typing import Any, Literal, Union

from .errors import Problem

MISSING = dataclasses.MISSING


def option(default: Any = MISSING, *, help: str, min: float | None = None,
           max: float | None = None, default_factory: Any = MISSING, hashed_when_set: bool = False):
    """A dataclass field with a help string and optional numeric bounds.

    ``hashed_when_set``: :func:`to_dict` leaves the option out while it holds its default, so that
    an option added to an existing step keeps the hashes and cache keys of the recipes written
    before it. A field named after a Python keyword takes a trailing underscore (``from_``) and is
    written without it in recipes (``from:``).

    Example:
        samples: int = option(1, help="Answers sampled per task.", min=1)
    """
    metadata = {"help": help, "min": min, "max": max, "hashed_when_set": hashed_when_set}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def closest(name: str, candidates: typing.Iterable[str]) -> str | None:
    """The candidate closest to ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def suggest(name: str, candidates: typing.Iterable[str], what: str = "key") -> str:
    """A fix hint: the closest valid name, or the list of valid names."""
    candidates = sorted(candidates)
    match = closest(name, candidates)
    if match:
        return f"did you mean '{match}'?"
    return f"valid {what}s: {', '.join(candidates)}"


def key_of(name: str) -> str:
    """The recipe key of field ``name``: ``from_`` is written ``from`` (a keyword cannot name a field)."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def help_of(cls) -> dict[str, str]:
    """Recipe key -> help string of a config dataclass."""
    return {key_of(f.name): f.metadata.get("help", "") for f in dataclasses.fields(cls)}


REQUIRED = "(required)"  # what an option without a default shows in its place


def option_help(cls, values: dict | None = None) -> list[tuple[str, str, str]]:
    """Each option of config dataclass ``cls`` as ``(name, default, help)``: what ``factory steps
    NAME`` and a trainer's ``-h`` show, so that both write defaults and help alike.

    Args:
        cls: a config dataclass (its fields made with :func:`option`).
        values: defaults shown instead of the dataclass's (those a trainer's ``--config`` file gives).

    Returns:
        Per field: its name, its default as Python writes it (``'embedded'``, ``16``) or
        :data:`REQUIRED`, and its help string.
    """
    values = values or {}
    shown = []
    for f in dataclasses.fields(cls):
        if f.name in values:
            default = repr(values[f.name])
        elif f.default is not MISSING:
            default = repr(f.default)
        elif f.default_factory is not MISSING:
            default = repr(f.default_factory())
        else:
            default = REQUIRED
        shown.append((key_of(f.name), default, f.metadata.get("help", "")))
    return shown


def build(cls, data: Any, path: tuple, problems: list[Problem], *, exclude: tuple = ()):
    """Validates ``data`` against config dataclass ``cls`` and returns an instance.

    Problems are appended to ``problems`` (with ``path`` prefixed); when there is any,
    the returned instance is None. Keys in ``exclude`` are ignored (already handled by
    the caller).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(Problem(f"expected a mapping of options, got {_describe(data)}", path=path,
                                fix=f"write it as `key: value` lines; keys: {', '.join(sorted(help_of(cls)))}"))
        return None
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    before = len(problems)
    aliases = column_aliases(known, hints) | {key_of(name): name for name in known if key_of(name) != name}
    _check_column_pairs(data, known, path, problems)
    values = {}
    for key, value in data.items():
        if key in exclude:
            continue
        name = aliases.get(key, key)
        if name not in known:
            problems.append(Problem(f"unknown key '{key}'", path=path + (key,),
                                    fix=suggest(key, [key_of(k) for k in known if k not in exclude])))
            continue
        field = known[name]
        checked = check_value(value, hints[name], path + (key,), problems)
        if checked is _INVALID:
            continue
        bound_problem = _check_bounds(checked, field.metadata)
        if bound_problem:
            problems.append(Problem(bound_problem[0], path=path + (key,), fix=bound_problem[1]))
            continue
        values[name] = checked
    given = {aliases.get(key, key) for key in data}
    for name, field in known.items():
        if name in exclude or name in values:
            continue
        if field.default is MISSING and field.default_factory is MISSING and name not in given:
            problems.append(Problem(f"missing required key '{key_of(name)}'", path=path,
                                    fix=f"add `{key_of(name)}:` ({field.metadata.get('help', '')})"))
    if len(problems) > before:
        return None
    instance = cls(**values)
    post = getattr(instance, "validate", None)
    if post is not None:
        for message, key, fix in post() or []:
            problems.append(Problem(message, path=path + ((key,) if key else ()), fix=fix))
        if len(problems) > before:
            return None
    return instance


def column_aliases(known: dict, hints: dict) -> dict[str, str]:
    """``column`` -> ``columns`` (and ``eval_column`` -> ``eval_columns``...) for a config whose
    option takes a list of columns and that has no option of the single name: one column given
    as ``column: x`` is ``columns: [x]``."""
    return {name[:-1]: name for name in known if name.endswith("columns") and name[:-1] not in known
            and _is_list(hints[name])}


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return typing.get_origin(annotation) in (list, tuple)


def _check_column_pairs(data: dict, known: dict, path: tuple, problems: list[Problem]) -> None:
    """``column`` and ``columns`` both given: one of them would be ignored, so neither is guessed."""
    for single in sorted(name[:-1] for name in known if name.endswith("columns")):
        if single in data and single + "s" in data:
            problems.append(Problem(f"both `{single}` and `{single}s` are given", path=path + (single,),
                                    fix=f"keep one: `{single}: x` for one column, `{single}s: [x, y]` for several"))


class _Invalid:
    pass


_INVALID = _Invalid()


def check_value(value: Any, annotation: Any, path: tuple, problems: list[Problem]) -> Any:
    """Checks ``value`` against a type annotation; returns it (converted) or ``_INVALID``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        scratch: list[Problem] = []
        for candidate in non_none:
            scratch = []
            result = check_value(value, candidate, path, scratch)
            if result is not _INVALID:
                return result
        if len(non_none) == 1:
            problems.extend(scratch)
        else:
            problems.append(Problem(f"expected {_type_name(annotation)}, got {_describe(value)}",
                                    path=path, fix=f"set it to {_type_name(annotation)}"))
        return _INVALID
    if origin is Literal:
        if value in args:
            return value
        choices = [str(a) for a in args]
        match = closest(str(value), choices)
        fix = f"did you mean '{match}'?" if match else f"choose one of: {', '.join(choices)}"
        problems.append(Problem(f"'{value}' is not one of {', '.join(choices)}", path=path, fix=fix))
        return _INVALID
    if origin in (list, tuple):
        if isinstance(value, str) and args and (args[0] is str or (typing.get_origin(args[0]) is Literal and all(
                isinstance(a, str) for a in typing.get_args(args[0])))):
            value = [value]  # a single string where a list of strings is expected
        if not isinstance(value, list):
            problems.append(Problem(f"expected a list, got {_describe(value)}", path=path,
                                    fix="write a YAML list, e.g. [a, b]"))
            return _INVALID
        item_type = args[0] if args else Any
        out = []
        ok = True
        for i, item in enumerate(value):
            checked = check_value(item, item_type, path + (i,), problems)
            if checked is _INVALID:
                ok = False
            out.append(checked)
        return out if ok else _INVALID
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(Problem(f"expected a mapping, got {_describe(value)}", path=path,
                                    fix="write it as `key: value` lines"))
            return _INVALID
        value_type = args[1] if len(args) == 2 else Any
        out = {}
        ok = True
        for k, v in value.items():
            checked = check_value(v, value_type, path + (str(k),), problems)
            if checked is _INVALID:
                ok = False
            out[str(k)] = checked
        return out if ok else _INVALID
    if dataclasses.is_dataclass(annotation):
        built = build(annotation, value, path, problems)
        return _INVALID if built is None else built
    if annotation is bool:
        if isinstance(value, bool):
            return value
        problems.append(Problem(f"expected true or false, got {_describe(value)}", path=path,
                                fix="write true or false"))
        return _INVALID
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(Problem(f"expected an integer, got {_describe(value)}", path=path,
                                fix="write a whole number such as 4"))
        return _INVALID
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        problems.append(Problem(f"expected a number, got {_describe(value)}", path=path,
                                fix="write a number such as 0.7"))
        return _INVALID
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(Problem(f"expected a string, got {_describe(value)}", path=path,
                                fix="quote the value"))
        return _INVALID
    return value


def _check_bounds(value: Any, metadata: typing.Mapping) -> tuple[str, str] | None:
    low, high = metadata.get("min"), metadata.get("max")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if low is not None and value < low:
        return (f"must be at least {_num(low)}, got {_num(value)}", f"set it to {_num(low)} or more")
    if high is not None and value > high:
        return (f"must be at most {_num(high)}, got {_num(value)}", f"set it to {_num(high)} or less")
    return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0])}s" if args else "a list"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    kind = {int: "an integer", float: "a number", str: "a string"}.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({kind})"


def to_dict(instance: Any) -> Any:
    """A config instance as plain data (for manifests and hashing)."""
    if dataclasses.is_dataclass(instance):
        return {key_of(f.name): to_dict(getattr(instance, f.name)) for f in dataclasses.fields(instance)
                if not (f.metadata.get("hashed_when_set") and getattr(instance, f.name) == f.default)}
    if isinstance(instance, (list, tuple)):
        return [to_dict(x) for x in instance]
    if isinstance(instance, dict):
        return {k: to_dict(v) for k, v in instance.items()}
    return instance
