"""Running a recipe end to end: source -> steps -> output columns -> a new dataset version.

Also the preview (the recipe on the first rows of its source, nothing written) and what the
command line prints of a run: the per-step summary, LLM usage and cost, and example rows.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from .budget import usd
from .cache import Cache, NullCache
from .errors import FactoryError
from .driver import Driver, RunResult
from .recipe_model import OutputConfig, Recipe, output_format
from .store import STOPPED, read_manifest, target_line, truncation_lines, write_version


def chat_messages(table: pl.DataFrame, output: OutputConfig, task_column: str = "instruction",
                  input_column: str = "input", response_column: str = "response") -> pl.DataFrame:
    """Adds the canonical ``messages`` column (system?, user task, assistant response)."""
    if response_column not in table.columns or task_column not in table.columns:
        if "messages" in table.columns:
            return table
        raise FactoryError(f"output.format 'messages' needs columns '{task_column}' and '{response_column}', "
                           f"and the final table has {', '.join(table.columns) or 'none'}; "
                           "set `output: {format: raw}`")
    user = pl.col(task_column).cast(pl.String)
    if input_column in table.columns:
        extra = pl.col(input_column).cast(pl.String)
        user = pl.when(extra.is_not_null() & (extra.str.strip_chars() != "")).then(
            pl.concat_str([user, pl.lit("\n\n"), extra])).otherwise(user)
    turns = [("system", pl.lit(output.system_prompt, dtype=pl.String))] if output.system_prompt else []
    turns += [("user", user), ("assistant", pl.col(response_column).cast(pl.String))]
    return table.with_columns(_turns_list(table, turns).alias("messages"))


def _turns_list(table: pl.DataFrame, turns: list[tuple[str, pl.Expr]]) -> pl.Series:
    """Per row, the list of ``{role, content}`` structs of ``turns`` (role, content expression):
    what ``pl.concat_list`` of one struct per turn gives, built by gathering the structs of all
    turns into row order (polars concatenates lists of structs row by row, many times slower)."""
    k = len(turns)
    structs = table.select(pl.struct(role=pl.lit(role, dtype=pl.String), content=content).alias(f"turn{i}")
                           for i, (role, content) in enumerate(turns))
    stacked = pl.concat([structs.to_series(i).alias("messages") for i in range(k)])  # every row's turn 0, then 1...
    order = (np.arange(table.height)[:, None] + np.arange(k) * table.height).ravel()  # row by row
    return stacked.gather(order).reshape((table.height, k)).arr.to_list()


def finalize(table: pl.DataFrame, output: OutputConfig, written_as: str) -> pl.DataFrame:
    """Shapes the final table as ``output`` asks, in format ``written_as`` (``output_format`` resolved)."""
    if written_as == "messages" and table.width:
        table = chat_messages(table, output)
    if output.columns:
        keep = [c for c in output.columns if c in table.columns]
        if "messages" in table.columns and "messages" not in keep:
            keep.append("messages")
        table = table.select(keep)
    return table


def output_table(recipe: Recipe, table: pl.DataFrame) -> tuple[pl.DataFrame, str]:
    """The final table shaped as the recipe's ``output`` asks, and the format it is written in."""
    if table.height == 0:
        # Every row was dropped: keep the declared columns so the version still has a schema.
        table = table.with_columns(pl.lit(None, dtype=pl.String).alias(c) for c in recipe.columns_after()
                                   if c not in table.columns)
    written_as = output_format(recipe.output, table.columns)
    return finalize(table, recipe.output, written_as), written_as


