"""A budget: the run stops before its requests could cost more than it, writes nothing, and the
same command with a larger budget pays only for what is new."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from factory.budget import Budget, BudgetReached
from factory.cli import main
from factory.errors import RecipeError
from factory.llm.base import GenerationParams, Request
from factory.recipe import load_recipe
from factory.recipe_model import Price

from .conftest import ROOT
from .fake_openai import FakeOpenAI

# The fake server reports 7 prompt and 3 completion tokens per request: at $10,000 per million
# output tokens, each request costs $0.03.
PRICES = "prices: {fake: {input: 0, output: 10000}}"


def write_recipe(folder: Path, base_url: str, rows: int = 300, budget: str = "budget: {max_usd: 3}",
                 max_tokens: int = 3, prices: str = PRICES) -> Path:
    source = folder / "tasks.jsonl"
    source.write_text("\n".join(json.dumps({"instruction": f"Task {i}: one word."}) for i in range(rows)))
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"""\
name: budgeted
llm: {{backend: openai, model: fake, base_url: "{base_url}", max_concurrency: 16}}
source: {{path: {source}}}
{prices}
{budget}
steps:
  - solve: {{max_tokens: {max_tokens}, on_truncation: keep}}
""")
    return recipe


def factory(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "factory", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def solve_requests(server) -> int:
    return len(server.requests)


def test_a_run_stops_before_its_budget_and_a_larger_one_pays_only_for_the_rest(tmp_path):
    out = tmp_path / "out"
    with FakeOpenAI(latency=0.01) as server:
        recipe = write_recipe(tmp_path, server.base_url)
        first = factory("run", str(recipe), "--out", str(out), "--quiet")
        sent = solve_requests(server)
        assert first.returncode == 1
        lines = first.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: budget reached: $3.0000 spent of budget.max_usd $3.00")
        assert "steps[0].solve" in lines[0] and "--max-usd" in lines[0]
        assert 90 <= sent <= 110
        assert not (out / "budgeted").exists()  # no version
        second = factory("run", str(recipe), "--out", str(out), "--quiet", "--max-usd", "20")
        assert second.returncode == 0, second.stderr
        assert solve_requests(server) == 300  # only the rest was sent: nothing paid twice
    manifest = json.loads((out / "budgeted" / "v1" / "manifest.json").read_text())
    assert manifest["rows"] == 300
    assert manifest["cost_usd"] == pytest.approx(0.03 * (300 - sent))  # what this run paid
    assert manifest["recipe"]["budget"] == {"max_usd": 20.0}


def test_the_budget_holds_while_max_tokens_says_a_request_could_cost_more(tmp_path):
    """Each request could cost $0.30 (max_tokens 30): the run keeps room for that, never passing $3."""
    with FakeOpenAI(latency=0.01) as server:
        recipe = write_recipe(tmp_path, server.base_url, max_tokens=30)
        done = factory("run", str(recipe), "--out", str(tmp_path / "out"), "--quiet")
        sent = solve_requests(server)
    assert done.returncode == 1 and "budget reached" in done.stderr
    assert 0.03 * sent <= 3.0 and sent >= 85


def test_a_request_that_alone_could_pass_the_budget_says_so():
    budget = Budget(1.0, {"m": Price(input=0.0, output=10_000)})  # $0.01 a token
    request = Request([{"role": "user", "content": "hi"}], GenerationParams(max_tokens=200))
    estimate, _, n = budget.worst_case(request, "m", False)
    with pytest.raises(BudgetReached, match=r"next could cost up to \$2.0000 \(more than the whole budget: lower "
                                            r"the step's max_tokens"):
        budget.reserve("m", [(estimate, n)])


def test_what_a_sample_has_cost_so_far_bounds_the_next_reservations():
    """A server whose usage passes max_tokens: after one reply, requests are reserved at what it cost."""
    budget = Budget(1.0, {"m": Price(input=0.0, output=1_000)})
    assert budget.reserve("m", [(0.01, 1)] * 3) == [0.01] * 3
    budget.settle("m", 0.01, 0.2)  # it cost 20 times the estimate
    assert budget.reserve("m", [(0.01, 1)] * 10) == [0.2] * 3  # 0.02 reserved + 0.2 spent: room for three


def test_a_budget_needs_a_price_for_every_model(tmp_path):
    recipe = write_recipe(tmp_path, "http://127.0.0.1:9/v1", prices="")
    with pytest.raises(RecipeError, match=r"budget.max_usd: budget.max_usd needs the price of every model the steps "
                                          r"use, and fake has none; add e.g. `prices: \{fake:"):
        load_recipe(recipe)


def test_max_usd_on_the_command_line_is_the_recipes_budget(tmp_path, capsys):
    recipe = write_recipe(tmp_path, "http://127.0.0.1:9/v1", budget="")
    assert main(["validate", str(recipe), "--print"]) == 0
    assert "\nbudget:" not in capsys.readouterr().out
    with FakeOpenAI() as server:
        recipe = write_recipe(tmp_path, server.base_url, rows=40, budget="")
        assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet", "--max-usd", "0.5"]) == 1
        assert len(server.requests) <= 17
    assert "budget reached" in capsys.readouterr().err
