"""People's verdicts on rows, kept beside a version, and how well each step agrees with them.

A version is immutable, so a verdict never goes into it: ``factory view`` appends it to
``OUT/<name>/annotations/v<N>.jsonl``, one JSON object per line::

    {"version": 3, "part": "rejected", "index": 17, "row_hash": "9f2c...", "verdict": "good",
     "note": "the judge missed that the answer is right", "time": "2026-12-06T10:00:00+00:00", "by": "ana"}

``part`` and ``index`` locate the row (its position in ``data/`` or ``rejected/``, whose shards are
read in name order; a version never changes, so the position never does); ``row_hash`` is a hash of
the row's content, which lets anyone who carries the file elsewhere (an export, the Hub) check that
a verdict belongs to the row they hold. The last line about a row wins; ``"verdict": "clear"``
withdraws one.

With verdicts, every judge, verifier and filter of the recipe is measured against people:
precision and recall of "the step kept it" against "a person said good", and Cohen's kappa
(agreement beyond chance) over the labelled rows the step decided on.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import re
import threading
import zlib
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from .errors import FactoryError
from .store import ROW_GROUP_ROWS, read_manifest

VERDICTS = ("good", "bad")
PARTS = ("data", "rejected")
KINDS = {"judge": "judge", "pairwise": "judge", "reward_model": "judge", "verify": "verifier"}
_LABEL = re.compile(r"^steps\[(\d+)\]")
_append_lock = threading.Lock()
CLUSTER_ROWS = ROW_GROUP_ROWS  # rows read together when fetching scattered rows: about one row group
MAX_SLICES = 64        # more separate stretches than this: one filtered pass over the part instead


def annotations_path(version_dir: str | Path) -> Path:
    """``OUT/<name>/annotations/v<N>.jsonl`` for the version folder ``OUT/<name>/v<N>``."""
    version_dir = Path(version_dir)
    return version_dir.parent / "annotations" / f"{version_dir.name}.jsonl"


def view_folder(version_dir: str | Path) -> Path:
    """The folder ``factory view`` serves for a version: OUT of ``OUT/<name>/v<N>``, or the evolve run
    of ``RUN/datasets/<name>/v<N>``."""
    path = Path(version_dir)
    return path.parents[2] if len(path.parents) > 2 and path.parents[1].name == "datasets" else path.parents[1]


def version_number(version_dir: str | Path) -> int:
    name = Path(version_dir).name
    if not re.fullmatch(r"v\d+", name):
        raise FactoryError(f"{version_dir}: not a version folder (expected a name such as v3)")
    return int(name[1:])


def part_files(version_dir: str | Path, part: str) -> list[Path]:
    """The parquet shards of ``data`` or ``rejected``, in the order their rows are numbered."""
    return sorted((Path(version_dir) / part).glob("*.parquet"))


def row_hash(row: dict) -> str:
    """A hash of a row's content: its columns and values, as canonical JSON (16 hex digits)."""
    text = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def add_verdict(version_dir: str | Path, part: str, index: int, verdict: str, note: str = "",
                row: dict | None = None) -> dict:
    """Appends a person's verdict on row ``index`` of ``part`` and returns the record.

    Args:
        verdict: ``good``, ``bad`` or ``clear`` (withdraws the row's verdict).
        row: the row as shown (its content hash goes into the record); read from the version when None.
    """
    if part not in PARTS:
        raise FactoryError(f"part {part!r}: expected one of {', '.join(PARTS)}")
    if verdict not in (*VERDICTS, "clear"):
        raise FactoryError(f"verdict {verdict!r}: expected good, bad or clear")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise FactoryError(f"index {index!r}: expected a row number (0 or more)")
    if row is None:
        found = rows_at(version_dir, part, [index])
        if index not in found:
            raise FactoryError(f"{version_dir}: {part} has no row {index}")
        row = found[index]
    record = {"version": version_number(version_dir), "part": part, "index": index, "row_hash": row_hash(row),
              "verdict": verdict, "note": str(note or ""),
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "by": _user()}
    path = annotations_path(version_dir)
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with _append_lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One write of one line in append mode: concurrent writers never interleave within a line.
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
    return record


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def read_verdicts(version_dir: str | Path) -> dict[tuple[str, int], dict]:
    """The standing verdict per row, ``(part, index) -> record``: the last line about a row wins,
    ``clear`` removes it, and lines that are not verdicts (a cut last line, hand edits) are skipped."""
    path = annotations_path(version_dir)
    if not path.is_file():
        return {}
    found: dict[tuple[str, int], dict] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not (isinstance(record, dict) and record.get("part") in PARTS and type(record.get("index")) is int
                and record.get("verdict") in (*VERDICTS, "clear")):
            continue
        key = (record["part"], record["index"])
        if record["verdict"] == "clear":
            found.pop(key, None)
        else:
            found[key] = record
    return found


