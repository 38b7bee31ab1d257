"""The Ray executor on a local Ray cluster: the same rows as the local runner, row for row."""

from __future__ import annotations

import json

import polars as pl

import pytest

ray = pytest.importorskip("ray")

from factory.build import run_recipe  # noqa: E402
from factory.cache import Cache  # noqa: E402
from factory.cli import main  # noqa: E402
from factory.ray_runner import RayRunner, merge_reports  # noqa: E402
from factory.recipe import load_recipe  # noqa: E402
from factory.runner import LocalRunner  # noqa: E402
from factory.store import read_version  # noqa: E402

LLM = """\
llm:
  backend: scripted
  rules:
    - {match: "Rate the response", reply: "Score: {score}"}
    - {match: "Think step by step", reply: "Working. The answer is {digit}."}
    - {match: ".", reply: "Answer {hash}"}
"""


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray")
    rows = []
    for i in range(120):
        text = f"Task {i % 90}: compute the total of the numbers in list number {i % 90} and explain each step"
        rows.append({"instruction": text if i % 7 else text + " carefully", "answer": str(i % 10)})
    (folder / "tasks.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    path = folder / "recipe.yaml"
    path.write_text(f"""\
name: raytest
seed: 5
batch_size: 16
{LLM}source: {{path: {folder / 'tasks.jsonl'}}}
steps:
  - minhash: {{column: instruction, threshold: 0.7, num_perm: 64}}
  - solve: {{samples: 3, temperature: 0.8, cot: true, answer_format: number}}
  - verify: {{reference: answer}}
  - judge: {{reasoning: false}}
  - consistency: {{min_agreement: 0.3}}
  - score: {{top_k: 1, group_by: instruction}}
  - exact: {{columns: [instruction]}}
""")
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="ERROR")
    yield
    ray.shutdown()


def test_ray_output_equals_local_output_row_for_row(recipe_path, tmp_path, ray_cluster):
    recipe = load_recipe(recipe_path)
    local_dir, local, _ = run_recipe(recipe, tmp_path / "local",
                                     runner=LocalRunner(Cache(tmp_path / "cache-local"), progress=False))
    ray_dir, distributed, _ = run_recipe(load_recipe(recipe_path), tmp_path / "ray",
                                         runner=RayRunner(Cache(tmp_path / "cache-ray"), progress=False))
    assert read_version(ray_dir).equals(read_version(local_dir))
    assert read_version(ray_dir, "rejected").equals(read_version(local_dir, "rejected"))
    for a, b in zip(local["steps"], distributed["steps"]):
        assert (a["name"], a["rows_in"], a["rows_out"], a["dropped"]) == (b["name"], b["rows_in"], b["rows_out"],
                                                                         b["dropped"])
        assert a["report"] == b["report"], a["name"]
        if a["llm"]:
            assert a["llm"]["conversations"] == b["llm"]["conversations"]
            assert a["llm"]["completion_tokens"] == b["llm"]["completion_tokens"]
    minhash = distributed["steps"][0]
    assert minhash["dropped"].get("near_duplicate", 0) > 0  # the planted near-duplicates were found


def test_a_restarted_ray_job_reuses_every_finished_batch(recipe_path, tmp_path, ray_cluster):
    cache = Cache(tmp_path / "cache")
    run_recipe(load_recipe(recipe_path), tmp_path / "out", runner=RayRunner(cache, progress=False))
    _, again, _ = run_recipe(load_recipe(recipe_path), tmp_path / "out", runner=RayRunner(cache, progress=False))
    for step in again["steps"]:
        assert step["cached_batches"] == step["batches"], step["name"]
        if step["llm"]:
            assert step["llm"]["calls"] == 0


def test_the_command_line_runs_on_ray(recipe_path, tmp_path, capsys):
    assert main(["run", str(recipe_path), "--out", str(tmp_path / "out"), "--executor", "ray", "--quiet",
                 "--replicas", "2"]) == 0
    version = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads((tmp_path / "out" / "raytest" / "v1" / "manifest.json").read_text())["executor"] == "ray"
    assert version.endswith("raytest/v1")


def test_merge_reports():
    assert merge_reports([{"tasks": 2, "ids": ["a"], "name": "x"}, {"tasks": 3, "ids": ["b"], "name": "x"}]) == {
        "tasks": 5, "ids": ["a", "b"], "name": "x"}


def test_vllm_steps_go_through_ray_data_llm_processors(recipe_path, tmp_path, monkeypatch):
    """The processor plumbing, with a stand-in for the vLLM engine (no GPU here): requests
    carry the step's messages and sampling, replies become the same rows as locally."""
    from factory.ray_runner import _vllm_reply, _vllm_request
    from factory.steps.base import DROP

    recipe = load_recipe(recipe_path, ["llm={backend: vllm, model: embedded}", "steps=[{solve: {samples: 2}}]",
                                       "batch_size=50"])
    step = recipe.steps[0]
    runner = RayRunner(Cache(tmp_path / "cache"), progress=False)
    assert runner._uses_llm_processor(step)
    seen = []

    def fake_engine(dataset):
        def generate(row):
            request = _vllm_request(row)
            seen.append(request)
            return _vllm_reply({**request, "generated_text": f"reply {row['row']}.{row['sample']}",
                                "num_input_tokens": 11, "num_generated_tokens": 3})
        return dataset.map(generate)

    monkeypatch.setattr(RayRunner, "_build_llm_processor", lambda self, step: fake_engine)
    from factory.llm.client import LLMClient
    from factory.llm.scripted import ScriptedBackend, ScriptedConfig

    step.llm = LLMClient(ScriptedBackend(ScriptedConfig()), Cache(tmp_path / "cache"), seed=5)
    table = recipe.source.read().head(3).with_columns(instruction=pl.Series(["a", "b", None]))
    [out] = list(runner._batch_outputs(step, [table], ["k0"], type("S", (), {"cached_batches": 0})()))
    assert out.filter(pl.col(DROP).is_null())["response"].to_list() == ["reply 0.0", "reply 0.1", "reply 1.0",
                                                                        "reply 1.1"]
    assert out.filter(pl.col(DROP).is_not_null())[DROP].to_list() == ["invalid_input"]
    assert step.llm.usage.completion_tokens == 12
    assert Cache(tmp_path / "cache").get_frame("steps", "k0").equals(out)
