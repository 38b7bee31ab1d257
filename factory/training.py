"""The trainers' options and the record a finished adapter carries: the schema that a recipe's
``evolve.train`` is validated against and that ``trainers/`` parses its command line with.

It imports neither torch nor trl, so a recipe loads without any trainer; the training
methods themselves live in ``trainers/`` (``python -m trainers.sft``, ``trainers.dpo``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .config import option

TRAINING_RECORD = "training.json"  # written last: its presence means the adapter is complete


@dataclass
class TrainConfig:
    """What every trainer takes: the version, the base model, the LoRA adapter, the schedule."""

    dataset: str = option(help="A dataset version folder (out/<name>/v<N>).")
    out: str = option(help="Where the adapter, training.json and checkpoints go.")
    model: str = option("embedded", help="Base model: `embedded` (SmolLM2-135M-Instruct) or a local HF folder.")
    init_adapter: str | None = option(None, help="Start from this LoRA adapter instead of a fresh one (e.g. the "
                                                 "previous round's).")
    lora_r: int = option(16, help="LoRA rank.", min=1)
    lora_alpha: int = option(32, help="LoRA scaling numerator (the update is scaled by alpha / r).", min=1)
    lora_dropout: float = option(0.05, help="Dropout on the LoRA path.", min=0.0, max=1.0)
    target_modules: list[str] = option(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"],
                                       help="Linear layers that get LoRA adapters.")
    learning_rate: float = option(2e-4, help="Peak learning rate.", min=0.0)
    epochs: float = option(1.0, help="Passes over the data (ignored when max_steps > 0).", min=0.0)
    max_steps: int = option(-1, help="Optimizer steps; -1 trains for `epochs`.", min=-1)
    batch_size: int = option(8, help="Examples per device step.", min=1)
    grad_accum: int = option(1, help="Device steps per optimizer step.", min=1)
    max_length: int = option(512, help="Longest example in tokens; longer ones are cut on the right.", min=8)
    save_steps: int = option(10, help="Checkpoint every N optimizer steps (what a restart resumes from).", min=1)
    logging_steps: int = option(1, help="Log the loss every N steps.", min=1)
    seed: int = option(0, help="Seed for initialisation and data order.")
    device: str = option("auto", help="`auto` (CUDA when available, else CPU), `cpu` or `cuda`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="Training dtype; `auto` is float32 on CPU and bfloat16 on GPU.")


@dataclass
class SFTConfig(TrainConfig):
    dataset: str = option(help="A dataset version folder (out/<name>/v<N>) with a `messages` column.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = option(
        "cosine", help="Learning-rate schedule.")
    warmup_ratio: float = option(0.05, help="Share of steps spent warming up (below 1).", min=0.0, max=0.99)
    weight_decay: float = option(0.0, help="AdamW weight decay.", min=0.0)
    packing: bool = option(False, help="Concatenate examples into full blocks of max_length tokens.")


@dataclass
class DPOTrainConfig(TrainConfig):
    dataset: str = option(help="A dataset version folder with `prompt`, `chosen` and `rejected` columns.")
    init_adapter: str | None = option(None, help="Start from this LoRA adapter (e.g. an SFT adapter) instead of "
                                                 "a fresh one; the reference stays the base model.")
    target_modules: list[str] = option(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                       help="Linear layers that get LoRA adapters.")
    learning_rate: float = option(5e-5, help="Peak learning rate.", min=0.0)
    batch_size: int = option(4, help="Pairs per device step.", min=1)
    max_length: int = option(512, help="Longest prompt + answer in tokens.", min=8)
    beta: float = option(0.1, help="DPO temperature: how far the policy may move from the reference.", min=0.0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = option("sigmoid", help="The DPO loss variant (TRL's names).")


TRAINERS = {"sft": SFTConfig, "dpo": DPOTrainConfig}  # evolve.method -> the options of its trainer


def is_trained(out: str | Path) -> bool:
    return (Path(out) / TRAINING_RECORD).is_file()
