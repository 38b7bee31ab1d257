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

from pathlib import Path

from factory.errors import FactoryError
from factory.training import DPOTrainConfig
from trainers.common import (begin_training, lora_config, model_to_train, parse_config, run_main,
                             train_and_record, training_arguments)


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
    from trl import DPOConfig, DPOTrainer

    from factory.models import load_tokenizer

    record = begin_training(config, "dpo")
    if record is None:
        return Path(config.out)
    out = Path(config.out)
    pairs = preference_dataset(config.dataset)
    out.mkdir(parents=True, exist_ok=True)  # only once there is something to train on
    tokenizer = load_tokenizer(config.model)
    model, device = model_to_train(config)
    args = DPOConfig(**training_arguments(config, out, device, model), beta=config.beta, loss_type=config.loss_type,
                     max_length=config.max_length)
    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
                         peft_config=None if config.init_adapter else lora_config(config))
    return train_and_record(trainer, out, record, {"pairs": len(pairs)}, device)


def main(argv: list[str] | None = None) -> Path:
    config = parse_config(DPOTrainConfig, argv, "LoRA DPO on a dataset version's prompt/chosen/rejected pairs.",
                          prog="python -m trainers.dpo (or: factory train dpo)")
    out = train(config)
    print(out)
    return out


if __name__ == "__main__":
    raise SystemExit(run_main(main))
