"""Answers compared as mathematics: `verify: {method: math}` against `numeric` and plain string equality.

The pairs are written here, programmatically, from a seeded draw of small integers: each
equivalent pair is one answer in two forms a model and a reference write (fractions as
``\\frac{14}{3}`` / ``14/3`` / ``4\\frac{2}{3}`` / ``4 2/3``, decimals, percentages, radicals,
tuples, intervals, sets, LaTeX against plain text, units, thousands separators, ``x = 5``), and
each wrong pair a near miss of the same kind (an off-by-one numerator, an interval end open
instead of closed, a tuple in the other order, a set with one element changed, a radical with
the wrong factor). Every method sees the same pairs as ``(prediction, reference)``:

  * math       -- ``answers_match(p, r, "math")``: math-verify and sympy under the time limit,
                  in this (main) thread, with a fresh parse cache (no pair is a cache hit)
  * math, proc -- the same comparisons sent to the worker process, as from a worker thread
  * math-verify -- the library alone, as its README calls it: ``verify(parse(r), parse(p))`` on
                  each answer wrapped in ``\\boxed{}`` (its own signal timeouts, main thread), without
                  the plain-form rewrites, the exact path for plain numbers or the parse cache
  * numeric    -- ``answers_match(p, r, "numeric")`` (numbers within 1e-6)
  * string     -- ``p.strip() == r.strip()``

It prints, per method, the equivalent pairs accepted, the wrong pairs rejected, the comparisons
per second, and then per kind how many equivalent pairs each method accepted. ``--keys`` also
times the voting keys (``answer_keys(..., "math")``) and counts the equivalent pairs whose two
forms get the same key.

Usage: python bench/math_verify.py [--per-kind 8] [--seed 0] [--timeout 5] [--keys]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from math import gcd
from pathlib import Path

# This file's folder leaves the path: its name would hide the math_verify package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from factory import math_answers  # noqa: E402
from factory.answers import answer_keys, answers_match  # noqa: E402


def _fraction(rng: random.Random) -> tuple[int, int]:
    while True:
        p, q = rng.randint(1, 40), rng.randint(2, 12)
        if gcd(p, q) == 1:
            return p, q


def pairs(per_kind: int, seed: int) -> list[tuple[str, str, str, bool]]:
    """``(kind, prediction, reference, equivalent)``: ``per_kind`` equivalent and as many wrong pairs per kind."""
    rng = random.Random(seed)
    out: list[tuple[str, str, str, bool]] = []

    def add(kind, same, wrong):
        out.append((kind, *same, True))
        out.append((kind, *wrong, False))

    for _ in range(per_kind):
        p, q = _fraction(rng)
        add("fraction", (f"{p}/{q}", f"\\frac{{{p}}}{{{q}}}"), (f"{p + 1}/{q}", f"\\frac{{{p}}}{{{q}}}"))
        whole, (n, d) = rng.randint(1, 9), _fraction(rng)
        n, d = (n % d) or 1, d
        add("mixed number", (f"{whole}\\frac{{{n}}}{{{d}}}", f"\\dfrac{{{whole * d + n}}}{{{d}}}"),
            (f"{whole}\\frac{{{n}}}{{{d}}}", f"\\frac{{{whole * n}}}{{{d}}}"))
        add("mixed, plain", (f"{whole} {n}/{d}", f"\\frac{{{whole * d + n}}}{{{d}}}"),
            (f"{whole} {n}/{d}", f"\\frac{{{whole + n}}}{{{d}}}"))
        k = rng.choice([2, 4, 5, 8, 10, 20, 25])
        value = rng.randint(1, 99)
        add("decimal", (f"{value / k:g}", f"\\frac{{{value}}}{{{k}}}"), (f"{value / k + 0.1:g}", f"\\frac{{{value}}}{{{k}}}"))
        add("trailing zeros", (f"{value}.50", f"{value}.5"), (f"{value}.05", f"{value}.5"))
        pct = rng.randint(1, 99)
        add("percent", (f"{pct}\\%", f"{pct}"), (f"{pct + 1}\\%", f"{pct}"))
        a, b = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7, 10, 11, 13])
        add("radical", (f"\\sqrt{{{a * a * b}}}", f"{a}\\sqrt{{{b}}}"), (f"\\sqrt{{{a * b}}}", f"{a}\\sqrt{{{b}}}"))
        x, (p, q) = rng.randint(1, 9), _fraction(rng)
        add("tuple", (f"({x}, {p}/{q})", f"\\left( {x}, \\frac{{{p}}}{{{q}}} \\right)"),
            (f"({p}/{q}, {x})", f"\\left( {x}, \\frac{{{p}}}{{{q}}} \\right)"))
        lo, hi = sorted(rng.sample(range(-9, 10), 2))
        add("interval", (f"[{lo}, {hi})", f"\\left[{lo},{hi}\\right)"), (f"({lo}, {hi}]", f"[{lo},{hi})"))
        add("ray", (f"(-\\infty, {hi}]", f"\\left(-\\infty,{hi}\\right]"), (f"(-\\infty, {hi})", f"(-\\infty,{hi}]"))
        items = rng.sample(range(1, 30), 3)
        shuffled = items[1:] + items[:1]
        add("set", ("\\{" + ", ".join(map(str, shuffled)) + "\\}", "\\{" + ",".join(map(str, items)) + "\\}"),
            ("\\{" + ", ".join(map(str, items[:2] + [items[2] + 1])) + "\\}", "\\{" + ",".join(map(str, items)) + "\\}"))
        m = rng.randint(2, 9)
        add("LaTeX vs plain", (f"{m}pi/2", f"\\frac{{{m}\\pi}}{{2}}"), (f"{m}pi/3", f"\\frac{{{m}\\pi}}{{2}}"))
        add("expression", (f"(x+{m})^2", f"x^{{2}}+{2 * m}x+{m * m}"), (f"(x+{m})^2", f"x^{{2}}+{m}x+{m * m}"))
        amount = rng.randint(2, 500)
        unit = rng.choice(["cm", "meters", "dollars", "apples"])
        add("units", (f"{amount}\\text{{ {unit}}}", f"{amount}"), (f"{amount + 1}\\text{{ {unit}}}", f"{amount}"))
        add("units, plain", (f"{amount} {unit}", f"{amount}"), (f"{amount + 2} {unit}", f"{amount}"))
        add("money", (f"\\${amount}.00", f"{amount}"), (f"\\${amount}.10", f"{amount}"))
        big = rng.randint(1_000, 999_999)
        add("thousands", (f"{big:,}", f"{big}"), (f"{big + 1000:,}", f"{big}"))
        add("equation", (f"x = {amount}", f"{amount}"), (f"x = {amount + 1}", f"{amount}"))
        add("degrees", (f"{amount % 360}^\\circ", f"{amount % 360}"), (f"{amount % 360 + 1}^\\circ", f"{amount % 360}"))
    return out


def run(method: str, data, timeout: float) -> tuple[list[bool], float]:
    pairs_only = [(p, r) for _, p, r, _ in data]
    started = time.perf_counter()
    if method == "string":
        verdicts = [p.strip() == r.strip() for p, r in pairs_only]
    elif method == "numeric":
        verdicts = [answers_match(p, r, "numeric") for p, r in pairs_only]
    elif method == "math-verify":
        from math_verify import parse, verify

        verify(parse("\\boxed{1}"), parse("\\boxed{1}"))  # imports and regexes, as `math` does in load()
        started = time.perf_counter()
        verdicts = [verify(parse(f"\\boxed{{{r}}}"), parse(f"\\boxed{{{p}}}")) for p, r in pairs_only]
    else:
        math_answers.parsed.cache_clear()
        math_answers.load()  # imports once, as a run does before its first comparison
        started = time.perf_counter()
        if method == "math":
            verdicts = [answers_match(p, r, "math") for p, r in pairs_only]
        else:
            math_answers.math_verdicts(pairs_only[:1], timeout, where="process")  # starts the worker
            started = time.perf_counter()
            verdicts = [bool(v) for v in math_answers.math_verdicts(pairs_only, timeout, where="process")]
    return verdicts, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-kind", type=int, default=8, help="equivalent (and as many wrong) pairs per kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=math_answers.MATH_TIMEOUT_S, help="seconds per comparison")
    parser.add_argument("--keys", action="store_true", help="also time the voting keys of `consistency`")
    args = parser.parse_args()

    data = pairs(args.per_kind, args.seed)
    equivalent = sum(same for *_, same in data)
    wrong = len(data) - equivalent
    print(f"{equivalent} equivalent pairs, {wrong} wrong pairs, {len({k for k, *_ in data})} kinds, "
          f"seed {args.seed}, limit {args.timeout:g} s per comparison")
    print(f"{'method':12} {'equivalent accepted':>20} {'wrong rejected':>15} {'comparisons/s':>14}")
    results = {}
    for method in ("math", "math, proc", "math-verify", "numeric", "string"):
        verdicts, seconds = run(method, data, args.timeout)
        results[method] = verdicts
        accepted = sum(v for v, (*_, same) in zip(verdicts, data) if same)
        rejected = sum(not v for v, (*_, same) in zip(verdicts, data) if not same)
        print(f"{method:12} {accepted:>11}/{equivalent:<8} {rejected:>7}/{wrong:<7} {len(data) / seconds:>14,.0f}")

    print(f"\nequivalent pairs accepted, per kind (of {args.per_kind}):")
    print(f"{'kind':16} " + " ".join(f"{m:>11}" for m in results))
    per_kind: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for i, (kind, _, _, same) in enumerate(data):
        for method, verdicts in results.items():
            per_kind[kind][method] += bool(same and verdicts[i])
    for kind, counts in per_kind.items():
        print(f"{kind:16} " + " ".join(f"{counts[m]:>11}" for m in results))
    for method in ("math", "math-verify"):
        false_accepts = [(k, p, r) for (k, p, r, same), v in zip(data, results[method]) if v and not same]
        for kind, p, r in false_accepts[:10]:
            print(f"{method} accepted a wrong pair ({kind}): {p!r} vs {r!r}")

    if args.keys:
        math_answers.parsed.cache_clear()
        answers = [a for _, p, r, _ in data for a in (p, r)]
        started = time.perf_counter()
        keys = answer_keys(answers, "math")
        seconds = time.perf_counter() - started
        grouped = sum(keys[2 * i] == keys[2 * i + 1] for i, (*_, same) in enumerate(data) if same)
        split = sum(keys[2 * i] != keys[2 * i + 1] for i, (*_, same) in enumerate(data) if not same)
        print(f"\nvoting keys: {len(answers) / seconds:,.0f} answers/s; equivalent pairs with one key "
              f"{grouped}/{equivalent}; wrong pairs with two keys {split}/{wrong}")


if __name__ == "__main__":
    main()
