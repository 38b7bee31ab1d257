"""The self-evolution loop: one full round, then a second, on a tiny random model and the
scripted backend; every artefact exists and links to its parent; training changes the
adapter and never the base weights; an interrupted loop resumes; the report redraws."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import polars as pl
import pytest

from factory.cli import main
from factory.errors import RecipeError
from factory.evolve.loop import Evolution
from factory.recipe import load_recipe
from factory.evolve.evaluate import distinct_n, gap_metrics, pass_at_k

from .conftest import ROOT

LLM = """\
llm:
  backend: scripted
  rules:
    - {match: "Which response answers", reply: "Winner: A"}
    - {match: "Rate the response", reply: "Score: {score}"}
    - {match: "Think step by step", reply: "Step by step: I add things up. The answer is {digit}."}
    - {match: ".", reply: "A plain answer {hash}."}
"""


def evolve_recipe(folder: Path, tiny_model_dir: Path, rounds: int = 1) -> Path:
    path = folder / "evolve.yaml"
    path.write_text(f"""\
name: tiny-evolve
seed: 1
{LLM}source: {{generator: arithmetic, num_rows: 6, max_steps: 3}}
steps:
  - solve: {{samples: 4, temperature: 0.8, cot: true, answer_format: number}}
  - verify: {{reference: answer}}
  - judge: {{reasoning: false}}
  - consistency: {{min_agreement: 0.0}}
  - score: {{top_k: 1, group_by: instruction, column: agreement}}
output: {{format: messages}}
evolve:
  rounds: {rounds}
  min_gap: null  # the scripted answers give no gap; train anyway, this is about the artefacts
  model: {tiny_model_dir}
  train: {{max_steps: 2, batch_size: 2, max_length: 96, save_steps: 1, learning_rate: 0.01}}
  eval: {{path: {ROOT / 'data' / 'eval' / 'arithmetic.jsonl'}, limit: 5}}
  win_rate: {{path: {ROOT / 'data' / 'seeds' / 'tasks.jsonl'}, limit: 3}}
