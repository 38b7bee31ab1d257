"""LLM backends behind one interface, and the helpers that pick and validate them."""

from __future__ import annotations

from ..config import build, suggest
from ..errors import Problem
from .base import Backend, BackendStats, Completion, Conversation, GenerationParams
from .openai_backend import OpenAIBackend, OpenAIConfig
from .scripted import ScriptedBackend, ScriptedConfig
from .transformers_backend import TransformersBackend, TransformersConfig
from .vllm_backend import VLLMBackend, VLLMConfig

BACKENDS: dict[str, type[Backend]] = {
    "transformers": TransformersBackend,
    "openai": OpenAIBackend,
    "vllm": VLLMBackend,
    "scripted": ScriptedBackend,
}

DEFAULT_LLM = {"backend": "transformers", "model": "embedded"}


def merge_llm(default: dict | None, override: dict | None) -> dict:
    """A step's ``llm:`` over the recipe's: keys merge when the backend stays the same."""
    base = dict(DEFAULT_LLM if default is None else default)
    if not override:
        return base
    if "backend" in override and override["backend"] != base.get("backend", "transformers"):
        return dict(override)
    return {**base, **override}


def build_llm_config(data, path: tuple, problems: list[Problem]):
    """Validates an ``llm:`` mapping against its backend's config dataclass."""
    if not isinstance(data, dict):
        problems.append(Problem("expected a mapping such as {backend: transformers, model: embedded}", path=path,
                                fix="write `llm:` as key: value lines"))
        return None
    backend = data.get("backend", "transformers")
    if backend not in BACKENDS:
        problems.append(Problem(f"unknown backend '{backend}'", path=path + ("backend",),
                                fix=suggest(backend, BACKENDS, "backend")))
        return None
    return build(BACKENDS[backend].Config, {**data, "backend": backend}, path, problems)


def create_backend(config) -> Backend:
    """A backend instance for a validated config (nothing is loaded yet)."""
    return BACKENDS[config.backend](config)


__all__ = ["BACKENDS", "Backend", "BackendStats", "Completion", "Conversation", "GenerationParams",
           "TransformersBackend", "TransformersConfig", "OpenAIBackend", "OpenAIConfig", "ScriptedBackend",
           "ScriptedConfig", "VLLMBackend", "VLLMConfig", "build_llm_config", "create_backend", "merge_llm"]
