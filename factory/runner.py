"""The local runner: executes a recipe's steps in order on one machine.

Row steps run over batches of ``batch_size`` rows and global steps over the whole table.
Every batch's output is cached under a key made of the step's identity (class, config,
seed, model) and the batch's content, so a re-run -- or a run restarted after a crash --
reuses finished batches and redoes only the one that was in flight. Rows a step drops go
to the rejected table with the step and the reason.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field

import polars as pl

from .cache import Cache, NullCache, frame_digest
from .config import to_dict
from .errors import FactoryError
from .llm import create_backend, fingerprint
from .llm.client import LLMClient
from .steps.base import DROP, INTERNAL_PREFIX, Step, _NoProgress

BACKEND_FAILURES = {"backend_error"}
DEAD_BACKEND_BATCHES = 3  # batches in a row whose every row failed in the backend: stop


@dataclass
class StepStats:
    """What one step did: rows in and out, drops per reason, time, cache hits, LLM usage."""

    index: int
    name: str
    kind: str
    rows_in: int = 0
    rows_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    batches: int = 0
    cached_batches: int = 0
    llm: dict | None = None
    report: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"steps[{self.index}].{self.name}"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class RunResult:
    table: pl.DataFrame
    rejected: pl.DataFrame
    steps: list[StepStats]
    seconds: float
    source_rows: int = 0  # rows the source gave the first step
    source_dropped: dict[str, int] = field(default_factory=dict)  # rows set aside while reading


def split_dropped(frame: pl.DataFrame, label: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Splits a step's output into kept rows and dropped rows.

    Internal columns (``_drop_reason``, ``_raw_reply``, ``_duplicate_of``...) say why a row
    went: kept rows lose them, dropped rows keep them without the underscore.
    """
    if DROP not in frame.columns:
        frame = frame.with_columns(pl.lit(None, dtype=pl.String).alias(DROP))
    internal = [c for c in frame.columns if c.startswith(INTERNAL_PREFIX)]
    kept = frame.filter(pl.col(DROP).is_null()).drop(internal)
    dropped = frame.filter(pl.col(DROP).is_not_null())
    dropped = dropped.rename({c: c[len(INTERNAL_PREFIX):] for c in internal
                              if c[len(INTERNAL_PREFIX):] not in dropped.columns})
    dropped = dropped.drop([c for c in dropped.columns if c.startswith(INTERNAL_PREFIX)])
    return kept, dropped.with_columns(pl.lit(label).alias("drop_step"))


