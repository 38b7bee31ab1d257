"""The driver: walks a recipe's steps, hands their work to an executor, keeps the stats.

Row steps run over batches of ``batch_size`` rows and global steps over the whole table.
Every batch's output (and its report) is cached under a key made of the step's identity
(class, config, seed, model) and the batch's content, so a re-run -- or a run restarted
after a crash -- reuses finished batches and redoes only the one that was in flight; the
LLM replies of that batch are journaled one by one (:mod:`factory.llm.requests`), so even
it resends only the requests that had not been answered. Rows a step drops go to the
rejected table with the step and the reason.

The executor (:mod:`factory.executors`) decides where the work runs: in this process, or
on a Ray cluster. It never looks inside a step or a backend; everything it runs goes
through :func:`factory.executors.base.run_batch` and the step's own ``process``.

Two runs read only a prefix of the source: a preview (:meth:`Driver.run` with ``limit``) and
a run that must make exactly ``output.rows`` rows (:meth:`Driver.run_to_target`), which walks
the whole recipe on a growing prefix until enough rows survive -- global steps (dedup, majority
votes) still see the whole table. Both keep each LLM reply under its own key too
(``Cache.keep_each_reply``), so the next pass, or the full run after a preview, sends only the
requests that were never answered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import polars as pl

from .budget import Budget, BudgetReached
from .cache import Cache, NullCache, frame_digest
from .errors import BackendError, FactoryError
from .executors.base import Executor, check_output
from .executors.local import LocalExecutor
from .hashing import fingerprint
from .llm import create_backend
from .llm.base import watching_loads
from .llm.requests import BackendPool, LLMSession, Usage
from .steps.context import StepContext, merge_reports
from .steps.drops import DROP, INTERNAL_PREFIX
from .steps.truncation import count_kept_cut, note_kept_cut, truncation_facts

BACKEND_FAILURES = {"backend_error"}
DEAD_BACKEND_BATCHES = 3  # batches in a row whose every row failed in the backend: stop


@dataclass
class StepStats:
    """What one step did: rows in and out, drops per reason, time, cache hits, LLM usage."""

    index: int
    name: str
    label: str  # the step's (steps[i].name), taken from it; readers of a manifest get it with store.step_label
    kind: str
    rows_in: int = 0
    rows_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    batches: int = 0
    cached_batches: int = 0
    llm: dict | None = None
    report: dict = field(default_factory=dict)
    truncation: dict | None = None  # replies cut at max_tokens (see :func:`truncation_facts`)
    acceptance: float | None = None  # rows out / rows in (above 1 for a step that makes several rows of one)

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
    target: dict | None = None  # how a run to `output.rows` went (see :meth:`Driver.run_to_target`)


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


YOUNG_OBJECTS = 10_000  # allocations between the garbage collector's young collections during a run


@contextlib.contextmanager
def fewer_collections(young: int = YOUNG_OBJECTS):
    """Python's cyclic garbage collector runs less often inside (its first threshold raised to
    ``young``, from 700), and as it did after.

    A batch's rows, requests and replies live while the batch runs: at 700 allocations between
    collections they outlive several, reach the oldest generation, and soon make the collector
    walk every object of the process (about 50 times in a 100,000-row run of five steps, a
    seventh of its time). At 10,000 they are mostly gone before the next one. Nothing a run
    computes depends on when garbage is collected; unreachable cycles wait a little longer.
    """
    before = gc.get_threshold()
    if not 0 < before[0] < young:  # the collector off (0), or already as patient
        yield
        return
    gc.set_threshold(young, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def split_batches(outputs: list[pl.DataFrame], label: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """:func:`split_dropped` of each batch's output, the kept parts and the dropped parts each
    concatenated. Outputs of one schema (the usual case) are concatenated first and split once,
    which gives the same frames."""
    first = outputs[0].schema
    if all(out.schema == first for out in outputs):
        return split_dropped(pl.concat(outputs, how="vertical"), label)
    kept, dropped = zip(*(split_dropped(out, label) for out in outputs))
    return pl.concat(kept, how="diagonal_relaxed"), pl.concat(dropped, how="diagonal_relaxed")


def count_backend_failures(frame: pl.DataFrame) -> int:
    """The rows of a step's output that :func:`split_dropped` drops for a reason in :data:`BACKEND_FAILURES`."""
    if DROP not in frame.columns or frame[DROP].null_count() == frame.height:
        return 0
    reason = frame["drop_reason" if "drop_reason" in frame.columns else DROP]  # the name split_dropped keeps
    return int((frame[DROP].is_not_null() & reason.is_in(list(BACKEND_FAILURES))).sum())


