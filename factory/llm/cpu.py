"""Faster linear layers for a model on a CPU: oneDNN with weights packed once at load.

``torch.nn.Linear`` on a CPU calls the BLAS torch was built with (MKL in the PyPI wheels),
which repacks the weight on every call and, on AMD CPUs, takes a slower code path: measured
on a 2-core AMD EPYC (AVX-512, no AMX) at the embedded model's decoding shapes (64 rows),
0.77 ms for a 576 x 1536 projection against 0.53 ms through oneDNN with the weight packed in
advance, and 39 ms against 18 ms for its 49,152-token output layer (``docs/performance.md``).
:func:`pack_linears` packs the weight of every plain ``nn.Linear`` once
(``torch.ops.mkldnn._reorder_linear_weight``) and routes the layer's forward through
``torch.ops.mkldnn._linear_pointwise``, the kernels ``torch.compile`` uses on a CPU. The
results differ from MKL's by float rounding only (about 1e-6 relative).

The packed copy sits beside the original weight (other code may read ``layer.weight``), so a
packed model holds its linear weights twice: models whose linear weights would take more than
a quarter of the free memory stay as they are.
"""

from __future__ import annotations

import logging
import os
import types

import torch

log = logging.getLogger(__name__)

MEMORY_SHARE = 0.25  # of the available memory, at most, for the packed copies


def packable() -> bool:
    """Whether this torch can pack linear weights for oneDNN."""
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and ops is not None
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


def pack_linears(model: torch.nn.Module) -> int:
    """Routes every plain ``nn.Linear`` of a CPU ``model`` (float32 or bfloat16) through oneDNN with
    its weight packed; returns how many layers were packed (0 when none can be, or the packed
    copies would not fit in memory, or a layer's packed result does not match its own)."""
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"
              and m.weight.dtype in (torch.float32, torch.bfloat16)]
    if not layers or not packable():
        return 0
    needed = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    available = available_memory()
    if available is not None and needed > MEMORY_SHARE * available:
        log.info("linear layers left unpacked: their packed copies (%.1f GiB) would take over a quarter of the "
                 "free memory (%.1f GiB)", needed / 2**30, available / 2**30)
        return 0
    with torch.inference_mode():
        if not _matches(layers[0]):
            return 0
        for layer in layers:
            layer._packed_weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach())
            layer.forward = types.MethodType(_packed_forward, layer)
    return len(layers)


def _packed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if (x.dtype != self.weight.dtype or x.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
        return torch.nn.functional.linear(x, self.weight, self.bias)  # no gradient through the packed copy
    return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight, self.bias, "none", [], "")


