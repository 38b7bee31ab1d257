"""A real OpenAI-compatible server, started by the test: `transformers serve` (strict request
schema, ignores `n`) serving the embedded model on CPU, and a recipe with a generator, solve
and judge run against it unchanged. vLLM's server is covered in tests/test_vllm_real.py."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from factory.store import read_manifest, read_version

from .conftest import ROOT

pytestmark = pytest.mark.skipif(importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn")
                                is None, reason="needs transformers[serving] (pip install 'transformers[serving]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def transformers_serve(tmp_path_factory):
    """`transformers serve` on the embedded model exported as a plain folder; yields (base_url, folder)."""
    from factory.models import EMBEDDED, export_model

    folder = export_model(EMBEDDED, tmp_path_factory.mktemp("served") / "smollm2")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("serve-log") / "serve.log", "w")
    serve = Path(sys.executable).with_name("transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([str(serve), "serve", str(folder), "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"transformers serve did not start: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.5)
        yield base_url, folder
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def factory_run(recipe: Path, out: Path) -> Path:
    """``factory run RECIPE --out OUT --quiet`` from the project folder; the version folder it printed."""
    result = subprocess.run([sys.executable, "-m", "factory", "run", str(recipe), "--out", str(out), "--quiet"],
                            capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(900)
def test_a_recipe_runs_unchanged_on_transformers_serve(transformers_serve, tmp_path):
    base_url, folder = transformers_serve
    recipe = tmp_path / "served.yaml"
    recipe.write_text(f"""\
name: served
seed: 3
batch_size: 8
llm: {{backend: openai, model: "{folder}", base_url: "{base_url}", max_concurrency: 2, timeout: 300}}
source: {{path: {ROOT / "data" / "seeds" / "tasks.jsonl"}}}
steps:
  - self_instruct: {{num_tasks: 2, examples: 3, prompts_per_round: 4, max_rounds: 2, max_tokens: 24}}
  - solve: {{samples: 2, temperature: 0.8, max_tokens: 24, on_truncation: keep}}
  - judge: {{scale: 10, reasoning: false}}
  - score: {{min: 1}}
