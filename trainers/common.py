"""What the trainers share: config from YAML and the command line, the dataset version they
consume, the model they start from, and the record they leave beside the adapter."""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import types
from pathlib import Path

import yaml

from factory.config import REQUIRED, build, option_help, to_dict
from factory.errors import FactoryError, Problem, RecipeError, error_lines
from factory.files import write_atomic
from factory.training import TRAINING_RECORD, is_trained


def _flags(cls, defaults: dict, **kwargs):
    """transformers' HfArgumentParser for ``cls``, each field shown with only its help and its
    default, written as ``factory steps`` writes them (:func:`factory.config.option_help`;
    ``defaults``: those of the config file): bounds, choices and unknown keys are checked
    afterwards by :func:`factory.config.build`, which says the fix. (Imported here: importing
    transformers takes seconds.)"""
    from transformers import HfArgumentParser

    shown = {name: f"{text} {REQUIRED}" if default == REQUIRED else f"{text} (default: {default})"
             for name, default, text in option_help(cls, defaults)}

    class Flags(HfArgumentParser):
        @staticmethod
        def _parse_dataclass_field(parser, field):
            bare = copy.copy(field)
            # argparse reads help as a %-format (a literal % in a help text or a default would break -h).
            bare.metadata = types.MappingProxyType({"help": shown[field.name].replace("%", "%%")})
            HfArgumentParser._parse_dataclass_field(parser, bare)

    # The plain formatter: the default is in the help already, written as option_help writes it.
    return Flags(cls, formatter_class=argparse.HelpFormatter, **kwargs)


def parse_config(cls, argv: list[str] | None, description: str, prog: str | None = None):
    """Every field of ``cls`` as a flag (``--max-steps 20``), over ``--config FILE.yaml``.

    Flags win over the file, the file over the defaults; the result is validated like a
    recipe (bounds, choices, unknown keys with the closest name).
    """
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    config_file = first.parse_known_args(argv)[0].config
    from_file = _read_config_file(config_file) if config_file else {}
    parser = _flags(cls, from_file, prog=prog, description=description)
    parser.add_argument("--config", help="a YAML file of options (flags override it)")
    for action in parser._actions:  # what the file gives is no longer required as a flag
        if action.dest in from_file:
            action.required = False
            action.default = from_file[action.dest]
    flags = vars(parser.parse_args(argv))
    flags.pop("config", None)
    problems: list[Problem] = []
    config = build(cls, {**from_file, **flags}, (), problems)
    if problems:
        for p in problems:
            p.file = config_file or "command line"
        raise RecipeError(problems)
    return config


def _read_config_file(path: str) -> dict:
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise FactoryError(f"{path}: cannot read the config ({err})") from None
    if not isinstance(loaded, dict):
        raise FactoryError(f"{path}: expected a mapping of options")
    return loaded


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
    write_atomic(out / TRAINING_RECORD, json.dumps(record, indent=2, default=str) + "\n")


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


def model_to_train(config):
    """The base model on the device the config picks, with the adapter to continue from
    (``init_adapter``) when there is one; and the device."""
    from peft import PeftModel

    from factory.models import load_plain_causal_lm

    device = pick_device(config.device)
    model = load_plain_causal_lm(config.model, device=device, dtype=config.dtype)
    if config.init_adapter:
        model = PeftModel.from_pretrained(model, config.init_adapter, is_trainable=True)
    return model, device


def training_arguments(config, out: Path, device: str, model) -> dict:
    """The Trainer arguments SFT and DPO share: checkpoints in OUT/checkpoints (the last two
    kept), the device, the dtype of the weights, no reporting to external services."""
    import torch

    return dict(output_dir=str(out / "checkpoints"), per_device_train_batch_size=config.batch_size,
                gradient_accumulation_steps=config.grad_accum, learning_rate=config.learning_rate,
                num_train_epochs=config.epochs, max_steps=config.max_steps, logging_steps=config.logging_steps,
                save_steps=config.save_steps, save_total_limit=2, seed=config.seed, report_to="none",
                use_cpu=not device.startswith("cuda"), bf16=model.dtype == torch.bfloat16,
                fp16=model.dtype == torch.float16, dataloader_num_workers=0)


def lora_config(config):
    """A fresh LoRA adapter's peft config from a trainer config's lora_* and target_modules fields."""
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")


def train_and_record(trainer, out: Path, record: dict, data_stats: dict, device: str) -> Path:
    """Trains (from the last checkpoint when there is one), saves the adapter, then the record.

    ``training.json`` is written last, so it exists only beside a complete adapter.
    """
    import time

    from transformers.trainer_utils import get_last_checkpoint

    resume = get_last_checkpoint(out / "checkpoints") if (out / "checkpoints").is_dir() else None
    began = time.time()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    # The base model may be a GGUF file: no config.json for peft to compare vocabularies against.
    trainer.model.save_pretrained(out, save_embedding_layers=False)
    record.update({"data": data_stats, "resumed_from": str(resume) if resume else None,
                   "metrics": {**log_history_metrics(trainer.state.log_history), "steps": trainer.state.global_step,
                               "wall_seconds": round(time.time() - began, 2)},
                   "device": device, "dtype": str(trainer.model.dtype).removeprefix("torch.")})
    (out / "metrics.json").write_text(json.dumps(record["metrics"], indent=2) + "\n", encoding="utf-8")
    write_record(out, record)
    return out


def log_history_metrics(log_history: list[dict]) -> dict:
    """Loss per logged step and the final summary from a Trainer's log history."""
    losses = [{"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate")}
              for e in log_history if "loss" in e]
    summary = next((e for e in reversed(log_history) if "train_runtime" in e), {})
    return {"loss_history": losses, **{k: v for k, v in summary.items() if k != "step"}}
