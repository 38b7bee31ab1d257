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


QA = [("Name a colour of the sky.", "Blue, on a clear day."), ("What do bees make?", "Bees make honey."),
      ("Which animal says moo?", "A cow says moo."), ("What is ice made of?", "Ice is frozen water.")]


def answer_log_prob(model, tokenizer) -> float:
    """Mean log-probability of each QA answer's tokens (and its end-of-turn) after its chat prompt,
    computed here from the model's logits, apart from the trainer's encoding and loss."""
    import torch

    total, count = 0.0, 0
    for question, answer in QA:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0].float()
        # position i predicts token i + 1: the answer's tokens are predicted from the prompt's last on
        log_probs = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
        total += log_probs.gather(1, torch.tensor(answer_ids)[:, None]).sum().item()
        count += len(answer_ids)
    return total / count


@pytest.fixture(scope="module")
def learnable_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama with its (tied) embeddings scaled up tenfold. At the usual 0.02 init, a token's
    logit is at most about |final norm output| x |embedding row| = 5.7 x 0.11, so no adapter on the
    attention and MLP layers can move the next-token distribution far from uniform (log 49152)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.get_input_embeddings().weight.data *= 10
    out = tmp_path_factory.mktemp("learnable-llama")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_sft_learns_its_training_answers(learnable_model_dir, tmp_path):
    """A few epochs over four conversations: the logged loss falls well below where it starts, and the
    saved adapter, loaded on the base model with peft, makes the training answers far more likely than
    the base model does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    rejected = pl.DataFrame({"drop_reason": ["x"], "drop_step": ["s"]})
    version = write_version(tmp_path, "qa", pl.DataFrame(rows), rejected, {})
    out = tmp_path / "adapter"
    sft.main(["--dataset", str(version), "--out", str(out), "--model", str(learnable_model_dir), "--epochs", "20",
              "--batch-size", "4", "--learning-rate", "0.01", "--lr-scheduler", "constant", "--warmup-ratio", "0",
              "--lora-dropout", "0", "--save-steps", "1000"])
    losses = [e["loss"] for e in json.loads((out / "training.json").read_text())["metrics"]["loss_history"]]
    assert len(losses) == 20
    # About 11.5 nats a token at first (a random model, near log 49152 = 10.8); 20 steps here reach about 7.
    assert losses[-1] < losses[0] - 2.0, f"the loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}"

    tokenizer = AutoTokenizer.from_pretrained(learnable_model_dir)
    base = answer_log_prob(AutoModelForCausalLM.from_pretrained(learnable_model_dir).eval(), tokenizer)
    trained = answer_log_prob(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(learnable_model_dir),
                                                        out).eval(), tokenizer)
    # The first step's loss is the base model's on the same answer tokens (a fresh LoRA adapter adds zero).
    assert losses[0] == pytest.approx(-base, abs=0.05)
    assert trained > base + 2.0, f"the adapter does not raise the answers' log-probability: {base:.3f} -> {trained:.3f}"


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
