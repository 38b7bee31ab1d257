"""LoRA DPO (direct preference optimisation) on a version's ``chosen``/``rejected`` pairs, with TRL.

    python -m trainers.dpo --dataset out/preference-pairs/v1 --out adapters/dpo-v1 --max-steps 20
    factory train dpo --dataset out/preference-pairs/v1 --out adapters/dpo-v1

The version needs ``prompt``, ``chosen`` and ``rejected`` text columns (what the
``preference_pairs`` step writes). Pairs become conversations (the prompt as the user
turn, each answer as the assistant turn) so TRL applies the model's chat template. The
reference model is the base model itself (the adapter switched off), so no second copy is
loaded. Checkpoints, resume and the ``training.json`` record work as in ``trainers.sft``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from factory.config import option
from factory.errors import FactoryError
from trainers.common import begin_training, lora_config, parse_config, pick_device, run_main, train_and_record


@dataclass
class DPOTrainConfig:
    dataset: str = option(help="A dataset version folder with `prompt`, `chosen` and `rejected` columns.")
    out: str = option(help="Where the adapter, training.json and checkpoints go.")
    model: str = option("embedded", help="Base model: `embedded` (SmolLM2-135M-Instruct) or a local HF folder.")
    init_adapter: str | None = option(None, help="Start from this LoRA adapter (e.g. an SFT adapter) instead of "
                                                 "a fresh one; the reference stays the base model.")
    beta: float = option(0.1, help="DPO temperature: how far the policy may move from the reference.", min=0.0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = option("sigmoid", help="The DPO loss variant (TRL's names).")
    lora_r: int = option(16, help="LoRA rank.", min=1)
    lora_alpha: int = option(32, help="LoRA scaling numerator.", min=1)
    lora_dropout: float = option(0.05, help="Dropout on the LoRA path.", min=0.0, max=1.0)
    target_modules: list[str] = option(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                       help="Linear layers that get LoRA adapters.")
    learning_rate: float = option(5e-5, help="Peak learning rate.", min=0.0)
    epochs: float = option(1.0, help="Passes over the pairs (ignored when max_steps > 0).", min=0.0)
    max_steps: int = option(-1, help="Optimizer steps; -1 trains for `epochs`.", min=-1)
    batch_size: int = option(4, help="Pairs per device step.", min=1)
    grad_accum: int = option(1, help="Device steps per optimizer step.", min=1)
    max_length: int = option(512, help="Longest prompt + answer in tokens.", min=8)
    save_steps: int = option(10, help="Checkpoint every N optimizer steps.", min=1)
    logging_steps: int = option(1, help="Log every N steps.", min=1)
    seed: int = option(0, help="Seed for initialisation and data order.")
    device: str = option("auto", help="`auto` (CUDA when available, else CPU), `cpu` or `cuda`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", help="Training dtype.")


def preference_dataset(version_dir: str):
    """The version's pairs in TRL's conversational preference format."""
    import datasets

    from factory.store import read_version

    table = read_version(version_dir)
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in table.columns]
    if missing:
        raise FactoryError(f"{version_dir}: no {', '.join(missing)} column(s) for DPO (columns: "
                           f"{', '.join(table.columns)}); make the version with the `preference_pairs` step")
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]}
            for r in table.select("prompt", "chosen", "rejected").iter_rows(named=True)
            if all(isinstance(r[k], str) and r[k].strip() for k in ("prompt", "chosen", "rejected"))]
    if not rows:
        raise FactoryError(f"{version_dir}: no complete prompt/chosen/rejected pair; nothing to train on")
    return datasets.Dataset.from_list(rows)


def train(config: DPOTrainConfig) -> Path:
    import torch
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    from factory.models import load_plain_causal_lm, load_tokenizer

    record = begin_training(config, "dpo")
    if record is None:
        return Path(config.out)
    out = Path(config.out)
    pairs = preference_dataset(config.dataset)
    out.mkdir(parents=True, exist_ok=True)  # only once there is something to train on
    tokenizer = load_tokenizer(config.model)
    device = pick_device(config.device)
    model = load_plain_causal_lm(config.model, device=device, dtype=config.dtype)
    peft_config = None
    if config.init_adapter:
        model = PeftModel.from_pretrained(model, config.init_adapter, is_trainable=True)
    else:
        peft_config = lora_config(config)
    args = DPOConfig(
        output_dir=str(out / "checkpoints"), beta=config.beta, loss_type=config.loss_type,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate, num_train_epochs=config.epochs, max_steps=config.max_steps,
        max_length=config.max_length, logging_steps=config.logging_steps, save_steps=config.save_steps,
        save_total_limit=2, seed=config.seed, report_to="none", use_cpu=not device.startswith("cuda"),
        bf16=model.dtype == torch.bfloat16, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
                         peft_config=peft_config)
    return train_and_record(trainer, out, record, {"pairs": len(pairs)}, device)


def main(argv: list[str] | None = None) -> Path:
    config = parse_config(DPOTrainConfig, argv, "LoRA DPO on a dataset version's prompt/chosen/rejected pairs.",
                          prog="python -m trainers.dpo (or: factory train dpo)")
    out = train(config)
    print(out)
    return out


if __name__ == "__main__":
    raise SystemExit(run_main(main))