def _matches(layer: torch.nn.Linear) -> bool:
    """Whether a packed copy of ``layer`` gives its results, to float rounding."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach())
        x = torch.randn(3, layer.in_features, dtype=layer.weight.dtype, generator=torch.Generator().manual_seed(0))
        got = torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], "")
    except RuntimeError as err:
        log.info("linear layers left unpacked: oneDNN refused %s (%s)", layer, err)
        return False
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    tolerance = 1e-3 if layer.weight.dtype == torch.float32 else 5e-2
    close = torch.allclose(got.float(), expected.float(), rtol=tolerance, atol=tolerance * float(expected.abs().max()))
    if not close:
        log.info("linear layers left unpacked: oneDNN's result differs from torch's on %s", layer)
    return close


def available_memory() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available


# ---------------------------------------------------------------- attention while decoding

ATTENTION = "factory_cpu_decode"


def use_decode_attention(model) -> bool:
    """On a CPU model in bfloat16 or float16 that attends with SDPA, attention for one new token per row
    (every decoding step) by two matrix products instead of torch's fused SDPA kernel, which at these
    dtypes is 5-9x slower on a CPU than in float32 (measured at the embedded model's decoding shapes on
    an AMD EPYC with AVX-512: 2.7 ms against 0.47 ms for 32 rows of 100 tokens). Prompts (several new
    tokens) still go through SDPA. Returns whether the model now uses it."""
    config = getattr(model, "config", None)
    if (config is None or getattr(config, "_attn_implementation", None) != "sdpa"
            or next(model.parameters()).dtype not in (torch.bfloat16, torch.float16)
            or not hasattr(model, "set_attn_implementation")):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, _decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    try:
        model.set_attn_implementation(ATTENTION)
    except (ValueError, TypeError) as err:
        log.info("decoding attention left to SDPA: %s", err)
        return False
    return getattr(model.config, "_attn_implementation", None) == ATTENTION


def _decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, new, dim = query.shape
    groups = heads // key.shape[1]
    if (new != 1 or query.device.type != "cpu" or dropout or heads % key.shape[1]
            or any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "position_bias"))
            or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else dim ** -0.5
    # The query heads that share a key/value head side by side: (rows, kv heads, groups, dim).
    scores = torch.matmul(query.view(rows, key.shape[1], groups, dim), key.transpose(-1, -2)).float() * scale
    if attention_mask is not None:
        mask = attention_mask.view(rows, 1, 1, -1) if attention_mask.shape[0] == rows else attention_mask[:, :, -1:]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask[..., -scores.shape[-1]:], float("-inf"))
        else:
            scores = scores + mask[..., -scores.shape[-1]:].float()
    out = torch.matmul(scores.softmax(dim=-1).to(value.dtype), value)
    return out.reshape(rows, 1, heads, dim), None


# ---------------------------------------------------------------- float32 or bfloat16

BF16_MIN_SPEEDUP = 1.4  # bfloat16 matmuls must be this much faster: the rest of a step does not speed up
PROBE_SHAPES = ((64, 576, 1536), (64, 1536, 576))  # rows x in x out: decoding steps of the embedded model
PROBE_FILE = "cpu_dtype_probe.json"


def bfloat16_speedup(refresh: bool = False) -> dict:
    """How much faster this CPU runs decoding-sized linear layers in bfloat16 than in float32 (both
    through oneDNN with packed weights when possible), measured once per machine (about a second)
    and kept in ``~/.cache/factory/cpu_dtype_probe.json`` by CPU model, flags, torch version and
    thread count. Returns ``{"float32_ms", "bfloat16_ms", "speedup", "cpu", "measured"}``."""
    import datetime
    import json

    from ..models import cpu_info

    key = _machine_key()
    path = _cache_home() / PROBE_FILE
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not refresh and isinstance(known.get(key), dict) and "speedup" in known[key]:
        return known[key]
    times = {name: _time_linears(dtype) for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    result = {"float32_ms": round(times["float32"], 4), "bfloat16_ms": round(times["bfloat16"], 4),
              "speedup": round(times["float32"] / times["bfloat16"], 3), "cpu": cpu_info()[0],
              "measured": datetime.datetime.now().isoformat(timespec="seconds")}
    known[key] = result
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(known, indent=1))
        temporary.replace(path)
    except OSError as err:  # a read-only home: measured again next time
        log.info("could not keep the CPU dtype probe in %s: %s", path, err)
    return result


def cpu_prefers_bfloat16() -> bool:
    """Whether bfloat16 decodes faster than float32 on this CPU, by :func:`bfloat16_speedup`."""
    return bfloat16_speedup()["speedup"] >= BF16_MIN_SPEEDUP


def _time_linears(dtype: torch.dtype) -> float:
    """The best of 5 timings of the probe's layers at ``dtype``, in milliseconds."""
    import time

    generator = torch.Generator().manual_seed(0)
    layers = []
    for rows, inputs, outputs in PROBE_SHAPES:
        x = torch.randn(rows, inputs, generator=generator).to(dtype)
        weight = (torch.randn(outputs, inputs, generator=generator) * 0.05).to(dtype)
        if packable():
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight)
                layers.append(lambda x=x, w=packed: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
                continue
            except RuntimeError:
                pass
        layers.append(lambda x=x, w=weight: torch.nn.functional.linear(x, w))
    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            for layer in layers:
                layer()
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(4):
                for layer in layers:
                    layer()
            best = min(best, (time.perf_counter() - start) / 4 * 1e3)
    return best


def _machine_key() -> str:
    import hashlib

    from ..models import cpu_info

    name, flags = cpu_info()
    digest = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12]
    return f"{name} | flags {digest} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _cache_home():
    from pathlib import Path

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "factory"
