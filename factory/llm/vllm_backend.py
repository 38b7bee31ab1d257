"""The offline vLLM engine (optional extra ``vllm``; needs a CUDA GPU).

vLLM is imported only when this backend first generates, so that the rest of the factory
works without it. ``model: embedded`` is exported once to a plain Hugging Face folder
(safetensors) under the cache, since vLLM reads that best. LoRA adapters are applied per
request with ``LoRARequest``, so each evolve round uses its newest adapter without merging.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import option
from ..errors import FactoryError
from ..models import EMBEDDED, adapter_fingerprint, check_adapter, export_model, model_fingerprint, resolve_model
from .base import Backend, Completion, GenerationParams, OnReply, Request, split_prefill


@dataclass
class VLLMConfig:
    backend: Literal["vllm"] = option("vllm", help="vLLM's offline engine on a CUDA GPU.")
    model: str = option("embedded", help="`embedded` or a local Hugging Face model folder.")
    adapter: str | None = option(None, help="A PEFT LoRA adapter applied per request (LoRARequest).")
    tensor_parallel_size: int = option(1, help="GPUs to shard the model over.", min=1)
    gpu_memory_utilization: float = option(0.85, help="Share of GPU memory vLLM may take.", min=0.05, max=1.0)
    max_model_len: int | None = option(None, help="Context length (default: the model's).", min=16)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", help="Weights dtype.")
    enable_prefix_caching: bool = option(True, help="Reuse the KV cache of shared prompt prefixes.")
    max_lora_rank: int = option(64, help="Largest LoRA rank the engine accepts.", min=1)
    export_dir: str = option("~/.cache/factory/embedded-hf", help="Where `embedded` is exported for vLLM.")


def vllm_available() -> bool:
    """True when vLLM is installed and a CUDA GPU is visible."""
    try:
        import importlib.util

        import torch
    except ImportError:
        return False
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


class VLLMBackend(Backend):
    name = "vllm"
    Config = VLLMConfig

    def __init__(self, config: VLLMConfig):
        super().__init__(config)
        self.engine = None
        self._model_id: str | None = None

    @property
    def model_id(self) -> str:
        if self._model_id is None:
            ident = "vllm:" + model_fingerprint(self.config.model)
            if self.config.adapter:
                ident += "+lora:" + adapter_fingerprint(self.config.adapter)
            self._model_id = ident
        return self._model_id

    def check(self) -> None:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise FactoryError("the vllm backend needs vLLM: pip install '.[vllm]' on a machine with a CUDA GPU, "
                               "or use `backend: transformers`")
        import torch

        if not torch.cuda.is_available():
            raise FactoryError("the vllm backend needs a CUDA GPU and none is visible; use `backend: transformers` "
                               "on CPU")
        resolve_model(self.config.model)
        if self.config.adapter:
            check_adapter(self.config.adapter)

    def _model_path(self) -> str:
        if self.config.model != EMBEDDED:
            return str(resolve_model(self.config.model).directory)
        target = Path(os.path.expanduser(self.config.export_dir))
        if not (target / "config.json").is_file():
            export_model(EMBEDDED, target)
        return str(target)

    def load(self) -> None:
        if self.engine is not None:
            return
        from vllm import LLM

        kwargs = dict(model=self._model_path(), tensor_parallel_size=self.config.tensor_parallel_size,
                      gpu_memory_utilization=self.config.gpu_memory_utilization, dtype=self.config.dtype,
                      enable_prefix_caching=self.config.enable_prefix_caching)
        if self.config.max_model_len:
            kwargs["max_model_len"] = self.config.max_model_len
        if self.config.adapter:
            kwargs.update(enable_lora=True, max_lora_rank=self.config.max_lora_rank)
        self.engine = LLM(**kwargs)

    def _lora(self):
        if not self.config.adapter:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest("adapter", 1, str(Path(self.config.adapter).resolve()))

    def sampling_params(self, params: GenerationParams):
        from vllm import SamplingParams

        extra = {}
        if params.regex:
            # Structured decoding moved from guided_decoding to structured_outputs in newer vLLM.
            try:
                from vllm.sampling_params import StructuredOutputsParams

                extra["structured_outputs"] = StructuredOutputsParams(regex=params.regex)
            except ImportError:
                from vllm.sampling_params import GuidedDecodingParams

                extra["guided_decoding"] = GuidedDecodingParams(regex=params.regex)
        return SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p if not params.greedy
                              else 1.0, max_tokens=params.max_tokens, stop=list(params.stop) or None,
                              seed=params.seed, **extra)

    def generate(self, requests: list[Request], on_reply: OnReply | None = None) -> list[Completion]:
        self.load()
        results: list[Completion | None] = [None] * len(requests)
        # vLLM's chat() takes one prefill mode per call: group by it. Sampling parameters
        # (and so seeds) go per request.
        groups: dict[bool, list[int]] = {False: [], True: []}
        for i, request in enumerate(requests):
            groups[split_prefill(request.messages)[1] is not None].append(i)
        for prefill, indices in groups.items():
            if not indices:
                continue
            self.stats.requests += len(indices)
            outputs = self.engine.chat([requests[i].messages for i in indices],
                                       [self.sampling_params(requests[i].params) for i in indices], use_tqdm=False,
                                       lora_request=self._lora(), add_generation_prompt=not prefill,
                                       continue_final_message=prefill)
            for i, out in zip(indices, outputs):
                results[i] = Completion([o.text for o in out.outputs], len(out.prompt_token_ids or []),
                                        sum(len(o.token_ids) for o in out.outputs))
            if on_reply is not None:
                on_reply([(i, results[i]) for i in indices])
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.engine = None
