"""The Ray executor on a local Ray cluster: the same rows as the local runner, row for row."""

from __future__ import annotations

import json
import shutil

import pytest

ray = pytest.importorskip("ray")

from factory.build import run_recipe  # noqa: E402
from factory.cache import Cache  # noqa: E402
from factory.cli import main  # noqa: E402
from factory.driver import Driver  # noqa: E402
from factory.executors.ray import RayExecutor  # noqa: E402
from factory.recipe import load_recipe  # noqa: E402
from factory.steps.context import merge_reports  # noqa: E402
from factory.store import read_version  # noqa: E402

# Replies carry the sampling seed each request was sent with: equal rows mean equal seeds.
LLM = """\
llm:
  backend: scripted
  rules:
    - {match: "Rate the response", reply: "Score: {score}"}
    - {match: "Think step by step", reply: "Working ({seed}). The answer is {digit}."}
    - {match: ".", reply: "Answer {hash} {seed}"}
"""


def local(cache_dir):
    return Driver(Cache(cache_dir), progress=False)


def on_ray(cache_dir, **options):
    return Driver(Cache(cache_dir), executor=RayExecutor(**options), progress=False)


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


@pytest.fixture(scope="module")
def ray_run(recipe_path, tmp_path_factory, ray_cluster):
    """One run of the recipe on Ray: its cache folder, version folder and manifest."""
    folder = tmp_path_factory.mktemp("ray-run")
    version, manifest, _ = run_recipe(load_recipe(recipe_path), folder / "out", driver=on_ray(folder / "cache"))
    return folder / "cache", version, manifest


def test_ray_output_equals_local_output_row_for_row(recipe_path, ray_run, tmp_path):
    local_dir, here, _ = run_recipe(load_recipe(recipe_path), tmp_path / "local", driver=local(tmp_path / "cache"))
    _, ray_dir, distributed = ray_run
    assert read_version(ray_dir).equals(read_version(local_dir))
    assert read_version(ray_dir, "rejected").equals(read_version(local_dir, "rejected"))
    assert distributed["executor"] == "ray" and here["executor"] == "local"
    for a, b in zip(here["steps"], distributed["steps"]):
        assert (a["name"], a["rows_in"], a["rows_out"], a["dropped"]) == (b["name"], b["rows_in"], b["rows_out"],
                                                                         b["dropped"])
        assert a["report"] == b["report"], a["name"]
        if a["llm"]:
            assert a["llm"]["conversations"] == b["llm"]["conversations"]
            assert a["llm"]["completion_tokens"] == b["llm"]["completion_tokens"]
    minhash = distributed["steps"][0]
    assert minhash["dropped"].get("near_duplicate", 0) > 0  # the planted near-duplicates were found


def test_a_restarted_ray_job_reuses_every_finished_batch(recipe_path, ray_run, tmp_path):
    cache, _, _ = ray_run
    _, again, _ = run_recipe(load_recipe(recipe_path), tmp_path / "out", driver=on_ray(cache))
    for step in again["steps"]:
        assert step["cached_batches"] == step["batches"], step["name"]
        if step["llm"]:
            assert step["llm"]["calls"] == 0


def test_ray_workers_answer_from_the_reply_cache(recipe_path, ray_run, tmp_path):
    """With no finished batch to reuse, only the replies, a second Ray run asks the model
    nothing: the replies come from the journals the workers wrote through the one LLM path."""
    cache, first_dir, _ = ray_run
    shutil.copytree(cache / "llm", tmp_path / "cache" / "llm")
    again_dir, again, _ = run_recipe(load_recipe(recipe_path), tmp_path / "out", driver=on_ray(tmp_path / "cache"))
    assert read_version(again_dir).equals(read_version(first_dir))
    asked = [s["llm"] for s in again["steps"] if s["llm"]]
    assert asked and all(u["calls"] == 0 and u["cached_conversations"] == u["conversations"] > 0 for u in asked)
    assert all(s["cached_batches"] == 0 for s in again["steps"])  # the steps did run again


def test_the_command_line_runs_on_ray(recipe_path, tmp_path, capsys):
    assert main(["run", str(recipe_path), "--out", str(tmp_path / "out"), "--executor", "ray", "--quiet",
                 "--replicas", "2"]) == 0
    version = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads((tmp_path / "out" / "raytest" / "v1" / "manifest.json").read_text())["executor"] == "ray"
    assert version.endswith("raytest/v1")


def test_merge_reports():
    assert merge_reports([{"tasks": 2, "ids": ["a"], "name": "x"}, {"tasks": 3, "ids": ["b"], "name": "x"}]) == {
        "tasks": 5, "ids": ["a", "b"], "name": "x"}


def test_ray_samples_with_the_local_seeds(tiny_model_dir, tmp_path, ray_cluster):
    """A real sampling backend (a tiny random model at temperature 1): Ray's rows equal the
    local rows only if every request is sent with the same seed and batched alike."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps({"instruction": f"Name thing number {i}."}) for i in range(12)))
    recipe_path = tmp_path / "sampling.yaml"
    recipe_path.write_text(f"""\
name: sampling
seed: 11
batch_size: 4
llm: {{backend: transformers, model: {tiny_model_dir}, batch_size: 4}}
source: {{path: {tasks}}}
steps:
  - solve: {{samples: 2, temperature: 1.0, max_tokens: 6, on_truncation: keep}}
""")
    local_dir, _, _ = run_recipe(load_recipe(recipe_path), tmp_path / "local", driver=local(tmp_path / "c1"))
    ray_dir, _, _ = run_recipe(load_recipe(recipe_path), tmp_path / "ray", driver=on_ray(tmp_path / "c2", replicas=2))
    here, there = read_version(local_dir), read_version(ray_dir)
    assert here.height == 24 and there.equals(here)
    assert here["response"].n_unique() > 12  # sampled, not greedy


def test_bad_input_in_a_ray_worker_is_one_line(tmp_path, ray_cluster):
    """A step's FactoryError in a worker (here: a reference with no number) reaches the driver as
    itself, the line the command prints, not as a Ray traceback."""
    from factory.errors import FactoryError

    rows = [{"id": f"q{i}", "instruction": f"Task {i}: add", "answer": "unknown" if i == 20 else f"#### {i}"}
            for i in range(24)]
    (tmp_path / "tasks.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: badref\nbatch_size: 8\n{LLM}source: {{path: {tmp_path / 'tasks.jsonl'}}}\nsteps:\n"
                    "  - solve: {cot: true, answer_format: number}\n  - verify: {reference: answer, method: numeric}\n")
    with pytest.raises(FactoryError, match=r"^steps\[1\]\.verify: row id 'q20': the reference 'unknown'") as err:
        run_recipe(load_recipe(path), tmp_path / "out", driver=on_ray(tmp_path / "cache"))
    assert err.value.exit_code == 2
