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
# Rules of one recipe, searched before RULES: replies its steps accept, so that its pinned run keeps rows
# (a pin of no kept rows cannot catch a change that loses them).
_REVERSED = " ".join(f"(?P<c{i}>\\w)" for i in range(8))
RECIPE_RULES = {
    # A question about the passage's heading; an answer that cites the first passage and quotes its
    # first sentence (of two passages: quotes the second, a wrong citation); a judge that finds an answer
    # supported when the sentence it quotes is in a passage the judge sees (only the cited ones).
    "grounded_qa": [
        {"match": r"Passage 1 \((?:[^)\n]*> )?(?P<topic>[^)>\n]+)\):[\s\S]*Write only the question",
         "reply": "Question: What does the passage say about {topic}?"},
        {"match": r"Answer the question using only the passages below[\s\S]*?\n\[(?P<cid>[^\]\n]+)\][^\n]*\n"
                  r"[\s\S]*?\n\n\[[^\]\n]+\][^\n]*\n(?P<fact>[^\n]*?[.!?])(?=\s)",
         "reply": "According to [{cid}], {fact}"},
        {"match": r"Answer the question using only the passage[\s\S]*?\n\[(?P<cid>[^\]\n]+)\][^\n]*\n"
                  r"(?P<fact>[^\n]*?[.!?])(?=\s)",
         "reply": "According to [{cid}], {fact}"},
        {"match": r"^Check whether the answer is supported[\s\S]*\n(?P<fact>[^\n]*?[.!?])(?=\s)[\s\S]*"
                  r"\nAnswer: According to \[[^\]\n]*\], (?P=fact)",
         "reply": "Supported: yes"},
        {"match": r"^Check whether the answer is supported", "reply": "Supported: no"},
    ],
    # A copy of the last example shown when it starts with "Write" (which the novelty filter drops); else a
    # task that differs from the others (its sequence comes from the conversation's digest, a word per
    # character, so ROUGE-L between two tasks stays under the threshold); an instance with the sequence
    # reversed, read back from the task.
    "self_instruct": [
        {"match": r"Come up with a list of diverse tasks[\s\S]*\n\d+\. (?P<last>Write [^\n]*)\n\d+\.$",
         "reply": " {last}"},
        {"match": r"Come up with a list of diverse tasks[\s\S]*\n\d+\.$",
         "reply": " Reverse the sequence " + " ".join(f"{{hash[{i}]}}" for i in range(8)) + "."},
        {"match": rf"\nTask: Reverse the sequence {_REVERSED}\.\nInput:$",
         "reply": "Input: <noinput>\nOutput: " + " ".join(f"{{c{i}}}" for i in reversed(range(8)))},
    ],
    # A record that matches the schema, with the topic and level of its row and a right answer; for a hard
    # exercise, one that writes its answer as text (not the schema's integer: dropped as schema_error).
    "typed_records": [
        {"match": r"Write one hard exercise about (?P<topic>[^\n]+?), with its",
         "reply": '{{"question": "In a lesson on {topic}, what is {score} times ten?", '
                  '"difficulty": "hard", "answer": "{score}0", "hints": ["Ten times a number ends in 0."]}}'},
        {"match": r"Write one (?P<level>easy|medium) exercise about (?P<topic>[^\n]+?), with its",
         "reply": '{{"question": "In a lesson on {topic}, what is {score} times ten?", '
                  '"difficulty": "{level}", "answer": {score}0, '
                  '"hints": ["Ten times a number ends in 0.", "Write a zero after {score}."]}}'},
    ],
    # The scripted model cannot add; these problems have answers that the text spells out digit by
    # digit (times ten, eleven times a digit, ten or eleven each), so their solutions are right.
    "quickstart": [
        {"match": r"Problem: A box holds (?P<a>\d+) pencils\. How many pencils are there in 10 boxes\?\nSolution:$",
         "reply": " {a} * 10 = {a}0. The answer is {a}0."},
        {"match": r"Problem: A box holds 10 pencils\. How many pencils are there in (?P<b>\d+) boxes\?\nSolution:$",
         "reply": " 10 * {b} = {b}0. The answer is {b}0."},
        {"match": r"Problem: A box holds 11 pencils\. How many pencils are there in (?P<b>\d) boxes\?\nSolution:$",
         "reply": " 11 * {b} = {b}{b}. The answer is {b}{b}."},
        {"match": r"Problem: (?P<n>\d)0 sweets are shared equally among (?P=n) friends\.[^\n]*\nSolution:$",
         "reply": " {n}0 / {n} = 10. The answer is 10."},
        {"match": r"Problem: (?P<n>\d)(?P=n) sweets are shared equally among (?P=n) friends\.[^\n]*\nSolution:$",
         "reply": " {n}{n} / {n} = 11. The answer is 11."},
    ],
}
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
    data["llm"] = {"backend": "scripted", "rules": RECIPE_RULES.get(name, []) + RULES}
    data.pop("evolve", None)
    recipe = recipe_from_data(data, file=f"recipes/{name}.yaml", base_dir=ROOT)
    version, manifest, _ = run_recipe(recipe, out, use_cache=False, progress=False)
    return {"rows": rows_digest(read_version(version)), "rejected": rows_digest(read_version(version, "rejected")),
            "manifest": {k: stable(v) for k, v in manifest.items()
                         if k in ("rows", "rejected_rows", "columns", "recipe_hash", "steps", "usage", "source",
                                  "models", "output_format", "backend_failures", "retries")}}


def pinned() -> dict:
    return json.loads(PINNED.read_text(encoding="utf-8")) if PINNED.is_file() else {}


# Recipes whose scripted run may keep no rows, with why (a pin of no rows cannot catch a change that loses
# them, so every other recipe must keep some). None: each recipe has rules it keeps rows with.
KEEPS_NO_ROWS: dict[str, str] = {}
NO_ROWS = hashlib.sha256(b"").hexdigest()[:16]


def drops(facts: dict) -> dict:
    """The rejected rows per step and reason, as the manifest counts them."""
    return {step["label"]: step["dropped"] for step in facts["manifest"]["steps"] if step["dropped"]}


@pytest.mark.parametrize("name", RECIPES)
def test_a_bundled_recipe_makes_the_rows_and_manifest_it_made_before(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    facts = run_facts(name, tmp_path)
    if name not in KEEPS_NO_ROWS:  # checked before a pin is written: a pin of no kept rows is not written
        assert facts["manifest"]["rows"] > 0 and facts["rows"] != NO_ROWS, (
            f"{name} keeps no rows on the scripted backend (drops: {drops(facts)})")
    if os.environ.get("PIN_RUNS") == "write":
        PINNED.write_text(json.dumps({**pinned(), name: facts}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    pin = pinned()[name]
    counts = [(run["manifest"]["rows"], run["manifest"]["rejected_rows"]) for run in (facts, pin)]
    assert counts[0] == counts[1], f"{name}: kept and rejected rows differ from the pin"
    assert drops(facts) == drops(pin), f"{name}: rows rejected for other reasons than the pin's"
    assert facts == pin


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
