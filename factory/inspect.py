"""``factory inspect``: what is in a dataset version, at a glance."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import polars as pl

from .annotations import agreement, agreement_lines, read_verdicts, verdict_counts, view_folder
from .quality import quality_text_lines
from .store import after_answer_lines, read_manifest, read_version, target_line, truncation_lines, usage_text

DISAGREE_SHOWN = 5  # disagreeing rows named per step; the viewer shows them all


def length_stats(table: pl.DataFrame) -> list[dict]:
    """Character and word lengths of each text column."""
    rows = []
    for column, dtype in table.schema.items():
        if dtype != pl.String:
            continue
        text = table[column].drop_nulls()
        if text.is_empty():
            continue
        chars = text.str.len_chars()
        words = text.str.split(" ").list.len()
        rows.append({"column": column, "min": int(chars.min()), "median": int(chars.median()),
                     "mean": round(float(chars.mean()), 1), "max": int(chars.max()),
                     "mean_words": round(float(words.mean()), 1)})
    return rows


LINEAGE = ("origin", "operation", "generation")


def lineage(table: pl.DataFrame, rejected: pl.DataFrame, chains: int = 3) -> dict:
    """Counts per (origin, operation, generation) and a few parent -> child chains."""
    present = [c for c in LINEAGE if c in table.columns]
    if not present:
        return {}
    counts = (table.group_by(present).len().sort(present, nulls_last=True)
              .rename({"len": "rows"}).to_dicts())
    found = []
    if "parent" in table.columns and "instruction" in table.columns:
        known = {}
        for frame in (rejected, table):  # kept rows win when a text appears in both
            if "instruction" in frame.columns:
                for row in frame.select([c for c in ("instruction", "parent", "operation", "generation")
                                         if c in frame.columns]).iter_rows(named=True):
                    known[row["instruction"]] = row
        deepest = table.filter(pl.col("parent").is_not_null())
        if "generation" in deepest.columns:
            deepest = deepest.sort("generation", descending=True, nulls_last=True)
        shown: set[str] = set()
        for row in deepest.iter_rows(named=True):
            if len(found) >= chains:
                break
            if row["instruction"] in shown:  # already part of a longer chain
                continue
            chain = [row]
            while chain[-1].get("parent") in known and len(chain) < 10:
                chain.append(known[chain[-1]["parent"]])
            root = chain[-1].get("parent")
            steps = [{"text": root, "operation": None, "generation": 0}] if root else []
            steps += [{"text": r["instruction"], "operation": r.get("operation"), "generation": r.get("generation")}
                      for r in reversed(chain)]
            shown.update(r["instruction"] for r in chain)
            found.append(steps)
    return {"counts": counts, "chains": found}


def token_stats(table: pl.DataFrame, tokenizer) -> list[dict]:
    """Token counts of each text column and of the rendered chat (``messages``)."""
    out = []
    columns = [c for c, t in table.schema.items() if t == pl.String and c not in ("origin", "operation")]
    for column in columns:
        texts = [t for t in table[column].to_list() if isinstance(t, str)]
        if texts:
            out.append(_count_stats(column, [len(ids) for ids in tokenizer(texts, add_special_tokens=False)
                                             ["input_ids"]]))
    if "messages" in table.columns and table.height and getattr(tokenizer, "chat_template", None):
        rendered = [tokenizer.apply_chat_template(m, tokenize=False) for m in table["messages"].to_list() if m]
        out.append(_count_stats("messages (chat template)",
                                [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]))
    return out


def _count_stats(column: str, counts: list[int]) -> dict:
    ordered = sorted(counts)
    return {"column": column, "min": ordered[0], "median": ordered[len(ordered) // 2],
            "mean": round(sum(ordered) / len(ordered), 1), "p95": ordered[min(len(ordered) - 1,
                                                                               int(len(ordered) * 0.95))],
            "max": ordered[-1], "total": sum(ordered)}


def load_inspect_tokenizer(name: str | None):
    """The tokenizer to count with (default: the embedded model's), or None when it is missing."""
    if name == "none":
        return None
    from .errors import FactoryError
    from .models import EMBEDDED, load_tokenizer

    try:
        return load_tokenizer(name or EMBEDDED)
    except FactoryError:
        if name:
            raise
        return None


def summarize(version_dir: str | Path, examples: int = 3, tokenizer=None) -> dict:
    """Everything ``inspect`` shows, as data."""
    manifest = read_manifest(version_dir)
    table = read_version(version_dir)
    rejected = read_version(version_dir, "rejected")
    info = {
        "path": str(version_dir),
        "name": manifest["name"],
        "version": manifest["version"],
        "created_at": manifest.get("created_at"),
        "recipe_hash": manifest.get("recipe_hash"),
        "parent": manifest.get("parent"),
        "models": sorted({m["model_id"] for m in manifest.get("models", [])}),
        "rows": table.height,
        "rejected_rows": rejected.height,
        "columns": {c: str(t) for c, t in table.schema.items()},
        "steps": [{**{k: s[k] for k in ("index", "name", "rows_in", "rows_out", "dropped", "seconds")},
                   "acceptance": s.get("acceptance"), "truncation": s.get("truncation"),
                   "report": {k: v for k, v in (s.get("report") or {}).items() if k == "after_answer"}}
                  for s in manifest.get("steps", [])],
        "target_rows": manifest.get("target_rows"),
        "usage": manifest.get("usage") or {},
        "cost_usd": manifest.get("cost_usd"),
        "drop_reasons": (dict(rejected.group_by("drop_step", "drop_reason").len()
                              .sort("drop_step", "drop_reason")
                              .select(pl.format("{} {}", "drop_step", "drop_reason"), "len").iter_rows())
                         if rejected.height else {}),
        "lengths": length_stats(table.drop("messages") if "messages" in table.columns else table),
        "examples": table.head(examples).to_dicts(),
        "lineage": lineage(table, rejected),
        "tokens": token_stats(table, tokenizer) if tokenizer is not None else [],
    }
    info["quality"] = manifest.get("quality")
    info["verification"] = verification(table, rejected, manifest)
    verdicts = read_verdicts(version_dir)
    info["verdicts"] = verdict_counts(verdicts)
    info["agreement"] = agreement(version_dir, manifest, verdicts)
    for column in ("score", "reward"):
        if column in table.columns and table[column].dtype.is_numeric():
            values = table[column].drop_nulls()
            if len(values):
                info[f"{column}_stats"] = {"min": float(values.min()), "mean": round(float(values.mean()), 3),
                                           "max": float(values.max())}
    return info


def verification(table: pl.DataFrame, rejected: pl.DataFrame, manifest: dict) -> list[dict]:
    """Per ``verify`` step: the rows it checked (kept, or dropped by it or a later step), how many
    passed, and the outcome of the others by reason (``code_result`` for code; the step's drop
    reason; else ``incorrect``)."""
    out = []
    for i, step in enumerate((manifest.get("recipe") or {}).get("steps") or []):
        config = step.get("verify") if isinstance(step, dict) else None
        if config is None:
            continue
        verdict = config.get("output_column", "correct")
        frames = [table]
        if rejected.height and "drop_step" in rejected.columns:
            order = rejected["drop_step"].str.extract(r"steps\[(\d+)\]").cast(pl.Int64)
            frames.append(rejected.filter(order >= i))
        rows = pl.concat(frames, how="diagonal_relaxed")
        label = f"steps[{i}].verify"
        outcome = pl.lit(None, dtype=pl.String)
        if "code_result" in rows.columns:
            outcome = pl.col("code_result")
        if "drop_step" in rows.columns:
            outcome = pl.coalesce(outcome, pl.when(pl.col("drop_step") == label).then(pl.col("drop_reason")))
        if verdict in rows.columns:
            correct = pl.col(verdict).cast(pl.Boolean, strict=False)
            outcome = pl.coalesce(outcome, pl.when(correct).then(pl.lit("passed"))
                                  .when(~correct).then(pl.lit("incorrect")))
        outcomes = rows.select(outcome.alias("outcome"))["outcome"].drop_nulls()
        if not len(outcomes):
            continue
        counts = dict(sorted(outcomes.value_counts().iter_rows(), key=lambda kv: (-kv[1], kv[0])))
        passed = counts.pop("passed", 0)
        out.append({"index": i, "method": config.get("method"), "checked": len(outcomes), "passed": passed,
                    "pass_rate": round(passed / len(outcomes), 4), "reasons": counts})
    return out


def render(info: dict, width: int = 100) -> str:
    """``summarize``'s result as text for the terminal."""
    out = [f"{info['path']}  ({info['name']} v{info['version']}, created {info['created_at']}, "
           f"recipe {str(info['recipe_hash'])[:12]})"]
    if info["parent"]:
        out.append(f"parent: {info['parent']}")
    if info["models"]:
        out.append(f"models: {', '.join(info['models'])}")
    out.append(f"rows: {info['rows']}   rejected: {info['rejected_rows']}")
    out.append("columns: " + ", ".join(f"{c} ({t})" for c, t in info["columns"].items()))
    # People's verdicts come first: where they exist, they are the best evidence on the steps below.
    out += agreement_text(info.get("agreement"), info["path"])
    if info["steps"]:
        out.append("")
        out.append(f"{'step':<24} {'in':>7} {'out':>7} {'secs':>7}  dropped")
        for s in info["steps"]:
            dropped = ", ".join(f"{k}={v}" for k, v in s["dropped"].items()) or "-"
            out.append(f"{'[' + str(s['index']) + '] ' + s['name']:<24} {s['rows_in']:>7} {s['rows_out']:>7} "
                       f"{s['seconds']:>7.1f}  {dropped}")
        out += truncation_lines(info["steps"]) + after_answer_lines(info["steps"])
    if info.get("target_rows"):
        out.append(target_line(info["target_rows"], info["rows"]))
    out += [f"llm {usage_text(key, u)}" for key, u in (info.get("usage") or {}).items()]
    out += _length_table("length (chars)", info["lengths"], [("min", 7), ("median", 7), ("mean", 9), ("max", 7),
                                                             ("words", 7)])
    out += _length_table("length (tokens)", info.get("tokens"), [("min", 7), ("median", 7), ("mean", 9), ("p95", 7),
                                                               ("max", 7), ("total", 9)])
    if info.get("lineage"):
        out.append("")
        counts = info["lineage"]["counts"]
        keys = [k for k in LINEAGE if k in counts[0]]
        out.append("lineage: " + " / ".join(keys) + ": rows")
        for row in counts:
            out.append("  " + " / ".join(str(row[k]) for k in keys) + f": {row['rows']}")
        for chain in info["lineage"]["chains"]:
            out.append("  chain:")
            for depth, link in enumerate(chain):
                label = f"gen {link['generation']}" + (f", {link['operation']}" if link["operation"] else "")
                indent = "    " + "  " * depth + ("-> " if depth else "")
                out.append(indent + textwrap.shorten(f"[{label}] {link['text']}", width=width - len(indent),
                                                     placeholder=" ..."))
    for v in info.get("verification") or []:
        reasons = ", ".join(f"{k} {n}" for k, n in v["reasons"].items())
        out.append(f"\nverify [{v['index']}] ({v['method']}): {v['passed']} of {v['checked']} passed "
                   f"({100 * v['pass_rate']:.1f} %)" + (f"; {reasons}" if reasons else ""))
    for column in ("score", "reward"):
        if f"{column}_stats" in info:
            s = info[f"{column}_stats"]
            out.append(f"\n{column}: min {s['min']:g}, mean {s['mean']:g}, max {s['max']:g}")
    out += [""] + quality_text_lines(info.get("quality"))
    for i, example in enumerate(info["examples"]):
        out.append(f"\n--- example {i + 1} of {info['rows']} ---")
        for key, value in example.items():
            if key == "messages":
                continue
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
            text = textwrap.shorten(text, width=max(40, width - len(key) - 2) * 3, placeholder=" ...")
            out.append(textwrap.fill(f"{key}: {text}", width=width, subsequent_indent="    "))
    return "\n".join(out)


def agreement_text(info: dict | None, path: str) -> list[str]:
    """The agreement table, then up to ``DISAGREE_SHOWN`` disagreeing rows per step as ``part#index``."""
    if not info:
        return []
    out = [""] + agreement_lines(info)
    disagreeing = [s for s in info["steps"] if s["disagree"]]
    if disagreeing:
        out.append(f"  rows where a step and people disagree (see them with `factory view {view_folder(path)}`):")
    for s in disagreeing:
        refs = ", ".join(f"{d['part']}#{d['index']} ({d['verdict']})" for d in s["disagree"][:DISAGREE_SHOWN])
        more = len(s["disagree"]) - DISAGREE_SHOWN
        out.append(f"    {s['label']}: {refs}" + (f" and {more} more" if more > 0 else ""))
    return out


def plot(version_dir: str | Path, path: str | Path, tokenizer=None) -> Path:
    """A PNG with the length histograms, the score distribution and the drop reasons."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manifest = read_manifest(version_dir)
    table = read_version(version_dir)
    panels = ["lengths"] + (["score"] if "score" in table.columns and table["score"].dtype.is_numeric() else []) \
        + ["drops"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4))
    axes = list(axes) if len(panels) > 1 else [axes]
    ax = axes[0]
    unit = "tokens" if tokenizer is not None else "characters"
    lengths = {}
    for column in ("instruction", "response"):
        if column in table.columns and table.height:
            texts = [t for t in table[column].to_list() if isinstance(t, str)]
            lengths[column] = ([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
                               if tokenizer is not None else [len(t) for t in texts])
    if lengths:
        import numpy as np

        edges = np.histogram_bin_edges([n for values in lengths.values() for n in values], bins=30)
        for column, values in lengths.items():
            ax.hist(values, bins=edges, alpha=0.6, label=column)
    ax.set(title=f"Lengths ({unit})", xlabel=unit, ylabel="rows")
    if lengths:
        ax.legend()
    if "score" in panels:
        ax = axes[panels.index("score")]
        ax.hist(table["score"].drop_nulls().to_list(), bins=20, color="tab:green")
        ax.set(title="Judge scores (kept rows)", xlabel="score", ylabel="rows")
    ax = axes[-1]
    reasons = {f"[{s['index']}] {s['name']}: {reason}": count for s in manifest.get("steps", [])
               for reason, count in s["dropped"].items()}
    if reasons:
        names = list(reasons)
        ax.barh(names, [reasons[n] for n in names], color="tab:red")
        ax.invert_yaxis()
    ax.set(title=f"Dropped rows ({manifest['rejected_rows']})", xlabel="rows")
    fig.suptitle(f"{manifest['name']} v{manifest['version']}: {manifest['rows']} rows")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _length_table(title: str, rows: list[dict] | None, columns: list[tuple[str, int]]) -> list[str]:
    """A blank line, a header and a line per text column (``words`` is the mean word count)."""
    if not rows:
        return []
    lines = ["", f"{title:<24} " + " ".join(f"{name:>{width}}" for name, width in columns)]
    for row in rows:
        values = [row["mean_words" if name == "words" else name] for name, _ in columns]
        lines.append(f"{row['column'][:24]:<24} " + " ".join(f"{v:>{w}}" for v, (_, w) in zip(values, columns)))
    return lines
