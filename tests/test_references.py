"""References are read with the same extraction as predictions: a GSM8K-style worked solution
(``... #### 18``), ``\\boxed{18}``, "The answer is 18." and a bare value all give 18, in
``verify``, in ``factory eval`` and in the eval of ``factory evolve``; a reference with
no value is an error that names the row, never a silent miss."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from factory.answers import answers_match, reference_answer
from factory.build import run_recipe
from factory.cache import Cache
from factory.cli import main
from factory.driver import Driver
from factory.errors import FactoryError
from factory.evolve.evaluate import accuracy, eval_step
from factory.evolve.loop import Evolution
from factory.llm import ScriptedConfig
from factory.recipe import load_recipe
from factory.store import read_version

WORKED = "Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18 every day.\n#### 18"
NUMBER_REFERENCES = [WORKED, "\\boxed{18}", "The answer is 18.", "18", "18.0", "$18", "Answer: 18"]


@pytest.mark.parametrize("reference, method, value", [
    (WORKED, "numeric", "18"), (WORKED, "auto", "18"), (WORKED, "exact", "18"),
    ("\\boxed{18}", "auto", "18"), ("\\boxed{\\frac{3}{4}}", "numeric", "0.75"),
    ("The answer is 18.", "numeric", "18"), ("The answer is: 18", "exact", "18"),
    ("1,234", "numeric", "1,234"), ("1,234", "auto", "1,234"), ("330", "auto", "330"), ("$5.50", "numeric", "$5.50"),
    ("3/4", "number", "3/4"), ("B", "choice", "B"), ("(B)", "choice", "B"), ("The answer is (B)", "choice", "B"),
    ("The answer is (B)", "auto", "(B)"), ("Paris", "normalized", "Paris"), ("Answer: Paris", "normalized", "Paris"),
    ("Answer: Paris", "text", "Paris"), ("the water cycle", "auto", "the water cycle"),
    ("the water cycle", "exact", "the water cycle"),
    ("unknown", "numeric", None), ("unknown", "number", None), ("", "auto", None), ("  ", "exact", None),
    (None, "numeric", None), ("Paris", "choice", None),
])
def test_reference_answer(reference, method, value):
    assert reference_answer(reference, method) == value


@pytest.mark.parametrize("reference", NUMBER_REFERENCES + ["1,234"])
def test_every_reference_format_matches_its_prediction(reference):
    prediction = "1234" if reference == "1,234" else "18"
    for method in ("auto", "numeric"):
        assert answers_match(prediction, reference_answer(reference, method), method)
    assert not answers_match("17", reference_answer(reference, "numeric"), "numeric")


def test_bare_references_match_as_before():
    for prediction, reference, method in [("330", "330", "auto"), ("B", "B", "choice"), ("paris", "Paris", "auto"),
                                          ("0.75", "3/4", "numeric"), ("5.5", "$5.50", "auto")]:
        assert answers_match(prediction, reference, method)
        assert answers_match(prediction, reference_answer(reference, method), method)


# -- through the verify step, in a recipe run ---------------------------------------------------

LLM = """\
llm:
  backend: scripted
  rules:
    - {match: "eggs", reply: "16 - 3 - 4 = 9 and 9 * 2 = 18. The answer is 18."}
    - {match: "thousand", reply: "Adding up gives 1,234. The answer is 1234."}
    - {match: "planet", reply: "Mars is red. The answer is (B)."}
    - {match: "capital", reply: "It is on the Seine.\\nAnswer: Paris"}
    - {match: "rain", reply: "Water evaporates and falls.\\nAnswer: The water cycle."}
    - {match: ".", reply: "No idea. The answer is 7."}
