"""LoRA supervised fine-tuning on a dataset version's ``messages``.

    python -m trainers.sft --dataset out/quickstart/v1 --out adapters/quickstart-v1 --max-steps 30
    factory train sft --dataset out/quickstart/v1 --out adapters/quickstart-v1

Each conversation is rendered with the model's chat template; the loss covers the
assistant turns only (their tokens up to and including the end-of-turn token), found by
rendering each prefix of the conversation. With ``packing``, examples are concatenated
into blocks of ``max_length`` tokens. Training runs on the GPU when there is one and on
the CPU otherwise, with transformers' Trainer, which checkpoints every ``save_steps``;
run the same command again after an interruption and it resumes from the last
checkpoint. The adapter folder ends up with the LoRA weights, ``training.json`` (the
config, the dataset version consumed -- path and manifest hash --, the base model and the
metrics) and ``checkpoints/``.
"""

from __future__ import annotations

from pathlib import Path

from factory.errors import FactoryError
from factory.training import SFTConfig
from trainers.common import (begin_training, lora_config, model_to_train, parse_config, run_main,
                             train_and_record, training_arguments)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A turn's span runs from the end of the prompt before it (rendered with the generation
    prompt) to the end of the conversation rendered up to it, without the trailing
    newline: the turn's text and its end-of-turn token.

    Raises:
        FactoryError: the chat template does not render prefixes consistently.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[:k + 1], tokenize=False).rstrip("\n")
        if not (full.startswith(before) and full.startswith(upto) and len(upto) > len(before)):
            raise FactoryError("the model's chat template renders a conversation's prefixes differently from the "
                               "whole, so assistant tokens cannot be located; use a model whose template is "
                               "prefix-consistent")
        spans.append((len(before), len(upto)))
    return full, spans


def encode(tokenizer, messages: list[dict], max_length: int) -> dict | None:
    """Token ids and labels (-100 outside assistant turns); None when nothing is left to learn."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"][:max_length], enc["offset_mapping"][:max_length]
    labels = [t if any(start < end_tok and begin_tok < end for start, end in spans) else -100
              for t, (begin_tok, end_tok) in zip(ids, offsets)]
    if all(label == -100 for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenates examples into blocks of ``max_length`` tokens (the last may be shorter)."""
    ids, labels = [], []
    for e in examples:
        ids.extend(e["input_ids"])
        labels.extend(e["labels"])
    blocks = [{"input_ids": ids[i:i + max_length], "labels": labels[i:i + max_length]}
              for i in range(0, len(ids), max_length)]
    return [b for b in blocks if any(label != -100 for label in b["labels"])]


class Collator:
    """Pads a batch on the right; padding is masked out of attention and loss."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        ids = [b["input_ids"] + [self.pad_id] * (width - len(b["input_ids"])) for b in batch]
        labels = [b["labels"] + [-100] * (width - len(b["labels"])) for b in batch]
        mask = [[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def load_examples(config: SFTConfig, tokenizer) -> tuple[list[dict], dict]:
    from factory.store import read_version

    table = read_version(config.dataset)
    if "messages" not in table.columns:
        raise FactoryError(f"{config.dataset}: no `messages` column to train on (columns: "
                           f"{', '.join(table.columns)}); write the version with `output: {{format: messages}}`")
    examples, skipped = [], 0
    for messages in table["messages"].to_list():
        encoded = encode(tokenizer, messages, config.max_length) if messages else None
        if encoded is None:
            skipped += 1
        else:
            examples.append(encoded)
    if not examples:
        raise FactoryError(f"{config.dataset}: no example has an assistant turn within {config.max_length} tokens; "
                           "nothing to train on")
    stats = {"examples": len(examples), "skipped": skipped,
             "train_tokens": sum(sum(label != -100 for label in e["labels"]) for e in examples),
             "tokens": sum(len(e["input_ids"]) for e in examples)}
    if config.packing:
        examples = pack(examples, config.max_length)
        stats["packed_blocks"] = len(examples)
    return examples, stats


def train(config: SFTConfig) -> Path:
    """Trains (or resumes) and returns the adapter folder."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from factory.models import load_tokenizer

    record = begin_training(config, "sft")
    if record is None:
        return Path(config.out)
    out = Path(config.out)
    tokenizer = load_tokenizer(config.model)
    examples, data_stats = load_examples(config, tokenizer)
    out.mkdir(parents=True, exist_ok=True)  # only once there is something to train on
    model, device = model_to_train(config)
    if not config.init_adapter:
        model = get_peft_model(model, lora_config(config))
    args = TrainingArguments(**training_arguments(config, out, device, model), lr_scheduler_type=config.lr_scheduler,
                             warmup_steps=config.warmup_ratio, weight_decay=config.weight_decay,
                             data_seed=config.seed, remove_unused_columns=False, disable_tqdm=False)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=Collator(tokenizer.pad_token_id))
    return train_and_record(trainer, out, record, data_stats, device)


def main(argv: list[str] | None = None) -> Path:
    config = parse_config(SFTConfig, argv, "LoRA SFT on a dataset version's messages (loss on assistant tokens).",
                          prog="python -m trainers.sft (or: factory train sft)")
    out = train(config)
    print(out)
    return out


if __name__ == "__main__":
    raise SystemExit(run_main(main))
