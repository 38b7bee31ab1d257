"""Evaluation takes the one LLM path: ``factory eval`` and the evolve loop's eval run their
``solve`` step through the driver, so the batch cache, the failure stop and the usage counts
cover them, and a second eval of the same model on the same set asks the model nothing."""

from __future__ import annotations

import json

import polars as pl
import pytest

from factory.cache import Cache
from factory.cli import main
from factory.driver import Driver
from factory.errors import BackendError
from factory.evolve.evaluate import EvalRequest, accuracy, eval_step, evaluate_model
from factory.llm import ScriptedBackend, ScriptedConfig
from factory.llm.base import Completion

from .conftest import ROOT

EVAL = ROOT / "data" / "eval" / "arithmetic.jsonl"
RULES = [{"match": "Tariq", "reply": "33 * 10 = 330. The answer is 330."}, {"match": ".", "reply": "The answer is 7."}]
LLM = json.dumps({"backend": "scripted", "rules": RULES})


class Counting(ScriptedBackend):
    """Counts the requests that reach it; fails those whose question holds ``fail``."""

    made: list["Counting"] = []

    def __init__(self, config, fail: str | None = None):
        super().__init__(config)
        self.asked, self.fail = 0, fail
        Counting.made.append(self)

    def generate(self, requests, on_reply=None):
        self.asked += len(requests)
        replies = super().generate(requests)
        return [Completion([], error="HTTP 503 (after 5 retries)") if self.fail and self.fail in
                r.messages[-1]["content"] else reply for r, reply in zip(requests, replies)]


def counting_driver(cache, fail: str | None = None) -> Driver:
    Counting.made = []
    return Driver(cache, progress=False, backend_factory=lambda config: Counting(config, fail))


def test_a_second_eval_of_the_same_model_on_the_same_set_asks_the_model_nothing(tmp_path):
    request = EvalRequest(spec=str(EVAL), llm=LLM, limit=12)
    first = evaluate_model(counting_driver(Cache(tmp_path)), request)
    assert sum(b.asked for b in Counting.made) == 12
    assert (first.items, first.correct) == (12, 1)  # item 0 (Tariq, 330) alone is answered right
    assert first.usage["conversations"] == 12 and first.usage["cached_batches"] == 0

    again = evaluate_model(counting_driver(Cache(tmp_path)), request)
    assert sum(b.asked for b in Counting.made) == 0
    assert again.results == first.results and again.usage["cached_batches"] == again.usage["batches"] == 1

    evaluate_model(counting_driver(Cache(tmp_path)), EvalRequest(spec=str(EVAL), llm=LLM, limit=12,
                                                           max_tokens=32))
    assert sum(b.asked for b in Counting.made) == 12  # another prompt (a token limit) is another eval


def test_an_eval_whose_requests_fail_stops_instead_of_counting_them_wrong(tmp_path):
    table = pl.DataFrame({"instruction": [f"Question {i}?" for i in range(8)], "answer": ["7"] * 8})
    step = eval_step(ScriptedConfig(rules=RULES))
    with pytest.raises(BackendError, match=r"^eval: 8 of 8 rows failed in the backend .*HTTP 503"):
        accuracy(counting_driver(Cache(tmp_path), fail="Question"), step, table, "instruction", "answer")
    # Under the recipe's failure limit, a failed request is an unanswered item, as a wrong answer is.
    table = table.with_columns(pl.Series("instruction", ["Question 0?"] + [f"Item {i}?" for i in range(1, 8)]))
    result = accuracy(counting_driver(Cache(tmp_path), fail="Question"), step, table, "instruction", "answer")
    assert (result.items, result.correct, result.no_answer) == (8, 7, 1)
    assert [r["correct"] for r in result.results] == [False] + [True] * 7  # in the eval's order


def test_factory_eval_prints_the_accuracy_and_writes_each_item(tmp_path, capsys):
    results = tmp_path / "results.json"
    args = ["eval", str(EVAL), "--llm", LLM, "--limit", "5", "--out", str(tmp_path / "out"), "--quiet"]
    assert main(args + ["--results", str(results)]) == 0
    assert json.loads(capsys.readouterr().out) == {"accuracy": 0.2, "items": 5, "correct": 1, "no_answer": 0,
                                                   "truncated": 0}
    written = json.loads(results.read_text())
    assert written["usage"]["conversations"] == 5 and written["usage"]["cached_batches"] == 0
    items = written["results"]
    assert [(r["reference"], r["prediction"], r["correct"]) for r in items[:2]] == [("330", "330", True),
                                                                                   ("80", "7", False)]
    assert (tmp_path / "out" / ".cache").is_dir()


def test_factory_eval_takes_the_prompt_and_model_of_a_recipe(write_recipe, tmp_path, capsys):
    recipe = write_recipe(f"""\
        name: with-prompt
        llm: {{backend: scripted, rules: [{{match: "^Q: Tariq", reply: "The answer is 330."}}, {{match: ".", reply: "no"}}]}}
        source: {{path: {EVAL}}}
        steps:
          - solve: {{template: "Q: {{{{ task }}}}", answer_format: number}}
        """)
    assert main(["eval", str(EVAL), "--recipe", str(recipe), "--limit", "3", "--out", str(tmp_path), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["correct"] == 1  # the recipe's template reached the model


def test_factory_eval_names_what_is_wrong(tmp_path, capsys, write_recipe):
    assert main(["eval", str(tmp_path / "none.jsonl"), "--llm", LLM, "--out", str(tmp_path)]) != 0
    assert "none.jsonl" in capsys.readouterr().err
    assert main(["eval", str(EVAL), "--llm", "{backend: nope}", "--out", str(tmp_path)]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err
    assert main(["eval", str(EVAL), "--llm", LLM, "--answer-column", "gold", "--out", str(tmp_path)]) != 0
    assert "no column gold" in capsys.readouterr().err
    no_solve = write_recipe(f"name: x\nllm: {LLM}\nsource: {{path: {EVAL}}}\nsteps:\n  - exact: {{columns: [id]}}\n")
    assert main(["eval", str(EVAL), "--recipe", str(no_solve), "--out", str(tmp_path)]) != 0
    assert "--recipe gives the eval its `solve` prompt, and the recipe has no `solve` step" in capsys.readouterr().err
