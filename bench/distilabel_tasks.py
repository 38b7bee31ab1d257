"""What running a distilabel task as a factory step costs beside distilabel's own Task, in one run.

UltraFeedback (aspect honesty) over ``--rows`` rows of two generations each, its model a canned
reply (no model time, so only the engines' own work is measured), two ways:

* the factory's ``distilabel`` step: format_input, the factory's LLM path (request keys, seeds,
  samples, the scripted backend, no cache), format_output, the polars frame;
* distilabel's ``Task.process`` in this process, with an LLM that returns the same reply (its
  inner loop; a distilabel Pipeline adds processes, queues and batch files around it).

Both read the same ratings. The task is built and distilabel imported before the timing (once
per process: about 2 s). Each way runs ``--repeats`` times; the best run counts.

Usage: python bench/distilabel_tasks.py [--rows 2000] [--repeats 3]   (needs dataset-factory[distilabel])
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REPLY = "Rating: 4\nRationale: fine\n\nRating: 2\nRationale: not quite"


def factory_step():
    from factory.config import build
    from factory.registry import step_class

    cls = step_class("distilabel")
    problems: list = []
    step = cls(build(cls.Config, {"task": "UltraFeedback", "options": {"aspect": "honesty"}}, (), problems))
    assert not problems and not step.check()
    step.task  # noqa: B018 - distilabel imported, the task built
    return step


def run_factory(step, rows) -> float:
    import polars as pl

    from factory.llm import ScriptedBackend, ScriptedConfig
    from factory.llm.requests import LLMClient
    from factory.steps.context import StepContext

    client = LLMClient(ScriptedBackend(ScriptedConfig(), reply_fn=lambda conversation, k: REPLY))
    began = time.perf_counter()
    out = step.process(pl.DataFrame(rows), StepContext(llm=client))
    seconds = time.perf_counter() - began
    assert out.height == len(rows) and out["ratings"][0].to_list() == [4, 2]
    return seconds


def distilabel_task():
    from distilabel.models.llms.base import LLM

    from factory.steps.distilabel import tasks

    class Canned(LLM):
        structured_output: object = None

        @property
        def model_name(self) -> str:
            return "canned"

        def generate(self, inputs, num_generations: int = 1, **kwargs):
            return [{"generations": [REPLY] * num_generations,
                     "statistics": {"input_tokens": [0], "output_tokens": [0]}} for _ in inputs]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = tasks.tasks_module().UltraFeedback(llm=Canned(), aspect="honesty", add_raw_output=False,
                                                  add_raw_input=False)
        task.load()
    return task


def run_distilabel(task, rows) -> float:
    began = time.perf_counter()
    out = next(task.process(rows))
    seconds = time.perf_counter() - began
    assert len(out) == len(rows) and out[0]["ratings"] == [4, 2]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = [{"instruction": f"Task {i}", "generations": [f"first answer {i}", f"second answer {i}"]}
            for i in range(args.rows)]
    step, task = factory_step(), distilabel_task()
    ours = min(run_factory(step, rows) for _ in range(args.repeats))
    theirs = min(run_distilabel(task, rows) for _ in range(args.repeats))
    print(f"UltraFeedback over {args.rows} rows, canned replies (best of {args.repeats}):")
    print(f"  factory distilabel step     {ours:6.2f} s  {args.rows / ours:8.0f} rows/s  "
          f"{ours / args.rows * 1e3:.3f} ms/row")
    print(f"  distilabel Task.process     {theirs:6.2f} s  {args.rows / theirs:8.0f} rows/s  "
          f"{theirs / args.rows * 1e3:.3f} ms/row")
    print(f"  factory / distilabel time   {ours / theirs:6.2f}x  (the difference is the factory's LLM path: "
          "request keys, seeds, samples, frames)")


if __name__ == "__main__":
    main()
