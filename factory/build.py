"""Running a recipe: source -> steps -> output columns -> a new dataset version, or a preview of it.

The manifest a version records is assembled in :mod:`factory.manifest`; what the command line
prints of a run or a preview, in :mod:`factory.printing`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from .cache import Cache, NullCache
from .errors import FactoryError
from .driver import Driver, RunResult
from .manifest import run_manifest
from .recipe_model import OutputConfig, Recipe, output_format
from .store import read_manifest, write_version


def chat_messages(table: pl.DataFrame, output: OutputConfig, task_column: str = "instruction",
                  input_column: str = "input", response_column: str = "response") -> pl.DataFrame:
    """Adds the canonical ``messages`` column (system?, user task, assistant response), unless a
    step wrote one (a conversation of several turns: its first turn is in the task and response
    columns too, and must not replace it)."""
    if "messages" in table.columns:
        return table
    if response_column not in table.columns or task_column not in table.columns:
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
    manifest = run_manifest(recipe, result, written_as, started_at=began, executor=driver.executor.name,
                            parent=parent, extra=extra_manifest, table=table)
    version_dir = write_version(out_dir, recipe.name, table, result.rejected, manifest,
                                shard_rows=recipe.output.shard_rows)
    return version_dir, read_manifest(version_dir), result


# -- preview ----------------------------------------------------------------------------------

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
