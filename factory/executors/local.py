"""The local executor: every batch in this process.

Batches run one after the other, except where the step's backend answers calls from several
threads at once (a server: :attr:`~factory.llm.requests.LLMSession.batches_in_flight`). There
the next batches are already asking while the driver takes the first one's result, so the
server always has ``max_concurrency`` requests to answer instead of waiting at the end of each
batch for its slowest reply. Results still come back in the batches' order.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

from .base import Executor, run_batch


def _job_progress(on_progress, j: int):
    return None if on_progress is None else (lambda count: on_progress(count, j))


class LocalExecutor(Executor):
    """Runs batches lazily, as the driver takes them, so a step stopped early computes no more
    than the batches already under way."""

    name = "local"

    def map_batches(self, step, jobs, cache, session, on_progress=None):
        ahead = session.batches_in_flight(max(batch.height for batch, _ in jobs)) if session else 1
        if ahead <= 1 or len(jobs) <= 1:
            for j, (batch, key) in enumerate(jobs):
                yield run_batch(step, batch, key, cache, session, _job_progress(on_progress, j))
            return
        pool = ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="factory-batch")
        waiting: deque = deque()
        try:
            for j, (batch, key) in enumerate(jobs):
                waiting.append(pool.submit(run_batch, step, batch, key, cache, session,
                                           _job_progress(on_progress, j)))
                if len(waiting) >= ahead:
                    yield waiting.popleft().result()
            while waiting:
                yield waiting.popleft().result()
        finally:
            # Stopped early (a failure, Ctrl-C): batches not started never start; those under way
            # end with the backend, which the driver closes.
            pool.shutdown(wait=False, cancel_futures=True)

    def run_global(self, step, table, ctx):
        return step.process(table, ctx)
