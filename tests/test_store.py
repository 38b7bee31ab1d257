"""Versioned datasets: atomic, numbered, loadable, with a manifest and a valid card."""

from __future__ import annotations

import json
import multiprocessing as mp

import polars as pl

from factory.store import latest_version, read_manifest, read_version, step_label, versions, write_version


def frame(n: int, tag: str = "x") -> pl.DataFrame:
    return pl.DataFrame({"instruction": [f"{tag} task {i}" for i in range(n)],
                         "response": [f"answer {i}" for i in range(n)]})


def empty_rejected() -> pl.DataFrame:
    return pl.DataFrame(schema={"drop_reason": pl.String, "drop_step": pl.String})


def test_versions_are_numbered_and_hold_data_manifest_card(tmp_path):
    a = write_version(tmp_path, "ds", frame(3), empty_rejected(), {"recipe": {}})
    b = write_version(tmp_path, "ds", frame(5), empty_rejected(), {"recipe": {}})
    assert (a.name, b.name) == ("v1", "v2")
    assert versions(tmp_path / "ds") == [1, 2]
    assert latest_version(tmp_path / "ds") == b
    manifest = read_manifest(b)
    assert manifest["version"] == 2 and manifest["rows"] == 5
    assert manifest["columns"] == {"instruction": "String", "response": "String"}
    assert manifest["files"]["data"] == ["data/train-00000-of-00001.parquet"]
    assert "git_commit" in manifest["code_version"] or manifest["code_version"]["factory"]
    assert read_version(a).height == 3
    assert not [p for p in (tmp_path / "ds").iterdir() if p.name.startswith(".tmp")]


def test_shards_split_rows(tmp_path):
    v = write_version(tmp_path, "ds", frame(10), empty_rejected(), {}, shard_rows=4)
    assert sorted(p.name for p in (v / "data").iterdir()) == [
        "train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]
    assert read_version(v)["instruction"].to_list() == frame(10)["instruction"].to_list()


def test_load_dataset_reads_a_version(tmp_path):
    from datasets import load_dataset

    v = write_version(tmp_path, "ds", frame(4).with_columns(
        messages=pl.concat_list([pl.struct(role=pl.lit("user"), content="instruction"),
                                 pl.struct(role=pl.lit("assistant"), content="response")])),
        empty_rejected(), {})
    ds = load_dataset("parquet", data_files=str(v / "data" / "*.parquet"), split="train",
                      cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 4
    assert ds[0]["messages"] == [{"role": "user", "content": "x task 0"}, {"role": "assistant", "content": "answer 0"}]


def test_card_metadata_passes_huggingface_validation(tmp_path):
    from huggingface_hub import DatasetCard

    v = write_version(tmp_path, "ds", frame(2), empty_rejected(), {"recipe": {"description": "demo data"}})
    card = DatasetCard.load(v / "README.md")
    data = card.data.to_dict()
    assert data["configs"][0]["data_files"][0]["path"] == "data/train-*"
    assert data["size_categories"] == ["n<1K"]
    assert "synthetic" in data["tags"]
    assert "demo data" in card.text


def _writer(args):
    root, tag = args
    return write_version(root, "race", frame(50, tag), empty_rejected(), {"writer": tag}).name


def test_concurrent_writers_get_distinct_versions_never_half_written(tmp_path):
    tags = [f"w{i}" for i in range(6)]
    with mp.get_context("spawn").Pool(3) as pool:
        names = pool.map(_writer, [(tmp_path, t) for t in tags])
    assert sorted(names, key=lambda n: int(n[1:])) == [f"v{i}" for i in range(1, 7)]
    writers = set()
    for name in names:
        manifest = json.loads((tmp_path / "race" / name / "manifest.json").read_text())
        assert manifest["version"] == int(name[1:])
        data = read_version(tmp_path / "race" / name)
        assert data.height == 50 and data["instruction"][0].startswith(manifest["writer"])
        writers.add(manifest["writer"])
    assert writers == set(tags)


def test_a_step_is_named_by_its_label_and_old_manifests_by_index_and_name():
    assert step_label({"index": 1, "name": "solve", "label": "steps[1].solve"}) == "steps[1].solve"
    assert step_label({"index": 2, "name": "score"}) == "steps[2].score"  # written before steps carried a label
