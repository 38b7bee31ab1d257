"""Engine overhead: a 5-step recipe over 100,000 rows on the scripted backend.

Compares, in one run:
  * factory, cold   -- the driver on the local executor, with its cache (every batch computed and stored)
  * factory, warm   -- the same command again (the source's rows and every batch read back from the cache)
  * plain loop      -- the same work as a hand-written Python loop over rows: build the
                       prompt, ask the scripted backend, parse, filter (no batches, no cache,
                       no rejected table, no manifest)

Usage: python bench/engine_overhead.py [--rows 100000] [--batch-size 1000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The judge's score depends only on the answer, so the plain loop can reproduce it exactly.
RULES = """\
  rules:
    - {match: "Response: Answer [0-3]", reply: "Score: 2"}
    - {match: "Response: Answer", reply: "Score: 8"}
    - {match: ".", reply: "Answer {hash}"}
"""


def recipe_text(source: Path, batch_size: int) -> str:
    return f"""\
name: overhead
seed: 1
batch_size: {batch_size}
llm:
  backend: scripted
{RULES}source: {{path: {source}}}
steps:
  - solve: {{}}
  - judge: {{}}
  - score: {{min: 3}}
  - judge: {{output_column: score2, judgement_column: judgement2, reasoning: false}}
  - score: {{min: 3, column: score2}}
output: {{format: messages}}
"""


def plain_loop(rows: list[dict]) -> int:
    from factory.llm import GenerationParams, ScriptedBackend, ScriptedConfig
    from factory.steps.judge import parse_score

    backend = ScriptedBackend(ScriptedConfig(rules=[
        {"match": "Response: Answer [0-3]", "reply": "Score: 2"}, {"match": "Response: Answer", "reply": "Score: 8"},
        {"match": ".", "reply": "Answer {hash}"}]))
    params = GenerationParams()
    kept = 0
    for row in rows:
        answer = backend.chat([[{"role": "user", "content": row["instruction"]}]], params)[0].texts[0]
        judge = [{"role": "user", "content": f"Rate the response to the instruction from 1 to 10.\n\n"
                                             f"Instruction: {row['instruction']}\n\nResponse: {answer}"}]
        if parse_score(backend.chat([judge], params)[0].texts[0], 10) < 3:
            continue
        judge2 = judge + [{"role": "assistant", "content": "Score:"}]
        if parse_score("Score:" + backend.chat([judge2], params)[0].texts[0], 10) < 3:
            continue
        kept += 1
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()

    from factory.build import run_recipe
    from factory.cache import Cache
    from factory.recipe import load_recipe
    from factory.driver import Driver

    work = Path(tempfile.mkdtemp(prefix="factory-bench-"))
    try:
        source = work / "tasks.jsonl"
        with open(source, "w") as f:
            for i in range(args.rows):
                f.write(json.dumps({"instruction": f"Task {i}: explain idea {i * 7919 % 100003} briefly."}) + "\n")
        recipe_path = work / "recipe.yaml"
        recipe_path.write_text(recipe_text(source, args.batch_size))
        results = {}
        for label in ("factory, cold", "factory, warm"):
            recipe = load_recipe(recipe_path)
            driver = Driver(Cache(work / "cache"), progress=False)
            start = time.perf_counter()
            _, manifest, _ = run_recipe(recipe, work / "out", driver=driver)
            seconds = time.perf_counter() - start
            results[label] = (seconds, manifest["rows"])
        rows = [json.loads(line) for line in source.open()]
        start = time.perf_counter()
        kept = plain_loop(rows)
        results["plain loop"] = (time.perf_counter() - start, kept)

        print(f"engine overhead: 5 steps (solve, judge, score, judge, score) over {args.rows:,} rows, "
              f"scripted backend, batch_size {args.batch_size}")
        print(f"{'run':<16} {'seconds':>9} {'rows/s':>10} {'rows kept':>10}")
        for label, (seconds, kept_rows) in results.items():
            print(f"{label:<16} {seconds:>9.2f} {args.rows / seconds:>10,.0f} {kept_rows:>10,}")
        rate = {label: args.rows / seconds for label, (seconds, _) in results.items()}
        print(f"cold / plain loop rows/s = {rate['factory, cold'] / rate['plain loop']:.2f} (target >= 1; the factory "
              "also writes the cache, rejected rows, manifest and card)")
        print(f"warm / plain loop rows/s = {rate['factory, warm'] / rate['plain loop']:.2f} (target >= 5)")
        assert results["factory, cold"][1] == results["factory, warm"][1] == results["plain loop"][1], \
            "the three runs must keep the same rows"
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
