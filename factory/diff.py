"""``factory diff A B``: what changed between two dataset versions.

Rows are matched by the content of key columns (``instruction`` and ``response`` when
both exist, else every column), so the same row is recognised wherever it sits.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from .quality import quality_shifts
from .store import read_manifest, read_version, step_label


def recipe_changes(a, b, path: str = "") -> list[dict]:
    """Every key path whose value differs between two resolved recipes."""
    if isinstance(a, dict) and isinstance(b, dict):
        changes = []
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a:
                changes.append({"path": sub, "a": None, "b": b[key], "change": "added"})
            elif key not in b:
                changes.append({"path": sub, "a": a[key], "b": None, "change": "removed"})
            else:
                changes += recipe_changes(a[key], b[key], sub)
        return changes
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        changes = []
        for i, (x, y) in enumerate(zip(a, b)):
            changes += recipe_changes(x, y, f"{path}[{i}]")
        return changes
    return [] if a == b else [{"path": path, "a": a, "b": b, "change": "changed"}]


def _keys(table: pl.DataFrame, columns: list[str]) -> pl.Series:
    text = pl.concat_str([pl.col(c).cast(pl.String).fill_null("\u0000") if table.schema[c] != pl.List
                          else pl.col(c).cast(pl.List(pl.String), strict=False).list.join("\u0001")
                          for c in columns], separator="\u0002")
    return table.select(text.alias("key"))["key"]


def _metrics(manifest: dict, table: pl.DataFrame) -> dict:
    metrics = {"rows": manifest["rows"], "rejected_rows": manifest["rejected_rows"]}
    for column in ("instruction", "response"):
        if column in table.columns and table[column].dtype == pl.String and table.height:
            metrics[f"mean_chars_{column}"] = round(float(table[column].str.len_chars().mean()), 1)
    if "score" in table.columns and table["score"].dtype.is_numeric() and table.height:
        metrics["mean_score"] = round(float(table["score"].mean()), 3)
    dropped: dict[str, int] = {}
    for step in manifest.get("steps", []):
        for reason, count in step["dropped"].items():
            dropped[f"{step_label(step)}:{reason}"] = count
    metrics["dropped"] = dropped
    return metrics


def diff(version_a: str | Path, version_b: str | Path, key: list[str] | None = None, examples: int = 3) -> dict:
    ma, mb = read_manifest(version_a), read_manifest(version_b)
    ta, tb = read_version(version_a), read_version(version_b)
    shared = [c for c in ta.columns if c in tb.columns]
    if key:
        missing = [c for c in key if c not in shared]
        if missing:
            from .errors import FactoryError

            raise FactoryError(f"key column(s) {', '.join(missing)} are not in both versions (shared: "
                               f"{', '.join(shared)})")
    key = key or ([c for c in ("instruction", "response") if c in shared] if {"instruction", "response"} <= set(shared)
                  else [c for c in shared if c != "messages"])
    ka, kb = set(_keys(ta, key).to_list()), set(_keys(tb, key).to_list())
    added = tb.filter(~_keys(tb, key).is_in(list(ka)))
    removed = ta.filter(~_keys(ta, key).is_in(list(kb)))
    metrics_a, metrics_b = _metrics(ma, ta), _metrics(mb, tb)
    shifts = {}
    for name in sorted(set(metrics_a) | set(metrics_b)):
        if name == "dropped":
            continue
        a, b = metrics_a.get(name), metrics_b.get(name)
        if a != b:
            shifts[name] = {"a": a, "b": b, "delta": round(b - a, 4) if isinstance(a, (int, float)) and
                            isinstance(b, (int, float)) else None}
    drops = {}
    for reason in sorted(set(metrics_a["dropped"]) | set(metrics_b["dropped"])):
        a, b = metrics_a["dropped"].get(reason, 0), metrics_b["dropped"].get(reason, 0)
        if a != b:
            drops[reason] = {"a": a, "b": b, "delta": b - a}
    return {
        "a": str(version_a), "b": str(version_b), "key": key,
        "rows": {"a": ta.height, "b": tb.height, "added": added.height, "removed": removed.height,
                 "common": len(ka & kb)},
        "columns": {"added": [c for c in tb.columns if c not in ta.columns],
                    "removed": [c for c in ta.columns if c not in tb.columns]},
        "recipe_changes": recipe_changes(ma.get("recipe", {}), mb.get("recipe", {})),
        "models": {"a": sorted({m["model_id"] for m in ma.get("models", [])}),
                   "b": sorted({m["model_id"] for m in mb.get("models", [])})},
        "metric_shifts": shifts, "drop_shifts": drops,
        "quality": {"missing": [f"v{m.get('version')}" for m in (ma, mb) if not m.get("quality")],
                    "shifts": quality_shifts(ma.get("quality"), mb.get("quality"))},
        "examples": {"added": added.select(key).head(examples).to_dicts(),
                     "removed": removed.select(key).head(examples).to_dicts()},
    }


def render(info: dict, width: int = 100) -> str:
    import textwrap

    r = info["rows"]
    lines = [f"{info['a']} -> {info['b']}",
             f"rows: {r['a']} -> {r['b']}  (+{r['added']} added, -{r['removed']} removed, {r['common']} in both; "
             f"matched on {', '.join(info['key'])})"]
    if info["columns"]["added"] or info["columns"]["removed"]:
        lines.append(f"columns: +{info['columns']['added']} -{info['columns']['removed']}")
    if info["models"]["a"] != info["models"]["b"]:
        lines.append(f"models: {', '.join(info['models']['a'])} -> {', '.join(info['models']['b'])}")
    lines.append("")
    lines.append("recipe changes:" if info["recipe_changes"] else "recipe: unchanged")
    for c in info["recipe_changes"]:
        a, b = (textwrap.shorten(json.dumps(v, default=str), 40) for v in (c["a"], c["b"]))
        lines.append(f"  {c['path']}: {a} -> {b}")
    if info["metric_shifts"] or info["drop_shifts"]:
        lines += ["", "metric shifts:"]
        for name, s in {**info["metric_shifts"], **info["drop_shifts"]}.items():
            delta = f" ({s['delta']:+g})" if s["delta"] is not None else ""
            lines.append(f"  {name}: {s['a']} -> {s['b']}{delta}")
    lines += quality_lines(info.get("quality"))
    for which in ("added", "removed"):
        if info["examples"][which]:
            lines += ["", f"{which} (first {len(info['examples'][which])}):"]
            for row in info["examples"][which]:
                lines.append("  " + textwrap.shorten(" | ".join(str(v) for v in row.values()), width=width - 2,
                                                     placeholder=" ..."))
    return "\n".join(lines)


def quality_lines(quality: dict | None) -> list[str]:
    """The quality sections' shifts: every figure that changed, old -> new (change), and how many did not."""
    if not quality:
        return []
    lines = [""] + [f"quality: no quality section in {version}" for version in quality["missing"]]
    if quality["missing"]:
        return lines
    changed = {name: s for name, s in quality["shifts"].items() if s["a"] != s["b"]}
    lines.append("quality shifts:" if changed else "quality: the same figures")
    for name, s in changed.items():
        old, new = ("-" if v is None else f"{v:g}" for v in (s["a"], s["b"]))
        lines.append(f"  {name}: {old} -> {new}" + (f" ({s['delta']:+g})" if s["delta"] is not None else ""))
    if changed and len(changed) < len(quality["shifts"]):
        lines.append(f"  ({len(quality['shifts']) - len(changed)} other figures unchanged)")
    return lines
