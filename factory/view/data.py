"""What ``factory view`` reads: the output folder's datasets, versions and evolve runs.

Rows are never loaded whole: a page is a lazy polars scan over the version's parquet shards,
sliced (the reader skips the row groups before the page) or filtered then sliced, so a page of
a million-row version costs about as much as a page of a small one. A version never changes,
so what is worth keeping about it (schema, counts, facets) is kept per folder for the server's life.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from pathlib import Path

import polars as pl

from ..annotations import (PARTS, agreement, annotations_path, part_files, read_verdicts, row_hash, rows_at,
                           step_order, verdict_counts)
from ..errors import FactoryError
from ..store import MANIFEST, read_manifest, step_label

VERSION_DIR = re.compile(r"^v(\d+)$")
SKIP_DIRS = {"data", "rejected", "adapters", "annotations", "__pycache__", "node_modules"}
MAX_DEPTH = 5
FACET_VALUES = 30  # a column with more distinct values than this is searched, not faceted
FACET_TEXT = 80    # nor is a text column whose values run longer than this


class ViewError(FactoryError):
    """A page cannot be shown: the one line that says why, and the HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def clean(value):
    """A value JSON can carry: NaN and infinities become None, bytes a placeholder."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    return value


class Folder:
    """The output folder being viewed: finds datasets and evolve runs under it, resolves ids
    (paths relative to it) and refuses any that lead outside."""

    def __init__(self, root: str | Path, sample: int = 20):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FactoryError(f"{root}: no such folder; give the --out folder of a run (default: out)")
        self.sample = sample
        self._versions: dict[Path, Version] = {}
        self._lock = threading.Lock()

    def resolve(self, rel: str, what: str = "folder") -> Path:
        """``root/rel``, refused when it is absolute, leaves the root (``..``, a link) or is missing."""
        if rel is None or rel == "":
            raise ViewError(f"no {what} given")
        if os.path.isabs(rel) or "\\" in rel or "\x00" in rel:
            raise ViewError(f"{what} {rel!r}: give a path relative to the viewed folder", 403)
        path = (self.root / rel).resolve()
        if path != self.root and self.root not in path.parents:
            raise ViewError(f"{what} {rel!r} is outside the viewed folder", 403)
        if not path.is_dir():
            raise ViewError(f"{what} {rel!r}: no such folder under {self.root}", 404)
        return path

    def rel(self, path: Path) -> str:
        rel = path.resolve().relative_to(self.root).as_posix()
        return rel or "."

    def version(self, ds: str, v) -> "Version":
        try:
            number = int(v)
        except (TypeError, ValueError):
            raise ViewError(f"version {v!r}: expected a number such as 3") from None
        folder = self.resolve(ds, "dataset") / f"v{number}"
        if not folder.is_dir():
            raise ViewError(f"{ds} has no version v{number}", 404)
        with self._lock:
            found = self._versions.get(folder)
            if found is None:
                found = self._versions[folder] = Version(folder, ds)
        return found

    # -- discovery ---------------------------------------------------------------------------
    def walk(self) -> tuple[list[Path], list[Path]]:
        """Dataset folders (holding v<N> folders) and evolve runs (holding evolve.json) under the root."""
        datasets, runs = [], []
        for here, dirs, files in os.walk(self.root):
            path = Path(here)
            depth = len(path.relative_to(self.root).parts)
            if "evolve.json" in files:
                runs.append(path)
            if any(VERSION_DIR.match(d) for d in dirs):
                datasets.append(path)
            dirs[:] = sorted(d for d in dirs if depth < MAX_DEPTH and not d.startswith(".") and d not in SKIP_DIRS
                             and not VERSION_DIR.match(d))
        return datasets, runs

    def index(self) -> dict:
        datasets, runs = self.walk()
        out = {"root": str(self.root), "datasets": [], "evolve_runs": [], "agreement": [], "problems": []}
        for folder in datasets:
            ds = self.rel(folder)
            numbers = sorted(int(m.group(1)) for d in folder.iterdir() if (m := VERSION_DIR.match(d.name)))
            entry = {"id": ds, "name": folder.name, "versions": [], "error": None}
            for n in numbers:
                entry["versions"].append(self._version_line(folder / f"v{n}", ds, out))
            if not any(v["error"] is None for v in entry["versions"]):
                entry["error"] = f"{ds}: none of its version folders holds a {MANIFEST}"
            out["datasets"].append(entry)
        for folder in runs:
            out["evolve_runs"].append(evolve_line(folder, self.rel(folder)))
        if not datasets and not runs:
            out["problems"].append(f"{self.root} holds no dataset versions (OUT/<name>/v<N>) and no evolve runs; "
                                   "run `factory run RECIPE --out THIS_FOLDER` first, or view another folder")
        return out

    def _version_line(self, folder: Path, ds: str, out: dict) -> dict:
        try:
            manifest = read_manifest(folder)
        except (FactoryError, OSError, ValueError) as e:
            return {"version": int(folder.name[1:]), "error": _one_line(e)}
        usage = manifest.get("usage") or {}
        verdicts = read_verdicts(folder)
        # the folder's number addresses the version (a copied folder keeps its manifest's old number)
        line = {"version": int(folder.name[1:]), "created_at": manifest.get("created_at"),
                "rows": manifest.get("rows"), "rejected_rows": manifest.get("rejected_rows"),
                "parent": manifest.get("parent"),
                "models": sorted({m.get("model_id", "?") for m in manifest.get("models", [])}),
                "drops": {step_label(s): s.get("dropped", {}) for s in manifest.get("steps", []) if s.get("dropped")},
                "tokens": {"prompt": sum(u.get("prompt_tokens", 0) for u in usage.values()),
                           "completion": sum(u.get("completion_tokens", 0) for u in usage.values())},
                "cost_usd": manifest.get("cost_usd"), "verdicts": len(verdicts), "error": None}
        if verdicts:
            try:
                out["agreement"].append({"ds": ds, "version": line["version"],
                                         "agreement": agreement(folder, manifest, verdicts)})
            except Exception as e:  # a broken shard must not hide the other versions
                line["error"] = _one_line(e)
        return line


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class Version:
    """One version folder, read lazily."""

    def __init__(self, folder: Path, ds: str):
        self.folder = folder
        self.ds = ds
        try:
            self.manifest = read_manifest(folder)
        except ValueError as e:
            raise ViewError(f"{ds}/v{folder.name[1:]}: {MANIFEST} is not valid JSON ({e})", 500) from None
        except FactoryError as e:
            raise ViewError(str(e), 404) from None
        self._schemas: dict[str, dict] = {}
        self._facets: dict[str, dict] = {}
        self._lock = threading.Lock()

    # -- the parts -----------------------------------------------------------------------------
    def scan(self, part: str) -> pl.LazyFrame | None:
        if part not in PARTS:
            raise ViewError(f"part {part!r}: expected data or rejected")
        files = part_files(self.folder, part)
        listed = [f for f in (self.manifest.get("files") or {}).get(part, [])]
        missing = [name for name in listed if not (self.folder / name).is_file()]
        if missing:
            raise ViewError(f"{self.ds}/{self.folder.name}: {len(missing)} of the {len(listed)} {part} shards the "
                            f"manifest lists are missing ({missing[0]}); the version is damaged: re-run its recipe",
                            500)
        return pl.scan_parquet(files) if files else None

    def schema(self, part: str) -> dict:
        with self._lock:
            if part not in self._schemas:
                scan = self.scan(part)
                if scan is None:
                    self._schemas[part] = {"rows": 0, "columns": {}}
                else:
                    try:
                        columns = {c: str(t) for c, t in scan.collect_schema().items()}
                        rows = scan.select(pl.len()).collect().item()
                    except Exception as e:
                        raise ViewError(f"{self.ds}/{self.folder.name}/{part}: cannot read its parquet shards "
                                        f"({_one_line(e)}); the version is damaged: re-run its recipe", 500) from None
                    self._schemas[part] = {"rows": rows, "columns": columns}
            return self._schemas[part]

    def facets(self, part: str) -> dict:
        """Columns with few distinct values (at most FACET_VALUES, short texts): value -> rows."""
        with self._lock:
            if part in self._facets:
                return self._facets[part]
        schema = self.schema(part)
        found = {}
        scan = self.scan(part)
        if scan is not None and schema["rows"]:
            head = scan.head(2000).collect()
            candidates = []
            for column, dtype in head.schema.items():
                if column in ("raw_reply", "drop_detail") or not (dtype == pl.String or dtype == pl.Boolean
                                                                   or dtype.is_numeric()):
                    continue
                values = head[column]
                distinct = values.n_unique()
                if distinct > FACET_VALUES or (dtype != pl.Boolean and 2 * distinct > head.height):
                    continue  # nearly one value per row: a text to search, not a value to pick
                if dtype == pl.String and (values.drop_nulls().str.len_chars().max() or 0) > FACET_TEXT:
                    continue
                candidates.append(column)
            if candidates:
                counts = pl.collect_all([scan.group_by(c).len().sort("len", descending=True).head(FACET_VALUES + 1)
                                         for c in candidates])
                for column, frame in zip(candidates, counts):
                    if frame.height <= FACET_VALUES:
                        found[column] = [[clean(v), n] for v, n in frame.iter_rows()]
        with self._lock:
            self._facets[part] = found
        return found

    def groups(self) -> list[dict]:
        scan = self.scan("rejected")
        if scan is None or not {"drop_step", "drop_reason"} <= set(self.schema("rejected")["columns"]):
            return []
        frame = scan.group_by("drop_step", "drop_reason").len().collect()
        rows = [{"step": s, "reason": r, "rows": n} for s, r, n in frame.iter_rows()]
        return sorted(rows, key=lambda g: (step_order(g["step"]), -g["rows"], str(g["reason"])))

    # -- rows ----------------------------------------------------------------------------------
    def conditions(self, part: str, q: str | None, filters: list[tuple[str, object]], step: str | None,
                   reason: str | None, within: str | None = None) -> list[pl.Expr]:
        """Polars conditions for a search (``q``, case-insensitive, in every text column and in chat
        messages' content, or only in the column ``within``), column filters and a drop step / reason."""
        columns = self.schema(part)["columns"]
        if within and within not in columns:
            raise ViewError(f"search in {within!r}: the {part} rows have no such column")
        searched = {within: columns[within]} if within else columns
        conds = []
        for column, value in filters:
            if column not in columns:
                raise ViewError(f"filter on {column!r}: the {part} rows have no such column (they have "
                                f"{', '.join(columns)})")
            conds.append(pl.col(column).is_null() if value is None else pl.col(column) == pl.lit(value))
        if step:
            conds.append(pl.col("drop_step") == step if "drop_step" in columns else pl.lit(False))
        if reason:
            conds.append(pl.col("drop_reason") == reason if "drop_reason" in columns else pl.lit(False))
        if q:
            pattern = "(?i)" + re.escape(q)
            texts = [pl.col(c).str.contains(pattern) for c, t in searched.items() if t == "String"]
            texts += [pl.col(c).list.eval(pl.element().struct.field("content").str.contains(pattern)).list.any()
                      for c, t in searched.items() if t.startswith("List(Struct") and "'content'" in t]
            conds.append(pl.any_horizontal(texts).fill_null(False) if texts else pl.lit(False))
        return conds

    def page(self, part: str, offset: int = 0, limit: int = 50, q: str | None = None,
             filters: list | None = None, step: str | None = None, reason: str | None = None,
             within: str | None = None) -> dict:
        started = time.perf_counter()
        offset, limit = max(0, int(offset)), max(1, min(500, int(limit)))
        schema = self.schema(part)
        scan = self.scan(part)
        conds = self.conditions(part, q, filters or [], step, reason, within)
        if scan is None:
            found = []
        elif q:
            # a search decodes the text columns, most of the bytes: one pass, the index taken before
            # the filter so that each row keeps its place in the version
            frame = (scan.with_row_index("_index").filter(pl.all_horizontal(conds))
                     .slice(offset, limit + 1).collect())
            found = frame.to_dicts()
        elif conds:
            # First the positions of the matching rows, reading only the columns the conditions name,
            # then those rows whole, reading only the row groups that hold them.
            condition = pl.all_horizontal(conds)
            needed = sorted(set(condition.meta.root_names()) & set(schema["columns"]))
            hits = (scan.select(needed).with_row_index("_index").filter(condition).select("_index")
                    .slice(offset, limit + 1).collect()["_index"].to_list())
            rows = rows_at(self.folder, part, hits)
            found = [{"_index": i, **rows[i]} for i in hits]
        else:
            # a slice reads only the row groups under it
            frame = scan.slice(offset, limit + 1).collect()
            found = frame.with_row_index("_index", offset=offset).to_dicts() if frame.height else []
        more = len(found) > limit
        rows = self.rows_out(part, found[:limit])
        return {"rows": rows, "offset": offset, "limit": limit, "more": more,
                "total": None if conds else schema["rows"], "ms": round(1000 * (time.perf_counter() - started), 1)}

    def count(self, part: str, q=None, filters=None, step=None, reason=None, within=None) -> dict:
        started = time.perf_counter()
        scan = self.scan(part)
        conds = self.conditions(part, q, filters or [], step, reason, within)
        total = 0 if scan is None else (scan.filter(pl.all_horizontal(conds)) if conds else scan) \
            .select(pl.len()).collect().item()
        return {"total": total, "ms": round(1000 * (time.perf_counter() - started), 1)}

    def rows_out(self, part: str, rows: list[dict]) -> list[dict]:
        """Rows as the page gets them: index, content hash and standing verdict first."""
        verdicts = read_verdicts(self.folder)
        out = []
        for row in rows:
            index = int(row.pop("_index"))
            verdict = verdicts.get((part, index))
            out.append({"_index": index, "_hash": row_hash(row),
                        "_verdict": {k: verdict[k] for k in ("verdict", "note", "time")} if verdict else None,
                        **clean(row)})
        return out

    def row(self, part: str, index) -> dict:
        try:
            index = int(index)
        except (TypeError, ValueError):
            raise ViewError(f"row {index!r}: expected a row number") from None
        self.scan(part)  # a clear error for missing shards
        found = rows_at(self.folder, part, [index])
        if index not in found:
            raise ViewError(f"{self.ds}/{self.folder.name}: {part} has no row {index} (it has "
                            f"{self.schema(part)['rows']})", 404)
        return self.rows_out(part, [{"_index": index, **found[index]}])[0]

    # -- the version page ----------------------------------------------------------------------
    def summary(self, folder: Folder) -> dict:
        m = self.manifest
        parent = m.get("parent")
        parent_ref = None
        if parent:
            path = Path(parent)
            path = path if path.is_absolute() else Path.cwd() / path
            if path.is_dir() and VERSION_DIR.match(path.name):
                try:
                    parent_ref = {"ds": folder.rel(path.parent), "version": int(path.name[1:])}
                except ValueError:
                    parent_ref = None  # outside the viewed folder: shown as text only
        siblings = sorted(int(mm.group(1)) for d in self.folder.parent.iterdir()
                          if (mm := VERSION_DIR.match(d.name)) and (d / MANIFEST).is_file())
        verdicts = read_verdicts(self.folder)
        return {
            "ds": self.ds, "name": m.get("name"), "version": int(self.folder.name[1:]), "created_at": m.get("created_at"),
            "parent": parent_ref, "parent_text": parent,
            "models": sorted({x.get("model_id", "?") for x in m.get("models", [])}),
            "usage": m.get("usage") or {}, "cost_usd": m.get("cost_usd"), "recipe_file": m.get("recipe_file"),
            "recipe_hash": m.get("recipe_hash"),
            "steps": [{"label": step_label(s), "name": s.get("name"), "rows_in": s.get("rows_in"),
                       "rows_out": s.get("rows_out"), "dropped": s.get("dropped", {}), "seconds": s.get("seconds")}
                      for s in m.get("steps", [])],
            "parts": {p: self.schema(p) for p in PARTS},
            "groups": self.groups(),
            "facets": {p: self.facets(p) for p in PARTS},
            "verdicts": verdict_counts(verdicts),
            "agreement": agreement(self.folder, m, verdicts) if verdicts else None,
            "versions": siblings, "evolve": evolve_of(folder, self.folder), "sample_size": folder.sample,
            "annotations_file": f"{folder.rel(self.folder.parent)}/annotations/{annotations_path(self.folder).name}",
        }


# -- evolve runs ---------------------------------------------------------------------------------

def read_state(run: Path) -> dict:
    try:
        state = json.loads((run / "evolve.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise ViewError(f"{run.name}/evolve.json is not valid JSON ({e}); was the run killed while writing it?",
                        500) from None
    if not isinstance(state, dict) or not isinstance(state.get("rounds"), list):
        raise ViewError(f"{run.name}/evolve.json has no `rounds` list: not an evolve run's state", 500)
    return state


def evolve_line(run: Path, rel: str) -> dict:
    try:
        state = read_state(run)
    except ViewError as e:
        return {"id": rel, "name": run.name, "rounds": 0, "stopped": None, "error": str(e)}
    done = sum(1 for rs in state["rounds"] if rs.get("eval") is not None)
    return {"id": rel, "name": state.get("name") or run.name, "rounds": len(state["rounds"]) - 1,
            "evaluated": done, "stopped": state.get("stopped"), "error": None}


def evolve_of(folder: Folder, version: Path) -> dict | None:
    """The evolve run and round a version belongs to, when it sits in a run's ``datasets/``."""
    run = version.parent.parent.parent
    if version.parent.parent.name != "datasets" or not (run / "evolve.json").is_file():
        return None
    try:
        return {"run": folder.rel(run), "round": int(version.name[1:])}
    except ValueError:
        return None


def round_version(folder: Folder, run: Path, rs: dict) -> dict | None:
    """The round's dataset version as ``{"ds", "version"}``: where the state says, or, for a run
    folder that was moved, the same ``datasets/<name>/v<N>`` inside it."""
    text = rs.get("version")
    if not text:
        return None
    path = Path(text)
    candidates = [path, run / "datasets" / path.parent.name / path.name]
    for candidate in candidates:
        if (candidate / MANIFEST).is_file():
            try:
                return {"ds": folder.rel(candidate.parent), "version": int(candidate.name[1:])}
            except ValueError:
                continue
    return None


def wilson(successes: float, n: int, z: float = 1.96) -> list[float] | None:
    """The Wilson score 95 % interval of a proportion."""
    if not n:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def evolve_page(folder: Folder, run_id: str) -> dict:
    from ..report import rows as report_rows

    run = folder.resolve(run_id, "evolve run")
    if not (run / "evolve.json").is_file():
        raise ViewError(f"{run_id}: no evolve.json (not an evolve run's folder)", 404)
    state = read_state(run)
    versions = [round_version(folder, run, rs) for rs in state["rounds"]]
    # The report's rows, read with each round's version where it is found now (a moved run's too),
    # so that they carry people's verdicts on it.
    found = {**state, "rounds": [{**rs, "version": str(folder.root / v["ds"] / f"v{v['version']}")} if v else rs
                                 for rs, v in zip(state["rounds"], versions)]}
    try:
        table = report_rows(found)
    except (KeyError, TypeError, ValueError) as e:
        raise ViewError(f"{run_id}/evolve.json: a round is incomplete ({_one_line(e)}); the run may have been cut "
                        "short: resume it with the same `factory evolve` command", 500) from None
    verifiers = sorted({name for rs in state["rounds"] for name in ((rs.get("gap") or {}).get("verifiers") or {})})
    rounds = []
    for rs, row, version in zip(state["rounds"], table, versions):
        evaluated = rs.get("eval") or {}
        gap = rs.get("gap") or {}
        items = evaluated.get("items")
        entry = {"round": rs["round"], "accuracy": row.get("accuracy"), "items": items,
                 "accuracy_ci95": wilson(evaluated.get("correct", (row.get("accuracy") or 0) * (items or 0)), items)
                 if items and row.get("accuracy") is not None else None,
                 "gain": row.get("gain"), "win_rate": row.get("win_rate"), "J_f": gap.get("J_f"),
                 "samples": gap.get("samples"), "verifiers": {},
                 "pass_at_k": gap.get("pass_at_k") or {}, "diversity": gap.get("diversity") or {},
                 "seconds": rs.get("seconds") or {}, "train_loss": row.get("train_loss"),
                 "rolled_back": row.get("rolled_back"), "version": version, "agreement": row.get("agreement"),
                 "verifier_agreement": row.get("verifier_agreement")}
        for name, v in (gap.get("verifiers") or {}).items():
            accepted = v.get("accepted") or 0
            entry["verifiers"][name] = {"J_w": v.get("J_f_w"), "accepted": accepted, "gap": v.get("gap"),
                                        "relative_gap": v.get("relative_gap"),
                                        "J_w_ci95": wilson((v.get("J_f_w") or 0) * accepted, accepted)}
        rounds.append(entry)
    return {"id": run_id, "name": state.get("name"), "base_model": state.get("base_model"),
            "method": state.get("method"), "recipe_file": state.get("recipe_file"), "stopped": state.get("stopped"),
            "best": state.get("best"), "verifiers": verifiers, "rounds": rounds, "error": None}