class Driver:
    """Runs a recipe, step after step, on an executor.

    Args:
        cache: where finished batches and LLM replies are kept (None: no cache).
        executor: where the work runs (default: this process).
        progress: show a progress bar per step on stderr.
        backend_factory: builds a backend from a validated llm config (tests inject
            scripted backends here).
    """

    def __init__(self, cache: Cache | None = None, *, executor: Executor | None = None, progress: bool = True,
                 backend_factory=create_backend):
        self.cache = cache or NullCache()
        self.executor = executor or LocalExecutor()
        self.progress = progress
        self.backends = BackendPool(backend_factory)
        self.budget: Budget | None = None  # the spending limit of the run under way (every pass of it)
        self._rows_done = 0  # rows of the row step under way whose batches are done (for the budget's line)
        self.ledger: dict[int, list] | None = None  # step index -> tokens of each reply (factory estimate)

    def preflight(self, recipe) -> None:
        """Checks every backend the recipe uses (server reachable, GPU present) before any work."""
        for step in recipe.steps:
            if step.uses_llm:
                for name, config in [(None, step.llm_config), *step.extra_llm_configs.items()]:
                    backend = self.backends.get(config)
                    backend.check()
                    step.check_backend(backend, name)

    def run(self, recipe, table: pl.DataFrame | None = None, *, limit: int | None = None) -> RunResult:
        """Runs all steps of ``recipe`` on ``table`` (default: the recipe's source).

        Args:
            limit: read only the source's first ``limit`` rows (a preview). The replies are kept
                one by one as well, so that the full run afterwards reuses them.
        """
        if limit is not None and recipe.source is not None and table is None:
            recipe = dataclasses.replace(recipe, source=recipe.source.first(limit))
        with self._open(recipe), self._keeping_replies(limit is not None):
            return self._walk(recipe, table)

    def run_steps(self, steps: list, table: pl.DataFrame, *, seed: int = 0, batch_size: int = 64,
                  max_failure_rate: float = 0.5) -> RunResult:
        """Runs ``steps`` over ``table`` as a recipe's steps run: the batch cache, the failure
        stop, progress, usage and truncation counts, the backends opened once and closed after.
        For callers that hold steps rather than a recipe (the evaluations of
        :mod:`factory.evolve.evaluate`); ``seed``, ``batch_size`` and ``max_failure_rate`` are
        what a recipe's header would give."""
        with self._open(None), self._keeping_replies(False):
            return self._walk_steps(steps, table, seed, batch_size, max_failure_rate)

    def run_to_target(self, recipe, rows: int, max_candidates: int,
                      on_pass: Callable[[str], None] | None = None) -> RunResult:
        """Runs ``recipe`` on a growing prefix of its source until ``rows`` rows survive every step,
        or ``max_candidates`` source rows were used, or the source ran out.

        Each pass walks the whole recipe on the first k source rows, so global steps see the
        whole table; what earlier passes computed comes back from the cache. After a pass that
        kept ``kept`` of ``k`` candidates, the next reads ``k + ceil((rows - kept) / (kept / k) * 1.2)``
        (twice as many when none was kept), at most ``max_candidates``. Of more than ``rows``
        survivors the first ``rows`` (in source order) are kept; the others (the surplus) are
        neither written nor rejected.

        The result's steps are the last pass's, with each step's LLM usage and seconds summed
        over all passes (tokens are what was sent to the backend, so a cached reply counts once);
        its ``target`` says how it went: ``rows``, ``max_candidates``, ``candidates`` (source rows
        fed into the steps in the last pass), ``passes``, ``reached``, ``surplus``, ``stopped``
        (``reached``, ``max_candidates`` or ``source_exhausted``) and the ``history`` of passes.
        """
        if recipe.source is None:
            raise FactoryError(f"{recipe.file}: output.rows reads the source until {rows} rows survive, and the "
                               "recipe has no `source:`; add one, or remove output.rows")
        say = on_pass or (lambda line: None)
        began = time.perf_counter()
        k = min(rows, max_candidates)
        history: list[dict] = []
        usage: dict[int, Usage] = {}
        seconds: dict[int, float] = {}
        with self._open(recipe), self._cache_for_passes(), self._keeping_replies(True):
            while True:
                # A generator source makes rows past its num_rows: output.rows decides how many.
                result = self._walk(dataclasses.replace(recipe, source=recipe.source.first(k, grow=True)))
                for stats in result.steps:
                    seconds[stats.index] = seconds.get(stats.index, 0.0) + stats.seconds
                    if stats.llm is not None:
                        usage.setdefault(stats.index, Usage()).add(usage_of(stats.llm))
                kept, candidates = result.table.height, result.source_rows
                history.append({"candidates": candidates, "rows": kept})
                say(f"pass {len(history)}: {candidates} candidates -> {min(kept, rows)} rows of {rows}"
                    + (f" (+{kept - rows} surplus)" if kept > rows else ""))
                if kept >= rows:
                    stopped = "reached"
                elif candidates < k:  # the source gave fewer rows than asked for: it has no more
                    stopped = "source_exhausted"
                elif k >= max_candidates:
                    stopped = "max_candidates"
                else:
                    k = min(max_candidates, next_candidates(k, kept, rows, candidates))
                    continue
                break
        for stats in result.steps:
            stats.seconds = round(seconds[stats.index], 3)
            if stats.index in usage:
                stats.llm = with_usage(stats.llm, usage[stats.index].to_json())
        surplus = max(0, result.table.height - rows)
        result.table = result.table.head(rows)
        result.seconds = round(time.perf_counter() - began, 3)
        result.target = {"rows": rows, "max_candidates": max_candidates, "candidates": candidates,
                         "passes": len(history), "reached": stopped == "reached", "surplus": surplus,
                         "stopped": stopped, "history": history}
        return result

    @contextlib.contextmanager
    def _cache_for_passes(self):
        """The passes of a run to ``output.rows`` need a cache even without one (``--no-cache``), or
        each pass would ask the model again for every row of the one before: a temporary one then."""
        if not isinstance(self.cache, NullCache):
            yield
            return
        before = self.cache
        with tempfile.TemporaryDirectory(prefix="factory-passes-") as folder:
            self.cache = Cache(folder)
            try:
                yield
            finally:
                self.cache = before

    @contextlib.contextmanager
    def _keeping_replies(self, on: bool):
        """Keeps each LLM reply under its own key too while inside (``Cache.keep_each_reply``)."""
        before = self.cache.keep_each_reply
        self.cache.keep_each_reply = before or on
        try:
            yield
        finally:
            self.cache.keep_each_reply = before

    @contextlib.contextmanager
    def _open(self, recipe):
        """The executor joined, the backends open and the budget counting for a run, or for every pass of one."""
        self.budget = Budget.for_recipe(recipe) if recipe is not None else None
        try:
            with self.executor, fewer_collections():
                yield
        finally:
            self.backends.close()
            self.budget = None

    def _walk(self, recipe, table: pl.DataFrame | None = None) -> RunResult:
        """One walk over a recipe's steps, from its source unless ``table`` (inside :meth:`_open`)."""
        source_rejected = None
        if table is None:
            table = recipe.source.read(self.cache, self.progress) if recipe.source else pl.DataFrame()
            source_rejected = recipe.source.rejected if recipe.source else None
        return self._walk_steps(recipe.steps, table, recipe.seed, recipe.header.batch_size,
                                recipe.header.max_failure_rate, source_rejected)

    def _walk_steps(self, steps: list, table: pl.DataFrame, seed: int, batch_size: int, max_failure_rate: float,
                    source_rejected: pl.DataFrame | None = None) -> RunResult:
        """One walk over ``steps`` from ``table`` (inside :meth:`_open`); ``source_rejected``: rows
        the source set aside while reading."""
        start = time.perf_counter()
        rejected_parts = [source_rejected] if source_rejected is not None else []
        source_rows = table.height
        source_dropped = (dict(rejected_parts[0]["drop_reason"].value_counts().iter_rows()) if rejected_parts else {})
        all_stats: list[StepStats] = []
        for step in steps:
            stats = StepStats(step.index, step.name, step.label, step.kind, rows_in=table.height)
            session = LLMSession(step.llm_config, self.cache, seed, self.backends, budget=self.budget,
                                 ledger=None if self.ledger is None else self.ledger.setdefault(step.index, []),
                                 extras=step.extra_llm_configs) if step.uses_llm else None
            usage = Usage() if session else None
            began = time.perf_counter()
            try:
                if step.kind == "global":
                    out = self._run_global(step, table, stats, session, usage)
                    kept, dropped = split_dropped(out, stats.label)
                else:
                    kept, dropped = self._run_rows(step, table, stats, session, usage, batch_size, max_failure_rate)
            except BudgetReached as stop:
                done = self._rows_done if step.kind == "row" else 0
                raise stop.at(f"{stats.label}: {done} of {table.height} rows done, so {table.height - done} or more "
                              "requests left" + (", and the steps after it" if step is not steps[-1] else "")
                              ) from None
            kept = with_columns_of(step, table, kept)
            stats.rows_out = kept.height
            stats.acceptance = round(kept.height / table.height, 4) if table.height else None
            stats.dropped = dict(sorted(dropped["drop_reason"].value_counts().iter_rows())) if dropped.height else {}
            stats.seconds = round(time.perf_counter() - began, 3)
            if session is not None:
                stats.llm = llm_facts(session, usage)
                stats.truncation = truncation_facts(step, stats)
            all_stats.append(stats)
            if dropped.height:
                rejected_parts.append(dropped)
            table = kept
        rejected = pl.concat(rejected_parts, how="diagonal_relaxed") if rejected_parts else pl.DataFrame(
            schema={"drop_reason": pl.String, "drop_step": pl.String})
        return RunResult(table, rejected, all_stats, round(time.perf_counter() - start, 3), source_rows,
                         source_dropped)

    def _step_key(self, step, session: LLMSession | None) -> str:
        # A step that asks for JSON where the backend enforces a schema (and prefills otherwise)
        # computes something else on each: the backend's capability is part of its identity.
        enforced = session.enforces_schema if session and getattr(step, "reads_fields", False) else None
        # A step's other models answer for its rows too (cache keys of steps with one model stay as they were).
        others = session.extra_model_ids() if session and session.extras else None
        return fingerprint([step.fingerprint(), session.model_id if session else None]
                           + ([enforced] if enforced is not None else []) + ([others] if others else []))

    @contextlib.contextmanager
    def _bar(self, step, total: int | None, eta: bool = True):
        """The step's progress bar; a model that loads while it is open (on its own lines, see
        :func:`~factory.llm.base.announcing_load`) is left out of its rate and elapsed time. Without
        ``eta`` it shows no rate and no time left until :func:`_show_eta`."""
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=f"[{step.index}] {step.name}", unit="row", file=sys.stderr,
                  disable=not self.progress, dynamic_ncols=True, mininterval=0.5, leave=True,
                  bar_format=None if eta else "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]") as bar:
            def loaded(seconds: float) -> None:
                if not bar.disable:  # a disabled bar keeps no clock
                    bar.start_t += seconds
                    bar.last_print_t += seconds

            with watching_loads(loaded):
                yield bar

    def _run_rows(self, step, table: pl.DataFrame, stats: StepStats, session, usage: Usage | None,
                  batch_size: int, max_failure_rate: float):
        step_key = self._step_key(step, session)
        # A Batch API answers a step at once, hours later: its rows go as one batch, not one job per 64 rows.
        size = max(1, table.height) if session is not None and session.batched else batch_size
        batches = [table.slice(offset, size) for offset in range(0, table.height, size)]
        keys = [fingerprint([step_key, frame_digest(batch)]) for batch in batches]
        outputs = [self.cache.get_frame("steps", key) for key in keys]
        reports = [self.cache.get_json("reports", key) or {} if out is not None else None
                   for key, out in zip(keys, outputs)]
        todo = [i for i, out in enumerate(outputs) if out is None]
        stats.batches, stats.cached_batches = len(batches), len(batches) - len(todo)
        failures = processed = failed_batches_in_a_row = kept_cut = 0
        self._rows_done = 0
        # A model in this process answers a batch's requests together, and its rows finish in a burst
        # at the batch's end: until a batch has ended, a time per row says nothing of the time left.
        together = session is not None and bool(todo) and session.batches_in_flight(size) <= 1
        computed_here = set(todo)
        with self._bar(step, table.height, eta=not together) as bar:
            # Replies move the bar while batches run (several at once, from other threads, on a
            # server); a step may send several requests per row, so a batch never moves it past its rows.
            shown = [0] * len(batches)
            lock = threading.Lock()
            live = _LiveText(bar, usage, session)

            def advance(count: int, j: int | None = None, i: int | None = None) -> None:
                i = todo[j] if i is None else i
                with lock:
                    count = min(count, batches[i].height - shown[i])
                    if count > 0:
                        bar.update(count)
                        shown[i] += count
                    live.maybe_show()

            computed = self.executor.map_batches(step, [(batches[i], keys[i]) for i in todo], self.cache, session,
                                                 advance)
            for i, batch in enumerate(batches):
                if outputs[i] is None:
                    outputs[i], facts = next(computed)
                    reports[i] = facts["report"]
                    if usage is not None:
                        usage.add(facts["usage"])
                kept_cut += count_kept_cut(outputs[i])
                processed += batch.height
                self._rows_done = processed
                if session is not None:
                    failed = count_backend_failures(outputs[i])
                    failures += failed
                    failed_batches_in_a_row = failed_batches_in_a_row + 1 if failed == batch.height else 0
                    # Stop as soon as the step's share of failures is bound to exceed the limit,
                    # or when the backend failed every row of several batches running (it is down).
                    if (failures > max_failure_rate * table.height
                            or failed_batches_in_a_row >= DEAD_BACKEND_BATCHES):
                        _stop_on_failures(stats, failures, processed, max_failure_rate,
                                          split_dropped(outputs[i], stats.label)[1])
                advance(batch.height, i=i)
                if together and i in computed_here and processed < table.height:
                    _show_eta(bar)  # the rows of finished batches, over the time they took
                live.maybe_show(force=True)
        stats.report = merge_reports(r for r in reports if r)
        note_kept_cut(stats, kept_cut)
        if not outputs:
            return split_dropped(table.clear(), stats.label)
        return split_batches(outputs, stats.label)

    def _run_global(self, step, table: pl.DataFrame, stats: StepStats, session, usage: Usage | None):
        key = fingerprint([self._step_key(step, session), frame_digest(table)])
        stats.batches = 1
        out = self.cache.get_frame("steps", key)
        if out is not None:
            stats.cached_batches = 1
            stats.report = self.cache.get_json("reports", key) or {}
            note_kept_cut(stats, count_kept_cut(out))
            return out
        with self._bar(step, None) as bar:
            ctx = StepContext(llm=session.client() if session else None, progress=bar)
            out = check_output(step, self.executor.run_global(step, table, ctx))
            if bar.n == 0:  # a step that counts nothing itself has seen every row once
                bar.total = table.height
                bar.update(table.height)
        stats.report = ctx.full_report()
        if usage is not None:
            usage.add(ctx.llm.total_usage())
            sent = usage.conversations - usage.cached_conversations
            if usage.failures and usage.failures >= sent:
                raise BackendError(f"{stats.label}: every one of its {sent} requests failed in the backend (last "
                                   f"error: {usage.last_error}); nothing was written. Fix the backend and run the "
                                   "same command again")
        if ctx.complete:  # a failure is never a result: a re-run asks the failed requests again
            self.cache.put_json("reports", key, stats.report)
            self.cache.put_frame("steps", key, out)
        note_kept_cut(stats, count_kept_cut(out))
        return out


