"""What a new user meets first: the quickstart keeps only checked rows, a filter-only recipe needs no
`output:`, and the run summary shows a few rows."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest

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

from .arithmetic_templates import recompute
from .conftest import ROOT

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def answers_by_problem() -> dict[str, str]:
    source = load_recipe(QUICKSTART).source.generator_config
    answers = dict(zip(*arithmetic(source)[["instruction", "answer"]].to_dict(as_series=False).values()))
    # The student answers with these: they are checked first, by arithmetic read from each problem's text.
    wrong = {problem: answer for problem, answer in answers.items() if answer != str(recompute(problem)[1])}
    assert not wrong, f"the generator's answers are off: {wrong}"
    return answers


RAMBLE = "It seems like you're trying to solve a math problem but you're not. What do you need 7 of?"


def student(answers: dict[str, str]):
    """A model that, per problem, answers right with a true sum (and, on every other problem, goes on
    talking after its answer, as the embedded model does), wrong, right by a false sum, and rambles."""
    def reply(conversation, sample):
        problem = re.findall(r"Problem: (.+)\nSolution:", conversation[-1]["content"])[-1]
        answer = int(answers[problem])
        goes_on = f" {RAMBLE}" if answer % 2 else ""
        return [f"{answer} + 0 = {answer}. The answer is {answer}.{goes_on}",
                f"{answer} + 1 = {answer + 1}. The answer is {answer + 1}.",
                f"{answer} + 2 = {answer}. The answer is {answer}.",
                "Let me think about this problem very carefully " * 10][sample % 4]
    return reply


def run_quickstart(tmp_path, answers: dict[str, str], overrides: list[str] | None = None):
    def backends(config):
        if config.backend != "transformers":
            return create_backend(config)
        return ScriptedBackend(ScriptedConfig(model="student"), reply_fn=student(answers))

    driver = Driver(Cache(tmp_path / "cache"), progress=False, backend_factory=backends)
    return run_recipe(load_recipe(QUICKSTART, overrides=overrides), tmp_path / "out", driver=driver)[:2]


def test_quickstart_keeps_only_rows_whose_answer_and_calculations_check(tmp_path):
    answers = answers_by_problem()
    version, manifest = run_quickstart(tmp_path, answers)
    rows = read_version(version)
    assert rows.height == len(answers)  # one checked solution per problem, nothing else
    for row in rows.iter_rows(named=True):
        answer = int(answers[row["instruction"]])
        assert answers_match(row["prediction"], answers[row["instruction"]], "numeric")
        assert false_calculations(row["response"]) == []
        # The reply ends where its answer does; what the model said after it is kept beside, not trained on.
        assert row["response"] == f"{answer} + 0 = {answer}. The answer is {answer}."
        assert row["after_answer"] == (RAMBLE if answer % 2 else None)
        assert row["messages"][-1] == {"role": "assistant", "content": row["response"]}
    went_on = sum(int(a) % 2 for a in answers.values())
    assert 0 < went_on < len(answers)
    assert manifest["steps"][0]["report"]["after_answer"] == {
        "answered": 3 * len(answers), "went_on": went_on, "action": "cut", "column": "after_answer"}
    dropped = {s["name"]: s["dropped"] for s in manifest["steps"]}
    assert dropped["solve"] == {"truncated": len(answers)}
    assert dropped["verify"] == {"incorrect": len(answers), "false_calculation": len(answers)}
    rejected = read_version(version, "rejected")
    lucky = rejected.filter(pl.col("drop_reason") == "false_calculation")
    assert lucky["drop_detail"].str.starts_with("false: ").all()
    assert manifest["output_format"] == "messages"


def test_replies_that_go_on_after_their_answer_can_be_dropped_with_their_own_reason(tmp_path):
    answers = answers_by_problem()
    version, manifest = run_quickstart(tmp_path, answers, ["steps[0].solve.after_answer=drop",
                                                           "output.columns=[instruction, response]"])
    went_on = {p for p, a in answers.items() if int(a) % 2}
    assert set(read_version(version)["instruction"]) == set(answers) - went_on
    rejected = read_version(version, "rejected").filter(pl.col("drop_reason") == "text_after_answer")
    assert set(rejected["instruction"]) == went_on and rejected["drop_step"].unique().to_list() == ["steps[0].solve"]
    detail = rejected["drop_detail"][0]
    assert detail.startswith("the reply goes on after its answer (") and "The answer is" in detail and "It seems" in detail
    assert rejected["raw_reply"].str.ends_with(RAMBLE).all()  # nothing is lost: the whole reply is kept


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
    kinds = set()
    for text, answer in zip(table["instruction"], table["answer"]):
        kind, expected, steps = recompute(text)  # the operation read from the text, not any of four
        assert (answer, steps) == (str(expected), 1), text
        kinds.add(kind)
    assert kinds == {"marbles_win", "stickers_give", "pencil_boxes", "sweets_share"}


def test_the_model_load_has_its_own_lines_and_the_bar_leaves_it_out_of_its_rate(tmp_path, capsys):
    """A 2 s load inside the first batch: the bar's elapsed time and rate are the generation's alone,
    so that its first line does not promise minutes for a run that takes seconds."""
    import time

    from factory.llm.base import announcing_load

    class SlowToLoad(ScriptedBackend):
        loaded = False

        def generate(self, requests, on_reply=None):
            if not self.loaded:
                with announcing_load("slow-model on cpu") as done:
                    time.sleep(2.0)
                    done.append("float32")
                self.loaded = True
            return super().generate(requests, on_reply)

    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"instruction": f"task {i}"}) + "\n" for i in range(40)))
    (tmp_path / "r.yaml").write_text("name: slow\nllm: {backend: transformers, model: embedded}\n"
                                     "source: {path: in.jsonl}\nsteps:\n  - solve: {max_tokens: 8}\n")
    driver = Driver(Cache(tmp_path / "cache"), progress=True,
                    backend_factory=lambda config: SlowToLoad(ScriptedConfig(model="slow")))
    run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "out", driver=driver)
    err = capsys.readouterr().err
    lines = [line.strip() for line in re.split(r"[\r\n]+", err) if line.strip()]
    assert "loading slow-model on cpu ..." in lines
    assert any(re.fullmatch(r"loaded in 2\.\ds \(float32\)", line) for line in lines), lines
    last = [line for line in lines if line.startswith("[0] solve") and "40/40" in line][-1]
    minutes, seconds = map(int, re.search(r"\[(\d\d):(\d\d)", last).groups())
    assert minutes * 60 + seconds < 2, last  # the load's 2 s are not in the bar's time


def bar_lines(err: str, step: str = "[0] solve") -> list[str]:
    return [line.strip() for line in re.split(r"[\r\n]+", err) if line.strip().startswith(step)]


@pytest.mark.parametrize("rows, batches", [(40, 1), (40, 2)])
def test_a_local_model_s_bar_promises_no_time_left_until_a_batch_has_ended(tmp_path, capsys, rows, batches):
    """The rows of a batch a model in this process answers finish together at its end: the bar shows
    no rate and no time left until then (the first row's time is most of the batch's)."""
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"instruction": f"task {i}"}) + "\n" for i in range(rows)))
    (tmp_path / "r.yaml").write_text(f"name: bar\nbatch_size: {rows // batches}\n"
                                     "llm: {backend: scripted, model: s}\n"
                                     "source: {path: in.jsonl}\nsteps:\n  - solve: {max_tokens: 8}\n")
    run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "out", driver=Driver(Cache(tmp_path / "cache")))
    lines = bar_lines(capsys.readouterr().err)
    first_batch = rows // batches
    early = [line for line in lines if int(re.search(r"(\d+)/" + str(rows), line).group(1)) < first_batch]
    assert early and not any("<" in line or "row/s" in line for line in early), early
    # With a batch done and rows left, the rows done so far over their time give the time left.
    assert ("<" in lines[-1]) == (batches > 1), lines[-1]
