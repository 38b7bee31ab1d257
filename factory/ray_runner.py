"""The Ray executor: the same recipe, spread over a Ray cluster with Ray Data.

``factory run RECIPE --executor ray [--address ADDR]`` writes the same versioned output
and manifest as the local runner, row for row:

* row steps run as Ray Data ``map_batches`` over the same batches the local runner makes
  (one block each); LLM steps run in an actor pool, each replica holding its own backend
  (``--replicas``, ``--gpus-per-replica``); on a vLLM backend each replica is a vLLM engine;
* global steps with a group key (``consistency``, ``score`` per task) run group by group
  with ``groupby().map_groups()``; steps with a row-parallel phase (``minhash``: the
  signatures and LSH band keys) run that phase over blocks and finish on the driver;
  other global steps (generators) run on the driver.

Batches are cached under the same keys as with the local runner, by the workers, so a
restarted job redoes only the batches that had not finished. On a real cluster the cache
folder (``--cache-dir``) must be storage every node sees.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
from collections import defaultdict

import polars as pl

from .cache import Cache
from .llm import create_backend
from .runner import LocalRunner, StepStats, check_output
from .steps.base import Step

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


def _process_batches(block, step: Step, keys: dict[int, str], cache: Cache, llm=None):
    """Runs ``step`` on each batch in ``block`` (tagged by BATCH), caching each output."""
    frame = pl.from_arrow(block)
    rows = []
    for index, batch in sorted(frame.partition_by(BATCH, as_dict=True, maintain_order=True).items()):
        index = int(index[0])
        before = _llm_counters(llm)
        out = step.process(batch.drop(BATCH))
        check_output(step, out)
        cache.put_frame("steps", keys[index], out)
        rows.append({"index": index, "payload": _to_ipc(out), "meta": json.dumps(_llm_delta(llm, before))})
    return _packed(rows)


def _llm_counters(llm) -> dict:
    if llm is None:
        return {}
    stats = llm.backend.stats
    return {"usage": dict(vars(llm.usage)), "retries": stats.retries, "retry_reasons": dict(stats.retry_reasons)}


def _llm_delta(llm, before: dict) -> dict:
    if llm is None:
        return {}
    now = _llm_counters(llm)
    return {"usage": {k: v - before["usage"][k] for k, v in now["usage"].items()},
            "retries": now["retries"] - before["retries"],
            "retry_reasons": {k: v - before["retry_reasons"].get(k, 0) for k, v in now["retry_reasons"].items()
                              if v - before["retry_reasons"].get(k, 0)}}


class _RowStepTask:
    """A row step without an LLM, as a Ray Data function."""

    def __init__(self, step: Step, keys: dict[int, str], cache: Cache):
        self.step, self.keys, self.cache = step, keys, cache

    def __call__(self, block):
        return _process_batches(block, self.step, self.keys, self.cache)


class _LLMStepActor:
    """One replica of an LLM step: it builds its backend once and serves many batches."""

    def __init__(self, step: Step, keys: dict[int, str], cache: Cache, seed: int, backend_factory):
        from .llm.client import LLMClient

        self.step, self.keys, self.cache = step, keys, cache
        self.backend = backend_factory(step.llm_config)
        self.step.llm = LLMClient(self.backend, cache, seed=seed)

    def __call__(self, block):
        return _process_batches(block, self.step, self.keys, self.cache, self.step.llm)


def _group_task(block, step: Step):
    """A global step with a group key, on one group."""
    out = step.process(pl.from_arrow(block))
    check_output(step, out)
    return _packed([{"index": 0, "payload": _to_ipc(out), "meta": json.dumps(step.report, default=str)}])


def _partial_task(block, step: Step):
    """The row-parallel phase of a global step, on one block of rows."""
    frame = pl.from_arrow(block)
    index = int(frame[BATCH][0])
    partial = step.partial(frame.drop(BATCH))
    return _packed([{"index": index, "payload": pickle.dumps(partial), "meta": "{}"}])


def _vllm_request(row: dict) -> dict:
    """Ray Data LLM preprocess: a chat request with this sample's sampling parameters."""
    request = {"messages": row["messages"], "sampling_params": json.loads(row["sampling"]),
               "batch": row["batch"], "row": row["row"], "sample": row["sample"]}
    if row.get("adapter"):
        request["model"] = row["adapter"]  # Ray Data LLM loads the LoRA adapter named by `model`
    return request


def _vllm_reply(row: dict) -> dict:
    """Ray Data LLM postprocess: the reply text and token counts, with the request's place."""
    return {"batch": row["batch"], "row": row["row"], "sample": row["sample"], "text": row["generated_text"],
            "prompt_tokens": row.get("num_input_tokens") or 0,
            "completion_tokens": row.get("num_generated_tokens") or 0}


