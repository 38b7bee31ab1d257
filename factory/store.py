"""Immutable, versioned datasets: ``OUT/<name>/v<N>/``.

A version is written whole into a hidden temporary folder beside its siblings and then
renamed into place, so no reader ever sees half of one. N is the next free number; when
two runs race for the same N, the rename of the second fails (the folder exists and is
not empty) and it takes N+1.

Layout of a version::

    v3/
      data/train-00000-of-00001.parquet   the rows (load_dataset("parquet", ...) reads them)
      rejected/rejected-00000-of-00001.parquet   dropped rows with drop_step and drop_reason
      manifest.json                       recipe, hash, parent, models, counts, timings, code version
      README.md                           dataset card with YAML metadata
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import shutil
import subprocess
import uuid
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from . import __version__
from .errors import format_path
from .quality import quality_card_lines

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dataset-factory/1"
_VERSION_DIR = re.compile(r"^v(\d+)$")


def versions(dataset_dir: Path) -> list[int]:
    """Version numbers present under ``OUT/<name>``, ascending."""
    if not dataset_dir.is_dir():
        return []
    found = []
    for child in dataset_dir.iterdir():
        m = _VERSION_DIR.match(child.name)
        if m and child.is_dir():
            found.append(int(m.group(1)))
    return sorted(found)


def latest_version(dataset_dir: Path) -> Path | None:
    found = versions(dataset_dir)
    return dataset_dir / f"v{found[-1]}" if found else None


# A reader that wants a few rows (a page in `factory view`) decompresses the whole row group that
# holds them: 10,000 rows cost ~20 ms where a 100,000-row group (polars' default here) cost ~220 ms,
# for about 3 % more bytes on disk.
ROW_GROUP_ROWS = 10_000


def write_shards(frame: pl.DataFrame, folder: Path, prefix: str, shard_rows: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    count = max(1, -(-frame.height // shard_rows))
    names = []
    for i in range(count):
        name = f"{prefix}-{i:05d}-of-{count:05d}.parquet"
        frame.slice(i * shard_rows, shard_rows).write_parquet(folder / name, row_group_size=ROW_GROUP_ROWS)
        names.append(f"{folder.name}/{name}")
    return names


def code_version() -> dict:
    """The factory's version and git commit, and the versions of the libraries that matter."""
    info = {"factory": __version__, "python": platform.python_version()}
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            info["git_commit"] = commit.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {**info, **_library_versions()}


