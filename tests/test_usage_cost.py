"""LLM usage per model in the manifest and the summary; cost from the recipe's `prices:`."""

from __future__ import annotations

import pytest

from factory.errors import RecipeError
from factory.printing import format_summary
from factory.recipe import load_recipe
from factory.store import read_version

from .test_target_rows import HALF_STEPS, half_recipe, run

PRICES = "prices: {scripted: {input: 2.5, output: 10}}\n"


def expected_tokens(path) -> tuple[int, int]:
    """Scripted tokens are words: the solve prompts' words, and 2 per answer, 7 per refusal."""
    recipe = load_recipe(path)
    rows = recipe.source.read().to_dicts()
    prompt = sum(len(m["content"].split()) for row in rows for m in recipe.steps[0].build_messages(row))
    completion = sum(7 if "odd" in row["instruction"] else 2 for row in rows)
    return prompt, completion


def test_cost_per_step_and_model_from_the_prices(write_recipe, tmp_path):
    path = half_recipe(write_recipe, tmp_path, output="{format: raw}", count=10, extra=PRICES)
    _, manifest, _ = run(path, tmp_path)
    prompt, completion = expected_tokens(path)
    cost = round((prompt * 2.5 + completion * 10) / 1_000_000, 6)
    assert completion == 45 and cost > 0
    solve = manifest["steps"][0]["llm"]
    assert (solve["prompt_tokens"], solve["completion_tokens"], solve["cost_usd"]) == (prompt, completion, cost)
    assert "cost_usd" not in manifest["steps"][1] and manifest["steps"][1]["llm"] is None
    assert manifest["usage"] == {"scripted:scripted": {
        "backend": "scripted", "model": "scripted", "model_id": solve["model_id"], "steps": ["steps[0].solve"],
        "prompt_tokens": prompt, "completion_tokens": completion, "conversations": 10, "cached_conversations": 0,
        "cost_usd": cost}}
    assert manifest["cost_usd"] == cost
    summary = format_summary(manifest)
    assert "LLM usage (tokens sent to the backend; replies from the cache cost nothing):" in summary
    [step_line] = [line for line in summary.splitlines() if line.strip().startswith("[0] solve") and "0.00" in line]
    assert step_line.split()[2:] == ["10", "0", str(prompt), str(completion), f"{cost:.4f}"]
    assert any(line.split()[:2] == ["model", "scripted:scripted"] for line in summary.splitlines())
    assert f"total cost: ${cost:.4f}" in summary


def test_cached_replies_cost_nothing(write_recipe, tmp_path):
    path = half_recipe(write_recipe, tmp_path, output="{format: raw}", count=10, extra=PRICES)
    run(path, tmp_path)
    version, manifest, _ = run(path, tmp_path)
    usage = manifest["usage"]["scripted:scripted"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["cost_usd"]) == (0, 0, 0.0)
    assert manifest["steps"][0]["cached_batches"] == manifest["steps"][0]["batches"] == 1
    assert manifest["cost_usd"] == 0.0 and read_version(version).height == 5


def test_usage_per_model_with_one_priced_and_one_not(write_recipe, tmp_path):
    steps = HALF_STEPS.replace("  - heuristics", "  - solve: {llm: {model: checker}}\n  - heuristics")
    path = half_recipe(write_recipe, tmp_path, output="{format: raw}", count=10, extra=PRICES, steps=steps)
    _, manifest, _ = run(path, tmp_path)
    assert sorted(manifest["usage"]) == ["scripted:checker", "scripted:scripted"]
    checker = manifest["usage"]["scripted:checker"]
    assert checker["steps"] == ["steps[1].solve"] and "cost_usd" not in checker
    assert checker["completion_tokens"] == manifest["steps"][1]["llm"]["completion_tokens"] > 0
    assert manifest["cost_usd"] == manifest["usage"]["scripted:scripted"]["cost_usd"] > 0
    assert "(no price for checker; add it under `prices:`)" in format_summary(manifest)


def test_unpriced_runs_report_tokens_without_cost(write_recipe, tmp_path):
    path = half_recipe(write_recipe, tmp_path, output="{format: raw}", count=4)
    _, manifest, _ = run(path, tmp_path)
    assert manifest["usage"]["scripted:scripted"]["completion_tokens"] == 2 * 2 + 2 * 7
    assert "cost_usd" not in manifest and "cost_usd" not in manifest["usage"]["scripted:scripted"]
    summary = format_summary(manifest)
    assert "LLM usage" in summary and "cost" not in summary.split("LLM usage")[1].split("\n", 2)[1]


def test_target_runs_count_the_tokens_of_every_pass_once(write_recipe, tmp_path):
    path = half_recipe(write_recipe, tmp_path, output="{rows: 20}", extra=PRICES)
    _, manifest, _ = run(path, tmp_path)
    rows = load_recipe(path).source.first(44).read().to_dicts()
    assert manifest["steps"][0]["llm"]["completion_tokens"] == sum(7 if "odd" in r["instruction"] else 2 for r in rows)


@pytest.mark.parametrize("prices, expected", [
    ("{scripted: {input: -1, output: 2}}", "prices.scripted.input: must be at least 0, got -1"),
    ("{scripted: {input: 1, outptu: 2}}", "prices.scripted.outptu: unknown key 'outptu'; did you mean 'output'?"),
    ("{scripted: {input: 1}}", "prices.scripted: missing required key 'output'"),
    ("{scriptd: {input: 1, output: 2}}",
     "prices.scriptd: price for model 'scriptd', which no step uses (models in use: scripted); did you mean "
     "'scripted'?"),
    ("{gpt-4o: {input: 1, output: 2}}", "prices.gpt-4o: price for model 'gpt-4o', which no step uses (models in use: "
                                        "scripted); price a model in use"),
    ("[1, 2]", "prices: `prices` must map model names to prices"),
])
def test_bad_prices_are_located_recipe_errors(write_recipe, tmp_path, prices, expected):
    path = half_recipe(write_recipe, tmp_path, output="{format: raw}", count=4, extra=f"prices: {prices}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    [problem] = [p for p in err.value.problems if expected in p.format()]
    assert problem.line == 12


def test_prices_without_any_llm_step(write_recipe, tmp_path):
    path = half_recipe(write_recipe, tmp_path, output="{format: raw}", count=4, steps="steps: [exact]\n",
                       extra=PRICES)
    with pytest.raises(RecipeError, match="prices.scripted: price for model 'scripted', and no step of the recipe "
                                          "uses a model; remove `prices`"):
        load_recipe(path)
