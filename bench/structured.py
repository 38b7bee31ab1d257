"""What a JSON Schema costs the transformers backend while it decodes, in one run.

The embedded model writes a typed record (an enum, a number, a list of texts) for each of
``--prompts`` topics, greedy, ``--max-new-tokens`` at most, batch ``--batch-size``, three ways:

* free: no schema (the prompt still describes the fields) -- replies are checked afterwards;
* outlines-core: the factory's grammar (factory/llm/grammar.py), which the backend uses;
* xgrammar: xgrammar's transformers logits processor, when xgrammar is installed (it is not a
  dependency: on Linux it pulls triton, 1 GB).

Each way runs ``--repeats`` times, interleaved, after one warm-up; the best run counts. It
prints milliseconds per decoding step (the batch's longest reply sets the steps: the cost of
a token, which the mask adds to), generated tokens/s (free replies end early, which leaves
padding in the batch, so compare per step), and how many replies are complete, schema-valid
records (the useful output).

Usage: python bench/structured.py [--prompts 32] [--batch-size 32] [--max-new-tokens 160] [--repeats 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOPICS = ["fractions", "prime numbers", "the area of a rectangle", "speed and distance", "money and change",
          "telling the time", "angles", "bar charts", "percentages", "ratios", "averages", "volume of a box"]
# Bounded (maxLength, maxItems) so that records end within the token budget: greedy decoding of a
# 135M model otherwise runs a string or a list to the limit.
RECORD = {"question": {"type": "string", "maxLength": 120}, "difficulty": ["easy", "medium", "hard"], "answer": "int",
          "steps": {"type": "array", "items": {"type": "string", "maxLength": 60}, "maxItems": 3}}


class XGrammars:
    """xgrammar's processor behind the backend's grammar interface (for comparison only)."""

    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar

        self.xgr = xgrammar
        self.compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tokenizer,
                                                                                       vocab_size=vocab_size))
        self.compiled = {}

    def processor(self, schema_text: str):
        if schema_text not in self.compiled:
            self.compiled[schema_text] = self.compiler.compile_json_schema(schema_text, any_whitespace=False)
        return self.xgr.contrib.hf.LogitsProcessor(self.compiled[schema_text])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from factory.llm import GenerationParams, TransformersBackend, TransformersConfig
    from factory.llm.base import Request
    from factory.llm.schema import describe, schema_text, to_json_schema, valid

    schema = to_json_schema(RECORD)
    prompts = [[{"role": "user", "content": f"Write one short math exercise about {TOPICS[i % len(TOPICS)]} "
                                            f"(number {i + 1}).\n\n{describe(schema)}"}] for i in range(args.prompts)]
    backend = TransformersBackend(TransformersConfig(model="embedded", batch_size=args.batch_size))
    backend.load()
    ours = backend._grammar(set())  # noqa: SLF001 - the grammar the backend itself uses
    ways = {"free (no schema)": None, "outlines-core (factory)": ours}
    if importlib.util.find_spec("xgrammar") is not None:
        ways["xgrammar (hf processor)"] = XGrammars(backend.tokenizer, backend.model.config.vocab_size)
    else:
        print("xgrammar is not installed (pip install xgrammar): its column is left out", file=sys.stderr)

    def run(grammar) -> tuple[float, int, int, int]:
        backend._grammars = grammar or ours  # noqa: SLF001
        params = GenerationParams(max_tokens=args.max_new_tokens,
                                  json_schema=schema_text(schema) if grammar is not None else None)
        began = time.perf_counter()
        out = backend.generate([Request(p, params) for p in prompts])
        seconds = time.perf_counter() - began
        steps = sum(max(c.completion_tokens for c in out[i:i + args.batch_size])
                    for i in range(0, len(out), args.batch_size))
        return (seconds, sum(c.completion_tokens for c in out), sum(valid(t, schema) for c in out for t in c.texts),
                steps)

    for grammar in ways.values():
        run(grammar)  # warm-up: the first pass builds the grammar's index
    best: dict[str, tuple[float, int, int, int]] = {}
    for _ in range(args.repeats):
        for name, grammar in ways.items():
            result = run(grammar)
            if name not in best or result[0] / result[3] < best[name][0] / best[name][3]:
                best[name] = result

    free = best["free (no schema)"]
    print(f"{args.prompts} records, batch {args.batch_size}, greedy, at most {args.max_new_tokens} tokens, "
          f"best of {args.repeats}")
    print(f"{'decoding':26} {'seconds':>8} {'steps':>6} {'ms/step':>8} {'vs free':>8} {'tokens':>7} {'tok/s':>7} "
          f"{'valid records':>14}")
    for name, (seconds, tokens, good, steps) in best.items():
        per_step = 1000 * seconds / steps
        print(f"{name:26} {seconds:8.1f} {steps:6d} {per_step:8.1f} {per_step / (1000 * free[0] / free[3]):7.2f}x "
              f"{tokens:7d} {tokens / seconds:7.1f} {good:>8d}/{args.prompts}")


if __name__ == "__main__":
    main()
