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
from pathlib import Path
from typing import Any

from .errors import FactoryError, Problem
from .hashing import fingerprint
from .sources import (BUNDLED_PERSONAS, PERSONA_COLUMN, PersonaSetConfig, Source, bundled_personas,
                      persona_set_source, read_personas, seeded_sample)

BUNDLED = BUNDLED_PERSONAS
COLUMN = PERSONA_COLUMN  # the column a persona set has, and the column the factory writes personas to
__all__ = ["BUNDLED", "COLUMN", "PersonaSetConfig", "bundled_file", "resolve", "load", "problems_of", "digest",
           "draw", "shuffled"]


def bundled_file() -> Path:
    """The bundled persona set: the checkout's ``data/personas/personas.jsonl``, or the wheel's copy."""
    return bundled_personas()


_READ: dict[tuple, tuple[str, ...]] = {}  # what a set held when read, by where it was read from


def resolve(value: Any, path: tuple, problems: list[Problem], base_dir: Path) -> tuple[str, ...] | None:
    """The personas of the set ``value`` names (see the module's docstring), read once per process;
    None with the problems appended when the set cannot be read, lacks its column or is empty."""
    found = persona_set_source(value, path, problems, base_dir)
    if found is None:
        return None
    source, column = found
    key = (_where(source), column, source.config.limit)
    if key not in _READ:
        try:
            _READ[key] = read_personas(source, column)
        except FactoryError as err:
            problems.append(Problem(str(err), path=path))
            return None
    return _READ[key]


def _where(source: Source) -> str:
    """Where a set is read from: its Hub dataset, or its file with the file's size and modification
    time (a set edited in the same process is read again)."""
    if source.hub_ref is not None:
        return json.dumps(source.describe(), sort_keys=True, default=str)
    path = source.resolved_path
    stat = path.stat() if path.is_file() else None
    return json.dumps([str(path), stat and [stat.st_size, stat.st_mtime_ns]])


def load(value: Any, base_dir: Path, where: str = "personas") -> tuple[str, ...]:
    """:func:`resolve` for a step that runs: the personas, or a :class:`FactoryError` naming ``where``."""
    problems: list[Problem] = []
    personas = resolve(value, (), problems, base_dir)
    if personas is None:
        raise FactoryError(f"{where}: " + "; ".join(p.format().removeprefix("<recipe>: ") for p in problems))
    return personas


def problems_of(value: Any, key: str, base_dir: Path, draws: dict[str, int | None] | None = None) -> list[tuple]:
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
    return seeded_sample(personas, k, *key)


def shuffled(personas: tuple[str, ...], *key) -> list[str]:
    """Every persona once, in an order seeded with ``key``: its first k are a seeded sample of k, and
    a shorter run sees the personas a longer one starts with."""
    return seeded_sample(personas, len(personas), *key)