USAGE_FIELDS = tuple(f.name for f in dataclasses.fields(Usage))
GROWTH_MARGIN = 1.2  # a pass of output.rows reads 20% more candidates than the acceptance so far says it needs


def llm_facts(session: LLMSession, usage: Usage) -> dict:
    """A step's ``llm`` entry in the manifest: its model and its usage (of all its models), and
    under ``llms`` each other model's description with its part of the usage."""
    return with_usage({**session.describe(), **({"llms": session.describe_extras()} if session.extras else {})},
                      usage.to_json())


def usage_of(facts: dict) -> dict:
    """The :class:`Usage` counts in a step's ``llm`` facts (:func:`llm_facts`), its other models' parts too."""
    usage = {name: facts[name] for name in USAGE_FIELDS if name in facts and name != "llms"}
    if facts.get("llms"):
        usage["llms"] = {llm: {k: v for k, v in part.items() if k in USAGE_FIELDS}
                         for llm, part in facts["llms"].items()}
    return usage


def with_usage(facts: dict, usage: dict) -> dict:
    """A step's ``llm`` facts with ``usage`` (a :meth:`Usage.to_json`) written over their counts,
    each other model's part over its entry in ``llms``."""
    parts = usage.pop("llms", None) or {}
    out = {**facts, **usage}
    if parts or "llms" in facts:
        out["llms"] = {name: {**facts.get("llms", {}).get(name, {}), **parts.get(name, {})}
                       for name in {**facts.get("llms", {}), **parts}}
    return out


