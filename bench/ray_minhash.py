"""Ray executor against the local executor: MinHash near-dedup of 1,000,000 rows on one machine.

Both run the same one-step recipe (`minhash` on generated rows with planted
near-duplicates) with no cache, in one run, and must drop the same rows. Ray starts a
local cluster with --cpus CPUs; its start-up is timed apart from the run.

Usage: python bench/ray_minhash.py [--rows 1000000] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"w{i}" for i in range(5000)])
    with open(path, "w") as f:
        previous = []
        for i in range(rows):
            if previous and rng.random() < 0.1:  # a near-duplicate of an earlier row: one word changed
                words = list(previous[int(rng.integers(0, len(previous)))])
                words[int(rng.integers(0, len(words)))] = str(rng.choice(vocabulary))
            else:
                words = list(rng.choice(vocabulary, size=int(rng.integers(15, 40))))
                if len(previous) < 10_000:
                    previous.append(words)
            f.write(json.dumps({"instruction": " ".join(words)}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    import ray

    from factory.build import run_recipe
    from factory.cache import NullCache
    from factory.driver import Driver
    from factory.executors.ray import RayExecutor
    from factory.recipe import load_recipe
    from factory.store import read_version

    work = Path(tempfile.mkdtemp(prefix="factory-ray-bench-"))
    try:
        write_rows(work / "rows.jsonl", args.rows)
        recipe_path = work / "recipe.yaml"
        recipe_path.write_text(f"name: dedup\nsource: {{path: {work / 'rows.jsonl'}}}\nsteps:\n"
                               "  - minhash: {column: instruction, threshold: 0.8, num_perm: 128}\n"
                               "output: {format: raw}\n")
        results = {}
        start = time.perf_counter()
        _, manifest, result = run_recipe(load_recipe(recipe_path), work / "local",
                                         driver=Driver(NullCache(), progress=False))
        results["local executor"] = (time.perf_counter() - start, manifest["steps"][0]["seconds"],
                                   manifest["steps"][0]["dropped"])
        local_rows = read_version(work / "local" / "dedup" / "v1")
        start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        startup = time.perf_counter() - start
        start = time.perf_counter()
        _, manifest, _ = run_recipe(load_recipe(recipe_path), work / "ray",
                                    driver=Driver(NullCache(), executor=RayExecutor(), progress=False))
        results[f"ray ({args.cpus} CPUs)"] = (time.perf_counter() - start, manifest["steps"][0]["seconds"],
                                              manifest["steps"][0]["dropped"])
        ray.shutdown()
        same = read_version(work / "ray" / "dedup" / "v1").equals(local_rows)
        print(f"minhash over {args.rows:,} rows (10% planted near-duplicates), threshold 0.8, 128 permutations")
        print(f"{'executor':<18} {'run s':>8} {'step s':>8} {'rows/s (step)':>14}  dropped")
        for name, (total, step, dropped) in results.items():
            print(f"{name:<18} {total:>8.1f} {step:>8.1f} {args.rows / step:>14,.0f}  {dropped}")
        (local_total, local_step, _), (ray_total, ray_step, _) = results.values()
        print(f"ray cluster start-up: {startup:.1f}s (not in the run)")
        print(f"ray / local step time: {ray_step / local_step:.2f}x; same rows kept: {same}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
