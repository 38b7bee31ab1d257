"""Running a recipe end to end: source -> steps -> output columns -> a new dataset version."""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl

from .cache import Cache, NullCache
from .errors import FactoryError
from .driver import Driver, RunResult
from .recipe import OutputConfig, Recipe, output_format
from .store import read_manifest, truncation_lines, write_version


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
    turns = []
    if output.system_prompt:
        turns.append(pl.struct(role=pl.lit("system"), content=pl.lit(output.system_prompt)))
    turns += [pl.struct(role=pl.lit("user"), content=user),
              pl.struct(role=pl.lit("assistant"), content=pl.col(response_column).cast(pl.String))]
    return table.with_columns(pl.concat_list(turns).alias("messages"))


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


def run_recipe(recipe: Recipe, out_dir: str | Path, *, cache_dir: str | Path | None = None, use_cache: bool = True,
               progress: bool = True, parent: str | None = None, driver: Driver | None = None,
               extra_manifest: dict | None = None) -> tuple[Path, dict, RunResult]:
    """Runs ``recipe`` and writes ``out_dir/<name>/v<N>``.

    Returns:
        The version folder, its manifest, and the run result.
    """
    out_dir = Path(out_dir)
    if driver is None:
        cache: Cache = Cache(cache_dir or out_dir / ".cache") if use_cache else NullCache()
        driver = Driver(cache, progress=progress)
    driver.preflight(recipe)
    began = time.time()
    result = driver.run(recipe)
    table = result.table
    if table.height == 0:
        # Every row was dropped: keep the declared columns so the version still has a schema.
        table = table.with_columns(pl.lit(None, dtype=pl.String).alias(c) for c in recipe.columns_after()
                                   if c not in table.columns)
    written_as = output_format(recipe.output, table.columns)
    table = finalize(table, recipe.output, written_as)
    models = []
    for step in recipe.steps:
        if step.uses_llm:
            stats = next(s for s in result.steps if s.index == step.index)
            models.append({"step": f"steps[{step.index}].{step.name}", **{k: stats.llm[k] for k in
                          ("backend", "model", "adapter", "model_id")}})
    default = recipe.llm
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
        "steps": [s.to_json() for s in result.steps],
        "retries": sum((s.llm or {}).get("retries", 0) for s in result.steps),
        "backend_failures": sum(s.dropped.get("backend_error", 0) for s in result.steps),
        "output_format": written_as,
        "timings": {"started_at": began, "run_seconds": result.seconds},
        "executor": driver.executor.name,
        **(extra_manifest or {}),
    }
    version_dir = write_version(out_dir, recipe.name, table, result.rejected, manifest,
                                shard_rows=recipe.output.shard_rows)
    return version_dir, read_manifest(version_dir), result


def format_summary(manifest: dict) -> str:
    """A short per-step table: rows in, out, and dropped by reason."""
    steps = manifest.get("steps", [])
    width = max([len(f"[{s['index']}] {s['name']}") for s in steps] + [4])
    lines = [f"{manifest['name']} v{manifest['version']}: {manifest['rows']} rows "
             f"({manifest['rejected_rows']} dropped) in {manifest['timings']['run_seconds']:.1f}s",
             f"  {'step':<{width}}  {'in':>7}  {'out':>7}  {'secs':>7}  dropped"]
    for s in steps:
        dropped = ", ".join(f"{k}={v}" for k, v in s["dropped"].items()) or "-"
        cached = f"  (cached {s['cached_batches']}/{s['batches']})" if s["cached_batches"] else ""
        lines.append(f"  {'[' + str(s['index']) + '] ' + s['name']:<{width}}  {s['rows_in']:>7}  {s['rows_out']:>7}  "
                     f"{s['seconds']:>7.1f}  {dropped}{cached}")
    lines += ["  " + line for line in truncation_lines(steps)]
    written = manifest.get("output_format")
    if written == "messages":
        lines.append("  written as chat `messages` (user task, assistant response) beside the kept columns")
    elif written == "raw":
        lines.append("  written as the rows are (no task and response columns for chat `messages`)")
    return "\n".join(lines)


def format_examples(table: pl.DataFrame, count: int = 3, width: int = 110) -> str:
    """Up to ``count`` rows spread over the table, one line per chat turn or column, cut to ``width``."""
    if count <= 0 or table.height == 0:
        return ""
    shown = min(count, table.height)
    picks = [i * table.height // shown for i in range(shown)]  # distinct: the step is at least one row
    lines = [f"{len(picks)} of the {table.height} rows:"]
    for n, i in enumerate(picks, 1):
        row = table.row(i, named=True)
        if row.get("messages"):
            fields = [(turn["role"], turn["content"]) for turn in row["messages"]]
        else:
            fields = [(name, value) for name, value in row.items() if not name.startswith("_")]
        for k, (name, value) in enumerate(fields):
            text = " ".join(str(value).split())
            text = text if len(text) <= width else text[:width - 3] + "..."
            lines.append(f"  {str(n) + '.' if k == 0 else '':<3} {name}: {text}")
    return "\n".join(lines)