def next_candidates(k: int, kept: int, rows: int, candidates: int) -> int:
    """How many source rows the next pass of ``output.rows`` reads, after a pass that kept ``kept``
    rows of ``candidates``: enough for the rows still missing at the acceptance seen so far, with a
    margin; twice as many when nothing was kept; always more than ``k``."""
    if kept == 0:
        return 2 * k
    rate = kept / max(candidates, 1)
    return max(k + 1, k + math.ceil((rows - kept) / rate * GROWTH_MARGIN))


def with_columns_of(step, before: pl.DataFrame, after: pl.DataFrame) -> pl.DataFrame:
    """``after`` with every column the step declares it outputs, null where the step wrote
    none (an empty output, or rows that all lacked it), so no later step misses a column."""
    missing = [c for c in step.columns_after(before.columns) if c not in after.columns]
    return after.with_columns(pl.lit(None).alias(c) for c in missing) if missing else after


def _stop_on_failures(stats: StepStats, failures: int, processed: int, rate: float, dropped: pl.DataFrame) -> None:
    if failures:
        detail = ""
        if "drop_detail" in dropped.columns:
            details = dropped.filter(pl.col("drop_reason").is_in(BACKEND_FAILURES))["drop_detail"].drop_nulls()
            detail = f" (last error: {details[-1]})" if len(details) else ""
        raise BackendError(f"{stats.label}: {failures} of {processed} rows failed in the backend{detail}; "
                           f"stopping rather than writing a hollow dataset (max_failure_rate={rate}). Fix the "
                           "backend and run the same command again: finished batches are cached")


