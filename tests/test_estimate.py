"""`factory estimate`: from a recipe's first rows, what the whole run will ask and cost -- and the
run that follows lands inside the ranges it gave, paying nothing for the rows it already saw."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from factory.build import run_recipe
from factory.cache import Cache
from factory.driver import Driver
from factory.estimate import estimate_recipe, format_estimate, mean_range, wilson
from factory.recipe import load_recipe

from .fake_limits import RateLimitedServer

ROWS = 600


def model(payload: dict, index: int) -> str:
    """Replies of 1 to 40 words; the judge's scores drop about half of the answers."""
    text = payload["messages"][-1]["content"]
    h = int(hashlib.sha256(f"{text}{payload.get('seed')}{index}".encode()).hexdigest()[:8], 16)
    if text.startswith("Rate the response") or "Score" in text[:400] and "rate" in text.lower():
        return f"Fine. Score: {h % 10 + 1}"
    return " ".join(["word"] * (h % 40 + 1))


def write_recipe(folder: Path, base_url: str) -> Path:
    source = folder / "tasks.jsonl"
    source.write_text("\n".join(json.dumps({"instruction": f"Task {i}: " + "describe it " * (i % 7 + 1)})
                                for i in range(ROWS)))
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"""\
name: estimated
seed: 1
llm: {{backend: openai, model: fake, base_url: "{base_url}"}}
source: {{path: {source}}}
prices: {{fake: {{input: 2.5, output: 10}}}}
steps:
  - solve: {{max_tokens: 64, samples: 2, temperature: 0.8}}
  - judge: {{}}
  - score: {{min: 6}}
""")
    return recipe


def inside(value: float, r, slack: float = 0.0) -> bool:
    return r.low * (1 - slack) <= value <= r.high * (1 + slack)


def test_the_run_lands_inside_the_estimate_and_pays_nothing_for_the_preview(tmp_path):
    cache = tmp_path / "cache"
    with RateLimitedServer(requests_per_second=None, reply_fn=model) as server:
        recipe = load_recipe(write_recipe(tmp_path, server.base_url))
        info = estimate_recipe(recipe, Driver(Cache(cache), progress=False), limit=40)
        asked = len(server.accepted)
        again = estimate_recipe(recipe, Driver(Cache(cache), progress=False), limit=40)
        assert len(server.accepted) == asked  # the second estimate: every reply from the cache
        _, manifest, _ = run_recipe(recipe, tmp_path / "out", driver=Driver(Cache(cache), progress=False))
        sent_by_run = len(server.accepted) - asked
    assert format_estimate(again) == format_estimate(info)
    solve, judge, score = info["steps"]
    assert info["source_rows"] == ROWS and solve["requests"].value == ROWS and judge["requests"].value == 2 * ROWS
    steps = {s["index"]: s for s in manifest["steps"]}
    assert sent_by_run == 3 * ROWS - 3 * 40  # the preview's 40 rows (and their 80 judged answers) were paid for
    cost = 0.0
    for est, ran in ((solve, steps[0]), (judge, steps[1])):
        llm = ran["llm"]
        sent = llm["conversations"] - llm["cached_conversations"]
        # What every request of the step takes, at the mean of those the run sent.
        tokens_in, tokens_out = (llm[name] / sent * est["requests"].value for name in ("prompt_tokens",
                                                                                        "completion_tokens"))
        assert inside(tokens_in, est["tokens_in"], 0.05) and inside(tokens_out, est["tokens_out"], 0.1)
        cost += llm["cost_usd"] / sent * est["requests"].value
    assert inside(manifest["rows"], info["rows_out"])
    assert sum(s["cost"].value for s in info["steps"] if "cost" in s) == pytest.approx(cost, rel=0.1)
    text = format_estimate(info)
    assert "[0] solve" in text and "cost (USD)" in text and "rows written" in text


def test_a_generator_source_is_extrapolated_to_its_num_rows(tmp_path, write_recipe):
    recipe = load_recipe(write_recipe("""\
        name: gen
        llm: {backend: scripted, default: "The answer is 4."}
        source: {generator: arithmetic, num_rows: 500, seed: 1}
        steps:
          - solve: {max_tokens: 16}
        """))
    info = estimate_recipe(recipe, Driver(Cache(tmp_path / "cache"), progress=False), limit=10)
    assert info["source_rows"] == 500 and info["steps"][0]["requests"].value == 500
    assert "generator arithmetic makes 500" in format_estimate(info)


def test_intervals_cover_the_share_and_the_mean():
    share = wilson(30, 100)
    assert share.low < 0.3 < share.high and 0.2 < share.low and share.high < 0.4
    assert wilson(60, 60, units=30).low < wilson(60, 60).low  # samples of one task are not independent draws
    assert wilson(200, 100).low == 2.0  # a step that makes two rows of one: as measured
    mean = mean_range([10, 20, 30, 40])
    assert mean.value == 25 and mean.low < 25 < mean.high
