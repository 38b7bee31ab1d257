"""Exports for training stacks, checked by TRL itself where it runs here and by schema elsewhere;
the Hub push's commit plan and card; inspect's plot and token counts; diff."""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pytest
import yaml

from factory.cli import main
from factory.errors import FactoryError
from factory.exports import FORMATS, export
from factory.hub import plan_push, push, validate_card_offline
from factory.store import write_version

REJECTED = pl.DataFrame({"drop_reason": ["too_short"], "drop_step": ["steps[1].heuristics"], "instruction": ["?"]})


def sft_version(folder: Path, n: int = 4) -> Path:
    rows = [{"instruction": f"What is {i} times 3?", "input": "", "response": f"{i} times 3 is {3 * i}.",
             "messages": [{"role": "system", "content": "Be exact."},
                          {"role": "user", "content": f"What is {i} times 3?"},
                          {"role": "assistant", "content": f"{i} times 3 is {3 * i}."}]} for i in range(n)]
    return write_version(folder, "times", pl.DataFrame(rows), REJECTED, {"recipe": {"description": "times tables"}})


def dpo_version(folder: Path, n: int = 4) -> Path:
    rows = [{"instruction": f"Name {i} fruits", "prompt": f"Name {i} fruits", "chosen": "Apple, pear.",
             "rejected": "No.", "chosen_score": 9.0, "rejected_score": 2.0} for i in range(n)]
    return write_version(folder, "pairs", pl.DataFrame(rows), REJECTED, {})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_format_writes_its_documented_schema(tmp_path):
    version = sft_version(tmp_path)
    expected = {"trl-sft": ["train.jsonl"], "openai": ["train.jsonl"], "alpaca": ["train.json"],
                "sharegpt": ["train.json"], "llama-factory": ["times_v1.json", "dataset_info.json"],
                "axolotl": ["train.jsonl", "axolotl.yaml"]}
    for fmt, files in expected.items():
        written = export(version, fmt, tmp_path / fmt)
        assert [p.name for p in written] == files
        record = json.loads((tmp_path / fmt / "export.json").read_text())
        assert record["rows"] == 4 and record["source"] == str(version.resolve()) and len(record["manifest_sha256"]) == 64
    chat = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "What is 1 times 3?"},
            {"role": "assistant", "content": "1 times 3 is 3."}]
    assert read_jsonl(tmp_path / "trl-sft" / "train.jsonl")[1] == {"messages": chat}
    assert read_jsonl(tmp_path / "openai" / "train.jsonl")[1] == {"messages": chat}
    assert json.loads((tmp_path / "alpaca" / "train.json").read_text())[1] == {
        "instruction": "What is 1 times 3?", "input": "", "output": "1 times 3 is 3.", "system": "Be exact."}
    assert json.loads((tmp_path / "sharegpt" / "train.json").read_text())[1] == {"conversations": [
        {"from": "system", "value": "Be exact."}, {"from": "human", "value": "What is 1 times 3?"},
        {"from": "gpt", "value": "1 times 3 is 3."}]}
    info = json.loads((tmp_path / "llama-factory" / "dataset_info.json").read_text())
    assert info == {"times_v1": {"file_name": "times_v1.json", "formatting": "sharegpt",
                                 "columns": {"messages": "conversations"},
                                 "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                                          "assistant_tag": "gpt", "system_tag": "system"}}}
    snippet = yaml.safe_load((tmp_path / "axolotl" / "axolotl.yaml").read_text())
    [dataset] = snippet["datasets"]
    assert dataset["type"] == "chat_template" and dataset["field_messages"] == "messages"
    assert Path(dataset["path"]).is_file() and dataset["ds_type"] == "json"


def test_prompt_completion_and_preference_formats(tmp_path):
    export(sft_version(tmp_path), "trl-sft", tmp_path / "pc", style="prompt-completion")
    row = read_jsonl(tmp_path / "pc" / "train.jsonl")[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"] and row["completion"][0]["role"] == "assistant"
    pairs = dpo_version(tmp_path)
    export(pairs, "trl-dpo", tmp_path / "dpo-std", style="standard")
    assert read_jsonl(tmp_path / "dpo-std" / "train.jsonl")[0] == {"prompt": "Name 0 fruits", "chosen": "Apple, pear.",
                                                                   "rejected": "No."}
    export(pairs, "openai", tmp_path / "oa")
    assert read_jsonl(tmp_path / "oa" / "train.jsonl")[0] == {
        "input": {"messages": [{"role": "user", "content": "Name 0 fruits"}]},
        "preferred_output": [{"role": "assistant", "content": "Apple, pear."}],
        "non_preferred_output": [{"role": "assistant", "content": "No."}]}
    export(pairs, "llama-factory", tmp_path / "lf")
    entry = json.loads((tmp_path / "lf" / "dataset_info.json").read_text())["pairs_v1"]
    assert entry["ranking"] is True and entry["columns"] == {"messages": "conversations", "chosen": "chosen",
                                                             "rejected": "rejected"}
    assert json.loads((tmp_path / "lf" / "pairs_v1.json").read_text())[0]["chosen"] == {"from": "gpt",
                                                                                         "value": "Apple, pear."}
    export(pairs, "axolotl", tmp_path / "ax")
    snippet = yaml.safe_load((tmp_path / "ax" / "axolotl.yaml").read_text())
    assert snippet["rl"] == "dpo" and snippet["datasets"][0]["field_chosen"] == "chosen"
    with pytest.raises(FactoryError, match="no prompt, chosen, rejected column"):
        export(sft_version(tmp_path / "x"), "trl-dpo", tmp_path / "bad")


def test_trl_sft_trainer_trains_one_step_on_the_export(tiny_model_dir, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    export(sft_version(tmp_path), "trl-sft", tmp_path / "sft")
    data = datasets.load_dataset("json", data_files=str(tmp_path / "sft" / "train.jsonl"), split="train",
                                 cache_dir=str(tmp_path / "hf"))
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir), train_dataset=data,
                         args=SFTConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2,
                                        report_to="none", use_cpu=True, save_strategy="no"))
    assert trainer.train().global_step == 1


def test_trl_dpo_trainer_trains_one_step_on_the_export(tiny_model_dir, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    export(dpo_version(tmp_path), "trl-dpo", tmp_path / "dpo")
    data = datasets.load_dataset("json", data_files=str(tmp_path / "dpo" / "train.jsonl"), split="train",
                                 cache_dir=str(tmp_path / "hf"))
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir), train_dataset=data,
                         args=DPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2,
                                        report_to="none", use_cpu=True, save_strategy="no"))
    assert trainer.train().global_step == 1


