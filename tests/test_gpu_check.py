"""The GPU path without a GPU: `auto` picks CUDA and bfloat16 when CUDA is there (mocked), the GPU
check says "no CUDA device" and exits 0 here, every row of it runs on the CPU (--cpu-smoke), and
its pack lists what must travel to the GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch

from factory import models
from factory.llm import TransformersBackend, TransformersConfig
from factory.training import DPOTrainConfig, SFTConfig
from trainers import common

from .conftest import ROOT

sys.path.append(str(ROOT / "bench"))  # last: bench/math_verify.py must not shadow the math_verify package
import gpu_check
import gpu_pack


@pytest.fixture
def cuda(monkeypatch):
    """torch as it is on a GPU machine, as far as picking goes: CUDA available."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture
def moves(monkeypatch):
    """Records every Module.to(device=..., dtype=...) and casts to the dtype alone (no GPU here)."""
    calls = []
    original = torch.nn.Module.to

    def to(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, dtype=kwargs["dtype"]) if kwargs.get("dtype") else self

    monkeypatch.setattr(torch.nn.Module, "to", to)
    return calls


def test_auto_picks_cuda_and_bfloat16_when_cuda_is_there(cuda):
    assert models.pick_device("auto") == "cuda" and models.pick_device("cpu") == "cpu"
    assert models.pick_dtype("auto", "cuda") is torch.bfloat16
    assert models.pick_dtype("auto", "cuda:1") is torch.bfloat16
    assert models.pick_dtype("float32", "cuda") is torch.float32


def test_auto_stays_on_the_cpu_in_float32_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.pick_device("auto") == "cpu" and models.pick_dtype("auto", "cpu") is torch.float32


@pytest.mark.parametrize("config_class", [SFTConfig, DPOTrainConfig])
def test_trainers_put_the_model_on_the_gpu_in_bfloat16_by_themselves(config_class, cuda, moves, tiny_model_dir,
                                                                     tmp_path):
    config = config_class(dataset="-", out=str(tmp_path), model=str(tiny_model_dir))  # device, dtype: auto
    model, device = common.model_to_train(config)
    assert device == "cuda"
    assert moves[-1] == {"device": "cuda", "dtype": torch.bfloat16} and model.dtype is torch.bfloat16
    arguments = common.training_arguments(config, tmp_path, device, model)
    assert arguments["use_cpu"] is False and arguments["bf16"] is True and arguments["fp16"] is False


def test_trainer_arguments_on_the_cpu_and_in_float16(tmp_path):
    config = SFTConfig(dataset="-", out=str(tmp_path))
    on_cpu = common.training_arguments(config, tmp_path, "cpu", types.SimpleNamespace(dtype=torch.float32))
    assert on_cpu["use_cpu"] is True and on_cpu["bf16"] is False
    half = common.training_arguments(config, tmp_path, "cuda", types.SimpleNamespace(dtype=torch.float16))
    assert half["use_cpu"] is False and half["fp16"] is True and half["bf16"] is False