class LocalRunner:
    """Runs a recipe in this process.

    Args:
        cache: where finished batches and LLM replies are kept (None: no cache).
        progress: show a progress bar per step on stderr.
        backend_factory: builds a backend from a validated llm config (tests inject
            scripted backends here).
    """

    def __init__(self, cache: Cache | None = None, *, progress: bool = True, backend_factory=create_backend):
        self.cache = cache or NullCache()
        self.progress = progress
        self.backend_factory = backend_factory
        self.backends: dict[str, object] = {}

    def backend_for(self, llm_config):
        key = fingerprint(to_dict(llm_config))
        if key not in self.backends:
            self.backends[key] = self.backend_factory(llm_config)
        return self.backends[key]

    def preflight(self, recipe) -> None:
        """Checks every backend the recipe uses (server reachable, GPU present) before any work."""
        for step in recipe.steps:
            if step.uses_llm:
                self.backend_for(step.llm_config).check()

    def run(self, recipe, table: pl.DataFrame | None = None) -> RunResult:
        """Runs all steps of ``recipe`` on ``table`` (default: the recipe's source)."""
        start = time.perf_counter()
        rejected_parts: list[pl.DataFrame] = []
        if table is None:
            table = recipe.source.read() if recipe.source else pl.DataFrame()
            if recipe.source and recipe.source.rejected is not None:
                rejected_parts.append(recipe.source.rejected)
        source_rows = table.height
        source_dropped = (dict(rejected_parts[0]["drop_reason"].value_counts().iter_rows()) if rejected_parts else {})
        all_stats: list[StepStats] = []
        try:
            for step in recipe.steps:
                stats = StepStats(step.index, step.name, step.kind, rows_in=table.height)
                step.report = {}
                began = time.perf_counter()
                if step.uses_llm:
                    backend = self.backend_for(step.llm_config)
                    step.llm = LLMClient(backend, self.cache, seed=recipe.seed)
                    retries_before = backend.stats.retries
                    reasons_before = dict(backend.stats.retry_reasons)
                if step.kind == "global":
                    kept, dropped = self._run_global(step, table, stats)
                else:
                    kept, dropped = self._run_rows(step, table, stats, recipe.header.batch_size,
                                                   recipe.header.max_failure_rate)
                stats.rows_out = kept.height
                stats.dropped = dict(sorted(dropped["drop_reason"].value_counts().iter_rows())) \
                    if dropped.height else {}
                stats.seconds = round(time.perf_counter() - began, 3)
                stats.report = step.report
                if step.uses_llm:
                    stats.llm = {**step.llm.backend.describe(), **asdict(step.llm.usage),
                                 "retries": backend.stats.retries - retries_before,
                                 "retry_reasons": _diff(backend.stats.retry_reasons, reasons_before)}
                all_stats.append(stats)
                if dropped.height:
                    rejected_parts.append(dropped)
                table = kept
        finally:
            for backend in self.backends.values():
                backend.close()
            self.backends.clear()
        rejected = pl.concat(rejected_parts, how="diagonal_relaxed") if rejected_parts else pl.DataFrame(
            schema={"drop_reason": pl.String, "drop_step": pl.String})
        return RunResult(table, rejected, all_stats, round(time.perf_counter() - start, 3), source_rows,
                         source_dropped)

    def _bar(self, step: Step, total: int | None):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"[{step.index}] {step.name}", unit="row", file=sys.stderr,
                    disable=not self.progress, dynamic_ncols=True, mininterval=0.5, leave=True)

    def _run_rows(self, step: Step, table: pl.DataFrame, stats: StepStats, batch_size: int,
                  max_failure_rate: float):
        step_key = step.fingerprint()
        batches = [table.slice(offset, batch_size) for offset in range(0, table.height, batch_size)]
        keys = [fingerprint([step_key, frame_digest(batch)]) for batch in batches]
        kept_parts, dropped_parts = [], []
        failures = processed = failed_batches_in_a_row = 0
        with self._bar(step, table.height) as bar:
            # The backend reports answered conversations while a batch runs, so the bar moves
            # within long batches; a step may send several per row, so the bar never runs past
            # the batch being computed (``current`` is its index, ``moved`` how far it went).
            current, moved = [0], [0]

            def advance(conversations: int) -> None:
                if current[0] < len(batches):
                    room = batches[current[0]].height - moved[0]
                    bar.update(min(conversations, room))
                    moved[0] += min(conversations, room)

            if step.llm is not None:
                step.llm.on_progress = advance
            try:
                for batch, out in zip(batches, self._batch_outputs(step, batches, keys, stats)):
                    stats.batches += 1
                    kept, dropped = split_dropped(out, stats.label)
                    kept_parts.append(kept)
                    dropped_parts.append(dropped)
                    processed += batch.height
                    if step.uses_llm:
                        failed = dropped.filter(pl.col("drop_reason").is_in(BACKEND_FAILURES)).height
                        failures += failed
                        failed_batches_in_a_row = failed_batches_in_a_row + 1 if failed == batch.height else 0
                        # Stop as soon as the step's share of failures is bound to exceed the limit,
                        # or when the backend failed every row of several batches running (it is down).
                        if (failures > max_failure_rate * table.height
                                or failed_batches_in_a_row >= DEAD_BACKEND_BATCHES):
                            _stop_on_failures(stats, failures, processed, max_failure_rate, dropped)
                    bar.update(batch.height - moved[0])
                    current[0], moved[0] = current[0] + 1, 0
                    if step.llm is not None:
                        bar.set_postfix_str(_usage_text(step.llm.usage, bar), refresh=False)
            finally:
                if step.llm is not None:
                    step.llm.on_progress = None
        if not kept_parts:
            return split_dropped(table.clear(), stats.label)
        return (pl.concat(kept_parts, how="diagonal_relaxed"),
                pl.concat(dropped_parts, how="diagonal_relaxed"))

    def _batch_outputs(self, step: Step, batches: list[pl.DataFrame], keys: list[str], stats: StepStats):
        """Each batch's output, in order: from the cache, or computed (and cached) now."""
        for batch, key in zip(batches, keys):
            out = self.cache.get_frame("steps", key)
            if out is None:
                out = step.process(batch)
                check_output(step, out)
                self.cache.put_frame("steps", key, out)
            else:
                stats.cached_batches += 1
            yield out

    def _run_global(self, step: Step, table: pl.DataFrame, stats: StepStats):
        key = fingerprint([step.fingerprint(), frame_digest(table)])
        out = self.cache.get_frame("steps", key)
        stats.batches = 1
        if out is not None:
            step.report = self.cache.get_json("reports", key) or {}
        if out is None:
            with self._bar(step, None) as bar:
                step.progress = bar
                try:
                    out = self._process_global(step, table)
                finally:
                    step.progress = _NoProgress()
            check_output(step, out)
            self.cache.put_json("reports", key, step.report)
            self.cache.put_frame("steps", key, out)
        else:
            stats.cached_batches = 1
        return split_dropped(out, stats.label)


    def _process_global(self, step: Step, table: pl.DataFrame) -> pl.DataFrame:
        """Runs a global step on the whole table (a distributed runner spreads it instead)."""
        return step.process(table)


def check_output(step: Step, out) -> None:
    if not isinstance(out, pl.DataFrame):
        raise TypeError(f"{type(step).__name__}.process returned {type(out).__name__}, not a polars DataFrame")


def _stop_on_failures(stats: StepStats, failures: int, processed: int, rate: float, dropped: pl.DataFrame) -> None:
    if failures:
        detail = ""
        if "drop_detail" in dropped.columns:
            details = dropped.filter(pl.col("drop_reason").is_in(BACKEND_FAILURES))["drop_detail"].drop_nulls()
            detail = f" (last error: {details[-1]})" if len(details) else ""
        raise FactoryError(f"{stats.label}: {failures} of {processed} rows failed in the backend{detail}; "
                           f"stopping rather than writing a hollow dataset (max_failure_rate={rate}). Fix the "
                           "backend and run the same command again: finished batches are cached")


def _usage_text(usage, bar) -> str:
    elapsed = bar.format_dict.get("elapsed") or 0
    rate = usage.completion_tokens / elapsed if elapsed else 0
    return f"{usage.completion_tokens} tok, {rate:.0f} tok/s"


def _diff(now: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}