def _show_eta(bar) -> None:
    """A bar made without ``eta`` shows its rate and time left from now on: the average since the
    start (rows that come in bursts make a moving one swing)."""
    bar.bar_format, bar.smoothing = None, 0


class _LiveText:
    """The bar's text while an LLM step runs: requests/s, tokens/s, throttled requests and the
    limits learned from the server (refreshed at most twice a second)."""

    def __init__(self, bar, usage: Usage | None, session):
        self.bar, self.usage, self.session = bar, usage, session
        self.shown_at = 0.0
        before = session.live() if session is not None else {"requests": 0, "completion_tokens": 0}
        self.requests_before, self.tokens_before = before["requests"], before["completion_tokens"]

    def maybe_show(self, force: bool = False) -> None:
        if self.usage is None or self.bar.disable:
            return
        now = time.perf_counter()
        if not force and now - self.shown_at < 0.5:
            return
        self.shown_at = now
        elapsed = max(self.bar.format_dict["elapsed"], 1e-9)  # the bar's clock: a model's load left out
        live = self.session.live()
        parts = [f"{(live['requests'] - self.requests_before) / elapsed:.1f} req/s",
                 f"{(live['completion_tokens'] - self.tokens_before) / elapsed:.0f} tok/s"]
        if live.get("throttled"):
            parts.append(f"{live['throttled']} throttled")
        if live.get("limits"):
            parts.append(f"limit {live['limits']}")
        if live.get("concurrency"):
            parts.append(f"{live['concurrency']} in flight")
        self.bar.set_postfix_str(", ".join(parts), refresh=False)
