"""What every executor implements, and the one function that runs a batch anywhere."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import polars as pl

from ..cache import Cache
from ..llm.requests import LLMSession
from ..steps.base import Step
from ..steps.context import StepContext

Job = tuple[pl.DataFrame, str]  # a batch of rows and its cache key
Result = tuple[pl.DataFrame, dict]  # a batch's output and its facts (report, LLM usage)


def run_batch(step: Step, batch: pl.DataFrame, key: str, cache: Cache, session: LLMSession | None,
              on_progress: Callable[[int], None] | None = None) -> Result:
    """Runs a row step on one batch and caches its output and report under ``key`` -- unless
    a request of the batch failed: a failure is never a result, so a re-run redoes the batch
    (its answered requests come back from the reply cache; only the failed ones are resent)."""
    ctx = StepContext(llm=session.client(on_progress) if session is not None else None)
    out = check_output(step, step.process(batch, ctx))
    if ctx.complete:
        cache.put_json("reports", key, ctx.full_report())
        cache.put_frame("steps", key, out)
    return out, ctx.facts()


def check_output(step: Step, out) -> pl.DataFrame:
    """``out`` when it is a frame; a step that returns anything else is a bug in the step."""
    if not isinstance(out, pl.DataFrame):
        raise TypeError(f"{type(step).__name__}.process returned {type(out).__name__}, not a polars DataFrame")
    return out


class Executor:
    """Runs the work of a step; knows nothing of what the step does or which model answers.

    Used as a context manager around a whole run (a cluster is joined once).
    """

    name: str

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def map_batches(self, step: Step, jobs: list[Job], cache: Cache, session: LLMSession | None,
                    on_progress: Callable[[int], None] | None = None) -> Iterator[Result]:
        """Each job's result, in the order of ``jobs``, each computed with :func:`run_batch`.

        ``on_progress(count, j)`` may be called with counts of requests answered while job ``j`` runs
        (from other threads than the caller's, where batches run side by side).
        """
        raise NotImplementedError

    def run_global(self, step: Step, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        """The step's output on the whole table (spread out where the step's hooks allow)."""
        raise NotImplementedError
