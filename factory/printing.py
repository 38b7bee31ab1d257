"""What the command line prints of a run and a preview: the per-step table, LLM usage and cost, example rows.

Everything here reads a manifest (or the stats of a preview, as the manifest would hold them)
and returns text; nothing is run or written.
"""

from __future__ import annotations

import shutil

import polars as pl

from .driver import RunResult
from .recipe_model import Recipe
from .store import STOPPED, after_answer_lines, step_label, target_line, truncation_lines



def format_steps(steps: list[dict]) -> list[str]:
    """The per-step table: rows in, out, out/in (above 100% for a step that samples several rows
    of one), seconds, and drops by reason."""
    width = max([len(f"[{s['index']}] {s['name']}") for s in steps] + [4])
    lines = [f"  {'step':<{width}}  {'in':>7}  {'out':>7}  {'out/in':>6}  {'secs':>7}  dropped"]
    for s in steps:
        dropped = ", ".join(f"{k}={v}" for k, v in s["dropped"].items()) or "-"
        cached = f"  (cached {s['cached_batches']}/{s['batches']})" if s["cached_batches"] else ""
        kept = f"{s['acceptance']:.0%}" if s.get("acceptance") is not None else "-"
        lines.append(f"  {'[' + str(s['index']) + '] ' + s['name']:<{width}}  {s['rows_in']:>7}  {s['rows_out']:>7}  "
                     f"{kept:>6}  {s['seconds']:>7.1f}  {dropped}{cached}")
    return lines


def format_summary(manifest: dict) -> str:
    """A short per-step table (rows in, out, dropped by reason), what a run to ``output.rows``
    came to, and the LLM usage (tokens per step and per model, the cost when priced)."""
    steps = manifest.get("steps", [])
    lines = [f"{manifest['name']} v{manifest['version']}: {manifest['rows']} rows "
             f"({manifest['rejected_rows']} dropped) in {manifest['timings']['run_seconds']:.1f}s"]
    lines += format_steps(steps)
    lines += ["  " + line for line in truncation_lines(steps) + after_answer_lines(steps)]
    if manifest.get("target_rows"):
        lines.append("  " + target_line(manifest["target_rows"], manifest["rows"]))
    written = manifest.get("output_format")
    if written == "messages":
        lines.append("  written as chat `messages` (every turn of each conversation) beside the kept columns")
    elif written == "raw":
        lines.append("  written as the rows are (no task and response columns for chat `messages`)")
    lines += ["  " + line for line in usage_lines(manifest)]
    return "\n".join(lines)


def usage_lines(manifest: dict) -> list[str]:
    """The LLM usage of a run: tokens in and out per LLM step and per model, with the cost when priced."""
    steps = [s for s in manifest.get("steps", []) if s.get("llm")]
    if not steps:
        return []
    usage = manifest.get("usage") or {}
    priced = any("cost_usd" in m for m in usage.values())
    rows = [(f"[{s['index']}] {s['name']}", s["llm"]) for s in steps]
    rows += [(f"model {key}", entry) for key, entry in usage.items()]
    width = max(len(label) for label, _ in rows)
    lines = ["LLM usage (tokens sent to the backend; replies from the cache cost nothing):",
             f"  {'':<{width}}  {'requests':>8}  {'cached':>7}  {'tokens in':>10}  {'tokens out':>10}"
             + ("  cost (USD)" if priced else "")]
    for label, facts in rows:
        cost = facts.get("cost_usd")
        line = (f"  {label:<{width}}  {facts.get('conversations', 0):>8}  {facts.get('cached_conversations', 0):>7}  "
                f"{facts.get('prompt_tokens', 0):>10}  {facts.get('completion_tokens', 0):>10}")
        if priced:
            line += f"  {cost:>10.4f}" if cost is not None else f"  {'-':>10}"
        lines.append(line)
    if priced:
        unpriced = sorted({str(e["model"]) for e in usage.values() if "cost_usd" not in e})
        lines.append(f"  total cost: ${manifest.get('cost_usd', 0):.4f}"
                     + (f" (no price for {', '.join(unpriced)}; add it under `prices:`)" if unpriced else ""))
    return lines


