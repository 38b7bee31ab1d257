"""The same recipes give the same rows and manifests: bundled recipes run on the scripted
backend, and an eval, compared with what the code gave before a refactor (``tests/data/pinned_runs.json``).

A change that is meant to change what a recipe makes rewrites the file on purpose:
``PIN_RUNS=write pytest tests/test_pinned_runs.py`` (and says why in its commit).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from factory.build import run_recipe
from factory.driver import Driver
from factory.evolve.evaluate import accuracy, correct_bits, eval_step, read_eval
from factory.llm import ScriptedBackend, ScriptedConfig
from factory.recipe import recipe_from_data
from factory.store import read_version

from .conftest import ROOT

PINNED = ROOT / "tests" / "data" / "pinned_runs.json"
RULES = [
    {"match": "Rate the response|Score:|score", "reply": "Looks fine. Score: {score}"},
    {"match": "diverse tasks|new task|Task \\d", "reply": " Explain idea number {hash} in simple words"},
    {"match": "[Pp]roblem", "reply": " {digit} + 1 = {digit}. The answer is {digit}."},
    {"match": ".", "reply": "Answer {hash} with {digit} apples. The answer is {digit}."},
]
RECIPES = ["quickstart", "arithmetic_consistency", "evol_instruct", "judged_instructions", "own_prompt",
           "preference_pairs", "self_refine", "self_instruct", "typed_records", "grounded_qa"]
VOLATILE = {"seconds", "created_at", "timings", "path", "code_version", "recipe_file", "files", "started_at",
            "run_seconds"}


def rows_digest(frame) -> str:
    lines = [json.dumps(row, sort_keys=True, default=str) for row in frame.to_dicts()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def stable(value):
    """The manifest without what changes from run to run (times, paths, the code's version)."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def run_facts(name: str, out: Path) -> dict:
    path = ROOT / "recipes" / f"{name}.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["llm"] = {"backend": "scripted", "rules": RULES}
    data.pop("evolve", None)
    recipe = recipe_from_data(data, file=f"recipes/{name}.yaml", base_dir=ROOT)
    version, manifest, _ = run_recipe(recipe, out, use_cache=False, progress=False)
    return {"rows": rows_digest(read_version(version)), "rejected": rows_digest(read_version(version, "rejected")),
            "manifest": {k: stable(v) for k, v in manifest.items()
                         if k in ("rows", "rejected_rows", "columns", "recipe_hash", "steps", "usage", "source",
                                  "models", "output_format", "backend_failures", "retries")}}


def pinned() -> dict:
    return json.loads(PINNED.read_text(encoding="utf-8")) if PINNED.is_file() else {}


@pytest.mark.parametrize("name", RECIPES)
def test_a_bundled_recipe_makes_the_rows_and_manifest_it_made_before(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    facts = run_facts(name, tmp_path)
    if os.environ.get("PIN_RUNS") == "write":
        PINNED.write_text(json.dumps({**pinned(), name: facts}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    assert facts == pinned()[name]


def test_an_eval_gives_the_result_it_gave_before():
    table = read_eval(str(ROOT / "data" / "eval" / "arithmetic.jsonl"), limit=40)
    places = {question: (i, answer) for i, (question, answer) in enumerate(zip(table["instruction"], table["answer"]))}

    def reply(conversation, sample):  # right, wrong, no answer, cut at the token limit: in turn
        i, answer = next(v for question, v in places.items() if question in conversation[-1]["content"])
        return [f"It is {answer}. The answer is {answer}.", f"The answer is {int(answer) + 1}.", "I am not sure.",
                f"The answer is {answer}. " + "and then " * 60][i % 4]

    backend = ScriptedBackend(ScriptedConfig(), reply_fn=reply)
    result = accuracy(Driver(progress=False, backend_factory=lambda config: backend),
                      eval_step(backend.config, True, "number", 64), table, "instruction", "answer")
    assert {**result.summary(), "correct_items": correct_bits(result)} == pinned()["eval"]
