"""Datasets on the Hugging Face Hub (or a local copy of a dataset repository) as rows.

A recipe names one as ``{hub: ORG/NAME, config, split, revision, columns, streaming}``, as its
``source:`` or as an eval set. It is read through ``datasets``' own loading path
(``load_dataset_builder``, then ``download_and_prepare`` + ``as_dataset``, or
``as_streaming_dataset`` with ``streaming``), which is what ``load_dataset`` does; so the
card's ``configs:``, parquet exports, the local cache and ``HF_HUB_OFFLINE`` all behave as a
user of ``datasets`` expects.

What a run was built from is recorded exactly: the resolved revision is the Hub commit sha
(``datasets`` names its cache folders after it, so it is known offline too). Offline, a
``revision`` is mapped to its sha through the ``huggingface_hub`` cache's ``refs/`` and that
sha's prepared copy is read, never silently another one.

Every failure is one line naming the dataset and the fix (:class:`HubError`), raised while the
recipe is validated, before any model loads.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from .errors import FactoryError

REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
SHA = re.compile(r"[0-9a-f]{40}")


class HubError(FactoryError):
    """A Hub dataset that cannot be read: missing, not cached offline, no such config or split."""


@dataclass(frozen=True)
class HubRef:
    """Which dataset: ``repo`` is ORG/NAME on the Hub, or ``local`` a folder holding a copy."""

    repo: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    columns: tuple[str, ...] | None = None
    streaming: bool = False
    local: Path | None = None

    @property
    def location(self) -> str:
        return str(self.local) if self.local else self.repo

    def fetch_command(self) -> str:
        """The command that puts this dataset in the local cache."""
        parts = ["factory", "fetch", self.repo]
        if self.config:
            parts += ["--config", self.config]
        if self.revision:
            parts += ["--revision", self.revision]
        return " ".join(shlex.quote(p) for p in parts)


def hub_offline() -> bool:
    import datasets.config
    import huggingface_hub.constants

    return bool(datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.HF_HUB_OFFLINE)


class HubDataset:
    """One dataset, split and revision: resolved once (the builder), then read."""

    def __init__(self, ref: HubRef):
        self.ref = ref
        self._builder = None
        self._features: list[str] | None = None

    # -- resolution --------------------------------------------------------------------

    def builder(self):
        """The ``datasets`` builder of the dataset at its revision (network: its card and file list).

        Raises:
            HubError: the dataset, config or revision does not exist or cannot be reached.
        """
        if self._builder is None:
            self._builder = self._resolve()
            self._check_split()
        return self._builder

    def _resolve(self):
        import datasets

        _quiet_datasets()
        ref = self.ref
        if ref.local is None and ref.revision and hub_offline():
            return self._offline_builder()
        try:
            builder = datasets.load_dataset_builder(ref.location, ref.config, revision=ref.revision)
        except Exception as err:  # datasets raises ConnectionError, FileNotFoundError, ValueError...
            raise self._explain(err) from None
        if ref.local is None and ref.revision and type(builder).__name__ == "Cache":
            # The Hub could not be reached and datasets fell back on its newest cached copy,
            # whatever its revision: read the copy of the revision asked, or stop.
            return self._offline_builder()
        return builder

    def _offline_builder(self):
        """Offline with a revision: the prepared copy of exactly that revision's commit."""
        from datasets.packaged_modules.cache.cache import Cache

        ref = self.ref
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hub cannot be reached"
        sha = ref.revision if SHA.fullmatch(ref.revision) else _cached_ref(ref.repo, ref.revision)
        if sha is None:
            raise HubError(f"hub dataset '{ref.repo}': revision '{ref.revision}' is not in the local cache and "
                           f"{why}; fetch it once with network access: {ref.fetch_command()}")
        found = _prepared_copies(ref.repo, sha)
        if ref.config:
            found = [p for p in found if p.parts[-3] == ref.config]
        if not found:
            raise HubError(f"hub dataset '{ref.repo}'" + (f" (config '{ref.config}')" if ref.config else "") +
                           f" at revision '{ref.revision}' ({sha[:12]}) is not in the local cache and "
                           f"{why}; fetch it once with network access: {ref.fetch_command()}")
        configs = sorted({p.parts[-3] for p in found})
        if len(configs) > 1:
            raise HubError(f"hub dataset '{ref.repo}' has several configs cached ({', '.join(configs)}); "
                           "set `config:` to one of them")
        path = found[0]
        return Cache(repo_id=ref.repo, dataset_name=ref.repo.split("/")[-1], config_name=path.parts[-3],
                     version=path.parts[-2], hash=path.parts[-1])

    def _explain(self, err: Exception) -> HubError:
        if isinstance(err, HubError):
            return err
        ref = self.ref
        text = " ".join(str(err).split())
        name = f"hub dataset '{ref.location}'"
        if ref.local is None and hub_offline():
            cached = re.search(r"Available configs in the cache: (\[.*?\])", text)
            what = f"{name}" + (f" (config '{ref.config}')" if ref.config else "")
            more = f" (cached configs: {cached.group(1)})" if cached else ""
            return HubError(f"{what} is not in the local cache and HF_HUB_OFFLINE is set{more}; fetch it once with "
                            f"network access: {ref.fetch_command()}")
        if "BuilderConfig" in text and "not found" in text:
            available = re.search(r"Available: (\[.*?\])", text)
            return HubError(f"{name} has no config '{ref.config}'" +
                            (f"; its configs: {available.group(1)}" if available else "") + "; fix `config:`")
        if "Config name is missing" in text:
            available = re.search(r"(\[.*?\])", text)
            return HubError(f"{name} has several configs and none is the default; set `config:`" +
                            (f" to one of {available.group(1)}" if available else ""))
        if "Revision" in text and "doesn't exist" in text:
            return HubError(f"{name} has no revision '{ref.revision}'{_tags_hint(ref.repo)}; fix `revision:` "
                            "(a tag such as v3, a branch, or a commit sha)")
        if isinstance(err, ConnectionError):
            return HubError(f"{name}: cannot reach the Hub ({text}) and it is not in the local cache; check the "
                            "network (a proxy: HTTPS_PROXY; a mirror: HF_ENDPOINT)")
        if "gated" in text or "doesn't exist on the Hub" in text or "cannot be accessed" in text:
            return HubError(f"{name}: {text.rstrip('.')}; check the name, or log in (`hf auth login`, or set "
                            "HF_TOKEN) for a private or gated dataset")
        cause = err.__cause__ or err.__context__  # DatasetGenerationError wraps the file's own error
        why = f"; {type(cause).__name__}: {' '.join(str(cause).split())[:300]}" if cause else ""
        return HubError(f"{name}: cannot load it ({type(err).__name__}: {text}{why})")

    def splits(self) -> list[str] | None:
        builder = self._builder
        if builder.info.splits:
            return list(builder.info.splits)
        data_files = getattr(builder.config, "data_files", None)
        return list(data_files) if data_files else None

    def _check_split(self) -> None:
        splits = self.splits()
        if splits is not None and self.ref.split not in splits:
            raise HubError(f"hub dataset '{self.ref.location}' has no split '{self.ref.split}' "
                           f"(splits: {', '.join(splits)}); fix `split:`")

    # -- what a run records ------------------------------------------------------------

    def sha(self) -> str | None:
        """The commit the rows come from: the Hub commit, or a local git checkout's HEAD."""
        if self.ref.local is not None:
            return _git_head(self.ref.local)
        value = getattr(self.builder(), "hash", None)
        return value if isinstance(value, str) and SHA.fullmatch(value) else None

    def describe(self) -> dict:
        ref = self.ref
        builder = self.builder()
        return {"hub": ref.repo, "config": builder.config.name, "split": ref.split, "revision": ref.revision,
                "sha": self.sha(), **({"local": str(ref.local)} if ref.local else {}),
                **({"columns": list(ref.columns)} if ref.columns else {}), "streaming": ref.streaming}

    # -- reading -----------------------------------------------------------------------

    def columns(self) -> list[str]:
        """Column names: from the dataset's features, or its first row (streamed) when none are declared."""
        if self._features is None:
            builder = self.builder()
            features = builder.info.features
            if features is None:
                if self.ref.streaming:
                    first = self._stream().take(1)
                    features = first.features or {name: None for row in first for name in row}
                else:
                    self._prepare()
                    features = builder.info.features
            names = list(features or [])
            missing = [c for c in self.ref.columns or [] if c not in names]
            if missing:
                raise HubError(f"hub dataset '{self.ref.location}' has no column {', '.join(map(repr, missing))} "
                               f"(it has {', '.join(names)}); fix `columns:`")
            self._features = list(self.ref.columns) if self.ref.columns is not None else names
        return list(self._features)

    def read(self, limit: int | None = None, progress: bool = False) -> pl.DataFrame:
        """The split's rows (the first ``limit``; with ``streaming`` only those are downloaded)."""
        self.columns()  # checks the requested columns exist
        if self.ref.streaming:
            return self._read_stream(limit, progress)
        self._prepare()
        builder = self.builder()
        try:
            ds = builder.as_dataset(split=self.ref.split)
        except Exception as err:
            raise self._explain(err) from None
        if self.ref.columns:
            ds = ds.select_columns(list(self.ref.columns))
        if limit is not None and limit < len(ds):
            ds = ds.select(range(limit))
        return pl.from_arrow(ds.flatten_indices().data.table)

    def _prepare(self) -> None:
        builder = self.builder()
        try:
            builder.download_and_prepare()
        except Exception as err:
            raise self._explain(err) from None

    def _stream(self):
        builder = self.builder()
        try:
            ds = builder.as_streaming_dataset(split=self.ref.split)
        except Exception as err:
            raise self._explain(err) from None
        return ds.select_columns(list(self.ref.columns)) if self.ref.columns else ds

    def _read_stream(self, limit: int | None, progress: bool) -> pl.DataFrame:
        import pyarrow as pa
        from tqdm.auto import tqdm

        ds = self._stream()
        if limit is not None:
            ds = ds.take(limit)
        tables = []
        with tqdm(total=limit, unit="rows", desc=f"streaming {self.ref.repo}", disable=not progress,
                  leave=False) as bar:
            try:
                for batch in ds.with_format("arrow").iter(batch_size=1000):
                    tables.append(batch)
                    bar.update(batch.num_rows)
            except Exception as err:
                raise self._explain(err) from None
        if not tables:
            return pl.DataFrame()
        return pl.from_arrow(pa.concat_tables(tables, promote_options="default"))


