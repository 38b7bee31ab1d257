"""How LLM-step throughput scales with Ray replicas, against an OpenAI-compatible server.

A local server answers every request after a fixed latency, one request at a time per
connection; each replica sends one request at a time (max_concurrency 1), so a step's
throughput is bounded by how many replicas wait in parallel -- the shape of a step
served by several model servers or GPUs. Runs the same solve step with 1, 2 and 4
replicas on a local Ray cluster, plus the local executor, and prints rows/s.

Usage: python bench/ray_replicas.py [--rows 96] [--latency 0.1]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--latency", type=float, default=0.1)
    args = parser.parse_args()

    import ray

    from factory.build import run_recipe
    from factory.cache import NullCache
    from factory.driver import Driver
    from factory.executors.ray import RayExecutor
    from factory.recipe import load_recipe
    from tests.fake_openai import FakeOpenAI

    work = Path(tempfile.mkdtemp(prefix="factory-replicas-"))
    try:
        (work / "tasks.jsonl").write_text("\n".join(json.dumps({"instruction": f"Task {i}"}) for i in range(args.rows)))
        with FakeOpenAI(latency=args.latency) as server:
            (work / "recipe.yaml").write_text(
                f"name: replicas\nbatch_size: 8\nllm: {{backend: openai, model: fake, base_url: '{server.base_url}', "
                f"max_concurrency: 1}}\nsource: {{path: {work / 'tasks.jsonl'}}}\nsteps:\n  - solve: {{}}\n")
            timings = {}
            start = time.perf_counter()
            run_recipe(load_recipe(work / "recipe.yaml"), work / "out", driver=Driver(NullCache(), progress=False))
            timings["local executor"] = time.perf_counter() - start
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            for replicas in (1, 2, 4):
                start = time.perf_counter()
                run_recipe(load_recipe(work / "recipe.yaml"), work / "out",
                           driver=Driver(NullCache(), executor=RayExecutor(replicas=replicas, cpus_per_replica=0.25),
                                         progress=False))
                timings[f"ray, {replicas} replica(s)"] = time.perf_counter() - start
            ray.shutdown()
        print(f"solve over {args.rows} rows, {args.latency}s per request, one request at a time per replica")
        base = timings["ray, 1 replica(s)"]
        for name, seconds in timings.items():
            print(f"{name:<20} {seconds:>7.2f}s {args.rows / seconds:>8.1f} rows/s  x{base / seconds:.2f} of 1 replica")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
