"""Curation filters: exact dedup, self-consistency, score quantiles, heuristics, decontamination."""

from __future__ import annotations

import json

import polars as pl
import pytest

from factory.build import run_recipe
from factory.cache import Cache
from factory.errors import RecipeError
from factory.recipe import load_recipe
from factory.driver import Driver
from factory.steps.context import StepContext
from factory.steps.drops import DROP, DROP_DETAIL
from factory.store import read_version
from filters.consistency import Consistency, ConsistencyConfig
from filters.exact import ExactConfig, ExactDedup
from filters.heuristics import Heuristics, HeuristicsConfig
from filters.score import ScoreConfig, ScoreFilter

from .conftest import ROOT, SCRIPTED_LLM, SEEDS


def reasons(frame: pl.DataFrame) -> list:
    return frame[DROP].to_list()


def test_exact_keeps_the_first_copy_after_normalisation():
    table = pl.DataFrame({"instruction": ["Write a poem.", "write  a POEM.", "Write a poem!", "Other", None, None]})
    out = ExactDedup(ExactConfig()).process(table)
    assert reasons(out) == [None, "duplicate", None, None, None, "duplicate"]
    assert out["_duplicate_of"].to_list() == [None, "Write a poem.", None, None, None, None]
    out = ExactDedup(ExactConfig(ignore_punctuation=True)).process(table)
    assert reasons(out)[:3] == [None, "duplicate", "duplicate"]


def test_exact_on_several_columns():
    table = pl.DataFrame({"instruction": ["q", "q", "q"], "response": ["a", "b", "a"]})
    out = ExactDedup(ExactConfig(columns=["instruction", "response"])).process(table)
    assert reasons(out) == [None, None, "duplicate"]


def test_consistency_majority_vote():
    table = pl.DataFrame({
        "instruction": ["t1"] * 4 + ["t2"] * 4 + ["t3"] * 2,
        "prediction": ["14", "14.0", "13", None, "5", "6", "7", "8", "1", "2"],
        "sample": list(range(4)) * 2 + [0, 1]})
    step = Consistency(ConsistencyConfig(min_agreement=0.5))
    ctx = StepContext()
    out = step.process(table, ctx)
    assert reasons(out) == [None, None, "minority_answer", "no_answer"] + ["low_agreement"] * 4 + [None, "minority_answer"]
    assert out["agreement"].to_list()[:4] == [0.5] * 4
    assert out["majority_answer"].to_list()[0] == "14"
    assert out["majority_answer"].to_list()[8] == "1"  # a 1-1 tie goes to the answer seen first
    assert out["instruction"].to_list() == table["instruction"].to_list()  # order kept
    assert ctx.report == {"tasks": 3, "tasks_kept": 2}


def test_score_top_k_and_quantile_per_task():
    table = pl.DataFrame({"instruction": ["a", "a", "a", "b", "b"], "score": [3.0, 9.0, 7.0, 5.0, 5.0]})
    best_of_n = ScoreFilter(ScoreConfig(top_k=1, group_by="instruction")).process(table)
    assert reasons(best_of_n) == ["not_top_k", None, "not_top_k", None, "not_top_k"]
    top_third = ScoreFilter(ScoreConfig(top_quantile=0.34, group_by="instruction")).process(table)
    assert reasons(top_third)[:3] == ["below_quantile", None, "below_quantile"]
    assert reasons(ScoreFilter(ScoreConfig(min=6)).process(table)) == ["below_min", None, None, "below_min",
                                                                        "below_min"]


def test_heuristics_reasons_and_details():
    texts = ["Paris is the capital of France.",
             "Hi",
             "I'm sorry, but I cannot help with that request.",
             "Le chat est assis sur le tapis et regarde la pluie tomber doucement dehors.",
             "Baby " * 40,
             "line\nline\nline\nother",
             "Sure! I'm sorry to hear that your plant died, " + "here is a long helpful answer " * 20]
    step = Heuristics(HeuristicsConfig(min_words=2, refusal_window=60))
    out = step.process(pl.DataFrame({"response": texts}))
    assert reasons(out) == [None, "too_short", "refusal", "wrong_language", "repetitive", "repetitive", "refusal"]
    assert out[DROP_DETAIL][1] == "response has 1 words (min_words 2)"
    assert "fr" in out[DROP_DETAIL][3]
    only_length = Heuristics(HeuristicsConfig(min_words=2, checks=["length"])).process(pl.DataFrame({"response": texts}))
    assert reasons(only_length) == [None, "too_short", None, None, None, None, None]