def verdicts_jsonl(verdicts: dict) -> str:
    """The standing verdicts as JSON lines, sorted by part then index: the file an export or a push
    carries beside the rows (``read_verdicts`` reads it back, since every line is a verdict)."""
    return "".join(json.dumps(verdicts[key], ensure_ascii=False) + "\n" for key in sorted(verdicts))


def verdict_counts(verdicts: dict) -> dict:
    good = sum(r["verdict"] == "good" for r in verdicts.values())
    return {"count": len(verdicts), "good": good, "bad": len(verdicts) - good}


def rows_at(version_dir: str | Path, part: str, indices, columns: list[str] | None = None) -> dict[int, dict]:
    """The rows at ``indices`` of ``part`` (``index -> row``), read lazily: only the columns asked for,
    and only the stretches of rows that hold the indices."""
    files = part_files(version_dir, part)
    wanted = sorted({int(i) for i in indices})
    if not files or not wanted:
        return {}
    scan = pl.scan_parquet(files)
    if columns is not None:
        present = scan.collect_schema().names()
        # none of them there: one column still, since a frame of no columns has no rows to find
        scan = scan.select([c for c in columns if c in present] or present[:1])
    # Indices close together share one slice: a slice reads only the row groups under it, where a
    # filter on the index would decode every row of the version.
    clusters: list[list[int]] = []
    for i in wanted:
        if clusters and i - clusters[-1][0] < CLUSTER_ROWS:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    if len(clusters) > MAX_SLICES:
        frame = scan.with_row_index("__index").filter(pl.col("__index").is_in(wanted)).collect()
    else:
        frames = pl.collect_all([scan.slice(c[0], c[-1] - c[0] + 1).with_row_index("__index", offset=c[0])
                                 .filter(pl.col("__index").is_in(c)) for c in clusters])
        frame = pl.concat(frames, how="diagonal_relaxed")
    return {row.pop("__index"): row for row in frame.to_dicts()}


def step_index(label: str | None) -> int | None:
    m = _LABEL.match(label or "")
    return int(m.group(1)) if m else None


def step_order(label: str | None) -> int:
    """Where a drop step comes in the recipe, for sorting: its index, -1 for one that is not a step
    (``source``)."""
    index = step_index(label)
    return -1 if index is None else index


def stratified_sample(version_dir: str | Path, n: int, seed: int | None = None) -> list[dict]:
    """``n`` rows to label, spread evenly over the strata ``kept`` and each ``drop_step: drop_reason``
    (a stratum smaller than its share gives the rest to the others), in a seeded random order that is
    the same every time for the same version and ``n``.

    Returns: ``[{"part", "index", "stratum"}]``, the strata interleaved.
    """
    import numpy as np

    version_dir = Path(version_dir)
    if seed is None:
        seed = zlib.crc32(f"{version_dir.parent.name}/{version_dir.name}".encode())
    rng = np.random.default_rng(seed)
    strata: dict[str, tuple[str, np.ndarray]] = {}
    data = part_files(version_dir, "data")
    if data:
        rows = pl.scan_parquet(data).select(pl.len()).collect().item()
        if rows:
            strata["kept"] = ("data", np.arange(rows))
    rejected = part_files(version_dir, "rejected")
    if rejected:
        scan = pl.scan_parquet(rejected)
        if {"drop_step", "drop_reason"} <= set(scan.collect_schema().names()):
            groups = (scan.select("drop_step", "drop_reason").with_row_index("i")
                      .group_by("drop_step", "drop_reason").agg("i").collect())
            for step, reason, idx in sorted(groups.iter_rows(), key=lambda r: (step_order(r[0]), str(r[1]))):
                strata[f"{step}: {reason}"] = ("rejected", np.asarray(idx))
    share = {name: 0 for name in strata}
    left = n
    while left > 0:  # round-robin: equal shares, capped by each stratum's size
        open_ = [s for s in strata if share[s] < len(strata[s][1])]
        if not open_:
            break
        for s in open_:
            if left == 0:
                break
            share[s] += 1
            left -= 1
    picked = {s: rng.choice(strata[s][1], size=share[s], replace=False).tolist() for s in strata}
    items = []
    for k in range(max(share.values(), default=0)):
        for s, (part, _) in strata.items():
            if k < share[s]:
                items.append({"part": part, "index": int(picked[s][k]), "stratum": s})
    return items