"""


def verify_run(write_recipe, tmp_path: Path, rows: list[dict], answer_format: str, method: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = tmp_path / f"{answer_format}.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows))
    path = write_recipe(f"name: refs\n{LLM}source: {{path: {source}}}\nsteps:\n"
                        f"  - solve: {{answer_format: {answer_format}}}\n"
                        f"  - verify: {{reference: answer, method: {method}}}\n", name=f"{answer_format}-{method}.yaml")
    version, manifest, _ = run_recipe(load_recipe(path), tmp_path / "out",
                                      driver=Driver(Cache(tmp_path / "cache"), progress=False))
    return read_version(version)


def test_verify_reads_references_in_every_format(write_recipe, tmp_path):
    eggs = "How many dollars does Janet make from her eggs?"
    rows = [{"id": f"n{i}", "instruction": eggs, "answer": ref} for i, ref in enumerate(NUMBER_REFERENCES)]
    rows += [{"id": "n-big", "instruction": "What is a thousand and more?", "answer": "1,234"},
             {"id": "n-wrong", "instruction": eggs, "answer": "#### 19"}]
    for method in ("auto", "numeric"):
        kept = verify_run(write_recipe, tmp_path / method, rows, "number", method)
        assert dict(zip(kept["id"], kept["correct"])) == {**{f"n{i}": True for i in range(len(NUMBER_REFERENCES))},
                                                           "n-big": True, "n-wrong": False}

    planet = "Which planet is red? (A) Venus (B) Mars"
    rows = [{"instruction": planet, "answer": ref} for ref in ("(B)", "B", "The answer is (B)", "b", "(A)")]
    kept = verify_run(write_recipe, tmp_path / "choice", rows, "choice", "choice")
    assert kept["correct"].to_list() == [True, True, True, True, False]

    rows = [{"instruction": "What is the capital of France?", "answer": ref}
            for ref in ("Paris", "Answer: Paris", "The answer is Paris.", "Lyon")]
    rows.append({"instruction": "Where does rain come from?", "answer": "the water cycle"})
    kept = verify_run(write_recipe, tmp_path / "text", rows, "text", "normalized")
    assert kept["correct"].to_list() == [True, True, True, False, True]


def test_a_reference_without_a_value_stops_the_run_naming_the_row(write_recipe, tmp_path, capsys):
    source = tmp_path / "refs.jsonl"
    rows = [{"id": "q1", "instruction": "How many eggs?", "answer": "#### 18"},
            {"id": "q2", "instruction": "How many eggs now?", "answer": "unknown"}]
    source.write_text("\n".join(json.dumps(r) for r in rows))
    path = write_recipe(f"name: refs\n{LLM}source: {{path: {source}}}\nsteps:\n  - solve: {{answer_format: number}}\n"
                        "  - verify: {reference: answer, method: numeric}\n")
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: steps[1].verify: row id 'q2': the reference 'unknown' in column 'answer' holds no number; "
                   "write the number (330, 1,234, 3/4), or end a worked solution with `#### 330`; fix the reference "
                   "or remove the row from the source")
    assert not (out / "refs").exists()


def test_an_empty_reference_without_an_id_is_named_by_its_task(tmp_path):
    from factory.steps.verify import Verify, VerifyConfig

    batch = pl.DataFrame({"instruction": ["What is 2 + 2?", "What is 3 + 3?"], "answer": ["4", None],
                          "prediction": ["4", "6"]})
    with pytest.raises(FactoryError, match=r"the row with instruction 'What is 3 \+ 3\?': the reference null in "
                                           r"column 'answer' is empty"):
        Verify(VerifyConfig()).process(batch)


@pytest.mark.parametrize("instruction, named", [
    ("x" * 60, "the row with instruction '" + "x" * 60 + "'"),  # 60 characters: whole
    ("y" * 60 + "z", "the row with instruction '" + "y" * 60 + "...'"),  # longer: its first 60 and ...
])
def test_a_row_is_named_by_its_task_cut_at_60_characters(instruction, named):
    from factory.steps.verify import Verify, VerifyConfig

    batch = pl.DataFrame({"instruction": ["What is 2 + 2?", instruction], "answer": ["4", ""],
                          "prediction": ["4", "6"]})
    with pytest.raises(FactoryError) as err:
        Verify(VerifyConfig()).process(batch)
    assert str(err.value).startswith(f"steps[0].verify: {named}: the reference '' in column 'answer' is empty")


# -- factory eval and the eval of factory evolve ------------------------------------------

SCRIPTED = ScriptedConfig(rules=[{"match": "eggs", "reply": "9 * 2 = 18. The answer is 18."},
                                 {"match": "planet", "reply": "The answer is (B)."},
                                 {"match": ".", "reply": "The answer is 7."}])


def test_evaluate_scores_worked_solutions_and_rejects_empty_references(tmp_path):
    table = pl.DataFrame({"instruction": ["How many eggs?"] * len(NUMBER_REFERENCES) + ["Other?"],
                          "answer": NUMBER_REFERENCES + ["The answer is 8."]})
    result = accuracy(Driver(progress=False), eval_step(SCRIPTED, True, "number", 64), table, "instruction", "answer")
    assert [r["correct"] for r in result.results] == [True] * len(NUMBER_REFERENCES) + [False]
    assert result.results[0]["reference"] == "18" and result.correct == len(NUMBER_REFERENCES)

    choices = pl.DataFrame({"question": ["Which planet is red?"] * 3, "gold": ["(B)", "The answer is (B)", "A"]})
    result = accuracy(Driver(progress=False), eval_step(SCRIPTED, False, "choice", 64), choices, "question", "gold")
    assert [r["correct"] for r in result.results] == [True, True, False]

    bad = pl.DataFrame({"instruction": ["How many eggs?", "And now?"], "answer": ["#### 18", "unknown"]})
    with pytest.raises(FactoryError) as err:
        accuracy(Driver(progress=False), eval_step(SCRIPTED, True, "number", 64), bad, "instruction", "answer",
                 source="data/eval/gsm.jsonl")
    assert str(err.value).startswith("data/eval/gsm.jsonl, line 2: the reference 'unknown' in column 'answer' "
                                     "holds no number")


def test_evolve_eval_reads_worked_solutions(write_recipe, tmp_path):
    eval_set = tmp_path / "gsm.jsonl"
    rows = [{"instruction": "How many eggs?", "answer": ref} for ref in NUMBER_REFERENCES]
    eval_set.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = write_recipe(f"""\
        name: evolve-refs
        llm:
          backend: scripted
          rules:
            - {{match: "eggs", reply: "9 * 2 = 18. The answer is 18."}}
        source: {{generator: arithmetic, num_rows: 2, max_steps: 2}}
        steps:
          - solve: {{answer_format: number}}
          - verify: {{reference: answer}}
        evolve:
          rounds: 1
          model: {tmp_path}
          eval: {{path: {eval_set}}}
        """)
    evolution = Evolution(str(recipe), tmp_path / "run", [], progress=False)
    assert evolution.evaluate(None)["accuracy"] == 1.0

    eval_set.write_text(eval_set.read_text() + json.dumps({"instruction": "How many eggs?", "answer": ""}) + "\n")
    with pytest.raises(FactoryError, match=rf"^{eval_set}, line 8: the reference '' in column 'answer' holds no "
                                           "number"):
        evolution.evaluate(None)
