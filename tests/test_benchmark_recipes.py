"""The recipes meant for a GPU and a real benchmark (GSM8K, MBPP), run on their mechanics: the
Hub model and data swapped for a scripted model and local slices of the same shape."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from factory.build import run_recipe
from factory.evolve.loop import Evolution
from factory.recipe import load_recipe
from factory.store import read_version

from .conftest import HUB_RECIPES, ROOT


def scripted(rules: list[tuple[str, str]]) -> str:
    return "llm=" + json.dumps({"backend": "scripted", "rules": [{"match": m, "reply": r} for m, r in rules]})


def test_code_rejection_sampling_keeps_the_solutions_that_pass_their_tests(tmp_path):
    rules = [("add two", "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\n```python\nprint(add(1, 2))\n```"),
             ("reverse a string", "```python\ndef reverse_string(s):\n    return s\n```"),
             ("largest", "```python\ndef largest(xs):\n    while True:\n        pass\n```"),
             (".", "I would rather not write code today.")]
    overrides = HUB_RECIPES["code_rejection_sampling"][1:] + [scripted(rules), "steps[0].solve.samples=2",
                                                               "steps[1].verify.time_limit=1"]
    recipe = load_recipe(ROOT / "recipes" / "code_rejection_sampling.yaml", overrides)
    version, manifest, _ = run_recipe(recipe, tmp_path / "out", use_cache=False, progress=False)
    kept = read_version(version)
    assert kept["instruction"].to_list() == ["Write a function to add two integers."]  # one of its 2 samples
    assert kept.select("tests_passed", "tests_total").row(0) == (3, 3)
    assert kept["messages"][0][1]["content"].startswith("Here it is:")
    rejected = read_version(version, "rejected")
    reasons = dict(rejected.group_by(pl.format("{} {}", "drop_step", "drop_reason")).len().iter_rows())
    # A reply without a fenced block is run as it is: prose does not compile.
    assert reasons == {"steps[1].verify wrong_answer": 2, "steps[1].verify timeout": 2,
                       "steps[1].verify syntax_error": 2, "steps[2].select duplicate": 1}
    wrong = rejected.filter(pl.col("drop_reason") == "wrong_answer")
    assert wrong["tests_passed"].to_list() == [1, 1] and "reverse_string('abc')" in wrong["drop_detail"][0]
    verify = manifest["steps"][1]
    assert verify["dropped"] == {"syntax_error": 2, "timeout": 2, "wrong_answer": 2}


def test_self_evolve_gsm8k_checks_answers_as_mathematics_through_a_round(tiny_model_dir, tmp_path):
    # sqrt(841) is 29: the math verifier accepts it where the numeric one would read 841.
    # (The scripted model's replies are format strings: braces are doubled.)
    rules = [("pencils", "3 * 12 = 36 and 36 - 7 = 29, so she keeps $\\boxed{{\\sqrt{{841}}}}$ pencils."),
             ("train travels", "45 * 4 + 30 = 210. The answer is 210 km."),
             ("marbles", "4 * 25 - 13 = 87, so \\boxed{{87}}."),
             (".", "I think the answer is \\boxed{{7}}.")]
    overrides = HUB_RECIPES["self_evolve_gsm8k"][1:] + [
        scripted(rules), f"evolve.model={tiny_model_dir}", "evolve.rounds=1", "steps[0].solve.samples=2",
        "evolve.train={max_steps: 1, batch_size: 2, max_length: 96, save_steps: 1}"]
    state = Evolution(str(ROOT / "recipes" / "self_evolve_gsm8k.yaml"), tmp_path / "run", overrides,
                      progress=False).run()
    base, first = state["rounds"]
    assert base["eval"]["correct"] == 1 and base["eval"]["items"] == 4  # the same rules answer the eval
    assert first["gap"]["J_f"] == round(4 / 12, 4) and first["gap"]["selected_by"] == "math"
    assert first["gap"]["verifiers"]["math"]["J_f_w"] == 1.0
    kept = read_version(Path(first["version"]))
    # One of each task's two samples; "210 km" equals the reference 210: units are dropped.
    assert sorted(kept["prediction"].to_list()) == ["210 km", "\\sqrt{841}"]
    assert "adapter" in first and state["stopped"] == "completed 1 round(s)"