# -- agreement with people ------------------------------------------------------------------------

def _judge_threshold(steps: list[dict], i: int, column: str, scale: int) -> tuple[float, str]:
    """The score a judge's row needs to count as kept: the `min` of a later `score` filter on the
    judge's column, else the upper half of its scale (as the evolve gap's `judge_score`)."""
    for step in steps[i + 1:]:
        name, config = next(iter(step.items()))
        if name == "score" and (config or {}).get("column", "score") == column and (config or {}).get("min") \
                is not None:
            return float(config["min"]), f"{column} >= {config['min']:g} (the score filter's min)"
    threshold = math.ceil(scale / 2 + 0.5)
    return float(threshold), f"{column} >= {threshold} (upper half of 1-{scale})"


def _decisions(steps: list[dict], i: int, rows: list[dict]) -> tuple[str, list[bool | None], list[float | None]]:
    """What step ``i`` decided on each labelled row: kept (True), dropped (False) or None (the row
    never reached it), and a score when the step gives one; plus how the decision is read."""
    name, config = next(iter(steps[i].items()))
    config = config or {}
    label = f"steps[{i}].{name}"
    reached = []
    for row in rows:
        at = step_index(row.get("drop_step")) if row["part"] == "rejected" else None
        reached.append(row["part"] == "data" or (at is not None and at >= i))
    dropped_here = [row["part"] == "rejected" and row.get("drop_step") == label for row in rows]
    scores: list[float | None] = [None] * len(rows)
    if name == "judge" and config.get("mode", "score") == "score":
        column = config.get("output_column", "score")
        threshold, how = _judge_threshold(steps, i, column, int(config.get("scale", 10)))
        scores = [_number(row.get(column)) if r else None for row, r in zip(rows, reached)]
        kept = [None if not r else (False if d or s is None else s >= threshold)
                for r, d, s in zip(reached, dropped_here, scores)]
        return how, kept, scores
    if name == "judge":
        column = config.get("correct_column", "judge_correct")
        return f"{column} is true", [None if not r else (not d and bool(row.get(column)))
                                     for row, r, d in zip(rows, reached, dropped_here)], scores
    if name == "verify":
        column = config.get("output_column", "correct")
        return f"{column} is true", [None if not r else (not d and row.get(column) is not False)
                                     for row, r, d in zip(rows, reached, dropped_here)], scores
    if name == "reward_model":
        column = config.get("output_column", "reward")
        scores = [_number(row.get(column)) if r else None for row, r in zip(rows, reached)]
        return f"ranking by {column} (a later select keeps)", [None] * len(rows), scores
    return "kept by the step", [None if not r else not d for r, d in zip(reached, dropped_here)], scores


def _number(value) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def confusion(kept: list[bool], good: list[bool]) -> dict:
    """Precision and recall of ``kept`` against ``good``, and Cohen's kappa between them."""
    tp = sum(k and g for k, g in zip(kept, good))
    fp = sum(k and not g for k, g in zip(kept, good))
    fn = sum(not k and g for k, g in zip(kept, good))
    tn = sum(not k and not g for k, g in zip(kept, good))
    n = tp + fp + fn + tn
    kappa = None
    if n:
        observed = (tp + tn) / n
        chance = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / (n * n)
        kappa = round((observed - chance) / (1 - chance), 4) if chance < 1 else None
    return {"n": n, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / (tp + fn), 4) if tp + fn else None, "kappa": kappa}


def auc(scores: list[float], good: list[bool]) -> float | None:
    """The chance that a row people call good scores above one they call bad (ties count half)."""
    goods = [s for s, g in zip(scores, good) if g]
    bads = [s for s, g in zip(scores, good) if not g]
    if not goods or not bads:
        return None
    wins = sum((g > b) + 0.5 * (g == b) for g in goods for b in bads)
    return round(wins / (len(goods) * len(bads)), 4)