output: {{format: messages, columns: [instruction, response, score]}}
""")
    version = factory_run(recipe, tmp_path / "out")
    assert version == tmp_path / "out" / "served" / "v1"
    manifest = read_manifest(version)
    steps = {s["name"]: s for s in manifest["steps"]}
    server = steps["solve"]["llm"]["server"]
    # The server rejects vLLM's fields and ignores `n`; the backend learned both before the run.
    assert server["probed"] and server["n"] is False
    assert server["prefill"] == "completions"  # the tokenizer is at hand: the model folder itself
    assert steps["self_instruct"]["rows_out"] >= 1 and steps["solve"]["rows_out"] == 2 * steps["solve"]["rows_in"]
    assert manifest["rows"] >= 1
    rejected = read_version(version, "rejected")
    assert "backend_error" not in set(rejected["drop_reason"].to_list() if rejected.height else [])
    # Samples asked one by one came back different (each with its own seed, sampled).
    assert server["identical_samples"] is False
    # 24 tokens cut some answers: kept (on_truncation: keep), and counted from the server's finish reasons.
    cut = steps["solve"].get("truncation") or {"cut": 0, "kept": 0}
    assert cut["kept"] == cut["cut"] <= steps["solve"]["rows_out"]


@pytest.mark.timeout(300)
def test_the_servers_finish_reason_tells_a_cut_reply(transformers_serve):
    from factory.llm import OpenAIBackend, OpenAIConfig
    from factory.llm.base import GenerationParams, Request

    base_url, folder = transformers_serve
    backend = OpenAIBackend(OpenAIConfig(base_url=base_url, model=str(folder), timeout=120))
    try:
        story = [{"role": "user", "content": "Write a long story about the sea."}]
        short = [{"role": "user", "content": "Reply with the single word: OK"}]
        cut, whole = backend.generate([Request(story, GenerationParams(max_tokens=4)),
                                       Request(short, GenerationParams(max_tokens=200))])
    finally:
        backend.close()
    assert cut.finish_reasons == ["length"] and cut.completion_tokens == 4
    assert whole.finish_reasons == ["stop"] and whole.completion_tokens < 200


@pytest.mark.timeout(600)
def test_a_json_schema_on_transformers_serve_is_held_or_checked_and_reasked(transformers_serve):
    """Whatever the server does with `response_format` (hold replies to it, ignore it or refuse
    it), the backend finds out before the run, and what reaches a step is valid JSON or a reply
    that was sent back to be fixed."""
    import json as _json

    from factory.llm import OpenAIBackend, OpenAIConfig
    from factory.llm.base import GenerationParams, Request
    from factory.llm.requests import LLMClient
    from factory.llm.schema import describe, problems, schema_text, to_json_schema, valid

    base_url, folder = transformers_serve
    schema = to_json_schema({"answer": ["yes", "no"], "reason": "str"})
    backend = OpenAIBackend(OpenAIConfig(base_url=base_url, model=str(folder), timeout=120))
    client = LLMClient(backend)
    try:
        ask = [{"role": "user", "content": f"Is the sea salty?\n\n{describe(schema)}"}]
        [c] = client.ask([Request(ask, GenerationParams(max_tokens=64, json_schema=schema_text(schema)))])
    finally:
        backend.close()
    server = backend.describe()["server"]
    # What the server does with the field, from its own code: the list of request fields it
    # accepts and ignores (with a warning). The probe must have found that out by itself.
    from transformers.cli.serving import chat_completion

    ignores = "response_format" in chat_completion.UNUSED_CHAT_COMPLETION_FIELDS
    assert server["probed"] and server["json_schema"] == (None if ignores else "response_format"), server
    if server["json_schema"]:
        assert client.usage.reasks == 0 and c.finish_reasons == ["stop"]
        assert not problems(_json.loads(c.texts[0]), schema), c.texts
    else:  # checked after the fact: a reply that does not match is sent back, twice at most
        assert c.error is None
        final_ok = valid(c.texts[0], schema)
        assert client.usage.reasks == 2 if not final_ok else client.usage.reasks <= 2
    print(f"transformers serve: json_schema={server['json_schema']}, reasks={client.usage.reasks}, reply={c.texts}")


@pytest.mark.timeout(900)
def test_tool_calls_run_on_transformers_serve(transformers_serve, tmp_path):
    """The bundled tools through a real server: transformers serve accepts OpenAI's `tools` but
    SmolLM2's template has no place for them, so the backend finds out (the same prompt tokens with
    and without a tool) and puts them in the prompt; every trajectory is kept or dropped with a
    reason of the step, none fails in the backend, and the kept ones export for TRL."""
    base_url, folder = transformers_serve
    source = tmp_path / "requests.jsonl"
    source.write_text('{"instruction": "What is 12.5 times 4?"}\n{"instruction": "How many km is 3 miles?"}\n',
                      encoding="utf-8")
    recipe = tmp_path / "tools.yaml"
    recipe.write_text(f"""\
name: served-tools
seed: 3
llm: {{backend: openai, model: "{folder}", base_url: "{base_url}", max_concurrency: 2, timeout: 300}}
source: {{path: {source}}}
steps:
  - tool_calls: {{tools: data/tools/tools.json, implementations: data/tools/tools.py, max_calls: 2, max_tokens: 96}}
output: {{format: messages}}
""")
    version = factory_run(recipe, tmp_path / "out")
    assert version == tmp_path / "out" / "served-tools" / "v1"
    manifest = read_manifest(version)
    step = manifest["steps"][0]
    assert step["llm"]["server"]["tools"] is False, step["llm"]["server"]
    assert step["rows_in"] == 2 and step["llm"]["conversations"] >= 2
    known = {"format", "execution", "semantic", "no_call", "repeated_call", "truncated", "parse_error"}
    assert set(step.get("dropped", {})) <= known, step.get("dropped")
    kept = read_version(version)
    for messages in kept["messages"].to_list() if kept.height else []:
        assert messages[-1]["role"] == "assistant" and messages[-1]["content"]
