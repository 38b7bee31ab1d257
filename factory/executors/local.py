"""The local executor: every batch in this process, one after the other."""

from __future__ import annotations

from .base import Executor, run_batch


class LocalExecutor(Executor):
    """Runs batches lazily, as the driver takes them, so a step stopped early computes no more."""

    name = "local"

    def map_batches(self, step, jobs, cache, session, on_progress=None):
        for batch, key in jobs:
            yield run_batch(step, batch, key, cache, session, on_progress)

    def run_global(self, step, table, ctx):
        return step.process(table, ctx)
