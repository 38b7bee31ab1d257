"""Where a decoding step of the embedded model goes: the factory backend on the workloads of
``bench/embedded_backend.py``, under torch's profiler, its time split into

  * prompts (prefill)    -- reading the prompts: every operator inside ``SlotDecoder._prefill``;
  * linear layers        -- the projections and the output layer of the decoding steps;
  * attention            -- the attention of the decoding steps (SDPA, or the factory's attention
                            for one new token in bfloat16);
  * key/value cache      -- writing each step's keys and values, rows leaving and joining;
  * sampling             -- choosing the next tokens from the logits;
  * other operators      -- norms, activations, rotary embeddings, masks, residual additions;
  * Python and framework -- the wall time no operator accounts for: the model's Python code,
                            transformers' mask building, the decoder's own bookkeeping.

Usage: HF_HUB_OFFLINE=1 python bench/embedded_profile.py [--workload equal|mixed] [--dtype float32|bfloat16]
       [--prompts 64] [--max-tokens N]
The profiler adds some overhead of its own to each operator (the wall time is printed beside the
unprofiled one).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

LINEAR_OPS = {"mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::linear", "aten::matmul"}
RANGES = {"prefill": "prompts (prefill)", "attention": "attention", "kv_cache": "key/value cache",
          "sampling": "sampling"}
ORDER = ["prompts (prefill)", "linear layers", "attention", "key/value cache", "sampling", "other operators",
         "Python and framework"]


def instrument():
    """Wraps the decoder's phases in named profiler ranges (each where this version of the code has it,
    so that an older checkout can be profiled the same way)."""
    import torch

    from factory.llm import decoding

    def ranged(owner, attribute, name):
        function = getattr(owner, attribute, None)
        if function is None:
            return

        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(name):
                return function(*args, **kwargs)
        static = isinstance(inspect.getattr_static(owner, attribute), staticmethod)
        setattr(owner, attribute, staticmethod(wrapper) if static else wrapper)

    ranged(decoding.SlotDecoder, "_prefill", "prefill")
    ranged(decoding.SlotDecoder, "_choose", "sampling")
    for helper in ("_append_rows", "_drop_rows"):
        ranged(decoding, helper, "kv_cache")
    for method in ("_join", "_trim"):  # before the cache worked in place
        ranged(decoding.SlotDecoder, method, "kv_cache")
    ranged(decoding.growing_layer(), "update", "kv_cache")
    from transformers import DynamicCache

    ranged(DynamicCache, "batch_select_indices", "kv_cache")  # rows leaving, before
    from transformers import AttentionInterface
    from transformers.integrations import sdpa_attention

    ranged(sdpa_attention, "sdpa_attention_forward", "attention")
    AttentionInterface.register("sdpa", sdpa_attention.sdpa_attention_forward)
    try:
        from factory.llm import cpu
    except ImportError:
        return
    ranged(cpu, "_decode_attention", "attention")
    AttentionInterface.register(cpu.ATTENTION, cpu._decode_attention)


def breakdown(prof, wall: float) -> dict[str, float]:
    """Seconds per category: each operator's own time goes to the innermost named range around it,
    else to linear layers or other operators by its name."""
    seconds: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name in RANGES or event.self_cpu_time_total <= 0:
            continue
        parent, where = event.cpu_parent, None
        while parent is not None:
            if parent.name in RANGES:
                where = RANGES[parent.name]
                if parent.name == "prefill":
                    break
            parent = parent.cpu_parent
        if where is None:
            where = "linear layers" if event.name in LINEAR_OPS else "other operators"
        seconds[where] += event.self_cpu_time_total / 1e6
    seconds["Python and framework"] = max(0.0, wall - sum(seconds.values()))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("equal", "mixed"), default="equal")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=None, help="default: the workload's (64 / 256)")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from embedded_backend import build_workloads
    from factory.llm import GenerationParams, TransformersBackend, TransformersConfig

    workload = build_workloads(args.prompts, 64, 256)[args.workload]
    max_tokens = args.max_tokens or workload["max_tokens"]
    backend = TransformersBackend(TransformersConfig(model="embedded", dtype=args.dtype))
    backend.load()
    instrument()
    params = GenerationParams(max_tokens=max_tokens)
    backend.chat(workload["conversations"][:8], GenerationParams(max_tokens=8))  # warm-up
    start = time.perf_counter()
    completions = backend.chat(workload["conversations"], params)
    plain = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        backend.chat(workload["conversations"], params)
        wall = time.perf_counter() - start
    tokens = sum(c.completion_tokens for c in completions)
    print(f"{args.workload}: {len(workload['conversations'])} prompts, max {max_tokens} tokens, "
          f"{backend.model.dtype}, {torch.get_num_threads()} threads: {tokens} useful tokens; "
          f"{plain:.2f} s unprofiled ({tokens / plain:.1f} tok/s), {wall:.2f} s profiled")
    seconds = breakdown(prof, wall)
    print(f"{'part':<24} {'seconds':>8} {'share':>7}")
    for name in ORDER:
        print(f"{name:<24} {seconds.get(name, 0.0):>8.2f} {seconds.get(name, 0.0) / wall:>7.1%}")
    print("\nbusiest operators (own time):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