def run_recipe(recipe: Recipe, out_dir: str | Path, *, cache_dir: str | Path | None = None, use_cache: bool = True,
               progress: bool = True, parent: str | None = None, driver: Driver | None = None,
               extra_manifest: dict | None = None, on_pass=None) -> tuple[Path, dict, RunResult]:
    """Runs ``recipe`` and writes ``out_dir/<name>/v<N>``.

    A recipe with ``output.rows`` runs until that many rows survive (see
    :meth:`~factory.driver.Driver.run_to_target`); ``on_pass(line)`` hears of each pass
    (default: a line on stderr when the driver shows progress).

    Returns:
        The version folder, its manifest, and the run result.
    """
    out_dir = Path(out_dir)
    if driver is None:
        cache: Cache = Cache(cache_dir or out_dir / ".cache") if use_cache else NullCache()
        driver = Driver(cache, progress=progress)
    driver.preflight(recipe)
    began = time.time()
    if recipe.output.rows is None:
        result = driver.run(recipe)
    else:
        if on_pass is None and driver.progress:
            def on_pass(line: str) -> None:
                print(line, file=sys.stderr, flush=True)
        result = driver.run_to_target(recipe, recipe.output.rows, recipe.output.max_candidates, on_pass)
    table, written_as = output_table(recipe, result.table)
    models = []
    for step in recipe.steps:
        if step.uses_llm:
            stats = next(s for s in result.steps if s.index == step.index)
            models.append({"step": f"steps[{step.index}].{step.name}", **{k: stats.llm[k] for k in
                          ("backend", "model", "adapter", "model_id")}})
    default = recipe.llm
    usage = usage_by_model(result.steps, recipe.prices)
    manifest = {
        "recipe": recipe.resolved(),
        "recipe_hash": recipe.hash,
        "recipe_file": recipe.file,
        "overrides": recipe.overrides,
        "parent": parent or (recipe.source.parent_version() if recipe.source else None),
        "source": ({**recipe.source.describe(), "rows_read": result.source_rows + sum(result.source_dropped.values()),
                    "dropped": result.source_dropped} if recipe.source else None),
        "backend": default.backend,
        "model": getattr(default, "model", None),
        "adapter": getattr(default, "adapter", None),
        "models": models,
        "seed": recipe.seed,
        "steps": priced_steps([s.to_json() for s in result.steps], recipe.prices),
        "usage": usage,
        **({"cost_usd": round(sum(m.get("cost_usd", 0.0) for m in usage.values()), 6)} if recipe.prices else {}),
        **({"target_rows": result.target} if result.target is not None else {}),
        "retries": sum((s.llm or {}).get("retries", 0) for s in result.steps),
        "throttled": sum((s.llm or {}).get("throttled", 0) for s in result.steps),
        "backend_failures": sum(s.dropped.get("backend_error", 0) for s in result.steps),
        "output_format": written_as,
        "timings": {"started_at": began, "run_seconds": result.seconds},
        "executor": driver.executor.name,
        **(extra_manifest or {}),
    }
    version_dir = write_version(out_dir, recipe.name, table, result.rejected, manifest,
                                shard_rows=recipe.output.shard_rows)
    return version_dir, read_manifest(version_dir), result


# -- LLM usage and cost ---------------------------------------------------------------------

def cost_usd(prompt_tokens: int, completion_tokens: int, price, batched: bool = False) -> float:
    """The cost of tokens sent to and generated by a model at ``price`` (USD per 1M tokens; a Batch
    API request pays ``price.batch`` of it), to the micro-dollar."""
    return round(usd(prompt_tokens, completion_tokens, price, batched), 6)


def model_key(llm: dict) -> str:
    """How the manifest's ``usage`` names a step's model: ``backend:model`` (``+adapter`` when one)."""
    key = f"{llm.get('backend')}:{llm.get('model')}"
    return key + (f"+{llm['adapter']}" if llm.get("adapter") else "")


def priced_steps(steps: list[dict], prices: dict) -> list[dict]:
    """Step entries with ``cost_usd`` in the LLM facts of each step whose model has a price."""
    for s in steps:
        llm = s.get("llm")
        if llm and str(llm.get("model")) in prices:
            llm["cost_usd"] = cost_usd(llm["prompt_tokens"], llm["completion_tokens"], prices[str(llm["model"])],
                                       bool(llm.get("batch")))
    return steps


