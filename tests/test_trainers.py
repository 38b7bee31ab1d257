"""Trainers: assistant-only loss, adapters and their records, resume, DPO, config handling."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl
import pytest

from factory.errors import RecipeError
from factory.store import write_version
from factory.training import SFTConfig, is_trained
from trainers import dpo, sft
from trainers.common import parse_config, run_main


def conversation_version(folder: Path, n: int = 6) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(n)]
    return write_version(folder, "sums", pl.DataFrame(rows), pl.DataFrame({"drop_reason": ["x"], "drop_step": ["s"]}),
                         {})


def test_only_assistant_tokens_are_learned(tiny_model_dir):
    from factory.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."}]
    encoded = sft.encode(tok, messages, 512)
    learned = tok.decode([t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != -100])
    assert learned == "Hello there.<|im_end|>Goodbye.<|im_end|>"
    assert sft.encode(tok, messages[:2], 512) is None  # nothing to learn without an assistant turn


def test_packing_fills_blocks():
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    assert sft.pack(examples, 4) == [{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]},
                                     {"input_ids": [5], "labels": [5]}]


def test_sft_writes_adapter_and_record_and_leaves_the_base_alone(tiny_model_dir, tmp_path):
    before = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    version = conversation_version(tmp_path)
    out = tmp_path / "adapter"
    sft.main(["--dataset", str(version), "--out", str(out), "--model", str(tiny_model_dir), "--max-steps", "3",
              "--batch-size", "2", "--learning-rate", "0.01", "--save-steps", "2"])
    record = json.loads((out / "training.json").read_text())
    assert record["dataset"]["path"] == str(version.resolve()) and record["dataset"]["rows"] == 6
    assert record["metrics"]["steps"] == 3 and len(record["metrics"]["loss_history"]) == 3
    assert record["data"]["examples"] == 6 and record["data"]["train_tokens"] > 0
    assert (record["device"], record["dtype"]) == ("cpu", "float32")  # auto, without a GPU
    assert (out / "adapter_model.safetensors").is_file() and is_trained(out)
    assert hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest() == before
    # Running again does nothing: the adapter is complete.
    sft.main(["--dataset", str(version), "--out", str(out), "--model", str(tiny_model_dir), "--max-steps", "3"])
    assert json.loads((out / "training.json").read_text()) == record


def test_sft_resumes_from_its_last_checkpoint(tiny_model_dir, tmp_path):
    version = conversation_version(tmp_path)
    out = tmp_path / "adapter"
    args = ["--dataset", str(version), "--out", str(out), "--model", str(tiny_model_dir), "--batch-size", "2",
            "--save-steps", "2", "--learning-rate", "0.01"]
    sft.main(args + ["--max-steps", "2"])
    # As if the process had died after its checkpoint: no final adapter, no record.
    for name in ("training.json", "adapter_model.safetensors", "metrics.json"):
        (out / name).unlink()
    sft.main(args + ["--max-steps", "4"])
    record = json.loads((out / "training.json").read_text())
    assert record["resumed_from"].endswith("checkpoint-2")
    assert record["metrics"]["steps"] == 4
    assert [e["step"] for e in record["metrics"]["loss_history"]] == [1, 2, 3, 4]


def test_dpo_one_step_with_trl(tiny_model_dir, tmp_path):
    pairs = pl.DataFrame({"prompt": [f"Question {i}?" for i in range(4)], "chosen": ["A good answer."] * 4,
                          "rejected": ["Bad."] * 4})
    version = write_version(tmp_path, "pairs", pairs, pl.DataFrame({"drop_reason": ["x"], "drop_step": ["s"]}), {})
    out = tmp_path / "dpo"
    dpo.main(["--dataset", str(version), "--out", str(out), "--model", str(tiny_model_dir), "--max-steps", "1",
              "--batch-size", "2"])
    record = json.loads((out / "training.json").read_text())
    assert record["method"] == "dpo" and record["data"]["pairs"] == 4 and record["metrics"]["steps"] == 1
    assert (record["device"], record["dtype"]) == ("cpu", "float32")
    assert record["metrics"]["loss_history"][0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2 at the start


def test_config_from_yaml_and_flags(tmp_path, capsys):
    config_file = tmp_path / "train.yaml"
    config_file.write_text("dataset: out/x/v1\nout: adapters/x\nlearning_rate: 0.001\nmax_steps: 5\n")
    config = parse_config(SFTConfig, ["--config", str(config_file), "--max-steps", "7"], "test")
    assert (config.learning_rate, config.max_steps, config.out) == (0.001, 7, "adapters/x")
    config_file.write_text("dataset: d\nout: o\nlearning_rat: 0.1\n")
    with pytest.raises(RecipeError, match="learning_rat: unknown key 'learning_rat'; did you mean 'learning_rate'"):
        parse_config(SFTConfig, ["--config", str(config_file)], "test")
    assert run_main(sft.main, ["--dataset", "d", "--out", "o", "--lora-r", "0"]) == 2
    assert "lora_r: must be at least 1, got 0" in capsys.readouterr().err


def test_help_writes_defaults_and_help_as_factory_steps_does(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_config(sft.SFTConfig, ["-h"], "test")
    shown = " ".join(capsys.readouterr().out.split())
    assert "--lora_r LORA_R, --lora-r LORA_R LoRA rank. (default: 16)" in shown
    assert "(default: 'embedded')" in shown and "checkpoints go. (required)" in shown
    config_file = tmp_path / "train.yaml"
    config_file.write_text("lora_r: 4\n")  # what the file gives is the default the help shows
    with pytest.raises(SystemExit):
        parse_config(sft.SFTConfig, ["--config", str(config_file), "-h"], "test")
    assert "LoRA rank. (default: 4)" in " ".join(capsys.readouterr().out.split())


def test_missing_messages_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    version = write_version(tmp_path, "raw", pl.DataFrame({"instruction": ["x"]}), pl.DataFrame(), {})
    assert run_main(sft.main, ["--dataset", str(version), "--out", str(tmp_path / "a"), "--model",
                               str(tiny_model_dir)]) == 2
    assert "no `messages` column to train on" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
