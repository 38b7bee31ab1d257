"""The real embedded model (SmolLM2-135M-Instruct on CPU): minutes, so marked `slow`.

Run with: make test-slow   (or: pytest -m slow)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from factory.answers import answers_match, false_calculations
from factory.llm import GenerationParams, TransformersBackend, TransformersConfig
from factory.store import read_version

from .conftest import ROOT

pytestmark = pytest.mark.slow


def test_embedded_model_answers_in_a_batch():
    backend = TransformersBackend(TransformersConfig(model="embedded"))
    questions = ["What is 2+3?", "What is the capital of France?"]
    out = backend.chat([[{"role": "user", "content": q}] for q in questions], GenerationParams(max_tokens=24))
    assert "5" in out[0].texts[0]
    assert "Paris" in out[1].texts[0]
    assert all(c.completion_tokens > 0 for c in out)


def test_quickstart_recipe_end_to_end_small(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "factory", "run", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(tmp_path),
         "--quiet", "--set", "source.num_rows=8"],
        capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    version = proc.stdout.strip().splitlines()[-1]
    manifest = json.loads((tmp_path / "quickstart" / "v1" / "manifest.json").read_text())
    assert version == str(tmp_path / "quickstart" / "v1")
    assert manifest["steps"][0]["rows_in"] == 8
    assert manifest["models"][0]["model_id"].startswith("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert manifest["rows"] + manifest["rejected_rows"] == 8 * 4
    # Whatever the model wrote, every kept row has the reference's answer and only true calculations.
    for row in read_version(tmp_path / "quickstart" / "v1").iter_rows(named=True):
        assert answers_match(row["prediction"], row["answer"], "numeric") and not false_calculations(row["response"])
