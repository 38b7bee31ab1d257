"""Hugging Face Hub datasets as sources and eval sets, offline.

Two stand-ins for the Hub, both read through the same ``datasets`` loading path as a Hub id:
a local dataset repository folder (data files + a README with ``configs:``, what a clone of a
Hub dataset holds), and the local cache an online load leaves behind (``datasets``' prepared
copy under ``org___name/<config>/<version>/<commit sha>``, ``huggingface_hub``'s ``refs/<tag>``),
which is what ``HF_HUB_OFFLINE=1`` reads.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest

from factory import hubdata
from factory.cli import main
from factory.errors import FactoryError, RecipeError
from factory.recipe import load_recipe
from factory.evolve.evaluate import read_eval

SHA_V1 = "1" * 40
SHA_V2 = "2" * 40


@pytest.fixture(autouse=True)
def hub_home(tmp_path, monkeypatch):
    """The ``datasets`` and ``huggingface_hub`` caches in tmp_path, and no Hub dataset resolved yet."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hubdata, "_OPENED", {})
    assert hubdata.hub_offline()  # the suite runs with HF_HUB_OFFLINE=1
    return tmp_path / "hf"


def dataset_repo(folder: Path, prefix: str = "", test_rows: int = 12) -> Path:
    """A dataset repository: config `main` (default; train and test), config `socratic` (test only)."""
    (folder / "data").mkdir(parents=True)
    (folder / "socratic").mkdir()
    (folder / "README.md").write_text("""\
---
configs:
- config_name: main
  default: true
  data_files:
  - split: train
    path: data/train-*.jsonl
  - split: test
    path: data/test-*.jsonl
- config_name: socratic
  data_files:
  - split: test
    path: socratic/test-*.jsonl
---
# A toy math set
""")
    for split, n in (("train", 30), ("test", test_rows)):
        rows = [{"question": f"{prefix}{split} question {i}: what is {i} plus one?", "answer": f"work #### {i + 1}",
                 "level": i % 3} for i in range(n)]
        (folder / "data" / f"{split}-00000-of-00001.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    pl.DataFrame({"question": [f"socratic {i}" for i in range(5)], "answer": [str(i) for i in range(5)]}) \
        .write_ndjson(folder / "socratic" / "test-00000-of-00001.jsonl")
    return folder


def cache_like_an_online_load(folder: Path, repo: str, sha: str, config: str | None = None, refs=()) -> None:
    """What `load_dataset(repo, config, revision=ref)` online leaves in the caches, made from a copy."""
    import datasets
    import huggingface_hub.constants

    builder = datasets.load_dataset_builder(str(folder), config)
    org, name = repo.split("/")
    assert folder.name == name  # datasets names the prepared files after the dataset
    out = Path(datasets.config.HF_DATASETS_CACHE) / f"{org}___{name}" / builder.config.name / "0.0.0" / sha
    builder.download_and_prepare(output_dir=str(out))
    for ref in refs:
        refs_dir = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"datasets--{org}--{name}" / "refs"
        refs_dir.mkdir(parents=True, exist_ok=True)
        (refs_dir / ref).write_text(sha)


def recipe(write_recipe, source: str, steps: str = "  - exact: {column: question}\n", extra: str = "") -> Path:
    return write_recipe(f"name: hubbed\nsource: {source}\nsteps:\n{steps}{extra}")


def run(path: Path, out: Path) -> dict:
    code = main(["run", str(path), "--out", str(out), "--quiet", "--examples", "0"])
    assert code == 0
    version = sorted((out / "hubbed").iterdir())[-1]
    return json.loads((version / "manifest.json").read_text()) | {"dir": str(version)}


def test_a_dataset_repository_folder_reads_by_config_and_split(write_recipe, tmp_path):
    repo = dataset_repo(tmp_path / "toy")
    path = recipe(write_recipe, f"{{hub: {repo}, config: main, split: test, limit: 5, "
                                "rename: {question: instruction}}", "  - exact: {}\n")
    manifest = run(path, tmp_path / "out")
    rows = pl.read_parquet(Path(manifest["dir"]) / "data")
    assert rows.height == 5 and rows.columns == ["instruction", "answer", "level"]
    assert rows["instruction"][0] == "test question 0: what is 0 plus one?"
    source = manifest["source"]
    assert source | {"rows_read": 5} == {"hub": str(repo), "config": "main", "split": "test", "revision": None,
                                         "sha": None, "local": str(repo), "streaming": False, "rows_read": 5,
                                         "dropped": {}}
    card = (Path(manifest["dir"]) / "README.md").read_text()
    assert f"- Source: `{repo}` (a local copy of a dataset repository), config `main`, split `test`" in card


def test_no_config_reads_the_default_one_and_another_config_its_own_files(write_recipe, tmp_path):
    repo = dataset_repo(tmp_path / "toy")
    plain = load_recipe(str(recipe(write_recipe, f"{{hub: {repo}, split: train}}")))
    assert plain.source.read().height == 30 and plain.source.describe()["config"] == "main"
    other = load_recipe(str(recipe(write_recipe, f"{{hub: {repo}, config: socratic, split: test}}")))
    assert other.source.read()["question"].to_list() == [f"socratic {i}" for i in range(5)]


def test_a_git_clone_records_its_commit(write_recipe, tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = dataset_repo(tmp_path / "toy")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "data"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    loaded = load_recipe(str(recipe(write_recipe, f"{{hub: {repo}, split: test}}")))
    assert loaded.source.describe()["sha"] == head


def test_streaming_with_a_limit_reads_only_those_rows_and_columns(write_recipe, tmp_path, hub_home):
    repo = dataset_repo(tmp_path / "toy", test_rows=5000)
    loaded = load_recipe(str(recipe(write_recipe, f"{{hub: {repo}, split: test, streaming: true, limit: 7, "
                                                  "columns: [question]}")))
    assert loaded.source.columns() == ["question"]
    rows = loaded.source.read()
    assert rows.columns == ["question"] and rows.height == 7
    assert not (hub_home / "datasets").exists() or not list((hub_home / "datasets").rglob("*.arrow"))  # nothing prepared
    # A preview (the first rows) of a streamed source streams only those.
    assert loaded.source.first(3).read().height == 3


@pytest.mark.parametrize("source, message", [
    ("{hub: REPO, config: nope}", "hub dataset 'REPO' has no config 'nope'; its configs: ['main', 'socratic']"),
    ("{hub: REPO, split: validation}", "hub dataset 'REPO' has no split 'validation' (splits: train, test)"),
    ("{hub: REPO, split: test, columns: [question, answr]}", "has no column 'answr' (it has question, answer, level)"),
    ("{hub: REPO, revision: v2}", "'REPO' is a local folder, which has no revisions"),
    ("{hub: 'not a dataset!'}", "'not a dataset!' is neither a Hub dataset id nor a local folder"),
    ("{hub: REPO, path: x.jsonl}", "both `path:` and `hub:` are given"),
    ("{path: DATA, revision: v2}", "`revision:` applies to Hub datasets"),
])
def test_bad_hub_sources_are_named_before_anything_runs(write_recipe, tmp_path, source, message):
    repo = dataset_repo(tmp_path / "toy")
    data = tmp_path / "toy" / "data" / "test-00000-of-00001.jsonl"
    path = recipe(write_recipe, source.replace("REPO", str(repo)).replace("DATA", str(data)))
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    assert message.replace("REPO", str(repo)) in str(err.value)


def test_offline_a_cached_hub_dataset_loads_at_the_revision_asked(write_recipe, tmp_path):
    # v1 and v2 of org/toy were loaded online once; v2 (main) is the newer copy.
    cache_like_an_online_load(dataset_repo(tmp_path / "v1" / "toy", prefix="old "), "org/toy", SHA_V1, refs=["v1"])
    cache_like_an_online_load(dataset_repo(tmp_path / "v2" / "toy", prefix="new "), "org/toy", SHA_V2,
                              refs=["v2", "main"])
    latest = load_recipe(str(recipe(write_recipe, "{hub: org/toy, config: main, split: test}")))
    assert latest.source.read()["question"][0].startswith("new ")
    assert latest.source.describe()["sha"] == SHA_V2
    pinned = load_recipe(str(recipe(write_recipe, "{hub: org/toy, config: main, split: test, revision: v1}")))
    assert pinned.source.read()["question"][0].startswith("old ")
    by_sha = load_recipe(str(recipe(write_recipe, f"{{hub: org/toy, split: test, revision: {SHA_V1}}}")))
    assert by_sha.source.describe() | {"sha": SHA_V1} == by_sha.source.describe()
    streamed = load_recipe(str(recipe(write_recipe, "{hub: org/toy, split: test, revision: v1, streaming: true, "
                                                    "limit: 2}")))
    assert streamed.source.read()["question"].to_list() == ["old test question 0: what is 0 plus one?",
                                                             "old test question 1: what is 1 plus one?"]

    manifest = run(recipe(write_recipe, "{hub: org/toy, config: main, split: test, revision: v1, limit: 4}"),
                   tmp_path / "out")
    assert {k: manifest["source"][k] for k in ("hub", "config", "split", "revision", "sha")} == {
        "hub": "org/toy", "config": "main", "split": "test", "revision": "v1", "sha": SHA_V1}
    card = (Path(manifest["dir"]) / "README.md").read_text()
    assert "source_datasets:\n- org/toy" in card
    assert (f"- Source: [org/toy](https://huggingface.co/datasets/org/toy/tree/{SHA_V1}), config `main`, split "
            f"`test`, revision `v1` (commit `{SHA_V1}`), 4 rows read") in card


def test_offline_a_missing_dataset_is_one_line_and_exit_2_before_any_model_loads(write_recipe, tmp_path, capsys,
                                                                                 monkeypatch):
    from factory.llm import transformers_backend

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers_backend.TransformersBackend, "__init__", no_model)
    path = write_recipe("name: hubbed\nllm: {backend: transformers, model: embedded}\n"
                        "source: {hub: someone/not-cached, config: main, split: test}\n"
                        "steps:\n  - solve: {column: question}\n")
    code = main(["run", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "hub dataset 'someone/not-cached' (config 'main') is not in the local cache and HF_HUB_OFFLINE is set" \
           in err and err.endswith("fetch it once with network access: factory fetch someone/not-cached --config main")
    # A revision that was never fetched, of a dataset that was: the same, naming the revision.
    cache_like_an_online_load(dataset_repo(tmp_path / "v1" / "toy"), "org/toy", SHA_V1, refs=["v1"])
    capsys.readouterr()
    path = recipe(write_recipe, "{hub: org/toy, split: test, revision: v7}")
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "revision 'v7' is not in the local cache" in err \
           and err.endswith("factory fetch org/toy --revision v7")


def test_fetch_needs_the_network_and_finds_every_hub_dataset_of_a_recipe(write_recipe, capsys):
    path = write_recipe("""\
        name: x
        source: {hub: org/seeds, config: main, split: train}
        steps:
          - decontaminate: {eval: {hub: openai/gsm8k, config: main, split: test}}
        evolve:
          eval: {hub: openai/gsm8k, config: main, split: test, revision: v2}
        """)
    assert hubdata.recipe_hub_refs(path) == [hubdata.HubRef("org/seeds", "main"),
                                             hubdata.HubRef("openai/gsm8k", "main"),
                                             hubdata.HubRef("openai/gsm8k", "main", revision="v2")]
    assert main(["fetch", str(path)]) == 2
    assert "HF_HUB_OFFLINE is set: run it with HF_HUB_OFFLINE=0" in capsys.readouterr().err


def test_a_version_pushed_by_the_factory_reads_back_by_repo_and_tag(write_recipe, tmp_path):
    from factory.hub import plan_push

    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"task {i}", "response": f"answer {i}"}) + "\n"
                              for i in range(6)))
    first = run(recipe(write_recipe, f"{{path: {source}}}", "  - exact: {}\n"), tmp_path / "out")
    # The repository as `factory push` leaves it (data/, README.md with configs:, manifest.json)...
    pushed = tmp_path / "pushed" / "evolved"
    for name, content in plan_push(first["dir"], "me/evolved").adds:
        (pushed / name).parent.mkdir(parents=True, exist_ok=True)
        (pushed / name).write_bytes(content if isinstance(content, bytes) else Path(content).read_bytes())
    # ...read by a clone, and by tag from the cache of a machine that loaded it online.
    original = pl.read_parquet(Path(first["dir"]) / "data")
    clone = load_recipe(str(recipe(write_recipe, f"{{hub: {pushed}}}", "  - exact: {}\n")))
    assert clone.source.read().equals(original)
    cache_like_an_online_load(pushed, "me/evolved", SHA_V1, refs=["v1"])
    tagged = load_recipe(str(recipe(write_recipe, "{hub: me/evolved, revision: v1}", "  - exact: {}\n")))
    assert tagged.source.read().equals(original) and tagged.source.describe()["sha"] == SHA_V1