def test_heuristics_unknown_check_is_a_recipe_error(write_recipe):
    with pytest.raises(RecipeError, match=r"steps\[1\]\.heuristics\.checks\[0\]: 'lenght' is not one of .*did you "
                                          r"mean 'length'"):
        load_recipe(write_recipe(f"name: h\n{SCRIPTED_LLM}source: {{path: {SEEDS}}}\nsteps:\n  - solve: {{}}\n"
                                 "  - heuristics: {checks: [lenght]}\n"))


def decontaminate_recipe(write_recipe, eval_path, extra=""):
    return load_recipe(write_recipe(f"name: d\n{SCRIPTED_LLM}source: {{path: {SEEDS}}}\nsteps:\n"
                                    f"  - decontaminate: {{eval: {eval_path}{extra}}}\noutput: {{format: raw}}\n"))


def test_decontaminate_finds_long_and_short_overlaps_and_reports_them(write_recipe, tmp_path):
    seeds = [json.loads(line) for line in SEEDS.open()]
    long_item = "  Tell me: " + seeds[0]["instruction"].upper() + " Please hurry."
    evals = [{"id": "e-long", "instruction": long_item},                      # shares a 13-gram with seed 0
             {"id": "e-short", "instruction": "Compute 17 multiplied by 23."},  # 5 words, inside seed 1
             {"id": "e-none", "instruction": "A question that appears nowhere in the training data at all."}]
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("\n".join(json.dumps(e) for e in evals))
    recipe = decontaminate_recipe(write_recipe, eval_path, ", eval_id_column: id")
    step, ctx = recipe.steps[0], StepContext()
    out = step.process(recipe.source.read(), ctx)
    dropped = out.filter(pl.col(DROP).is_not_null())
    assert dropped["id"].to_list() == ["seed-000", "seed-001"]
    assert dropped["_matched_eval"].to_list() == [["e-long"], ["e-short"]]
    assert ctx.report["eval_items"] == 3 and ctx.report["eval_items_matched"] == 2
    assert ctx.report["matched_eval_ids"] == ["e-long", "e-short"]


