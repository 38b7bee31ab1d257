"""Where a recipe's rows come from: a file, a local Hugging Face dataset, a dataset on the Hub, a
generator, or a persona set. Eval sets are named the same way (see :func:`build_source`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl

from . import bundled
from .config import build, option, suggest
from .errors import FactoryError, Problem
from .generators import GENERATORS
from .hashing import fingerprint_int
from .hubdata import REPO_ID, HubRef, open_hub

# The last place a relative path is looked for: the project (the bundled recipes/ and data/ in a wheel).
PROJECT_ROOT = bundled.root()
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv",
           ".tsv": "csv", ".md": "documents", ".txt": "documents"}
DOCUMENT_SUFFIXES = (".md", ".markdown", ".txt")
DOCUMENT_COLUMNS = ("doc_id", "title", "text")


@dataclass
class SourceConfig:
    path: str | None = option(None, help="A .jsonl/.json/.parquet/.csv file, a folder of parquet files, a "
                                          "dataset saved with save_to_disk, or a factory version folder.")
    hub: str | None = option(None, help="A dataset on the Hugging Face Hub (ORG/NAME), read with `datasets` "
                                        "(its cache, HF_HUB_OFFLINE and HF_TOKEN apply); or a local folder "
                                        "holding a copy of a dataset repository (data files + README `configs:`).")
    generator: str | None = option(None, help="A programmatic source instead of a file: "
                                              + ", ".join(GENERATORS) + ".")
    config: str | None = option(None, help="The Hub dataset's config (subset), e.g. `main` (default: its default "
                                           "config).")
    revision: str | None = option(None, help="The Hub dataset's revision: a tag (a version this factory pushed is "
                                             "tagged v<N>), a branch or a commit sha (default: main). The manifest "
                                             "records the commit it resolved to.")
    streaming: bool = option(False, help="Stream the Hub dataset instead of downloading it whole: with `limit`, "
                                         "only the first rows are fetched.")
    columns: list[str] | None = option(None, help="Read only these columns (before `rename`).")
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "hf", "documents"] = option(
        "auto", help="File format; `auto` guesses from the name. `documents`: a folder of .md/.txt files, one "
                     "row per file (doc_id, title, text).")
    split: str = option("train", help="The split to read: of a Hub dataset, or of a saved DatasetDict.")
    limit: int | None = option(None, help="Read only the first N rows.", min=1)
    rename: dict[str, str] = option(default_factory=dict, help="Rename columns on load, e.g. {question: instruction}.")


@dataclass
class Source:
    """A validated source: where rows come from, resolved against the recipe's folder."""

    config: SourceConfig
    resolved_path: Path | None = None
    generator_config: Any = None
    rejected: pl.DataFrame | None = None  # rows set aside while reading (see read_table)
    hub_ref: HubRef | None = None
    # `{personas: ...}`: generator_config is then a PersonaSourceConfig (the resolved recipe shows its
    # fields, as a generator's), and the set is read from `persona_set` (a Source) at its column.
    persona_set: tuple["Source", str] | None = None

    @property
    def generator(self):
        return GENERATORS[self.config.generator] if self.config.generator else None

    @property
    def hub(self):
        """The Hub dataset (:class:`~factory.hubdata.HubDataset`), resolved once per process."""
        return open_hub(self.hub_ref) if self.hub_ref else None

    def name(self) -> str:
        """The source in a message: its file, Hub dataset, generator or persona set."""
        if self.persona_set:
            return f"persona set {self.persona_set[0].name()}"
        if self.hub_ref:
            return f"hub dataset '{self.hub_ref.location}' (split {self.hub_ref.split})"
        return str(self.resolved_path or f"generator {self.config.generator}")

    def describe(self) -> dict:
        if self.persona_set:
            return {**self.persona_set[0].describe(), **dataclasses.asdict(self.generator_config)}
        if self.hub_ref:
            return self.hub.describe()
        if self.resolved_path:
            return {"path": str(self.resolved_path)}
        return {"generator": self.config.generator}

    def columns(self) -> list[str]:
        """Column names, read cheaply (a file's header or first lines, a Hub dataset's features)."""
        if self.generator:
            cols = list(self.generator.columns)
        elif self.persona_set:
            cols = [PERSONA_COLUMN]
        elif self.hub_ref:
            cols = self.hub.columns()
        else:
            cols = _peek_columns(self.resolved_path, self.file_format(), self.config.split)
            if self.config.columns is not None:
                cols = [c for c in self.config.columns if c in cols]
        return [self.config.rename.get(c, c) for c in cols]

    def file_format(self) -> str:
        return detect_format(self.resolved_path, self.config.format)

    def read(self, cache=None, progress: bool = False) -> pl.DataFrame:
        """The source's rows. Rows that do not fit their columns' type are set aside in
        :attr:`rejected` (reason ``invalid_input``) rather than failing the whole run.
        ``cache``: where JSON files parsed once are kept (see :func:`read_table_with_rejects`).

        Raises:
            FactoryError: the source has no rows, or lacks a column of ``columns``.
        """
        self.rejected = None
        if self.generator:
            frame = self.generator.make(self.generator_config)
        elif self.persona_set:
            frame = self._persona_rows(cache, progress)
        elif self.hub_ref:
            frame = self.hub.read(self.config.limit, progress)
        else:
            frame, self.rejected = read_table_with_rejects(self.resolved_path, self.file_format(),
                                                           self.config.split, cache)
            if self.config.columns is not None:
                missing = [c for c in self.config.columns if c not in frame.columns]
                if missing and frame.height:
                    raise FactoryError(f"source {self.name()} has no column {', '.join(map(repr, missing))} (it has "
                                       f"{', '.join(frame.columns)}); fix `columns:`")
                frame = frame.select([c for c in self.config.columns if c in frame.columns])
        if self.config.limit is not None:
            frame = frame.head(self.config.limit)
        if self.config.rename:
            frame = frame.rename({k: v for k, v in self.config.rename.items() if k in frame.columns})
        if frame.height == 0:
            raise FactoryError(f"source {self.name()} has no rows; point `source:` at "
                               f"{'a split' if self.hub_ref else 'a file'} with data")
        return frame

    def _persona_rows(self, cache, progress: bool) -> pl.DataFrame:
        """A persona set's rows: all of them, or with ``limit`` a seeded sample (the first rows of a
        seeded order, so a preview's few are among a longer run's)."""
        personas = read_personas(*self.persona_set, cache=cache, progress=progress)
        if self.config.limit is not None:
            personas = seeded_sample(personas, len(personas), "source", self.generator_config.seed)
        return pl.DataFrame({PERSONA_COLUMN: list(personas)}, schema={PERSONA_COLUMN: pl.String})

    def first(self, rows: int, *, grow: bool = False) -> "Source":
        """A copy of this source that reads only its first ``rows`` rows (a preview, a pass of
        ``output.rows``). A generator makes only those; with ``grow`` it makes them even past its
        own ``num_rows`` (``output.rows`` keeps it going until enough rows survive). Generators are
        prefix-stable (the first k rows are the same whatever ``num_rows`` is), so a longer prefix
        repeats a shorter one and the reply cache answers its rows again."""
        limit = rows if self.config.limit is None else min(rows, self.config.limit)
        generator_config = self.generator_config
        if generator_config is not None and hasattr(generator_config, "num_rows"):
            made = limit if grow else min(limit, generator_config.num_rows)
            generator_config = dataclasses.replace(generator_config, num_rows=made)
        return dataclasses.replace(self, config=dataclasses.replace(self.config, limit=limit),
                                   generator_config=generator_config, rejected=None)

    def parent_version(self) -> str | None:
        """The factory version folder this source was read from, if it is one (a Hub dataset is
        recorded, with its commit, as the manifest's ``source``)."""
        p = self.resolved_path
        if p is None:
            return None
        for candidate in (p, *p.parents):
            if (candidate / "manifest.json").is_file():
                return str(candidate)
        return None