def agreement(version_dir: str | Path, manifest: dict | None = None, verdicts: dict | None = None) -> dict | None:
    """Each judge, verifier and filter of the version's recipe against people's verdicts, and the
    version itself (kept at all); None without verdicts.

    Returns: ``{"labelled", "good", "bad", "steps": [{"label", "name", "kind", "decision", "n", "tp",
    "fp", "fn", "tn", "precision", "recall", "kappa", "auc", "disagree": [{"part", "index", "verdict",
    "kept"}]}]}``; a step appears when it decided on at least one labelled row.
    """
    verdicts = read_verdicts(version_dir) if verdicts is None else verdicts
    if not verdicts:
        return None
    manifest = manifest or read_manifest(version_dir)
    steps = [s for s in (manifest.get("recipe") or {}).get("steps") or [] if isinstance(s, dict) and s]
    rows: list[dict] = []
    for part in PARTS:
        keys = sorted(i for p, i in verdicts if p == part)
        found = rows_at(version_dir, part, keys, columns=_wanted_columns(steps))
        for i in keys:
            if i in found:  # a verdict on a row the version does not have is not counted
                rows.append({**found[i], "part": part, "index": i, "verdict": verdicts[(part, i)]["verdict"]})
    good = [r["verdict"] == "good" for r in rows]
    out = {"labelled": len(rows), "good": sum(good), "bad": len(rows) - sum(good), "steps": []}
    entries = [("version", "version", "version", "kept in the version", [r["part"] == "data" for r in rows],
                [None] * len(rows))]
    for i, step in enumerate(steps):
        name = next(iter(step))
        kind = KINDS.get(name, "filter" if _is_filter(name) else "step")
        how, kept, scores = _decisions(steps, i, rows)
        if kind == "step" and not any(k is False for k in kept):
            continue  # a generator or solver only counts where it dropped labelled rows
        entries.append((f"steps[{i}].{name}", name, kind, how, kept, scores))
    for label, name, kind, how, kept, scores in entries:
        decided = [(k, g, r) for k, g, r in zip(kept, good, rows) if k is not None]
        scored = [(s, g) for s, g in zip(scores, good) if s is not None]
        if not decided and not scored:
            continue
        entry = {"label": label, "name": name, "kind": kind, "decision": how,
                 **confusion([k for k, _, _ in decided], [g for _, g, _ in decided]),
                 "auc": auc([s for s, _ in scored], [g for _, g in scored]) if scored else None,
                 "disagree": [{"part": r["part"], "index": r["index"], "verdict": r["verdict"], "kept": k}
                              for k, g, r in decided if k != g]}
        out["steps"].append(entry)
    return out


def _wanted_columns(steps: list[dict]) -> list[str]:
    columns = {"drop_step"}
    for step in steps:
        name, config = next(iter(step.items()))
        config = config or {}
        if name == "judge":
            columns.add(config.get("output_column", "score"))
            columns.add(config.get("correct_column", "judge_correct"))
        elif name == "verify":
            columns.add(config.get("output_column", "correct"))
        elif name == "reward_model":
            columns.add(config.get("output_column", "reward"))
    return sorted(columns)


def _is_filter(name: str) -> bool:
    from .registry import registry

    cls = registry().get(name)
    return cls is not None and cls.__module__.startswith("filters.")


def agreement_lines(info: dict | None) -> list[str]:
    """The agreement table as text (``factory inspect``, the evolve report)."""
    if not info:
        return []
    lines = [f"people's verdicts: {info['labelled']} rows ({info['good']} good, {info['bad']} bad)",
             f"  {'step':<26} {'kind':<9} {'n':>5} {'precision':>9} {'recall':>7} {'kappa':>7} {'auc':>6}  "
             f"disagree  decision"]
    for s in info["steps"]:
        lines.append(f"  {s['label'][:26]:<26} {s['kind']:<9} {s['n']:>5} {_f(s['precision']):>9} "
                     f"{_f(s['recall']):>7} {_f(s['kappa']):>7} {_f(s['auc']):>6}  {len(s['disagree']):>8}  "
                     f"{s['decision']}")
    return lines


def _f(value) -> str:
    return "-" if value is None else f"{value:.3f}"
