"""What a new user meets first: the quickstart keeps only checked rows, a filter-only recipe needs no
`output:`, and the run summary shows a few rows."""

from __future__ import annotations

import json
import re

import polars as pl

from factory.answers import answers_match, false_calculations
from factory.build import run_recipe
from factory.cache import Cache
from factory.cli import main
from factory.driver import Driver
from factory.generators import ArithmeticConfig, arithmetic
from factory.llm import create_backend
from factory.llm.scripted import ScriptedBackend, ScriptedConfig
from factory.printing import format_examples
from factory.recipe import load_recipe
from factory.store import read_version

from .conftest import ROOT

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def answers_by_problem() -> dict[str, str]:
    source = load_recipe(QUICKSTART).source.generator_config
    return dict(zip(*arithmetic(source)[["instruction", "answer"]].to_dict(as_series=False).values()))


def student(answers: dict[str, str]):
    """A model that, per problem, answers right with a true sum, wrong, right by a false sum, and rambles."""
    def reply(conversation, sample):
        problem = re.findall(r"Problem: (.+)\nSolution:", conversation[-1]["content"])[-1]
        answer = int(answers[problem])
        return [f"{answer} + 0 = {answer}. The answer is {answer}.",
                f"{answer} + 1 = {answer + 1}. The answer is {answer + 1}.",
                f"{answer} + 2 = {answer}. The answer is {answer}.",
                "Let me think about this problem very carefully " * 10][sample % 4]
    return reply


def test_quickstart_keeps_only_rows_whose_answer_and_calculations_check(tmp_path):
    answers = answers_by_problem()

    def backends(config):
        if config.backend != "transformers":
            return create_backend(config)
        return ScriptedBackend(ScriptedConfig(model="student"), reply_fn=student(answers))

    driver = Driver(Cache(tmp_path / "cache"), progress=False, backend_factory=backends)
    version, manifest, _ = run_recipe(load_recipe(QUICKSTART), tmp_path / "out", driver=driver)
    rows = read_version(version)
    assert rows.height == len(answers)  # one checked solution per problem, nothing else
    for row in rows.iter_rows(named=True):
        assert answers_match(row["prediction"], answers[row["instruction"]], "numeric")
        assert false_calculations(row["response"]) == []
        assert row["messages"][-1] == {"role": "assistant", "content": row["response"]}
    dropped = {s["name"]: s["dropped"] for s in manifest["steps"]}
    assert dropped["solve"] == {"truncated": len(answers)}
    assert dropped["verify"] == {"incorrect": len(answers), "false_calculation": len(answers)}
    rejected = read_version(version, "rejected")
    lucky = rejected.filter(pl.col("drop_reason") == "false_calculation")
    assert lucky["drop_detail"].str.starts_with("false: ").all()
    assert manifest["output_format"] == "messages"


def test_a_filter_only_recipe_without_output_writes_the_rows_as_they_are(tmp_path, capsys):
    rows = [{"id": i, "text": t} for i, t in enumerate(["the cat sat on the mat", "The cat sat on the mat!",
                                                        "a dog ran in the park", "birds sing at dawn"])]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "curate.yaml").write_text("name: curate\nsource: {path: in.jsonl}\n"
                                          "steps:\n  - exact: {column: text}\n  - minhash: {column: text}\n")
    assert main(["run", str(tmp_path / "curate.yaml"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "written as the rows are" in out
    assert "3 of the 3 rows:" in out and "text: a dog ran in the park" in out
    table = read_version(tmp_path / "out" / "curate" / "v1")
    assert table.columns == ["id", "text"] and table["id"].to_list() == [0, 2, 3]
    manifest = json.loads((tmp_path / "out" / "curate" / "v1" / "manifest.json").read_text())
    assert manifest["output_format"] == "raw"


def test_a_recipe_that_can_write_messages_does_so_without_output(scripted_recipe, tmp_path, capsys):
    path = scripted_recipe()
    text = path.read_text()
    path.write_text(re.sub(r"(?m)^output:.*\n", "", text))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet", "--examples", "2"]) == 0
    out = capsys.readouterr().out
    assert "written as chat `messages`" in out and "2 of the " in out and "  1.  user: " in out
    version = out.strip().splitlines()[-1]
    assert "messages" in read_version(version).columns


def test_examples_are_spread_over_the_table_and_cut_to_one_line():
    table = pl.DataFrame({"instruction": [f"task {i}" for i in range(9)], "response": ["word " * 60] * 9})
    text = format_examples(table, 3, width=40)
    assert text.splitlines()[0] == "3 of the 9 rows:"
    assert [line.split("instruction: ")[1] for line in text.splitlines() if "instruction" in line] == \
        ["task 0", "task 3", "task 6"]
    assert all(len(line) <= 40 + 20 for line in text.splitlines())
    assert format_examples(table, 0) == "" and format_examples(table.head(0), 3) == ""


def test_false_calculations_catch_a_right_answer_reached_by_a_wrong_sum():
    assert false_calculations("12 + 5 = 17. The answer is 17.") == []
    assert false_calculations("4 x 6 = 24, 3 × (4 + 2) = 18, 1,200 + 30 = 1,230, 7/2 = 3.5, 12 - 15 = -3") == []
    assert false_calculations("10 / 6 = 1. The answer is 1.") == ["10 / 6 = 1"]
    assert false_calculations("the answer is 8 * 24 = 16*2 = 32") == ["8 * 24 = 16"]
    assert false_calculations("x = 5, N = 30, 2 apples = 2 pears") == []


def test_one_operation_problems_have_exact_answers():
    table = arithmetic(ArithmeticConfig(num_rows=40, min_steps=1, max_steps=1, seed=3))
    assert set(table["num_steps"]) == {1}
    for text, answer in zip(table["instruction"], table["answer"]):
        numbers = [int(n) for n in re.findall(r"\d+", text)]
        a, b = numbers[0], numbers[1]
        assert int(answer) in {a + b, a - b, a * b, a // b if b else None}, text
