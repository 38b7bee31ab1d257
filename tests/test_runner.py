"""The driver on the local executor: batches, cache reuse, rejected rows with reasons, failure threshold."""

from __future__ import annotations

import polars as pl
import pytest

from factory.build import run_recipe
from factory.cache import Cache
from factory.errors import FactoryError
from factory.llm import create_backend
from factory.llm.base import Completion
from factory.recipe import load_recipe
from factory.driver import Driver
from factory.store import read_version


class CountingFactory:
    """Builds real backends from configs and counts the conversations they are sent."""

    def __init__(self):
        self.conversations = 0

    def __call__(self, config):
        backend = create_backend(config)
        generate = backend.generate

        def counting_generate(requests, on_reply=None):
            self.conversations += len(requests)
            return generate(requests, on_reply)

        backend.generate = counting_generate
        return backend


def run(recipe_path, tmp_path, factory=None, overrides=None):
    recipe = load_recipe(recipe_path, overrides)
    driver = Driver(Cache(tmp_path / "cache"), progress=False, backend_factory=factory or create_backend)
    return run_recipe(recipe, tmp_path / "out", driver=driver)


def test_rerun_reuses_every_batch_and_writes_identical_rows(scripted_recipe, tmp_path):
    path = scripted_recipe(extra="batch_size: 5\n")
    first_counter, second_counter = CountingFactory(), CountingFactory()
    v1, m1, _ = run(path, tmp_path, first_counter)
    v2, m2, _ = run(path, tmp_path, second_counter)
    assert first_counter.conversations > 0
    assert second_counter.conversations == 0
    assert v1.name == "v1" and v2.name == "v2"
    assert read_version(v1).equals(read_version(v2))
    assert all(s["cached_batches"] == s["batches"] for s in m2["steps"])


def test_changed_step_config_reruns_only_from_that_step(scripted_recipe, tmp_path):
    path = scripted_recipe()
    run(path, tmp_path)
    counter = CountingFactory()
    _, manifest, _ = run(path, tmp_path, counter, overrides=["steps[2].judge.scale=5"])
    solve_rows = manifest["steps"][1]["rows_out"]
    assert counter.conversations == solve_rows  # only the judge asked again
    assert manifest["steps"][1]["cached_batches"] == manifest["steps"][1]["batches"]


def test_counts_and_rejected_rows_add_up(scripted_recipe, tmp_path):
    version, manifest, result = run(scripted_recipe(), tmp_path)
    steps = manifest["steps"]
    assert steps[0]["rows_out"] == 12
    assert steps[1]["rows_in"] == 12 and steps[1]["rows_out"] == 24  # two samples each
    for s in steps[2:]:  # after solve, which expands rows into samples
        assert s["rows_in"] - s["rows_out"] == sum(s["dropped"].values())
    rejected = read_version(version, "rejected")
    assert rejected.height == manifest["rejected_rows"] == sum(sum(s["dropped"].values()) for s in steps)
    below = rejected.filter(pl.col("drop_reason") == "below_min")
    assert below.height == steps[3]["dropped"].get("below_min", 0)
    assert (below["score"] < 5).all() and (below["drop_step"] == "steps[3].score").all()
    kept = read_version(version)
    assert (kept["score"] >= 5).all()
    assert kept["messages"][0][1]["content"] == kept["response"][0]


def test_unparseable_replies_are_dropped_with_the_raw_reply(write_recipe, tmp_path):
    from .conftest import SEEDS

    path = write_recipe(f"""\
        name: parse
        llm:
          backend: scripted
          rules:
            - {{match: "Rate the response", reply: "I think it is decent, around seven-ish"}}
            - {{match: "train", reply: "Score: 42"}}
            - {{match: ".", reply: "Answer"}}
        source: {{path: {SEEDS}, limit: 6}}
        steps:
          - solve: {{}}
          - judge: {{}}
        """)
    version, manifest, _ = run(path, tmp_path)
    assert manifest["rows"] == 0
    assert manifest["steps"][1]["dropped"] == {"parse_error": 6}
    rejected = read_version(version, "rejected")
    assert set(rejected["raw_reply"]) == {"I think it is decent, around seven-ish"}
    assert rejected["drop_detail"][0].startswith("no score found")
    assert "response" in rejected.columns  # the row as it was, plus why it was dropped


def test_rows_with_missing_or_non_text_fields_are_dropped_not_crashed(write_recipe, tmp_path):
    data = tmp_path / "odd.jsonl"
    data.write_text('{"instruction": "fine task"}\n{"instruction": 17}\n{"instruction": null}\n'
                    '{"instruction": "   "}\n{"other": "x"}\n')
    from .conftest import SCRIPTED_LLM

    path = write_recipe(f"name: odd\n{SCRIPTED_LLM}source: {{path: {data}}}\nsteps:\n  - solve: {{}}\n")
    version, manifest, _ = run(path, tmp_path)
    # A column holds one type: the number 17 is read as the text "17" and answered.
    assert sorted(read_version(version)["instruction"]) == ["17", "fine task"]
    assert manifest["steps"][0]["dropped"] == {"invalid_input": 3}
    details = read_version(version, "rejected")["drop_detail"].to_list()
    assert sorted(details) == ["column 'instruction' is empty", "column 'instruction' is missing, not text",
                               "column 'instruction' is missing, not text"]


def test_backend_failures_over_the_threshold_stop_the_run(scripted_recipe, tmp_path):
    path = scripted_recipe(steps="- solve: {}\n", extra="batch_size: 10\nmax_failure_rate: 0.2\n")
    recipe = load_recipe(path)

    def failing(config):
        backend = create_backend(config)
        backend.generate = lambda requests, on_reply=None: [Completion([], error="HTTP 503 (after 5 retries)")
                                                            for _ in requests]
        return backend

    driver = Driver(Cache(tmp_path / "cache"), progress=False, backend_factory=failing)
    # 10 failures > 0.2 x 40 rows: stop after the first batch.
    with pytest.raises(FactoryError, match=r"steps\[0\]\.solve: 10 of 10 rows failed in the backend"):
        run_recipe(recipe, tmp_path / "out", driver=driver)
    assert not (tmp_path / "out" / "demo").exists() or not any((tmp_path / "out" / "demo").glob("v*"))


def test_backend_failures_under_the_threshold_drop_rows_with_reason(scripted_recipe, tmp_path):
    path = scripted_recipe(steps="- solve: {}\n")
    recipe = load_recipe(path)

    def flaky(config):
        backend = create_backend(config)
        generate = backend.generate

        def generate_with_failures(requests, on_reply=None):
            out = generate(requests)
            out[0] = Completion([], error="timeout: no answer (after 5 retries)")
            return out

        backend.generate = generate_with_failures
        return backend

    driver = Driver(Cache(tmp_path / "cache"), progress=False, backend_factory=flaky)
    version, manifest, _ = run_recipe(recipe, tmp_path / "out", driver=driver)
    assert manifest["steps"][0]["dropped"] == {"backend_error": 1}
    assert manifest["rows"] == 39
    rejected = read_version(version, "rejected")
    assert rejected["drop_detail"][0].startswith("timeout")