def test_decontaminate_takes_a_hub_eval_set(write_recipe, tmp_path):
    repo = dataset_repo(tmp_path / "toy")
    rows = tmp_path / "rows.jsonl"
    leaked = "test question 3: what is 3 plus one?"
    rows.write_text("".join(json.dumps({"instruction": text}) + "\n" for text in
                            ["a fresh task about rivers and their deltas", f"Please solve: {leaked}", "write a haiku"]))
    steps = (f"  - decontaminate: {{eval: {{hub: {repo}, config: main, split: test, columns: [question]}}, "
             "eval_column: question, min_words: 3}\n")
    manifest = run(recipe(write_recipe, f"{{path: {rows}}}", steps), tmp_path / "out")
    report = manifest["steps"][0]["report"]
    assert report["eval_items"] == 12 and report["matched_eval_ids"] == ["eval[3]"]
    assert report["eval_set"]["hub"] == str(repo) and report["eval_set"]["split"] == "test"
    assert manifest["rows"] == 2
    bad = recipe(write_recipe, f"{{path: {rows}}}", f"  - decontaminate: {{eval: {{hub: {repo}, split: dev}}}}\n")
    with pytest.raises(RecipeError, match=r"steps\[0\]\.decontaminate\.eval: hub dataset .* has no split 'dev'"):
        load_recipe(str(bad))


