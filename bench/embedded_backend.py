"""The factory's transformers backend against a bare ``model.generate`` on the embedded model.

Same prompts (chat-templated seed tasks), same batch size, greedy, same max new tokens, in
one run; each side runs once to warm up and is then timed. Tokens are counted the same way
for both: generated tokens up to and including the first end-of-turn token.

Usage: python bench/embedded_backend.py [--prompts 64] [--batch-size 32] [--max-new-tokens 64]
Target: factory / bare >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def bare_generate(model, tokenizer, conversations, batch_size: int, max_new_tokens: int) -> int:
    import torch

    tokens = 0
    eos = tokenizer.eos_token_id
    for start in range(0, len(conversations), batch_size):
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            tokens += row.index(eos) + 1 if eos in row else len(row)
        tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    from factory.llm import GenerationParams, TransformersBackend, TransformersConfig

    seeds = [json.loads(line)["instruction"] for line in (ROOT / "data" / "seeds" / "tasks.jsonl").open()]
    conversations = [[{"role": "user", "content": seeds[i % len(seeds)]}] for i in range(args.prompts)]

    backend = TransformersBackend(TransformersConfig(model="embedded", batch_size=args.batch_size))
    backend.load()
    model, tokenizer = backend.model, backend.tokenizer
    params = GenerationParams(max_tokens=args.max_new_tokens)

    results = {}
    for label in ("bare model.generate", "factory backend"):
        runs = []
        for _ in range(2):  # the first run warms up
            start = time.perf_counter()
            if label == "factory backend":
                tokens = sum(c.completion_tokens for c in backend.chat(conversations, params))
            else:
                tokens = bare_generate(model, tokenizer, conversations, args.batch_size, args.max_new_tokens)
            runs.append((time.perf_counter() - start, tokens))
        results[label] = runs[-1]

    import torch

    print(f"embedded model (SmolLM2-135M-Instruct, float32, CPU x{torch.get_num_threads()} threads): "
          f"{args.prompts} prompts, batch {args.batch_size}, greedy, max {args.max_new_tokens} new tokens")
    print(f"{'generator':<22} {'seconds':>8} {'tokens':>8} {'tokens/s':>9}")
    for label, (seconds, tokens) in results.items():
        print(f"{label:<22} {seconds:>8.2f} {tokens:>8} {tokens / seconds:>9.1f}")
    bare = results["bare model.generate"][1] / results["bare model.generate"][0]
    ours = results["factory backend"][1] / results["factory backend"][0]
    print(f"factory / bare throughput: {ours / bare:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
