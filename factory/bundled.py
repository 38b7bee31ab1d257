"""The recipes and data that ship with the factory, and ``factory init``'s starter copies.

In a checkout (or an editable install) they are the project's own ``recipes/`` and ``data/``;
an installed wheel carries the same files as ``factory/_bundled/{recipes,data}`` (pyproject.toml
maps them there). ``root()`` is the folder that holds both, wherever the package runs from.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path, PurePosixPath

import yaml

from .config import closest
from .errors import FactoryError

PACKAGE = Path(__file__).resolve().parent
DATA = "data"


def root() -> Path:
    """The folder holding ``recipes/`` and ``data/``: the wheel's copy, else the checkout."""
    packed = PACKAGE / "_bundled"
    return packed if (packed / "recipes").is_dir() else PACKAGE.parent


def recipes() -> dict[str, Path]:
    """Bundled recipe name (its file name without .yaml) -> its file, sorted by name."""
    return {p.stem: p for p in sorted((root() / "recipes").glob("*.yaml"))}


def find_recipe(name: str) -> Path:
    """The bundled recipe called ``name`` (its file name, or the ``name:`` in it, e.g. self-instruct)."""
    available = recipes()
    key = name.removesuffix(".yaml")
    for candidate in (key, key.replace("-", "_")):
        if candidate in available:
            return available[candidate]
    match = closest(key, available)
    hint = f"did you mean '{match}'? " if match else ""
    raise FactoryError(f"unknown recipe '{name}'; {hint}bundled recipes: {', '.join(available)} "
                       "(`factory recipes` describes them)")


def summary(path: Path) -> str:
    """One line about a recipe: the first sentence of its ``description:``, else its leading comment."""
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    about = data.get("description") if isinstance(data, dict) else None
    if not isinstance(about, str) or not about.strip():
        comment = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        about = " ".join(comment)
    about = " ".join(about.split())
    first = re.split(r"(?<=[.!?])\s+(?=[A-Z(`])", about, maxsplit=1)[0]
    return first


def data_references(data) -> list[str]:
    """Every value in a loaded recipe that names a path under ``data/`` (source files, eval sets,
    document folders), in the order they appear, each once."""
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            parts = PurePosixPath(node.strip()).parts
            if len(parts) > 1 and parts[0] == DATA and ".." not in parts:
                path = str(PurePosixPath(*parts))
                if path not in found:
                    found.append(path)

    walk(data)
    return found


def init_files(name: str) -> list[tuple[str, Path]]:
    """What ``factory init NAME`` writes: (path relative to the target folder, bundled file)."""
    recipe = find_recipe(name)
    files = [(recipe.name, recipe)]
    base = root()
    data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    for ref in data_references(data):
        src = base / ref
        if src.is_file():
            files.append((ref, src))
        elif src.is_dir():
            files.extend((str(PurePosixPath(ref) / f.relative_to(src).as_posix()), f)
                         for f in sorted(src.rglob("*")) if f.is_file() and "__pycache__" not in f.parts)
    return files


def init(name: str, dest: str | Path = ".", force: bool = False) -> list[tuple[str, bool]]:
    """Copies bundled recipe ``name`` and the data files it references into ``dest``, at the same
    relative paths, so that the recipe runs from there as it is. Returns (relative path, written):
    a file already there with the same content is left alone (written False). Any other existing
    file stops it before anything is written, unless ``force``."""
    dest = Path(dest)
    plan = []
    for rel, src in init_files(name):
        target = dest / rel
        if target.is_dir():
            raise FactoryError(f"{target} is a folder; move it away so that `factory init` can write the file "
                               f"{rel} there")
        same = target.is_file() and target.read_bytes() == src.read_bytes()
        if target.exists() and not same and not force:
            raise FactoryError(f"{target} already exists and differs from the bundled copy; move it away or run "
                               f"`factory init {name} --force` to overwrite it")
        plan.append((rel, src, target, not same))
    for rel, src, target, write in plan:
        if write:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
    return [(rel, write) for rel, _, _, write in plan]