def test_evolve_eval_and_win_rate_take_hub_eval_sets(write_recipe, tmp_path, tiny_model_dir):
    from factory.evolve.loop import Evolution

    repo = dataset_repo(tmp_path / "toy")
    path = write_recipe(f"""\
        name: hub-evolve
        llm:
          backend: scripted
          rules:
            - {{match: "Which response answers", reply: "Winner: A"}}
            - {{match: ".", reply: "The answer is 4."}}
        source: {{generator: arithmetic, num_rows: 4}}
        steps:
          - solve: {{answer_format: number}}
        evolve:
          model: {tiny_model_dir}
          min_gap: null
          eval: {{hub: {repo}, config: main, split: test, column: question, answer_column: answer, limit: 6}}
          win_rate: {{hub: {repo}, split: train, column: question, limit: 2, streaming: true}}
        """)
    evolution = Evolution(str(path), tmp_path / "run", [], progress=False)
    result = evolution.evaluate(None)
    assert result["items"] == 6 and result["correct"] == 1  # only "what is 3 plus one?" has answer 4
    assert evolution.win_rate(None, None)["tasks"] == 2
    assert read_eval({"hub": str(repo), "split": "test"}, limit=3).height == 3

    broken = path.read_text().replace("answer_column: answer", "answer_column: solution")
    with pytest.raises(RecipeError, match=r"evolve\.eval\.answer_column: the eval set .* has no column 'solution'"):
        load_recipe(str(write_recipe(broken, "broken.yaml")))
    neither = path.read_text().replace(f"eval: {{hub: {repo}, ", "eval: {")
    with pytest.raises(RecipeError, match=r"evolve\.eval: give the eval set as `path:` \(a file\) or `hub:`"):
        load_recipe(str(write_recipe(neither, "neither.yaml")))


def test_read_eval_names_a_missing_file(tmp_path):
    with pytest.raises(FactoryError, match="eval set 'nowhere.jsonl' does not exist"):
        read_eval("nowhere.jsonl", tmp_path)