""")
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_one_round_then_two_every_artefact_links_to_its_parent(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    base_weights = sha(tiny_model_dir / "model.safetensors")
    recipe = evolve_recipe(tmp_path, tiny_model_dir)
    out = tmp_path / "run"
    state = Evolution(str(recipe), out, [], progress=False).run()

    baseline, first = state["rounds"]
    assert set(baseline) == {"round", "eval", "seconds"} and baseline["eval"]["items"] == 5
    version = Path(first["version"])
    manifest = json.loads((version / "manifest.json").read_text())
    assert version == out / "datasets" / "tiny-evolve" / "v1"
    assert manifest["parent"] is None and manifest["evolve"] == {"run": str(out), "round": 1, "adapter": None}
    adapter = Path(first["adapter"])
    record = json.loads((adapter / "training.json").read_text())
    assert record["dataset"]["path"] == str(version.resolve())
    assert record["dataset"]["manifest_sha256"] == sha(version / "manifest.json")
    assert record["metrics"]["steps"] == 2 and record["config"]["init_adapter"] is None
    # LoRA starts with B = 0: a trained adapter has moved away from it.
    lora_b = [t for name, t in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in name]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)
    assert sha(tiny_model_dir / "model.safetensors") == base_weights
    gap = first["gap"]
    assert gap["samples"] == 24 and set(gap["verifiers"]) >= {"majority_vote", "judge_score", "programmatic"}
    assert gap["verifiers"]["programmatic"]["J_f_w"] in (0.0, 1.0)
    assert first["win_rate"]["judged"] == 3 and first["win_rate"]["ties"] == 3  # "Winner: A" both ways: a tie
    for name in ("report.json", "report.md", "report.png", "evolve.json"):
        assert (out / name).is_file()

    # A second round continues from the first: its data's parent is v1, its model round 1's adapter.
    recipe = evolve_recipe(tmp_path, tiny_model_dir, rounds=2)  # same recipe, more rounds
    with pytest.raises(Exception, match="another recipe"):
        Evolution(str(recipe), out, [], progress=False)
    state = Evolution(str(evolve_recipe(tmp_path, tiny_model_dir)), out, [], rounds=2, progress=False).run()
    second = state["rounds"][2]
    assert state["rounds"][1]["adapter"] == str(adapter)  # round 1 was not redone
    manifest2 = json.loads((Path(second["version"]) / "manifest.json").read_text())
    assert manifest2["parent"] == str(version) and manifest2["evolve"]["adapter"] == str(adapter)
    assert manifest2["adapter"] == str(adapter)
    record2 = json.loads((Path(second["adapter"]) / "training.json").read_text())
    assert record2["config"]["init_adapter"] == str(adapter)
    assert state["stopped"] == "completed 2 round(s)"
    report = (out / "report.md").read_text()
    assert "| 2 |" in report and "J(f[w])" in report
    # Gains over round 0 come with a paired interval; every phase of every round is timed.
    assert "gain over round 0 [95 % CI]" in report and "| 1 | 0.000 | +0.000 [+0.000, +0.000]" in report
    assert "## Seconds per phase" in report and set(state["rounds"][2]["seconds"]) == {"generate", "train", "eval",
                                                                                         "win_rate"}


def test_report_redraws_from_the_state(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    Evolution(str(evolve_recipe(tmp_path, tiny_model_dir)), out, [], progress=False).run()
    (out / "report.png").unlink()
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.png").stat().st_size > 10_000 and "Self-evolution report" in (out / "report.md").read_text()
    assert main(["report", str(tmp_path)]) == 2
    assert "no evolve.json" in capsys.readouterr().err


def test_evolve_section_is_validated(tmp_path, tiny_model_dir):
    recipe = evolve_recipe(tmp_path, tiny_model_dir)
    text = recipe.read_text()
    bad = text.replace("max_steps: 2", "max_step: 2").replace("method: sft", "")
    recipe.write_text(bad)
    with pytest.raises(RecipeError, match=r"evolve\.train\.max_step: unknown key 'max_step'; did you mean 'max_steps'"):
        load_recipe(recipe)
    recipe.write_text(text.replace("  model: " + str(tiny_model_dir) + "\n", ""))
    with pytest.raises(RecipeError, match="evolve.model: a scripted llm has no weights to train"):
        load_recipe(recipe)
    recipe.write_text(text.replace("train: {", "train: {dataset: x, "))
    with pytest.raises(RecipeError, match="evolve.train.dataset: 'dataset' is set by the loop"):
        load_recipe(recipe)


def test_gap_metrics_by_hand():
    samples = pl.DataFrame({
        "instruction": ["a"] * 4 + ["b"] * 4,
        "prediction": ["1", "1", "2", None, "5", "6", "7", "8"],
        "correct": [True, True, False, False, False, False, False, True],
        "score": [9, 8, 2, 1, 9, 1, 1, 1],
        "response": ["x y", "x y", "z", "", "p q r", "s", "t", "u"]})
    report = gap_metrics(samples)
    assert report["J_f"] == 3 / 8
    mv = report["verifiers"]["majority_vote"]  # task a: "1" twice of 4 (0.5 agreement); task b: none reaches 0.5
    assert mv["accepted"] == 2 and mv["J_f_w"] == 1.0 and mv["gap"] == round(1 - 3 / 8, 4)
    assert mv["relative_gap"] == 1.0
    judge = report["verifiers"]["judge_score"]  # threshold: upper half of the top score 9 -> 6
    assert judge["accepted"] == 3 and judge["J_f_w"] == round(2 / 3, 4)
    assert report["verifiers"]["programmatic"]["J_f_w"] == 1.0
    assert report["pass_at_k"] == {"pass@1": round((2 / 4 + 1 / 4) / 2, 4), "pass@4": 1.0}
    assert report["diversity"]["distinct_answers_per_sample"] == round((3 / 4 + 4 / 4) / 2, 4)  # None counts once


def test_gap_of_a_reward_model_is_best_of_n_and_the_reference_check_takes_the_verify_method_name():
    samples = pl.DataFrame({
        "instruction": ["a"] * 3 + ["b"] * 3,
        "correct": [False, True, True, False, False, True],
        "reward": [0.9, 0.5, 0.9, 2.0, None, -1.0],  # a: a tie at 0.9 goes to the earlier (wrong) sample
        "response": ["p", "q", "r", "s", "t", "u"]})
    report = gap_metrics(samples, reference_check="math")
    assert set(report["verifiers"]) == {"reward_model", "math"}
    best = report["verifiers"]["reward_model"]
    assert best["accepted"] == 2 and best["J_f_w"] == 0.0 and best["gap"] == -0.5
    two = gap_metrics(samples, reward_per_task=2)["verifiers"]["reward_model"]  # the null reward is never accepted
    assert two["accepted"] == 4 and two["J_f_w"] == 0.5
    assert gap_metrics(samples, reward_per_task=2, min_reward=0.6)["verifiers"]["reward_model"]["accepted"] == 3
    assert "reward_model" not in gap_metrics(samples.drop("reward"))["verifiers"]


def test_pass_at_k_and_distinct_n():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert math.isclose(pass_at_k(4, 1, 2), 0.5)
    assert distinct_n(["a b a b", "a b"], 1) == round(2 / 6, 4)
    assert distinct_n(["a b c", "a b d"], 2) == round(3 / 4, 4)
