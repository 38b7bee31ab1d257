"""The Ray executor: the same recipe, spread over a Ray cluster with Ray Data.

``factory run RECIPE --executor ray [--address ADDR]`` writes the same versioned output
and manifest as the local executor, row for row:

* row steps run as Ray Data ``map_batches`` over the batches the driver makes (one block
  each) in a pool of actors; an LLM step's actors each build the step's backend once
  (``--replicas``, ``--gpus-per-replica``: on a vLLM backend each replica is a vLLM engine)
  and send every request through the one LLM path, so the reply cache and the seeds are
  those of a local run;
* global steps with a group key (``consistency``, ``score`` per task) run group by group
  with ``groupby().map_groups()``; steps with a row-parallel phase (``minhash``: the
  signatures and LSH band keys) run that phase over blocks and finish on the driver;
  other global steps (generators) run on the driver.

Batches are cached under the driver's keys by the workers, so a restarted job redoes only
the batches that had not finished. On a real cluster the cache folder (``--cache-dir``)
must be storage every node sees.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import pickle

import polars as pl

from ..errors import FactoryError
from ..steps.context import StepContext, merge_reports
from .base import Executor, run_batch

BATCH = "__batch"
POSITION = "__row"
BLOCK_ROWS = 50_000


def _to_ipc(frame: pl.DataFrame) -> bytes:
    sink = io.BytesIO()
    frame.write_ipc(sink)
    return sink.getvalue()


def _from_ipc(data: bytes) -> pl.DataFrame:
    return pl.read_ipc(io.BytesIO(data))


def _packed(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=pa.schema([("index", pa.int64()), ("payload", pa.binary()),
                                                        ("meta", pa.string())]))


def _unpacked(done):
    """``(index, payload, meta)`` of every packed row a Ray dataset yields."""
    for part in done.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in part.to_pylist():
            yield row["index"], row["payload"], json.loads(row["meta"])


class _BatchWorker:
    """A Ray Data actor that runs a row step on the batches of its blocks (tagged by BATCH).

    An LLM step's actor builds its backend once, on the first batch, and keeps it.
    """

    def __init__(self, step, keys: dict[int, str], cache, session):
        self.step, self.keys, self.cache, self.session = step, keys, cache, session

    def __call__(self, block):
        frame = pl.from_arrow(block)
        rows = []
        for index, batch in sorted(frame.partition_by(BATCH, as_dict=True, maintain_order=True).items()):
            index = int(index[0])
            try:
                out, facts = run_batch(self.step, batch.drop(BATCH), self.keys[index], self.cache, self.session)
            except FactoryError as err:  # bad input: the driver stops with its one line, not a Ray traceback
                facts = {"error": str(err), "exit_code": err.exit_code}
                rows.append({"index": index, "payload": b"", "meta": json.dumps(facts)})
                break
            rows.append({"index": index, "payload": _to_ipc(out), "meta": json.dumps(facts, default=str)})
        return _packed(rows)


def _group_task(block, step):
    """A global step with a group key, on one group."""
    ctx = StepContext()
    out = step.process(pl.from_arrow(block), ctx)
    return _packed([{"index": 0, "payload": _to_ipc(out), "meta": json.dumps(ctx.report, default=str)}])


def _partial_task(block, step):
    """The row-parallel phase of a global step, on one block of rows."""
    frame = pl.from_arrow(block)
    index = int(frame[BATCH][0])
    return _packed([{"index": index, "payload": pickle.dumps(step.partial(frame.drop(BATCH))), "meta": "{}"}])


class RayExecutor(Executor):
    """Runs a recipe's work on Ray (a local cluster by default, or ``address``).

    Args:
        address: a Ray cluster address (``ray://host:10001`` or ``auto``); None starts a
            local cluster with ``num_cpus`` CPUs.
        replicas: actor replicas per row step (for an LLM step: model replicas).
        gpus_per_replica: GPUs each LLM replica takes (0 on CPU).
        cpus_per_replica: CPUs each LLM replica reserves (below 1 for replicas that mostly wait on a server).
    """

    name = "ray"

    def __init__(self, *, address: str | None = None, num_cpus: int | None = None, replicas: int = 1,
                 gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0):
        self.address, self.num_cpus = address, num_cpus
        self.replicas, self.gpus_per_replica, self.cpus_per_replica = replicas, gpus_per_replica, cpus_per_replica
        self._started = False

    def __enter__(self):
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, num_cpus=None if self.address else self.num_cpus,
                     include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="ERROR")
            self._started = True
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # the driver's bars say how far a step is
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def map_batches(self, step, jobs, cache, session, on_progress=None):
        import ray

        if not jobs:
            return
        budget = session.budget if session is not None else None
        if session is not None:
            # Each replica learns the server's limits and spends on its own: it gets its share of
            # both, and what the replicas spent is charged to the run's budget as their batches return.
            share = 1.0 / max(1, self.replicas)
            session = dataclasses.replace(session, share=session.share * share,
                                          budget=budget.share(share) if budget is not None else None)
        blocks = [batch.with_columns(pl.lit(i, dtype=pl.Int64).alias(BATCH)).to_arrow()
                  for i, (batch, _) in enumerate(jobs)]
        done = ray.data.from_arrow(blocks).map_batches(
            _BatchWorker, fn_constructor_kwargs={"step": step, "keys": {i: key for i, (_, key) in enumerate(jobs)},
                                                 "cache": cache, "session": session},
            compute=ray.data.ActorPoolStrategy(size=max(1, self.replicas)),
            num_gpus=(self.gpus_per_replica or None) if session is not None else None,
            num_cpus=self.cpus_per_replica if session is not None else 1, batch_size=None, batch_format="pyarrow",
            zero_copy_batch=True)
        waiting, expected = {}, 0
        for index, payload, facts in _unpacked(done):
            if "error" in facts:
                error = FactoryError(facts["error"])
                error.exit_code = facts["exit_code"]
                raise error
            waiting[index] = (_from_ipc(payload), facts)
            if budget is not None and facts.get("usage"):
                budget.charge(session.cost_of(facts["usage"]))
            while expected in waiting:
                yield waiting.pop(expected)
                expected += 1

    def run_global(self, step, table, ctx):
        import ray

        if ctx.llm is not None or table.height == 0:
            return step.process(table, ctx)  # generators and judges of the whole pool run on the driver
        key = step.group_key()
        if key is not None:
            dataset = ray.data.from_arrow(table.with_row_index(POSITION).to_arrow())
            done = dataset.groupby(key).map_groups(_group_task, fn_kwargs={"step": step}, batch_format="pyarrow")
            parts, reports = [], []
            for _, payload, report in _unpacked(done):
                parts.append(_from_ipc(payload))
                reports.append(report)
            ctx.report.update(merge_reports(reports))
            return pl.concat(parts, how="diagonal_relaxed").sort(POSITION).drop(POSITION)
        if step.splits:
            blocks = [table.slice(o, BLOCK_ROWS).with_columns(pl.lit(i, dtype=pl.Int64).alias(BATCH)).to_arrow()
                      for i, o in enumerate(range(0, table.height, BLOCK_ROWS))]
            done = ray.data.from_arrow(blocks).map_batches(_partial_task, fn_kwargs={"step": step}, batch_size=None,
                                                           batch_format="pyarrow")
            partials = {index: pickle.loads(payload) for index, payload, _ in _unpacked(done)}
            return step.combine(table, [partials[i] for i in range(len(blocks))], ctx)
        return step.process(table, ctx)
