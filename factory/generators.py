"""Programmatic task sources (``source: {generator: NAME, ...}``).

``arithmetic``: multi-step arithmetic word problems with exact integer answers, for
verifiable self-improvement. ``numbers``: short numeric questions ("Which number is larger,
47 or 52?", "What is 27 + 8?") that a small model gets right some of the time. Problems are assigned to the ``train`` or ``eval`` split by a
hash of their text, so the two splits never share a problem whatever seeds are used.

Generators are prefix-stable: the first k rows are the same whatever ``num_rows`` is (rows
come one by one from a seeded stream and ``num_rows`` only says when to stop), so a run on
the first k rows (a preview, a pass of ``output.rows``) sees the rows a longer run starts with.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Literal

import polars as pl

from .config import option

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Mateo",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Vik", "Wen", "Yara", "Zane"]


def _one_step(rng: random.Random, name: str) -> tuple[str, int, int]:
    """One operation: addition, subtraction, multiplication or an exact division."""
    kind, r = rng.randrange(4), rng.randint
    if kind == 0:
        a, b = r(5, 60), r(2, 40)
        return f"{name} has {a} marbles and wins {b} more. How many marbles does {name} have now?", a + b, 1
    if kind == 1:
        a = r(10, 90)
        b = r(1, a - 1)
        return f"{name} has {a} stickers and gives {b} of them away. How many stickers are left?", a - b, 1
    if kind == 2:
        a, b = r(2, 12), r(2, 10)
        return f"A box holds {a} pencils. How many pencils are there in {b} boxes?", a * b, 1
    n, each = r(2, 9), r(2, 12)
    return f"{n * each} sweets are shared equally among {n} friends. How many sweets does each friend get?", each, 1


def _p(rng: random.Random, steps: int) -> tuple[str, int, int]:
    """One problem: (text, answer, number of operations)."""
    name = rng.choice(NAMES)
    r = rng.randint
    if steps == 1:
        return _one_step(rng, name)
    kind = rng.randrange(8) if steps >= 3 else rng.randrange(4)
    if kind == 0:
        a, b = r(5, 60), r(2, 40)
        c = r(1, a + b)
        return (f"{name} has {a} marbles, wins {b} more in a game and then gives {c} to a friend. "
                f"How many marbles does {name} have now?", a + b - c, 2)
    if kind == 1:
        a, b = r(3, 24), r(2, 12)
        c = r(1, a * b)
        return (f"A box holds {a} pencils. A teacher buys {b} boxes and hands out {c} pencils. "
                f"How many pencils are left?", a * b - c, 2)
    if kind == 2:
        a, b = r(6, 40), r(2, 9)
        return (f"{name} reads {a} pages on Monday, {b} times as many on Tuesday and none on Wednesday. "
                f"How many pages does {name} read over the three days?", a + a * b, 2)
    if kind == 3:
        n = r(2, 9)
        each, b = r(3, 15), r(1, 3)
        b = min(b, each)
        return (f"{n} friends share {n * each} sweets equally, and then each of them eats {b}. "
                f"How many sweets does each friend have left?", each - b, 2)
    if kind == 4:
        a, b, c, d = r(2, 20), r(2, 6), r(1, 12), r(2, 6)
        return (f"Adult tickets cost ${a} and child tickets cost ${c}. A family buys {b} adult tickets and "
                f"{d} child tickets. How many dollars do they pay in total?", a * b + c * d, 3)
    if kind == 5:
        b, c = r(2, 9), r(2, 8)
        a = r(b * c, b * c + 200)
        d = r(5, 80)
        return (f"A tank holds {a} litres of water. It leaks {b} litres an hour for {c} hours and is then "
                f"refilled with {d} litres. How many litres are in the tank now?", a - b * c + d, 3)
    if kind == 6:
        b, c = r(1, 40), r(1, 40)
        a = r(b + c, b + c + 150)
        d, e = r(2, 8), r(3, 20)
        return (f"A shop has {a} shirts. It sells {b} on Monday and {c} on Tuesday, then receives {d} boxes "
                f"with {e} shirts in each. How many shirts does the shop have now?", a - b - c + d * e, 4)
    a, b, c = r(2, 12), r(2, 12), r(2, 5)
    d = r(1, a * b * c)
    return (f"A baker bakes {a} trays of {b} cookies every day for {c} days and sells {d} cookies. "
            f"How many cookies are left?", a * b * c - d, 3)


@dataclass
class ArithmeticConfig:
    num_rows: int = option(200, help="Problems to generate.", min=1)
    split: Literal["train", "eval"] = option("train", help="Which split: problems are assigned to a split "
                                                           "by a hash of their text, so splits never overlap.")
    eval_share: float = option(0.2, help="Share of all possible problems that belong to the eval split.",
                               min=0.01, max=0.99)
    min_steps: int = option(2, help="Fewest arithmetic operations per problem (1: a single addition, "
                                    "subtraction, multiplication or division).", min=1, max=4)
    max_steps: int = option(4, help="Most arithmetic operations per problem.", min=1, max=4)
    seed: int = option(0, help="Generator seed (the recipe seed is not used, so eval sets stay fixed).")

    def validate(self):
        if self.min_steps > self.max_steps:
            return [(f"min_steps {self.min_steps} is above max_steps {self.max_steps}", "min_steps", "lower it")]
        return []


def problem_split(text: str, eval_share: float) -> str:
    bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "eval" if bucket < eval_share else "train"


def arithmetic(config: ArithmeticConfig) -> pl.DataFrame:
    rng = random.Random(f"arithmetic:{config.seed}:{config.split}")
    rows, seen = [], set()
    attempts = 0
    while len(rows) < config.num_rows:
        attempts += 1
        if attempts > config.num_rows * 200:
            break
        text, answer, steps = _p(rng, rng.randint(config.min_steps, config.max_steps))
        if not config.min_steps <= steps <= config.max_steps or text in seen:
            continue
        if problem_split(text, config.eval_share) != config.split:
            continue
        seen.add(text)
        rows.append({"id": f"arith-{config.split}-{len(rows):05d}", "instruction": text, "answer": str(answer),
                     "num_steps": steps, "split": config.split})
    return pl.DataFrame(rows, schema={"id": pl.String, "instruction": pl.String, "answer": pl.String,
                                      "num_steps": pl.Int64, "split": pl.String})


@dataclass
class NumbersConfig:
    num_rows: int = option(200, help="Questions to generate.", min=1)
    split: Literal["train", "eval"] = option("train", help="Which split: questions are assigned to a split "
                                                           "by a hash of their text, so splits never overlap.")
    eval_share: float = option(0.25, help="Share of all possible questions that belong to the eval split.",
                               min=0.01, max=0.99)
    kinds: list[Literal["larger", "smaller", "add", "sub", "mul"]] = option(
        default_factory=lambda: ["larger", "smaller", "add", "mul"],
        help="Kinds of question, drawn with equal odds: `larger` / `smaller` (which of two numbers from 10 to "
             "`max_number`), `add` (a + b, a from 10 to `add_max`, b from 2 to 9), `sub` (a - b, a from 10 to "
             "`add_max`, b from 2 to 9), `mul` (a x b, both from 2 to `mul_max`).")
    max_number: int = option(99, help="Largest number compared.", min=11)
    add_max: int = option(60, help="Largest first term of `add` and `sub`.", min=10)
    mul_max: int = option(12, help="Largest factor of `mul`.", min=2)
    seed: int = option(0, help="Generator seed (the recipe seed is not used, so eval sets stay fixed).")

    def validate(self):
        return [] if self.kinds else [("needs at least one kind", "kinds", "use e.g. [larger, smaller, add, mul]")]


def _number_question(rng: random.Random, kind: str, c: NumbersConfig) -> tuple[str, int]:
    r = rng.randint
    if kind in ("larger", "smaller"):
        a, b = rng.sample(range(10, c.max_number + 1), 2)
        return f"Which number is {kind}, {a} or {b}?", max(a, b) if kind == "larger" else min(a, b)
    if kind == "add":
        a, b = r(10, c.add_max), r(2, 9)
        return f"What is {a} + {b}?", a + b
    if kind == "sub":
        a, b = r(10, c.add_max), r(2, 9)
        return f"What is {a} - {b}?", a - b
    a, b = r(2, c.mul_max), r(2, c.mul_max)
    return f"What is {a} x {b}?", a * b


def numbers(config: NumbersConfig) -> pl.DataFrame:
    """Short numeric questions ("Which number is larger, 47 or 52?", "What is 27 + 8?") with
    exact answers: tasks a small model gets right some of the time, which self-training can sharpen."""
    rng = random.Random(f"numbers:{config.seed}:{config.split}")
    n = config.max_number - 9
    space = sum({"larger": n * (n - 1), "smaller": n * (n - 1), "add": (config.add_max - 9) * 8,
                 "sub": (config.add_max - 9) * 8, "mul": (config.mul_max - 1) ** 2}[k] for k in set(config.kinds))
    rows, seen, attempts = [], set(), 0
    while len(rows) < config.num_rows and attempts < config.num_rows * 200 and len(seen) < space:
        attempts += 1
        kind = rng.choice(config.kinds)
        text, answer = _number_question(rng, kind, config)
        if text in seen:
            continue
        seen.add(text)
        if problem_split(text, config.eval_share) != config.split:
            continue
        rows.append({"id": f"num-{config.split}-{len(rows):05d}", "instruction": text, "answer": str(answer),
                     "kind": kind, "split": config.split})
    return pl.DataFrame(rows, schema={"id": pl.String, "instruction": pl.String, "answer": pl.String,
                                      "kind": pl.String, "split": pl.String})


@dataclass(frozen=True)
class Generator:
    name: str
    Config: type
    make: Callable[[object], pl.DataFrame]
    columns: tuple[str, ...]


GENERATORS: dict[str, Generator] = {
    "arithmetic": Generator("arithmetic", ArithmeticConfig, arithmetic,
                            ("id", "instruction", "answer", "num_steps", "split")),
    "numbers": Generator("numbers", NumbersConfig, numbers, ("id", "instruction", "answer", "kind", "split")),
}