_OPENED: dict[HubRef, HubDataset] = {}


def open_hub(ref: HubRef) -> HubDataset:
    """The dataset of ``ref``, resolved once per process (a recipe validated, then run)."""
    if ref not in _OPENED:
        _OPENED[ref] = HubDataset(ref)
    return _OPENED[ref]


def fetch_target(target: str, config: str | None = None, revision: str | None = None) -> list[str]:
    """``factory fetch``: prepares a dataset id, or every ``hub:`` a recipe names, in the local
    cache; one line per dataset (what was fetched, at which commit, with its splits' sizes).

    Raises:
        FactoryError: offline, an unreadable recipe, or a dataset that cannot be fetched.
    """
    if hub_offline():
        raise FactoryError("factory fetch downloads, and HF_HUB_OFFLINE is set: run it with HF_HUB_OFFLINE=0")
    path = Path(target)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        refs = recipe_hub_refs(path)
        if not refs:
            raise FactoryError(f"{target}: the recipe names no Hub dataset (`hub:`), so there is nothing to fetch")
    elif REPO_ID.fullmatch(target):
        refs = [HubRef(target, config, revision=revision)]
    else:
        raise FactoryError(f"'{target}' is neither a recipe file nor a Hub dataset id; write ORG/NAME or a .yaml path")
    lines = []
    for ref in refs:
        dataset = HubDataset(ref)
        dataset._prepare()
        builder = dataset.builder()
        sizes = ", ".join(f"{name} {split.num_examples:,}" for name, split in (builder.info.splits or {}).items())
        lines.append(f"{ref.repo} (config {builder.config.name}) at {dataset.sha() or ref.revision or 'main'}: "
                     f"{sizes or 'prepared'} -> {builder.cache_dir}")
    return lines