def test_decontaminate_validates_its_eval_set(write_recipe, tmp_path):
    with pytest.raises(RecipeError, match=r"steps\[0\]\.decontaminate\.eval: eval set 'nope.jsonl' does not exist"):
        decontaminate_recipe(write_recipe, "nope.jsonl")
    (tmp_path / "e.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(RecipeError, match="the eval set has no column 'instruction'"):
        decontaminate_recipe(write_recipe, tmp_path / "e.jsonl")


def grams(text: str, n: int = 13) -> set:
    import re

    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_curation_chain_end_to_end_with_manifest_counts(write_recipe, tmp_path):
    """solve x4 -> verify -> consistency -> score top-1 per task -> decontaminate -> exact."""
    llm = """\
llm:
  backend: scripted
  rules:
    - {match: "Rate the response", reply: "Score: {score}"}
    - {match: "Tariq", reply: "33 + 9 * 33 = 330. The answer is 330."}
    - {match: "Problem 5", reply: "The answer is {digit}."}
    - {match: ".", reply: "Working it out. The answer is 7."}
"""
    eval_rows = [json.loads(line) for line in (ROOT / "data" / "eval" / "arithmetic.jsonl").open()][:5]
    source = tmp_path / "train.jsonl"
    rows = [{"instruction": f"Problem {i}: what is 3 + 4?", "answer": "7"} for i in range(6)]
    assert eval_rows[0]["instruction"].startswith("Tariq reads 33 pages") and eval_rows[0]["answer"] == "330"
    rows.append({"instruction": eval_rows[0]["instruction"], "answer": eval_rows[0]["answer"]})  # a leaked eval item
    source.write_text("\n".join(json.dumps(r) for r in rows))
    path = write_recipe(f"""\
name: curate
{llm}source: {{path: {source}}}
steps:
  - solve: {{samples: 4, answer_format: number}}
  - verify: {{reference: answer}}
  - consistency: {{min_agreement: 0.75}}
  - judge: {{}}
  - score: {{top_k: 1, group_by: instruction}}
  - decontaminate: {{eval: data/eval/arithmetic.jsonl}}
  - exact: {{columns: [instruction]}}
""")
    recipe = load_recipe(path)
    version, manifest, _ = run_recipe(recipe, tmp_path / "out",
                                      driver=Driver(Cache(tmp_path / "cache"), progress=False))
    steps = {s["name"]: s for s in manifest["steps"]}
    kept = read_version(version)
    assert steps["solve"]["rows_out"] == 28
    assert steps["verify"]["dropped"] == {}
    # "Problem 5" gets scattered answers: its samples disagree and the task goes.
    assert steps["consistency"]["dropped"] == {"low_agreement": 4}
    assert steps["consistency"]["report"] == {"tasks": 7, "tasks_kept": 6}
    assert steps["score"]["dropped"] == {"not_top_k": 18}
    decon = steps["decontaminate"]
    assert decon["dropped"] == {"contaminated": 1}
    # Templated problems share phrasing: every eval item with a 13-gram in common with the
    # leaked one is reported, computed here independently.
    all_evals = [json.loads(line)["instruction"] for line in (ROOT / "data" / "eval" / "arithmetic.jsonl").open()]
    leaked = grams(all_evals[0])
    expected = [f"eval[{i}]" for i, text in enumerate(all_evals) if grams(text) & leaked]
    assert decon["report"]["eval_items"] == 200 and decon["report"]["matched_eval_ids"] == expected[:100]
    assert decon["report"]["eval_items_matched"] == len(expected) and "eval[0]" in expected
    assert steps["exact"]["dropped"] == {}
    assert kept.height == manifest["rows"] == 5 and kept["correct"].all()
    assert "matched_eval" not in kept.columns
    leaked = read_version(version, "rejected").filter(pl.col("drop_reason") == "contaminated").row(0, named=True)
    assert leaked["matched_eval"] == expected and leaked["drop_step"] == "steps[5].decontaminate"
    assert sorted(kept["instruction"]) == [f"Problem {i}: what is 3 + 4?" for i in range(5)]


# -- `column:` for one column, `columns:` for several, in every step -----------------------------

def filter_step(write_recipe, step: str):
    path = write_recipe(f"name: cols\nsource: {{path: {SEEDS}}}\nsteps:\n  - {step}\noutput: {{format: raw}}\n")
    return load_recipe(path).steps[0]


@pytest.mark.parametrize("step, option, expected", [
    ("exact: {column: output}", "columns", ["output"]),
    ("exact: {columns: output}", "columns", ["output"]),
    ("exact: {columns: [instruction, output]}", "columns", ["instruction", "output"]),
    ("minhash: {columns: [instruction, output]}", "columns", ["instruction", "output"]),
    ("minhash: {columns: output}", "columns", ["output"]),
    ("minhash: {column: output}", "column", "output"),
    ("heuristics: {column: output}", "columns", ["output"]),
    ("heuristics: {columns: output, checks: length}", "checks", ["length"]),
    ("decontaminate: {eval: data/eval/arithmetic.jsonl, column: output, eval_column: instruction}", "columns",
     ["output"]),
    ("decontaminate: {eval: data/eval/arithmetic.jsonl, eval_column: instruction}", "eval_columns", ["instruction"]),
    ("score: {column: output, min: 1}", "column", "output"),
    ("consistency: {column: output, answer_column: instruction}", "column", "output"),
])
def test_column_and_columns_are_accepted_everywhere(write_recipe, step, option, expected, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert getattr(filter_step(write_recipe, step).config, option) == expected


@pytest.mark.parametrize("step", ["exact: {column: output, columns: [instruction]}",
                                  "minhash: {column: output, columns: [instruction, output]}",
                                  "heuristics: {column: output, columns: output}"])
def test_column_and_columns_together_is_one_located_error(write_recipe, step):
    with pytest.raises(RecipeError) as err:
        filter_step(write_recipe, step)
    [problem] = err.value.problems
    assert problem.line == 4 and problem.key_path.endswith(".column")
    assert problem.format().endswith("column: both `column` and `columns` are given; keep one: `column: x` for one "
                                     "column, `columns: [x, y]` for several")


def test_exact_on_one_column_given_as_column(write_recipe, tmp_path):
    step = filter_step(write_recipe, "exact: {column: output}")
    table = pl.DataFrame({"instruction": ["a", "b", "c"], "output": ["same", "Same", "other"]})
    assert reasons(step.process(table)) == [None, "duplicate", None]