@functools.lru_cache(maxsize=1)
def _library_versions() -> dict:
    """The installed versions of the libraries that matter (read once: the ones a process has
    imported do not change under it)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "datasets", "polars", "peft"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def write_version(out_root: str | Path, name: str, table: pl.DataFrame, rejected: pl.DataFrame, manifest: dict,
                  *, shard_rows: int = 100_000, card=None) -> Path:
    """Writes a new version of dataset ``name`` atomically and returns its folder.

    Args:
        manifest: everything but the version number, path, files and timestamps, which
            are filled in here.
        card: ``card(manifest, table) -> str``, the README.md text (default: :func:`dataset_card`).
    """
    dataset_dir = Path(out_root) / name
    dataset_dir.mkdir(parents=True, exist_ok=True)
    tmp = dataset_dir / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        files = {"data": write_shards(table, tmp / "data", "train", shard_rows),
                 "rejected": write_shards(rejected, tmp / "rejected", "rejected", shard_rows)}
        number = (versions(dataset_dir) or [0])[-1] + 1
        while True:
            target = dataset_dir / f"v{number}"
            full = {"format": MANIFEST_FORMAT, "name": name, "version": number, "path": str(target),
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    **manifest, "rows": table.height, "rejected_rows": rejected.height,
                    "columns": {c: str(t) for c, t in table.schema.items()}, "files": files,
                    "code_version": code_version()}
            (tmp / MANIFEST).write_text(json.dumps(full, indent=2, ensure_ascii=False, default=str) + "\n",
                                        encoding="utf-8")
            (tmp / "README.md").write_text((card or dataset_card)(full, table), encoding="utf-8")
            if not target.exists():
                try:
                    os.rename(tmp, target)
                    return target
                except OSError:
                    pass  # another run took this number between our check and our rename
            number = max(number + 1, (versions(dataset_dir) or [0])[-1] + 1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def step_label(step: dict) -> str:
    """The label of a manifest's step entry (``steps[1].solve``): its ``label``, or, in a manifest
    written before steps carried one, the same key path made from its index and name."""
    return step.get("label") or format_path(("steps", step["index"], step["name"]))


def read_manifest(version_dir: str | Path) -> dict:
    from .errors import FactoryError

    path = Path(version_dir) / MANIFEST
    if not path.is_file():
        raise FactoryError(f"{version_dir}: not a dataset version (no {MANIFEST}); give a folder such as "
                           "out/<name>/v1")
    return json.loads(path.read_text(encoding="utf-8"))


def read_version(version_dir: str | Path, part: str = "data") -> pl.DataFrame:
    """The rows (``part="data"``) or dropped rows (``part="rejected"``) of a version."""
    files = sorted((Path(version_dir) / part).glob("*.parquet"))
    if not files:
        return pl.DataFrame()
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")


def size_category(rows: int) -> str:
    for limit, label in [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")]:
        if rows < limit:
            return label
    return "10M<n<100M"


def dataset_card(manifest: dict, table: pl.DataFrame, configs: list[dict] | None = None,
                 load_code: str | None = None) -> str:
    """A Hugging Face dataset card: YAML metadata, how the data was made, how to load it.

    Args:
        configs: the card's ``configs`` (default: one config reading data/train-*).
        load_code: the ``load_dataset(...)`` call to show (default: the local parquet files).
    """
    import yaml
    from huggingface_hub import DatasetCardData

    recipe = manifest.get("recipe", {})
    output = recipe.get("output", {})
    source = manifest.get("source") or {}
    hub_source = source.get("hub") if not source.get("local") else None
    data = DatasetCardData(
        license=output.get("license", "other"), language=["en"], task_categories=["text-generation"],
        size_categories=[size_category(manifest["rows"])], pretty_name=manifest["name"],
        **({"source_datasets": [hub_source]} if hub_source else {}),
        tags=["synthetic", "dataset-factory", *output.get("tags", [])],
        configs=configs or [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
    )
    name, version = manifest["name"], manifest["version"]
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {name} (v{version})", "",
        recipe.get("description") or "A synthetic dataset made with the factory.", "",
        "## How it was made", "",
        f"- Recipe: `{manifest.get('recipe_file', '')}` (hash `{manifest.get('recipe_hash', '')[:12]}`)",
        f"- Parent: {manifest.get('parent') or 'none'}",
        f"- Source: {source_line(source) if source.get('hub') else json.dumps(manifest.get('source'))}",
        f"- Models: {', '.join(sorted({m['model_id'] for m in manifest.get('models', [])})) or 'none'}",
        f"- Rows: {manifest['rows']} kept, {manifest['rejected_rows']} dropped (in `rejected/`)",
        *([f"- {target_line(manifest['target_rows'], manifest['rows'])}"] if manifest.get("target_rows") else []),
        *usage_card_lines(manifest.get("usage")),
        f"- Created: {manifest['created_at']} with dataset-factory {manifest['code_version'].get('factory')}",
        "", "| step | rows in | rows out | dropped | seconds |", "|---|---|---|---|---|",
    ]
    for s in manifest.get("steps", []):
        dropped = ", ".join(f"{k}: {v}" for k, v in s["dropped"].items()) or "-"
        lines.append(f"| {s['index']}. {s['name']} | {s.get('rows_in', '-')} | {s.get('rows_out', '-')} | {dropped} | "
                     f"{s.get('seconds', '-')} |")
    cut = truncation_lines(manifest.get("steps", []))
    if cut:
        lines += ["", "Replies cut at the token limit (`max_tokens`):", ""] + [f"- {line[len('cut: '):]}"
                                                                                for line in cut]
    went_on = after_answer_lines(manifest.get("steps", []))
    if went_on:
        lines += ["", "Replies that went on after their final answer:", ""] + \
            [f"- {line[len('after answer: '):]}" for line in went_on]
    lines += ["", *quality_card_lines(manifest.get("quality")), "## Columns", ""]
    lines += [f"- `{c}`: {t}" for c, t in manifest["columns"].items()]
    lines += ["", "## Load it", "", "```python", "from datasets import load_dataset", "",
              "ds = " + (load_code or f'load_dataset("parquet", data_files="{manifest.get("path") or "."}/data/*.parquet", '
                         'split="train")'),
              "```", "", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def source_line(source: dict) -> str:
    """A Hub source in a card: the dataset (linked at the commit read), config, split, revision."""
    repo, sha = source["hub"], source.get("sha")
    if source.get("local"):
        name = f"`{source['local']}` (a local copy of a dataset repository{f', commit `{sha}`' if sha else ''})"
    else:
        name = f"[{repo}](https://huggingface.co/datasets/{repo}" + (f"/tree/{sha}" if sha else "") + ")"
    parts = [name, f"config `{source.get('config')}`", f"split `{source.get('split')}`"]
    if not source.get("local"):
        parts.append(f"revision `{source.get('revision') or 'main'}`" + (f" (commit `{sha}`)" if sha else ""))
    if source.get("columns"):
        parts.append("columns " + ", ".join(f"`{c}`" for c in source["columns"]))
    if "rows_read" in source:
        parts.append(f"{source['rows_read']} rows read" + (" (streamed)" if source.get("streaming") else ""))
    return ", ".join(parts)


STOPPED = {"max_candidates": "max_candidates reached", "source_exhausted": "the source ran out"}


def target_line(target: dict, rows: int) -> str:
    """One line on a run to ``output.rows``: reached or not, in how many passes over how many candidates."""
    passes = f"{target['passes']} pass{'es' if target['passes'] != 1 else ''}"
    if target["reached"]:
        surplus = f"; {target['surplus']} surplus rows cut" if target["surplus"] else ""
        return f"output.rows: {rows} of {target['rows']} rows from {target['candidates']} candidates in {passes}" \
               f"{surplus}"
    return (f"output.rows: only {rows} of {target['rows']} rows from {target['candidates']} candidates in {passes} "
            f"({STOPPED.get(target['stopped'], target['stopped'])})")


def usage_text(key: str, usage: dict) -> str:
    """One model's LLM usage (manifest ``usage``): tokens sent to the backend, requests, the cost when priced."""
    cost = f", ${usage['cost_usd']:.4f}" if "cost_usd" in usage else ""
    return (f"{key}: {usage['prompt_tokens']} tokens in, {usage['completion_tokens']} out, {usage['conversations']} "
            f"requests ({usage['cached_conversations']} from the cache){cost}")