def target_warning(manifest: dict, reasons_per_step: int = 3) -> str | None:
    """The warning for a run to ``output.rows`` that fell short: what it got, from how many
    candidates, why it stopped, and which steps dropped the rest (their top reasons)."""
    target = manifest.get("target_rows")
    if not target or target["reached"]:
        return None
    drops = []
    for s in manifest.get("steps", []):
        if s["dropped"]:
            top = sorted(s["dropped"].items(), key=lambda kv: -kv[1])[:reasons_per_step]
            drops.append(f"{step_label(s)} dropped {s['rows_in'] - s['rows_out']} of {s['rows_in']} "
                         f"({', '.join(f'{k}={v}' for k, v in top)})")
    fix = ("raise output.max_candidates" if target["stopped"] == "max_candidates"
           else "give the source more rows (or a generator more room)")
    return (f"warning: output.rows asked for {target['rows']} rows and got {manifest['rows']}, from "
            f"{target['candidates']} candidates ({STOPPED.get(target['stopped'], target['stopped'])}); "
            + ("; ".join(drops) if drops else "no step dropped rows") + f". The version holds what survived; {fix}, "
            "or loosen the steps that drop most")


def format_rows(table: pl.DataFrame, picks: list[int], width: int = 110, indent: int = 2) -> list[str]:
    """Rows ``picks`` of ``table``, numbered, one line per chat turn or column, each line cut to ``width``."""
    lines = []
    for n, i in enumerate(picks, 1):
        row = table.row(i, named=True)
        if row.get("messages"):
            fields = [(turn["role"], turn_text(turn)) for turn in row["messages"]]
        else:
            fields = [(name, value) for name, value in row.items() if not name.startswith("_")]
        for k, (name, value) in enumerate(fields):
            head = f"{' ' * indent}{str(n) + '.' if k == 0 else '':<3} {name}: "
            text = " ".join(str(value).split())
            room = max(width - len(head), 12)
            lines.append(head + (text if len(text) <= room else text[:room - 3] + "..."))
    return lines


def turn_text(turn: dict) -> str:
    """A chat turn as one line: its text, or the tool calls it makes (``name(arguments)``)."""
    calls = turn.get("tool_calls")
    if calls:
        return "; ".join(f"{c['function']['name']}({c['function']['arguments']})" for c in calls)
    return turn.get("content") or ""


def format_examples(table: pl.DataFrame, count: int = 3, width: int = 110) -> str:
    """Up to ``count`` rows spread over the table, one line per chat turn or column, cut to ``width``."""
    if count <= 0 or table.height == 0:
        return ""
    shown = min(count, table.height)
    picks = [i * table.height // shown for i in range(shown)]  # distinct: the step is at least one row
    return "\n".join([f"{len(picks)} of the {table.height} rows:"] + format_rows(table, picks, width + 12))


PREVIEW_ROWS = 20  # kept rows a preview shows


def format_preview(recipe: Recipe, table: pl.DataFrame, result: RunResult, limit: int,
                   cache: str | None, width: int | None = None) -> str:
    """What ``factory preview`` prints: the rows (up to :data:`PREVIEW_ROWS`), the drops per step,
    and that nothing was written."""
    width = width or shutil.get_terminal_size((110, 24)).columns
    if recipe.source is None:
        read = "the recipe has no source, so --limit has nothing to cap: it ran whole"
    else:
        read = f"the first {result.source_rows} source rows (--limit {limit})"
    lines = [f"preview of {recipe.name}: {read} -> {table.height} rows in {result.seconds:.1f}s"]
    steps = [s.to_json() for s in result.steps]
    lines += format_steps(steps)
    lines += ["  " + line for line in truncation_lines(steps) + after_answer_lines(steps)]
    if recipe.output.rows is not None:
        lines.append(f"  (output.rows: {recipe.output.rows} is not applied in a preview)")
    if table.height:
        shown = min(PREVIEW_ROWS, table.height)
        lines.append(f"{'all ' if shown == table.height else 'the first '}{shown} of the {table.height} rows:")
        lines += format_rows(table, list(range(shown)), width)
    else:
        lines.append("no row survived every step; the drops above say where they went")
    kept = (f"; the LLM replies are cached in {cache}, so `factory run` reuses them" if cache else "")
    lines.append(f"preview: nothing was written (no dataset version){kept}")
    return "\n".join(lines)
