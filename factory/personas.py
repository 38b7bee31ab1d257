"""Persona sets: short descriptions of people that shape prompts, and their seeded draws.

A recipe names a persona set the same way wherever it takes one (the ``personas`` step's
``from:``, ``self_instruct``'s ``personas:``, ``source: {personas: ...}``):

* ``bundled`` -- ``data/personas/personas.jsonl``, 300 people written for this project;
* a path -- a .jsonl/.json/.parquet/.csv file (or a folder ``source: {path: ...}`` reads) with
  a ``persona`` column; relative paths are read from the working folder, the recipe's folder
  or the project, as a source's are;
* a mapping -- ``{path: FILE, column: text}``, or a Hub dataset in Persona Hub's layout
  (``{hub: proj-persona/PersonaHub, config: persona}``, column ``persona``) with ``config``,
  ``split``, ``revision``, ``limit`` and ``streaming`` as ``source:`` has them; a local folder
  holding a copy of the dataset repository works offline.

Sets are read through :mod:`factory.sources` (so Hub datasets behave as a ``source:`` does),
checked while the recipe is validated (a missing column, an empty set, a draw larger than the
set), and read once per process. Draws come from generators seeded with the recipe's seed and
what is drawn for, so the same seed gives the same personas.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import bundled
from .config import build, closest, option
from .errors import FactoryError, Problem
from .hashing import fingerprint, fingerprint_int
from .sources import Source, build_source

BUNDLED = "bundled"
COLUMN = "persona"  # the column a persona set has, and the column the factory writes personas to
FORMS = ("`bundled`, a file such as personas.jsonl, or {hub: proj-persona/PersonaHub, config: persona} "
         "(or {path: FILE, column: NAME})")


def bundled_file() -> Path:
    """The bundled persona set: the checkout's ``data/personas/personas.jsonl``, or the wheel's copy."""
    return bundled.root() / "data" / "personas" / "personas.jsonl"


@dataclass
class PersonaSetConfig:
    """A persona set written as a mapping (``{hub: ..., column: ...}`` or ``{path: ..., column: ...}``)."""

    path: str | None = option(None, help="A .jsonl/.json/.parquet/.csv file with one persona per row "
                                         "(`bundled`: the set that ships with the factory).")
    hub: str | None = option(None, help="A dataset on the Hugging Face Hub (e.g. proj-persona/PersonaHub), or a "
                                        "local folder holding a copy of one.")
    column: str = option(COLUMN, help="The column that holds the persona text.")
    config: str | None = option(None, help="The Hub dataset's config (Persona Hub: `persona`).")
    split: str = option("train", help="The Hub dataset's split.")
    revision: str | None = option(None, help="The Hub dataset's revision (tag, branch or commit).")
    streaming: bool = option(False, help="Stream the Hub dataset: with `limit`, only those rows are fetched.")
    limit: int | None = option(None, help="Read only the first N rows of the set.", min=1)


def source_of(value: Any, path: tuple, problems: list[Problem], base_dir: Path) -> tuple[Source, str] | None:
    """The :class:`~factory.sources.Source` a persona set is read from, and its persona column, or
    None with the problems appended (``path`` is the key path of ``value`` in the recipe)."""
    before = len(problems)
    if isinstance(value, str):
        spec = PersonaSetConfig(path=value)
    elif isinstance(value, dict):
        spec = build(PersonaSetConfig, value, path, problems)
    else:
        problems.append(Problem("expected the name of a persona set", path=path, fix=f"write {FORMS}"))
        return None
    if spec is None:
        return None
    if (spec.path is None) == (spec.hub is None):
        problems.append(Problem("a persona set needs one of `path:` and `hub:`", path=path, fix=f"write {FORMS}"))
        return None
    data = {k: v for k, v in vars(spec).items() if v is not None and k != "column"}
    if spec.path is not None:
        data = {k: v for k, v in data.items() if k in ("path", "limit")}
        if spec.path.strip() == BUNDLED:
            data["path"] = str(bundled_file())
    source = build_source(data, path, problems, base_dir, what="persona file")
    if isinstance(value, str):  # the name itself is the path: problems are located at it
        for problem in problems[before:]:
            problem.path = path
    if source is None or len(problems) > before:
        return None
    return source, spec.column


_READ: dict[tuple, tuple[str, ...]] = {}  # what a set held when read, by where it was read from


def resolve(value: Any, path: tuple, problems: list[Problem], base_dir: Path) -> tuple[str, ...] | None:
    """The personas of the set ``value`` names (see the module's docstring), read once per process;
    None with the problems appended when the set cannot be read, lacks its column or is empty."""
    found = source_of(value, path, problems, base_dir)
    if found is None:
        return None
    source, column = found
    key = (json.dumps(source.describe() if source.hub_ref else str(source.resolved_path), sort_keys=True, default=str),
           _stamp(source.resolved_path), column, source.config.limit)
    if key in _READ:
        return _READ[key]
    name = BUNDLED if value == BUNDLED else source.name()
    try:
        columns = source.columns()
        frame = source.read() if column in columns else None
    except FactoryError as err:
        problems.append(Problem(str(err), path=path))
        return None
    if frame is None or column not in frame.columns:
        match = closest(column, columns)
        problems.append(Problem(f"the persona set {name} has no column '{column}' (it has {', '.join(columns)})",
                                path=path, fix=(f"did you mean `column: {match}`?" if match else
                                                "name the column that holds the personas: "
                                                "{path: FILE, column: NAME}")))
        return None
    personas = tuple(dict.fromkeys(text.strip() for text in frame[column].to_list()
                                   if isinstance(text, str) and text.strip()))
    if not personas:
        problems.append(Problem(f"the persona set {name} has no personas in column '{column}'", path=path,
                                fix="point it at a file with one persona per row, or use `bundled`"))
        return None
    _READ[key] = personas
    return personas


def _stamp(path: Path | None) -> tuple | None:
    """A file's size and modification time: a set edited in the same process is read again."""
    if path is None or not path.is_file():
        return None
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def load(value: Any, base_dir: Path, where: str = "personas") -> tuple[str, ...]:
    """:func:`resolve` for a step that runs: the personas, or a :class:`FactoryError` naming ``where``."""
    problems: list[Problem] = []
    personas = resolve(value, (), problems, base_dir)
    if personas is None:
        raise FactoryError(f"{where}: " + "; ".join(p.format().removeprefix("<recipe>: ") for p in problems))
    return personas


def problems_of(value: Any, key: str, base_dir: Path, draws: dict[str, int] | None = None) -> list[tuple]:
    """A step's ``check()`` entries for the persona set at option ``key``: ``(message, key path, fix)``.
    ``draws`` maps another option to how many distinct personas it draws at once (``per_row: 3``);
    more than the set holds is a problem there."""
    problems: list[Problem] = []
    personas = resolve(value, (key,), problems, base_dir)
    found = [(p.message, p.path, p.fix) for p in problems]
    for option_name, wanted in (draws or {}).items():
        if personas is not None and wanted is not None and wanted > len(personas):
            found.append((f"draws {wanted} distinct personas, and the set holds {len(personas)}", option_name,
                          f"set it to {len(personas)} or less, or use a larger persona set"))
    return found


def digest(personas: tuple[str, ...]) -> str:
    """What a set holds, for cache keys (a set edited since is another set)."""
    return fingerprint(list(personas))


def draw(personas: tuple[str, ...], k: int, *key) -> list[str]:
    """``k`` distinct personas, drawn by a generator seeded with ``key`` (the recipe's seed and what
    they are drawn for): the same key gives the same draw."""
    return random.Random(fingerprint_int(["personas", *key])).sample(personas, k)


def shuffled(personas: tuple[str, ...], *key) -> list[str]:
    """Every persona once, in an order seeded with ``key``: its first k are a seeded sample of k, and
    a shorter run sees the personas a longer one starts with."""
    return draw(personas, len(personas), *key)