def usage_by_model(steps, prices: dict) -> dict[str, dict]:
    """LLM usage summed per model over the steps (:class:`~factory.driver.StepStats`): tokens sent to
    the backend (a reply from the cache costs nothing), requests and how many the cache answered,
    and ``cost_usd`` for a model with a price (each step's tokens at its price: batch or not)."""
    totals: dict[str, dict] = {}
    for s in steps:
        if not s.llm:
            continue
        entry = totals.setdefault(model_key(s.llm), {
            "backend": s.llm.get("backend"), "model": s.llm.get("model"), "model_id": s.llm.get("model_id"),
            "steps": [], "prompt_tokens": 0, "completion_tokens": 0, "conversations": 0, "cached_conversations": 0})
        entry["steps"].append(s.label)
        for name in ("prompt_tokens", "completion_tokens", "conversations", "cached_conversations"):
            entry[name] += s.llm.get(name, 0)
        price = prices.get(str(entry["model"]))
        if price is not None:
            entry["cost_usd"] = round(entry.get("cost_usd", 0.0) + cost_usd(
                s.llm.get("prompt_tokens", 0), s.llm.get("completion_tokens", 0), price, bool(s.llm.get("batch"))), 6)
    return totals


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


# -- what the command line prints -----------------------------------------------------------

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
    lines += ["  " + line for line in truncation_lines(steps)]
    if manifest.get("target_rows"):
        lines.append("  " + target_line(manifest["target_rows"], manifest["rows"]))
    written = manifest.get("output_format")
    if written == "messages":
        lines.append("  written as chat `messages` (user task, assistant response) beside the kept columns")
    elif written == "raw":
        lines.append("  written as the rows are (no task and response columns for chat `messages`)")
    lines += ["  " + line for line in usage_lines(manifest)]
    return "\n".join(lines)


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
            drops.append(f"steps[{s['index']}].{s['name']} dropped {s['rows_in'] - s['rows_out']} of {s['rows_in']} "
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
            fields = [(turn["role"], turn["content"]) for turn in row["messages"]]
        else:
            fields = [(name, value) for name, value in row.items() if not name.startswith("_")]
        for k, (name, value) in enumerate(fields):
            head = f"{' ' * indent}{str(n) + '.' if k == 0 else '':<3} {name}: "
            text = " ".join(str(value).split())
            room = max(width - len(head), 12)
            lines.append(head + (text if len(text) <= room else text[:room - 3] + "..."))
    return lines


def format_examples(table: pl.DataFrame, count: int = 3, width: int = 110) -> str:
    """Up to ``count`` rows spread over the table, one line per chat turn or column, cut to ``width``."""
    if count <= 0 or table.height == 0:
        return ""
    shown = min(count, table.height)
    picks = [i * table.height // shown for i in range(shown)]  # distinct: the step is at least one row
    return "\n".join([f"{len(picks)} of the {table.height} rows:"] + format_rows(table, picks, width + 12))


# -- preview ----------------------------------------------------------------------------------

PREVIEW_ROWS = 20  # kept rows a preview shows


def preview_recipe(recipe: Recipe, driver: Driver, limit: int) -> tuple[pl.DataFrame, RunResult]:
    """Runs ``recipe`` on the first ``limit`` rows of its source and writes no version.

    The driver's cache is used as in a full run, and every reply is also kept under its own
    key, so the full run afterwards sends only the requests the preview did not.

    Returns:
        The rows as a version would hold them (output format and columns applied), and the run result.
    """
    driver.preflight(recipe)
    result = driver.run(recipe, limit=limit)
    return output_table(recipe, result.table)[0], result


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
    lines += format_steps([s.to_json() for s in result.steps])
    lines += ["  " + line for line in truncation_lines([s.to_json() for s in result.steps])]
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