def test_export_command(tmp_path, capsys):
    version = sft_version(tmp_path)
    assert main(["export", str(version), "--format", "sharegpt", "--out", str(tmp_path / "e")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "e" / "train.json")
    assert sorted(FORMATS) == sorted(["trl-sft", "trl-dpo", "openai", "alpaca", "sharegpt", "llama-factory",
                                      "axolotl"])


def test_export_refuses_a_version_with_no_rows(write_recipe, tmp_path, capsys):
    source = tmp_path / "tasks.jsonl"
    source.write_text("\n".join(json.dumps({"instruction": f"Task {i}", "response": "Done."}) for i in range(3)))
    recipe = write_recipe(f"name: none-left\nsource: {{path: {source}}}\nsteps:\n"
                          "  - heuristics: {column: instruction, checks: [length], min_words: 50}\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    version = tmp_path / "out" / "none-left" / "v1"
    capsys.readouterr()
    for fmt in FORMATS:
        assert main(["export", str(version), "--format", fmt, "--out", str(tmp_path / "e")]) == 2
        assert capsys.readouterr().err == (
            f"error: {version} has 0 rows, so there is nothing to export (steps[0].heuristics dropped the last 3 "
            f"rows: too_short 3); see `factory inspect {version}` for the drops per step and reason, and export a "
            "version with rows. Nothing was written\n")
    assert not (tmp_path / "e").exists()
    empty = write_version(tmp_path / "plain", "times", pl.DataFrame(schema={"instruction": pl.String}), REJECTED, {})
    with pytest.raises(FactoryError, match="has 0 rows, so there is nothing to export \\(every row was dropped"):
        export(empty, "trl-sft", tmp_path / "e2")
    assert not (tmp_path / "e2").exists()


# -- push --------------------------------------------------------------------------------------

def test_push_plan_adds_shards_card_manifest_deletes_stale_shards_and_tags(tmp_path):
    version = sft_version(tmp_path)
    plan = plan_push(version, "me/times", existing_files=["README.md", "data/train-00000-of-00002.parquet",
                                                          "data/train-00001-of-00002.parquet", "other/keep.parquet"])
    assert [p for p, _ in plan.adds] == ["data/train-00000-of-00001.parquet", "manifest.json", "README.md"]
    assert plan.deletes == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    assert plan.tag == "v1" and plan.commit_message.startswith("times v1")
    card = plan.adds[-1][1].decode()
    data = validate_card_offline(card)
    assert data["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}],
                                "default": True}]
    assert data["license"] == "other" and data["task_categories"] == ["text-generation"]
    assert data["size_categories"] == ["n<1K"] and "synthetic" in data["tags"]
    assert 'load_dataset("me/times", revision="v1", split="train")' in card
    assert "## Recipe" in card and "times tables" in card


def test_named_config_keeps_the_other_configs_in_the_card(tmp_path):
    version = sft_version(tmp_path)
    existing = plan_push(version, "me/times").adds[-1][1].decode()
    plan = plan_push(version, "me/times", config_name="round2", existing_card=existing)
    assert [p for p, _ in plan.adds][0] == "round2/train-00000-of-00001.parquet" and plan.tag == "round2-v1"
    names = [c["config_name"] for c in validate_card_offline(plan.adds[-1][1].decode())["configs"]]
    assert names == ["round2", "default"]


def test_push_without_token_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    version = sft_version(tmp_path)
    assert main(["push", str(version), "--repo", "me/times"]) == 2
    assert "no Hugging Face token: set HF_TOKEN or run `hf auth login`" in capsys.readouterr().err
    assert main(["push", str(version), "--repo", "me/times", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "add     data/train-00000-of-00001.parquet" in out and "tag: v1" in out and "nothing was pushed" in out


class FakeApi:
    """Records the calls a push makes (the Hub's API as huggingface_hub exposes it)."""

    def __init__(self, files=(), tags=()):
        self.files, self.tags, self.calls = list(files), list(tags), []

    def create_repo(self, repo, **kw):
        self.calls.append(("create_repo", repo, kw))

    def list_repo_files(self, repo, **kw):
        return self.files

    def list_repo_refs(self, repo, **kw):
        from types import SimpleNamespace

        return SimpleNamespace(tags=[SimpleNamespace(name=t) for t in self.tags])

    def create_commit(self, repo, operations, **kw):
        from types import SimpleNamespace

        self.calls.append(("create_commit", [(type(o).__name__, o.path_in_repo) for o in operations], kw))
        return SimpleNamespace(oid="abc123")

    def create_tag(self, repo, **kw):
        self.calls.append(("create_tag", kw["tag"], kw["revision"]))


def test_push_makes_one_commit_and_tags_it(tmp_path, monkeypatch):
    from huggingface_hub import DatasetCard

    monkeypatch.setattr(DatasetCard, "validate", lambda self, repo_type=None: None)  # the Hub's check is online
    version = sft_version(tmp_path)
    api = FakeApi(files=["data/train-00000-of-00003.parquet"], tags=["v0"])
    push(version, "me/times", private=True, api=api)
    create, commit, tag = api.calls
    assert create == ("create_repo", "me/times", {"repo_type": "dataset", "private": True, "exist_ok": True})
    assert commit[1] == [("CommitOperationAdd", "data/train-00000-of-00001.parquet"),
                         ("CommitOperationAdd", "manifest.json"), ("CommitOperationAdd", "README.md"),
                         ("CommitOperationDelete", "data/train-00000-of-00003.parquet")]
    assert tag == ("create_tag", "v1", "abc123")
    with pytest.raises(FactoryError, match="already has v1, v3; pushing v1 would make main hold an older version"):
        push(version, "me/times", api=FakeApi(tags=["v1", "v3"]))


@pytest.mark.skipif(not os.environ.get("HF_TOKEN"), reason="needs HF_TOKEN and the network")
def test_real_upload_round_trips(tmp_path):
    import uuid

    from datasets import load_dataset
    from huggingface_hub import HfApi

    api = HfApi()
    repo = f"{api.whoami()['name']}/factory-test-{uuid.uuid4().hex[:8]}"
    version = sft_version(tmp_path)
    try:
        push(version, repo, private=True)
        ds = load_dataset(repo, revision="v1", split="train", cache_dir=str(tmp_path / "hf"))
        assert ds.num_rows == 4
    finally:
        api.delete_repo(repo, repo_type="dataset")


# -- inspect and diff ------------------------------------------------------------------------------

def test_inspect_counts_tokens_and_plots(tiny_model_dir, tmp_path, capsys):
    version = sft_version(tmp_path)
    assert main(["inspect", str(version), "--tokenizer", str(tiny_model_dir), "--plot", str(tmp_path / "v.png")]) == 0
    out = capsys.readouterr().out
    assert "length (tokens)" in out and "messages (chat template)" in out
    assert (tmp_path / "v.png").stat().st_size > 10_000


def test_diff_reports_rows_recipe_and_metric_shifts(tmp_path, capsys):
    a = write_version(tmp_path, "d", pl.DataFrame({"instruction": ["x", "y", "z"], "response": ["1", "2", "3"]}),
                      REJECTED, {"recipe": {"seed": 1, "steps": [{"solve": {"samples": 1}}]},
                                 "steps": [{"index": 0, "name": "solve", "dropped": {"parse_error": 2}}]})
    b = write_version(tmp_path, "d", pl.DataFrame({"instruction": ["y", "z", "w", "v"], "response": ["2", "3", "4", "5"]}),
                      REJECTED, {"recipe": {"seed": 1, "steps": [{"solve": {"samples": 4}}]},
                                 "steps": [{"index": 0, "name": "solve", "dropped": {"parse_error": 1}}]})
    assert main(["diff", str(a), str(b), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == {"a": 3, "b": 4, "added": 2, "removed": 1, "common": 2}
    assert info["recipe_changes"] == [{"path": "steps[0].solve.samples", "a": 1, "b": 4, "change": "changed"}]
    assert info["metric_shifts"]["rows"] == {"a": 3, "b": 4, "delta": 1}
    assert info["drop_shifts"] == {"steps[0].solve:parse_error": {"a": 2, "b": 1, "delta": -1}}
    assert info["examples"]["removed"] == [{"instruction": "x", "response": "1"}]
    assert main(["diff", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert "rows: 3 -> 4  (+2 added, -1 removed, 2 in both" in text and "steps[0].solve.samples: 1 -> 4" in text