def test_backend_loads_on_the_gpu_in_bfloat16_by_itself(cuda, moves, tiny_model_dir):
    backend = TransformersBackend(TransformersConfig(model=str(tiny_model_dir)))
    backend.load()
    assert backend.device == "cuda" and backend.model.dtype is torch.bfloat16
    assert any(call.get("dtype") is None for call in moves)  # load_causal_lm's lm.to("cuda")
    explicit = TransformersBackend(TransformersConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"))
    assert explicit.dtype_on("cpu") == "float32"


def test_the_check_says_no_cuda_and_exits_0_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(gpu_check.NO_CUDA) and "make gpu-check" in done.stdout


CPU_SMOKE_BUDGET = 1500  # seconds for the whole check: each of its 8 workers may take up to 5 minutes on a CPU


# Its own limit, past the check's budget and the subprocess's: the suite's 300 s would stop it first.
@pytest.mark.timeout(CPU_SMOKE_BUDGET + 200)
def test_every_row_of_the_check_runs_on_the_cpu(tmp_path):
    """The whole check with a tiny model, so that its code has run before it reaches a GPU."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke", "--budget",
                           str(CPU_SMOKE_BUDGET), "--out", str(tmp_path)], capture_output=True, text=True, check=False,
                          timeout=CPU_SMOKE_BUDGET + 100)
    assert done.returncode == 0, done.stdout + done.stderr + (tmp_path / "gpu-check.log").read_text()[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert set(report["results"]) == {"sft-factory", "sft-trl", "dpo-factory", "dpo-trl", "generate", "reward_model",
                                      "evolve"}
    for name in ("sft-factory", "sft-trl", "dpo-factory", "dpo-trl"):
        row = report["results"][name]
        assert row["tokens"] > 0 and row["tokens_per_s"] > 0 and row["timed_steps"] == 2, name
    assert report["results"]["sft-factory"]["record"] == {"device": "cpu", "dtype": "float32"}
    runs = report["results"]["generate"]["runs"]
    assert [run["batch"] for run in runs.values()] == [4, 6]
    assert all(run["factory"]["tokens"] > 0 and run["bare"]["tokens"] > 0 for run in runs.values())
    reward = report["results"]["reward_model"]
    assert reward["rows"] == 12 and reward["tokens"] > 0 and reward["factory"]["rows_per_s"] > 0
    assert reward["max_abs_diff"] < 1e-4  # the step and the plain loop score alike
    evolve = report["results"]["evolve"]
    assert evolve["picked"]["device"] == "cpu" and evolve["steps"] == 2
    table = (tmp_path / "gpu-check.md").read_text()
    for check in ("LoRA SFT", "LoRA DPO", "generate, batch 4", "generate, batch 6", "reward model", "evolve, 1 round"):
        assert f"| {check} |" in table
    assert table.count("(ok)") == 6 and "expected" not in table
    assert table == done.stdout


def test_a_wrong_pick_shows_in_the_table():
    picked_cpu = {"tokens_per_s": 10.0, "peak_gib": None, "picked": {"device": "cpu", "dtype": "float32"},
                  "loss": [1.0, 0.5], "timed_steps": 3}
    lines = gpu_check.table({"sft-factory": picked_cpu, "sft-trl": None}, {"sft-trl": "failed (exit 1)"}, cpu=False)
    assert "cpu, float32 (expected cuda, bfloat16)" in lines[2]
    assert lines[3].endswith("failed (exit 1) |")
    assert not any("DPO" in line for line in lines)  # rows not run are left out


def test_a_failed_reward_row_says_why():
    lines = gpu_check.table({"reward_model": None}, {"reward_model": "stopped after 90 s (its time cap)"}, cpu=False)
    assert lines[2:] == ["| reward model | factory reward_model step | - | - | - | - | stopped after 90 s (its time cap) |"]


def test_the_pack_carries_what_the_gpu_image_lacks():
    packages = gpu_pack.closure()
    assert {"trl", "datasets", "polars", "peft", "transformers", "torch", "numpy"} <= set(packages)
    pins = gpu_pack.carried(packages)
    assert {"trl", "datasets", "polars", "peft", "transformers", "gguf"} <= set(pins)
    assert not {"torch", "numpy", "pyarrow", "pandas", "dataset-factory"} & set(pins)
    assert all("+" not in version for version in pins.values())
    with pytest.raises(SystemExit, match="no-such-package is not installed"):
        gpu_pack.closure("no-such-package")


def test_the_printed_command_fits_the_device_tool():
    command = gpu_pack.command(ROOT / ".gpu-check" / "travel")
    assert len(command) < 2000
    assert "extractall('/tmp/site'" in command and "PYTHONPATH=/tmp/site:$PWD" in command
    assert "bench/gpu_check.py --model-files .gpu-check/travel/smollm2-135m --out $OUT" in command
