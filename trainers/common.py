"""What the trainers share: config from YAML and the command line, the dataset version they
consume, the model they start from, and the record they leave beside the adapter."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import typing
from pathlib import Path

import yaml

from factory.config import build, to_dict
from factory.errors import FactoryError, Problem, RecipeError, error_lines

TRAINING_RECORD = "training.json"  # written last: its presence means the adapter is complete


def parse_config(cls, argv: list[str] | None, description: str, prog: str | None = None):
    """``--dataset``/``--out`` and every field of ``cls`` as a flag, over ``--config FILE.yaml``.

    Flags win over the YAML file; the result is validated like a recipe (bounds, choices,
    unknown keys with the closest name).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML file of options (flags override it)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        help_text = f.metadata.get("help", "") + (" (required)" if required else "")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, type=_boolean, metavar="true|false",
                                help=f"{help_text} [default: {default}]")
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, type=yaml.safe_load,
                                metavar=f.name.upper(), help=f"{help_text} [default: {default}]")
    args = vars(parser.parse_args(argv))
    data: dict = {}
    config_file = args.pop("config", None)
    if config_file:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise FactoryError(f"{config_file}: cannot read the config ({err})") from None
        if not isinstance(loaded, dict):
            raise FactoryError(f"{config_file}: expected a mapping of options")
        data.update(loaded)
    data.update(args)
    problems: list[Problem] = []
    config = build(cls, data, (), problems)
    if problems:
        for p in problems:
            p.file = config_file or "command line"
        raise RecipeError(problems)
    return config


def _boolean(text: str) -> bool:
    value = yaml.safe_load(text)
    if not isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def run_main(main, argv=None) -> int:
    """Runs a trainer's ``main`` with the CLI's error handling (one line, exit code 2)."""
    try:
        main(argv)
        return 0
    except FactoryError as err:
        print("\n".join(error_lines(err)), file=sys.stderr)
        return 2


def dataset_record(version_dir: str | Path) -> dict:
    """The version a trainer consumed: path, name, version and the manifest's hash."""
    from factory.store import MANIFEST, read_manifest

    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir)
    digest = hashlib.sha256((version_dir / MANIFEST).read_bytes()).hexdigest()
    return {"path": str(version_dir.resolve()), "name": manifest["name"], "version": manifest["version"],
            "manifest_sha256": digest, "rows": manifest["rows"], "recipe_hash": manifest.get("recipe_hash")}


def pick_device(device: str) -> str:
    from factory.models import pick_device as pick

    return pick(device)


def write_record(out: Path, record: dict) -> None:
    """Writes ``training.json`` atomically; it marks the adapter as complete."""
    tmp = out / f".{TRAINING_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out / TRAINING_RECORD)


def is_trained(out: str | Path) -> bool:
    return (Path(out) / TRAINING_RECORD).is_file()


def begin_training(config, method: str) -> dict | None:
    """What every trainer does first: None when ``config.out`` already holds a finished adapter;
    otherwise seeds the run, quiets library notices and returns the start of the training record."""
    import warnings

    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    from factory.models import model_fingerprint

    if is_trained(config.out):
        print(f"{config.out} is already trained ({TRAINING_RECORD} exists); nothing to do")
        return None
    record = {"method": method, "config": to_dict(config), "dataset": dataset_record(config.dataset),
              "base_model": model_fingerprint(config.model)}
    set_seed(config.seed)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not the user's
    return record


def lora_config(config):
    """A fresh LoRA adapter's peft config from a trainer config's lora_* and target_modules fields."""
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")


def latest_checkpoint(folder: Path) -> Path | None:
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                         if p.name.split("-")[-1].isdigit() else -1)
    return checkpoints[-1] if checkpoints else None


def train_and_record(trainer, out: Path, record: dict, data_stats: dict, device: str) -> Path:
    """Trains (from the last checkpoint when there is one), saves the adapter, then the record.

    ``training.json`` is written last, so it exists only beside a complete adapter.
    """
    import time

    resume = latest_checkpoint(out / "checkpoints")
    began = time.time()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    # The base model may be a GGUF file: no config.json for peft to compare vocabularies against.
    trainer.model.save_pretrained(out, save_embedding_layers=False)
    record.update({"data": data_stats, "resumed_from": str(resume) if resume else None,
                   "metrics": {**log_history_metrics(trainer.state.log_history), "steps": trainer.state.global_step,
                               "wall_seconds": round(time.time() - began, 2)},
                   "device": device})
    (out / "metrics.json").write_text(json.dumps(record["metrics"], indent=2) + "\n", encoding="utf-8")
    write_record(out, record)
    return out


def log_history_metrics(log_history: list[dict]) -> dict:
    """Loss per logged step and the final summary from a Trainer's log history."""
    losses = [{"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate")}
              for e in log_history if "loss" in e]
    summary = next((e for e in reversed(log_history) if "train_runtime" in e), {})
    return {"loss_history": losses, **{k: v for k, v in summary.items() if k != "step"}}