def merge_reports(reports: list[dict]) -> dict:
    """Step reports from parts of the table: numbers add up, lists concatenate."""
    merged: dict = {}
    for report in reports:
        for key, value in report.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[key] = merged.get(key, 0) + value
            elif isinstance(value, list):
                merged[key] = merged.get(key, []) + value
            else:
                merged[key] = value
    return merged


class RayRunner(LocalRunner):
    """Runs a recipe on Ray (a local cluster by default, or ``address``).

    Args:
        address: a Ray cluster address (``ray://host:10001`` or ``auto``); None starts a
            local cluster with ``num_cpus`` CPUs.
        replicas: actor replicas per LLM step.
        gpus_per_replica: GPUs each LLM replica takes (0 on CPU).
        cpus_per_replica: CPUs each LLM replica reserves (below 1 for replicas that mostly wait on a server).
    """

    def __init__(self, cache: Cache | None = None, *, address: str | None = None, num_cpus: int | None = None,
                 replicas: int = 1, gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0,
                 progress: bool = True, backend_factory=create_backend):
        super().__init__(cache, progress=progress, backend_factory=backend_factory)
        self.address, self.num_cpus = address, num_cpus
        self.replicas, self.gpus_per_replica, self.cpus_per_replica = replicas, gpus_per_replica, cpus_per_replica
        self._started = False

    def run(self, recipe, table=None):
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, num_cpus=None if self.address else self.num_cpus,
                     include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="ERROR")
            self._started = True
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # our bars say how far a step is
        try:
            return super().run(recipe, table)
        finally:
            if self._started:
                ray.shutdown()
                self._started = False

    def _batch_outputs(self, step: Step, batches: list[pl.DataFrame], keys: list[str], stats: StepStats):
        outputs = [self.cache.get_frame("steps", key) for key in keys]
        todo = [i for i, out in enumerate(outputs) if out is None]
        stats.cached_batches += len(batches) - len(todo)
        if todo and self._uses_llm_processor(step):
            self._llm_processor_outputs(step, batches, todo, keys, outputs)
        elif todo:
            for index, out, meta in self._map_batches(step, batches, todo, keys):
                outputs[index] = out
                self._count_llm(step, meta)
        yield from outputs

    def _map_batches(self, step: Step, batches: list[pl.DataFrame], todo: list[int], keys: list[str]):
        """The uncached batches through Ray Data, one block each: (index, output, LLM usage)."""
        import ray

        blocks = [batches[i].with_columns(pl.lit(i, dtype=pl.Int64).alias(BATCH)).to_arrow() for i in todo]
        dataset = ray.data.from_arrow(blocks)
        todo_keys = {i: keys[i] for i in todo}
        if step.uses_llm:
            worker = step.__class__.__new__(step.__class__)
            worker.__dict__.update(step.__getstate__())  # the step without its driver-side client
            done = dataset.map_batches(
                _LLMStepActor, fn_constructor_kwargs={"step": worker, "keys": todo_keys,
                                                      "cache": self.cache, "seed": step.llm.seed,
                                                      "backend_factory": self.backend_factory},
                compute=ray.data.ActorPoolStrategy(size=self.replicas), num_gpus=self.gpus_per_replica or None,
                num_cpus=self.cpus_per_replica, batch_size=None, batch_format="pyarrow", zero_copy_batch=True)
        else:
            done = dataset.map_batches(_RowStepTask, fn_constructor_kwargs={
                "step": step, "keys": todo_keys, "cache": self.cache},
                compute=ray.data.ActorPoolStrategy(size=max(1, self.replicas)), batch_size=None,
                batch_format="pyarrow")
        for part in done.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in part.to_pylist():
                yield row["index"], _from_ipc(row["payload"]), json.loads(row["meta"])

    # -- vLLM through Ray Data's LLM processors ------------------------------------------------
    @staticmethod
    def _uses_llm_processor(step: Step) -> bool:
        """An LLM step on vLLM whose work is one chat call per batch goes through Ray Data LLM."""
        from .steps.base import LLMStep

        return step.uses_llm and step.llm_config.backend == "vllm" and type(step).process is LLMStep.process

    def _build_llm_processor(self, step: Step):
        """Ray Data's vLLM processor: an engine per replica, prefix caching, LoRA per request."""
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig

        from .llm.vllm_backend import VLLMBackend

        config = step.llm_config
        engine = {"enable_prefix_caching": config.enable_prefix_caching, "dtype": config.dtype,
                  "gpu_memory_utilization": config.gpu_memory_utilization,
                  "tensor_parallel_size": config.tensor_parallel_size}
        if config.max_model_len:
            engine["max_model_len"] = config.max_model_len
        if config.adapter:
            engine.update(enable_lora=True, max_lora_rank=config.max_lora_rank)
        processor_config = vLLMEngineProcessorConfig(model_source=VLLMBackend(config)._model_path(),
                                                     engine_kwargs=engine, concurrency=self.replicas, batch_size=64)
        return build_processor(processor_config, preprocess=_vllm_request, postprocess=_vllm_reply)

    def _llm_processor_outputs(self, step: Step, batches, todo: list[int], keys: list[str], outputs: list) -> None:
        """One request per sample through the processor; replies become rows as on the local path."""
        import ray

        from .llm.base import Completion, fingerprint
        from .steps.base import DROP, DROP_DETAIL, InvalidRow, rows_to_frame

        params = step.generation_params()
        requests, plans = [], {}
        for i in todo:
            rows, conversations = batches[i].to_dicts(), []
            for r, row in enumerate(rows):
                try:
                    conversations.append((r, step.build_messages(row)))
                except InvalidRow as err:
                    conversations.append((r, str(err)))
            plans[i] = (rows, conversations)
            seed = int(fingerprint([step.llm.seed, [c for _, c in conversations if not isinstance(c, str)]])[:8], 16)
            for r, conversation in conversations:
                if isinstance(conversation, str):
                    continue
                for k in range(params.n):
                    requests.append({"batch": i, "row": r, "sample": k, "messages": conversation,
                                     "sampling": json.dumps({"temperature": params.temperature, "top_p": params.top_p,
                                                             "max_tokens": params.max_tokens,
                                                             "stop": list(params.stop) or None,
                                                             "seed": seed + r * params.n + k}),
                                     "adapter": step.llm_config.adapter})
        replies: dict = defaultdict(dict)
        if requests:
            processor = self._build_llm_processor(step)
            for reply in processor(ray.data.from_items(requests)).take_all():
                replies[(reply["batch"], reply["row"])][reply["sample"]] = reply
        for i in todo:
            rows, conversations = plans[i]
            out = []
            for r, conversation in conversations:
                if isinstance(conversation, str):
                    out.append({**rows[r], DROP: "invalid_input", DROP_DETAIL: conversation})
                    continue
                got = replies[(i, r)]
                completion = Completion([got[k]["text"] for k in range(params.n)], int(got[0]["prompt_tokens"]),
                                        sum(int(g["completion_tokens"]) for g in got.values()))
                step.llm.usage.prompt_tokens += completion.prompt_tokens
                step.llm.usage.completion_tokens += completion.completion_tokens
                out.extend(step.rows_from_completion(rows[r], completion))
            step.llm.usage.calls += 1
            step.llm.usage.conversations += len(conversations)
            outputs[i] = rows_to_frame(out, like=batches[i])
            self.cache.put_frame("steps", keys[i], outputs[i])

    def _count_llm(self, step: Step, meta: dict) -> None:
        """Adds a worker's LLM usage to the driver's, so the manifest counts every replica."""
        if not meta or step.llm is None:
            return
        for key, value in meta["usage"].items():
            setattr(step.llm.usage, key, getattr(step.llm.usage, key) + value)
        stats = step.llm.backend.stats
        stats.retries += meta["retries"]
        for reason, count in meta["retry_reasons"].items():
            stats.retry_reasons[reason] = stats.retry_reasons.get(reason, 0) + count

    def _process_global(self, step: Step, table: pl.DataFrame) -> pl.DataFrame:
        import ray

        if step.uses_llm or table.height == 0:
            return step.process(table)  # generators and judges of the whole pool run on the driver
        key = step.group_key()
        if key is not None:
            dataset = ray.data.from_arrow(table.with_row_index(POSITION).to_arrow())
            parts, reports = [], []
            done = dataset.groupby(key).map_groups(_group_task, fn_kwargs={"step": step}, batch_format="pyarrow")
            for part in done.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in part.to_pylist():
                    parts.append(_from_ipc(row["payload"]))
                    reports.append(json.loads(row["meta"]))
            step.report = merge_reports(reports)
            return pl.concat(parts, how="diagonal_relaxed").sort(POSITION).drop(POSITION)
        if step.splits:
            blocks = [table.slice(o, BLOCK_ROWS).with_columns(pl.lit(i, dtype=pl.Int64).alias(BATCH)).to_arrow()
                      for i, o in enumerate(range(0, table.height, BLOCK_ROWS))]
            partials: dict[int, object] = defaultdict(object)
            done = ray.data.from_arrow(blocks).map_batches(_partial_task, fn_kwargs={"step": step}, batch_size=None,
                                                           batch_format="pyarrow")
            for part in done.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in part.to_pylist():
                    partials[row["index"]] = pickle.loads(row["payload"])
            return step.combine(table, [partials[i] for i in range(len(blocks))])
        return step.process(table)