def recipe_hub_refs(path: Path) -> list[HubRef]:
    """Every ``{hub: ...}`` mapping in a recipe's YAML (its source and eval sets), read without
    validating it (validation would need them already)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise FactoryError(f"{path}: cannot read the recipe ({' '.join(str(err).split())})") from None
    found: list[HubRef] = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("hub"), str) and REPO_ID.fullmatch(node["hub"]):
                ref = HubRef(node["hub"], node.get("config"), revision=node.get("revision"))
                if ref not in found:
                    found.append(ref)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(data)
    return found


def _quiet_datasets() -> None:
    """``datasets`` warns on every offline read ("Using the latest cached version"); what it read
    is in the manifest instead."""
    import datasets

    datasets.logging.set_verbosity_error()


def _cached_ref(repo: str, revision: str) -> str | None:
    """The commit sha the ``huggingface_hub`` cache holds for ``revision`` (a tag or branch)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    refs = Path(HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}" / "refs" / revision
    if refs.is_file():
        sha = refs.read_text(encoding="utf-8").strip()
        return sha if SHA.fullmatch(sha) else None
    return None


def _prepared_copies(repo: str, sha: str) -> list[Path]:
    """The ``datasets`` cache folders (``org___name/<config>/<version>/<sha>``) prepared from ``sha``."""
    import datasets.config
    from datasets.naming import camelcase_to_snakecase

    parts = repo.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = Path(datasets.config.HF_DATASETS_CACHE).expanduser() / "___".join(parts)
    return sorted(p for p in root.glob(f"*/*/{sha}") if (p / "dataset_info.json").is_file())


def _tags_hint(repo: str) -> str:
    """`` (tags: v1, v2)`` from the Hub, or nothing when it cannot be asked."""
    try:
        from huggingface_hub import HfApi

        tags = sorted(t.name for t in HfApi().list_repo_refs(repo, repo_type="dataset").tags)
    except Exception:  # only a hint: the error it decorates is the message
        return ""
    return f" (its tags: {', '.join(tags)})" if tags else " (it has no tags)"


def _git_head(folder: Path) -> str | None:
    """The commit a local clone of a dataset repository is at, if it is one."""
    if not (folder / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    sha = done.stdout.strip()
    return sha if done.returncode == 0 and SHA.fullmatch(sha) else None