def resolve_path(path: str, base_dir: Path) -> Path | None:
    """Finds ``path``: as given (relative to the working folder), beside the recipe, or in the project."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p if p.exists() else None
    for root in (Path.cwd(), base_dir, PROJECT_ROOT):
        if (root / p).exists():
            return (root / p).resolve()
    return None


HUB_ONLY = ("config", "revision", "streaming")


def build_source(data, path: tuple, problems: list[Problem], base_dir: Path,
                 what: str = "source file") -> Source | None:
    """Validates a recipe's ``source:`` mapping (or an eval set given in the same form, ``what``
    naming it in messages). A Hub dataset is resolved here, so a missing one stops the recipe
    before any model loads."""
    if isinstance(data, str):
        data = {"path": data}
    if not isinstance(data, dict):
        problems.append(Problem("expected a mapping such as {path: data/seeds/tasks.jsonl} or {hub: ORG/NAME}",
                                path=path, fix="write it with a `path:`, `hub:` or `generator:` key"))
        return None
    kinds = [k for k in ("path", "hub", "generator", "personas") if data.get(k) is not None]
    if len(kinds) > 1:
        problems.append(Problem(f"both `{kinds[0]}:` and `{kinds[1]}:` are given", path=path,
                                fix="keep one: a file (`path:`), a Hub dataset (`hub:`), a `generator:` or a "
                                    "persona set (`personas:`)"))
        return None
    if "personas" in data:
        return _persona_source(data, path, problems, base_dir)
    before = len(problems)
    generator_config = None
    if "generator" in data:
        name = data["generator"]
        if name not in GENERATORS:
            problems.append(Problem(f"unknown generator '{name}'", path=path + ("generator",),
                                    fix=suggest(str(name), GENERATORS, "generator")))
            return None
        common = {k: v for k, v in data.items() if k in ("generator", "limit", "rename")}
        generator_config = build(GENERATORS[name].Config, {k: v for k, v in data.items() if k not in common},
                                 path, problems)
        config = build(SourceConfig, common, path, problems)
    else:
        config = build(SourceConfig, data, path, problems)
        if config is not None and config.path is None and config.hub is None:
            problems.append(Problem("needs `path:`, `hub:` or `generator:`", path=path,
                                    fix="add e.g. `path: data/seeds/tasks.jsonl` or `hub: openai/gsm8k`"))
    if len(problems) > before or config is None:
        return None
    if config.hub is None:
        for key in HUB_ONLY:
            if key in data:
                problems.append(Problem(f"`{key}:` applies to Hub datasets", path=path + (key,),
                                        fix="remove it, or read the data with `hub: ORG/NAME`"))
    if len(problems) > before:
        return None
    if config.hub is not None:
        ref = _hub_ref(config, path, problems, base_dir)
        return Source(config, hub_ref=ref) if ref is not None else None
    resolved = None
    if config.path is not None:
        resolved = resolve_path(config.path, base_dir)
        if resolved is None:
            problems.append(Problem(f"{what} '{config.path}' does not exist (looked in {Path.cwd()}, "
                                    f"{base_dir} and {PROJECT_ROOT})", path=path + ("path",),
                                    fix="fix the path; relative paths are read from the working folder, "
                                        "the recipe's folder or the project"))
            return None
        try:
            detect_format(resolved, config.format)
        except FactoryError as err:
            problems.append(Problem(str(err), path=path + ("path",), fix="set `format:`"))
            return None
    return Source(config, resolved, generator_config)


PERSONA_COLUMN = "persona"  # the column a persona set has by default, and the one a persona source makes
BUNDLED_PERSONAS = "bundled"
PERSONA_FORMS = ("`bundled`, a file such as personas.jsonl, or {hub: proj-persona/PersonaHub, config: persona} "
                 "(or {path: FILE, column: NAME})")


def bundled_personas() -> Path:
    """The persona set that ships with the factory (``bundled``): ``data/personas/personas.jsonl``."""
    return bundled.root() / "data" / "personas" / "personas.jsonl"


@dataclass
class PersonaSetConfig:
    """A persona set written as a mapping (``{hub: ..., column: ...}`` or ``{path: ..., column: ...}``)."""

    path: str | None = option(None, help="A .jsonl/.json/.parquet/.csv file with one persona per row "
                                         "(`bundled`: the set that ships with the factory).")
    hub: str | None = option(None, help="A dataset on the Hugging Face Hub (e.g. proj-persona/PersonaHub), or a "
                                        "local folder holding a copy of one.")
    column: str = option(PERSONA_COLUMN, help="The column that holds the persona text.")
    config: str | None = option(None, help="The Hub dataset's config (Persona Hub: `persona`).")
    split: str = option("train", help="The Hub dataset's split.")
    revision: str | None = option(None, help="The Hub dataset's revision (tag, branch or commit).")
    streaming: bool = option(False, help="Stream the Hub dataset: with `limit`, only those rows are fetched.")
    limit: int | None = option(None, help="Read only the first N rows of the set.", min=1)


@dataclass
class PersonaSourceConfig:
    """``source: {personas: ..., limit: N, seed: S}``: persona rows (column ``persona``)."""

    personas: str | dict = option(help="The persona set: " + PERSONA_FORMS + ".")
    seed: int = option(0, help="With `limit`, the seed of the sample drawn (the same seed, the same personas).")


def persona_set_source(value: Any, path: tuple, problems: list[Problem],
                       base_dir: Path) -> tuple[Source, str] | None:
    """The :class:`Source` a persona set named as a recipe names it is read from, and its persona
    column; None with the problems appended (``path``: the key path of ``value``)."""
    before = len(problems)
    if isinstance(value, str):
        spec = PersonaSetConfig(path=value)
    elif isinstance(value, dict):
        spec = build(PersonaSetConfig, value, path, problems)
    else:
        problems.append(Problem("expected the name of a persona set", path=path, fix=f"write {PERSONA_FORMS}"))
        return None
    if spec is None:
        return None
    if (spec.path is None) == (spec.hub is None):
        problems.append(Problem("a persona set needs one of `path:` and `hub:`", path=path,
                                fix=f"write {PERSONA_FORMS}"))
        return None
    data = {k: v for k, v in vars(spec).items() if v is not None and k != "column"}
    if spec.path is not None:
        data = {k: v for k, v in data.items() if k in ("path", "limit")}
        if spec.path.strip() == BUNDLED_PERSONAS:
            data["path"] = str(bundled_personas())
    source = build_source(data, path, problems, base_dir, what="persona file")
    if isinstance(value, str):  # the name itself is the path: problems are located at it
        for problem in problems[before:]:
            problem.path = path
    if source is None or len(problems) > before:
        return None
    return source, spec.column


def read_personas(source: Source, column: str, cache=None, progress: bool = False) -> tuple[str, ...]:
    """The distinct, non-empty personas in ``column`` of ``source``, in the set's order.

    Raises:
        FactoryError: the set cannot be read, lacks the column, or holds no persona.
    """
    try:
        frame = source.read(cache, progress)
    except FactoryError as err:
        if "has no rows" not in str(err):  # an empty file is an empty set, said as such below
            raise
        frame = pl.DataFrame({column: []}, schema={column: pl.String})
    if column not in frame.columns:
        raise FactoryError(f"the persona set {source.name()} has no column '{column}' (it has "
                           f"{', '.join(frame.columns)}); name the column that holds the personas: "
                           "{path: FILE, column: NAME}")
    personas = tuple(dict.fromkeys(text.strip() for text in frame[column].to_list()
                                   if isinstance(text, str) and text.strip()))
    if not personas:
        raise FactoryError(f"the persona set {source.name()} has no personas in column '{column}'; point it "
                           "at a file with one persona per row, or use `bundled`")
    return personas


def seeded_sample(items, k: int, *key) -> list:
    """``k`` distinct items drawn by a generator seeded with ``key``: the same key, the same draw."""
    return random.Random(fingerprint_int(["personas", *key])).sample(list(items), k)


def _persona_source(data: dict, path: tuple, problems: list[Problem], base_dir: Path) -> Source | None:
    """``{personas: SET, limit: N, seed: S, rename: {...}}`` validated, the set resolved and checked."""
    before = len(problems)
    common = {k: v for k, v in data.items() if k in ("limit", "rename")}
    config = build(SourceConfig, common, path, problems)
    persona_config = build(PersonaSourceConfig, {k: v for k, v in data.items() if k not in common}, path, problems)
    if config is None or persona_config is None:
        return None
    found = persona_set_source(persona_config.personas, path + ("personas",), problems, base_dir)
    if found is None or len(problems) > before:
        return None
    try:
        read_personas(*found)
    except FactoryError as err:
        problems.append(Problem(str(err), path=path + ("personas",)))
        return None
    return Source(config, generator_config=persona_config, persona_set=found)


def _hub_ref(config: SourceConfig, path: tuple, problems: list[Problem], base_dir: Path) -> HubRef | None:
    """The Hub dataset a ``hub:`` names (a local folder when one exists at that path), resolved."""
    from .hubdata import HubError

    if config.format != "auto":
        problems.append(Problem("`format:` applies to files; a Hub dataset's card says how to read it",
                                path=path + ("format",), fix="remove it"))
        return None
    name = config.hub.strip()
    local = next((root / name for root in (Path.cwd(), base_dir) if (root / name).expanduser().is_dir()), None)
    if local is None and not REPO_ID.fullmatch(name):
        problems.append(Problem(f"'{name}' is neither a Hub dataset id nor a local folder", path=path + ("hub",),
                                fix="write ORG/NAME as on huggingface.co/datasets, e.g. openai/gsm8k"))
        return None
    if local is not None and config.revision:
        problems.append(Problem(f"'{name}' is a local folder, which has no revisions", path=path + ("revision",),
                                fix="remove `revision:`, or check out that revision in the folder"))
        return None
    ref = HubRef(repo=name, config=config.config, split=config.split, revision=config.revision,
                 columns=tuple(config.columns) if config.columns is not None else None,
                 streaming=config.streaming, local=local.expanduser().resolve() if local else None)
    try:
        open_hub(ref).builder()
    except HubError as err:
        problems.append(Problem(str(err), path=path + ("hub",)))
        return None
    return ref


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        if (path / "manifest.json").is_file() and (path / "data").is_dir():
            return "parquet"
        if any((path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "hf"
        if any(path.glob("*.parquet")) or any(path.glob("data/*.parquet")):
            return "parquet"
        if any(path.glob("*.jsonl")):
            return "jsonl"
        if any(p.suffix.lower() in DOCUMENT_SUFFIXES for p in path.rglob("*")):
            return "documents"
        raise FactoryError(f"{path}: a folder with no parquet, jsonl, saved dataset or .md/.txt documents in it")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise FactoryError(f"{path}: cannot tell the format from '{path.suffix}' (known: {', '.join(FORMATS)})")
    return fmt


def _files(path: Path, pattern: str) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.glob(pattern)) or sorted(path.glob("data/" + pattern))
    return files


# Bump when what a JSON file reads as changes: the frames earlier versions cached are not read then.
JSON_READER = "1"


def read_table(path: Path, fmt: str, split: str = "train") -> pl.DataFrame:
    """Reads a whole source into a frame, with errors that name the file and line.

    JSON rows whose values do not fit their column's type are left out; see
    :func:`read_table_with_rejects` to get them.
    """
    return read_table_with_rejects(path, fmt, split)[0]


def read_table_with_rejects(path: Path, fmt: str, split: str = "train",
                            cache=None) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """Like :func:`read_table`, and also the JSON rows set aside, with ``drop_reason``,
    ``drop_detail`` (file, line, column) and ``raw_row`` (the row as JSON).

    With a ``cache`` (:class:`~factory.cache.Cache`), JSON files are parsed once: the frames are
    kept under a digest of the files' names and bytes, and read back while they are unchanged.
    """
    if fmt == "parquet":
        return pl.concat([pl.read_parquet(f) for f in _files(path, "*.parquet")], how="diagonal_relaxed"), None
    if fmt == "csv":
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
        try:
            return pl.read_csv(path, separator=sep, infer_schema_length=None), None
        except (pl.exceptions.ComputeError, UnicodeDecodeError) as err:
            raise FactoryError(f"{path}: not a readable CSV file ({str(err).splitlines()[0]}); check the "
                               "delimiter and that it is UTF-8") from None
    if fmt == "hf":
        return _read_hf(path, split), None
    if fmt == "documents":
        return read_documents(path), None
    files = _files(path, "*.jsonl")
    contents = [f.read_bytes() for f in files]
    key = None
    if cache is not None:  # the frames read before from the same files, byte for byte
        key = hashlib.sha256(json.dumps([JSON_READER, fmt, [[str(f), hashlib.sha256(raw).hexdigest()]
                                                            for f, raw in zip(files, contents)]]).encode()).hexdigest()
        frame = cache.get_frame("sources", key)
        if frame is not None:
            return frame, cache.get_frame("sources-rejected", key)
    rows: list[dict] = []
    row_files: list[Path] = []  # each row's file and line (named only for a row set aside)
    lines: list[int] = []
    for f, raw in zip(files, contents):
        file_rows = _read_json_rows(f, fmt, raw)
        rows.extend(row for _, row in file_rows)
        row_files.extend([f] * len(file_rows))
        lines.extend(number for number, _ in file_rows)
    if not rows:
        return pl.DataFrame(), None
    rows, rejected = _set_aside_mixed_kinds(rows, row_files, lines)
    frame = pl.from_dicts(rows, infer_schema_length=None, strict=False) if rows else pl.DataFrame()
    if key is not None:  # the rows set aside first: a frame in the cache has them there too
        if rejected is not None:
            cache.put_frame("sources-rejected", key, rejected)
        cache.put_frame("sources", key, frame)
    return frame, rejected


def read_documents(path: Path) -> pl.DataFrame:
    """One row per .md/.txt file: ``doc_id`` (path inside the folder), ``title`` (the first
    Markdown heading, else the file name) and ``text``."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in DOCUMENT_SUFFIXES)
    rows = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise FactoryError(f"{f}: byte {err.start} is not valid UTF-8; re-encode the file as UTF-8") from None
        heading = next((line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")), None)
        doc_id = f.name if path.is_file() else str(f.relative_to(path))
        rows.append({"doc_id": doc_id, "title": heading or f.stem.replace("-", " ").replace("_", " "), "text": text})
    return pl.DataFrame(rows, schema={c: pl.String for c in DOCUMENT_COLUMNS})


def _kind(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return "scalar"  # text, numbers and booleans share a column (numbers are read as text)


def _kind_of_type(kind: type) -> str | None:
    """:func:`_kind` of any value of type ``kind``."""
    if kind is type(None):
        return None
    if issubclass(kind, (list, tuple)):
        return "list"
    if issubclass(kind, dict):
        return "mapping"
    return "scalar"


def _set_aside_mixed_kinds(rows: list[dict], files: list[Path],
                           lines: list[int]) -> tuple[list[dict], pl.DataFrame | None]:
    """Rows whose value in some column is of another kind (list, mapping, scalar) than the
    column's usual one cannot share a typed column: they are set aside, not lost."""
    # The kinds each column holds, from the distinct (column, type) pairs: rows are counted
    # one by one only when some column holds two.
    kinds_of: dict[str, set[str]] = {}
    for key, kind in {(key, value.__class__) for row in rows for key, value in row.items()}:
        kind = _kind_of_type(kind)
        if kind:
            kinds_of.setdefault(key, set()).add(kind)
    if all(len(kinds) < 2 for kinds in kinds_of.values()):
        return rows, None
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        for key, value in row.items():
            kind = _kind(value)
            if kind:
                counts.setdefault(key, {}).setdefault(kind, 0)
                counts[key][kind] += 1
    mixed = {key: max(kinds, key=kinds.get) for key, kinds in counts.items() if len(kinds) > 1}
    if not mixed:
        return rows, None
    kept, rejected = [], []
    for row, file, line in zip(rows, files, lines):
        bad = [key for key, usual in mixed.items() if _kind(row.get(key)) not in (None, usual)]
        if bad:
            details = ", ".join(f"column '{k}' is a {_kind(row[k])}, not a {mixed[k]} as in other rows" for k in bad)
            rejected.append({"drop_reason": "invalid_input", "drop_detail": f"{file}:{line}: {details}",
                             "raw_row": json.dumps(row, ensure_ascii=False), "drop_step": "source"})
        else:
            kept.append(row)
    return kept, pl.DataFrame(rejected)


_scan_once = json.JSONDecoder().scan_once  # json.loads' scanner: (value, end) of the JSON value at an index


def _read_json_rows(path: Path, fmt: str, raw: bytes | None = None) -> list[tuple[int, dict]]:
    raw = path.read_bytes() if raw is None else raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise FactoryError(f"{path}:{line}: byte {err.start} is not valid UTF-8; re-encode the file as UTF-8 "
                           "(e.g. iconv -f latin1 -t utf-8)") from None
    if fmt == "json" or (path.suffix == ".json" and text.lstrip().startswith("[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise FactoryError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise FactoryError(f"{path}: expected a JSON list of objects; use one object per line (.jsonl)")
        return [(i + 1, row) for i, row in enumerate(data)]
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        # json.loads(line), without its per-call checks where the line is one JSON value between
        # JSON whitespace; any other line goes through json.loads, for its error.
        value = line.strip(" \t\n\r")
        try:
            row, end = _scan_once(value, 0)
            if end != len(value):
                raise ValueError
        except (StopIteration, ValueError, RecursionError):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise FactoryError(f"{path}:{number}: not valid JSON ({err.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise FactoryError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def _read_hf(path: Path, split: str) -> pl.DataFrame:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise FactoryError(f"{path}: no split '{split}' (splits: {', '.join(ds)}); set source.split")
        ds = ds[split]
    return pl.from_arrow(ds.flatten_indices().data.table)


def _peek_columns(path: Path, fmt: str, split: str) -> list[str]:
    if fmt == "parquet":
        files = _files(path, "*.parquet")
        return list(pl.read_parquet_schema(files[0])) if files else []
    if fmt == "csv":
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
        return pl.read_csv(path, separator=sep, n_rows=1).columns
    if fmt == "hf":
        return _read_hf(path, split).columns
    if fmt == "documents":
        return list(DOCUMENT_COLUMNS)
    columns: dict[str, None] = {}
    for f in _files(path, "*.jsonl"):
        with open(f, "rb") as fh:
            for number, line in enumerate(fh):
                if number >= 1000:
                    break
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    columns.update(dict.fromkeys(row))
        if fmt == "json" and not columns:
            for _, row in _read_json_rows(f, "json")[:1000]:
                columns.update(dict.fromkeys(row))
    return list(columns)