def usage_card_lines(usage: dict | None) -> list[str]:
    """The card's line on LLM usage, per model."""
    return [f"- LLM usage: {'; '.join(usage_text(key, u) for key, u in usage.items())}"] if usage else []


def after_answer_lines(steps: list[dict]) -> list[str]:
    """One line per step some of whose replies went on after their final answer (``solve``'s
    ``after_answer``): how many, and what became of them."""
    lines = []
    for s in steps:
        a = (s.get("report") or {}).get("after_answer")
        if not a or not a.get("went_on"):
            continue
        done = {"cut": f"cut there (the text cut is in column `{a.get('column', 'after_answer')}`)",
                "drop": "dropped as text_after_answer",
                "keep": f"kept whole; after_answer: cut on {step_label(s)} ends them at their answer, "
                        "drop drops them"}[a.get("action", "keep")]
        lines.append(f"after answer: {step_label(s)}: {a['went_on']} of {a['answered']} replies with an answer "
                     f"went on after it: {done}")
    return lines


def truncation_lines(steps: list[dict]) -> list[str]:
    """One line per step some of whose replies were cut at the token limit: how many, what
    became of them, and the hint."""
    lines = []
    for s in steps:
        t = s.get("truncation")
        if not t:
            continue
        parts = [f"{t['dropped']} dropped as truncated"] if t["dropped"] else []
        if t["kept"]:
            parts.append(f"{t['kept']} kept" + (" (column `truncated`)" if t["on_truncation"] == "keep"
                                                else " (read before the cut)"))
        if other := t["cut"] - t["dropped"] - t["kept"]:
            parts.append(f"{other} dropped for another reason")
        if t.get("continued"):
            parts.append(f"{t['continued']} continuations asked")
        limits = ", ".join(f"{count} at {option}" for option, count in t["limits"].items())
        line = f"cut: {step_label(s)}: {t['cut']} of {t['replies']} replies hit the token limit" + \
            (f" ({limits})" if limits else "") + (f": {', '.join(parts)}" if parts else "")
        lines.append(line + (f"; {t['hint']}" if t.get("hint") else ""))
    return lines
