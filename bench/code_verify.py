"""Code verification: rows per second of ``verify: {method: code}`` against running the programs plainly.

200 programs with their tests (20 tasks; per task a right, a second right, a wrong, an erroring
and a slow-ish right solution; half MBPP-shaped -- a list of asserts --, half HumanEval-shaped
-- check(candidate) and an entry point). Compares, in one run:

  * factory          -- the verify step over the 200 rows: tests read, code taken from the fenced
                        reply, each row in the sandbox (own session and folder, limits, network
                        namespace, unprivileged user, audit hook), ``workers`` at once
  * plain, parallel  -- the same programs, each written to a file with its tests appended, run the
                        plainest way (``subprocess.run([sys.executable, file])``, no limits, no
                        isolation), ``workers`` at once over a thread pool
  * plain, sequential -- the same, one after the other
  * plain -I -S       -- the plain parallel run with the flags the sandbox's Python gets (no
                        ``site``: a plain start runs every ``.pth`` file of the environment,
                        19 ms here with an editable install): what the sandbox itself costs

and checks that the factory and the plain runs agree on which programs pass.

Usage: python bench/code_verify.py [--workers N] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SLOW = "    _ = sum(i * i for i in range(400_000))\n"  # ~30 ms of work before answering
# name, arguments, a right body, a second right body, a wrong body, tests as (call arguments, expected)
TASKS = [
    ("add", "a, b", "return a + b", "return sum((a, b))", "return a - b", [("1, 2", 3), ("2, 2", 4), ("-1, 1", 0)]),
    ("reverse", "s", "return s[::-1]", "return ''.join(reversed(s))", "return s", [("'abc'", "'cba'"), ("''", "''")]),
    ("is_prime", "n", "return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))",
     "return n > 1 and not [d for d in range(2, n) if n % d == 0]", "return n % 2 == 1",
     [("2", True), ("9", False), ("13", True), ("1", False)]),
    ("fib", "n", "a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
     "return n if n < 2 else fib(n - 1) + fib(n - 2)", "return n * 2", [("0", 0), ("1", 1), ("10", 55)]),
    ("squares", "xs", "return sum(x * x for x in xs)", "return sum(map(lambda x: x ** 2, xs))",
     "return sum(xs) ** 2", [("[1, 2, 3]", 14), ("[]", 0)]),
    ("vowels", "s", "return sum(c in 'aeiou' for c in s.lower())", "return len([c for c in s.lower() if c in 'aeiou'])",
     "return len(s)", [("'Hello'", 2), ("'xyz'", 0)]),
    ("largest", "xs", "return max(xs)", "return sorted(xs)[-1]", "return xs[0]", [("[3, 9, 2]", 9), ("[5]", 5)]),
    ("factorial", "n", "import math\n    return math.factorial(n)", "r = 1\n    for i in range(2, n + 1):\n"
     "        r *= i\n    return r", "return n", [("0", 1), ("5", 120)]),
    ("gcd", "a, b", "import math\n    return math.gcd(a, b)", "while b:\n        a, b = b, a % b\n    return a",
     "return min(a, b)", [("12, 18", 6), ("7, 5", 1)]),
    ("palindrome", "s", "return s == s[::-1]", "return all(s[i] == s[-1 - i] for i in range(len(s) // 2))",
     "return s[0] == s[-1]", [("'abba'", True), ("'abca'", False), ("'x'", True)]),
    ("evens", "xs", "return [x for x in xs if x % 2 == 0]", "return list(filter(lambda x: x % 2 == 0, xs))",
     "return [x for x in xs if x % 2]", [("[1, 2, 3, 4]", [2, 4]), ("[]", [])]),
    ("word_count", "s", "return len(s.split())", "return len([w for w in s.split(' ') if w])", "return len(s)",
     [("'a b  c'", 3), ("''", 0)]),
    ("digits_sum", "n", "return sum(int(d) for d in str(abs(n)))", "n = abs(n)\n    t = 0\n    while n:\n"
     "        t, n = t + n % 10, n // 10\n    return t", "return n % 10", [("123", 6), ("-45", 9)]),
    ("unique", "xs", "return sorted(set(xs))", "out = []\n    for x in sorted(xs):\n        if x not in out:\n"
     "            out.append(x)\n    return out", "return xs", [("[3, 1, 3]", [1, 3]), ("[]", [])]),
    ("capitalize", "s", "return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))", "return s.title()",
     "return s.upper()", [("'hello world'", "'Hello World'"), ("'a'", "'A'")]),
    ("count_char", "s, c", "return s.count(c)", "return sum(1 for x in s if x == c)", "return s.find(c)",
     [("'banana', 'a'", 3), ("'x', 'y'", 0)]),
    ("power", "a, n", "return a ** n", "r = 1\n    for _ in range(n):\n        r *= a\n    return r", "return a * n",
     [("2, 10", 1024), ("3, 0", 1)]),
    ("second", "xs", "return sorted(set(xs))[-2]", "m = max(xs)\n    return max(x for x in xs if x != m)",
     "return sorted(xs)[-2]", [("[1, 5, 5, 3]", 3), ("[2, 1]", 1)]),
    ("flatten", "xss", "return [x for xs in xss for x in xs]", "return sum(xss, [])", "return xss[0]",
     [("[[1], [2, 3]]", [1, 2, 3]), ("[[]]", [])]),
    ("mean", "xs", "return sum(xs) / len(xs)", "import statistics\n    return statistics.fmean(xs)",
     "return sum(xs) // len(xs)", [("[1, 2]", 1.5), ("[4]", 4.0)]),
]


def programs() -> list[dict]:
    """200 rows: per task and shape, five solutions (right, right, wrong, erroring, slow-ish right)."""
    rows = []
    for name, args, right, right2, wrong, cases in TASKS:
        variants = {"right": right, "right2": right2, "wrong": wrong, "error": "return undefined_name + 1",
                    "slow": SLOW.strip() + "\n    " + right}
        asserts = [f"assert {name}({call}) == {expected}" for call, expected in cases]
        check = "def check(candidate):\n" + "".join(f"    assert candidate({call}) == {expected}\n"
                                                    for call, expected in cases)
        for variant, body in variants.items():
            code = f"def {name}({args}):\n    {body}\n"
            reply = f"Here is the function.\n\n```python\n{code}```\n"
            rows.append({"id": f"{name}-{variant}-mbpp", "response": reply, "test_list": asserts,
                         "test": None, "entry_point": None, "plain": code + "\n" + "\n".join(asserts) + "\n",
                         "passes": variant in ("right", "right2", "slow")})
            rows.append({"id": f"{name}-{variant}-humaneval", "response": reply, "test_list": None,
                         "test": check, "entry_point": name, "plain": code + "\n" + check + f"\ncheck({name})\n",
                         "passes": variant in ("right", "right2", "slow")})
    return rows


def run_factory(rows: list[dict], workers: int) -> list[bool]:
    import polars as pl

    from factory.steps.context import StepContext
    from factory.steps.verify import Verify, VerifyConfig

    frame = pl.DataFrame([{k: v for k, v in r.items() if k not in ("plain", "passes")} for r in rows])
    mbpp = Verify(VerifyConfig(method="code", tests=["test_list"], workers=workers))
    humaneval = Verify(VerifyConfig(method="code", tests=["test"], entry_point="entry_point", workers=workers))
    # one batch per shape, as a recipe would have one verify step per data set
    out = pl.concat([mbpp.process(frame.filter(pl.col("test_list").is_not_null()), StepContext()),
                     humaneval.process(frame.filter(pl.col("test").is_not_null()), StepContext())])
    verdict = dict(zip(out["id"], out["correct"]))
    return [verdict[r["id"]] for r in rows]


def run_plain(files: list[Path], workers: int, flags: tuple[str, ...] = ()) -> list[bool]:
    def one(path: Path) -> bool:
        return subprocess.run([sys.executable, *flags, str(path)], capture_output=True).returncode == 0

    if workers == 1:
        return [one(path) for path in files]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, files))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=None, help="runs at once (default: the cores)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds of each (the best one counts)")
    args = parser.parse_args()

    from factory.sandbox import default_workers, run_python

    workers = args.workers or default_workers()
    rows = programs()
    work = Path(tempfile.mkdtemp(prefix="factory-bench-code-"))
    try:
        files = []
        for i, row in enumerate(rows):
            files.append(work / f"program_{i}.py")
            files[-1].write_text(row["plain"])
        run_python("pass")  # the harness's bytecode, written once
        contenders = {f"factory ({workers} workers)": lambda: run_factory(rows, workers),
                      f"plain, parallel ({workers})": lambda: run_plain(files, workers),
                      "plain, sequential": lambda: run_plain(files, 1),
                      f"plain -I -S, parallel ({workers})": lambda: run_plain(files, workers, ("-I", "-S"))}
        best, verdicts = {}, {}
        for _ in range(args.repeat):  # interleaved, so that a busy moment of the machine hits all alike
            for label, run in contenders.items():
                start = time.perf_counter()
                verdicts[label] = run()
                best[label] = min(best.get(label, float("inf")), time.perf_counter() - start)

        expected = [r["passes"] for r in rows]
        print(f"code verification: {len(rows)} programs (MBPP- and HumanEval-shaped; right, wrong, erroring, "
              f"slow-ish), {workers} workers, {os.cpu_count()} cores, best of {args.repeat}")
        print(f"{'run':<26} {'seconds':>8} {'rows/s':>8} {'passed':>7}")
        for label, seconds in best.items():
            print(f"{label:<26} {seconds:>8.2f} {len(rows) / seconds:>8.1f} {sum(verdicts[label]):>7}")
        factory, parallel, sequential, bare = (len(rows) / best[label] for label in contenders)
        print(f"factory / plain parallel rows/s = {factory / parallel:.2f} (target >= 0.8, the same parallelism; "
              f"the factory also isolates, limits and parses)")
        print(f"factory / plain sequential rows/s = {factory / sequential:.2f}")
        print(f"factory / plain -I -S parallel rows/s = {factory / bare:.2f} (the sandbox's own cost: its Python "
              f"starts without `site` too, whose .pth files a plain start runs)")
        for label, got in verdicts.items():
            assert got == expected, f"{label} disagrees on {[r['id'] for r, g in zip(rows, got) if g != r['passes']]}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
