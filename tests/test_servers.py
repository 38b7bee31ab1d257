"""OpenAI-compatible servers as they are: strict schemas, ignored `n`, refused keys and models,
prompts past the context, failures that must never become results."""

from __future__ import annotations

import json
import subprocess
import sys

import polars as pl
import pytest

from factory.errors import BackendError
from factory.llm import GenerationParams, OpenAIBackend, OpenAIConfig
from factory.llm.server import continuation, emulate_prefill, rejected_fields
from factory.store import read_manifest, read_version

from .conftest import ROOT
from .fake_openai import STANDARD, FakeOpenAI

USER = [{"role": "user", "content": "Rate this."}]
PREFILLED = USER + [{"role": "assistant", "content": "Score:"}]


def backend_for(server, **kw) -> OpenAIBackend:
    return OpenAIBackend(OpenAIConfig(model="fake", base_url=server.base_url, backoff=0.01, **kw))


def test_a_strict_server_gets_only_standard_fields_and_prefill_is_emulated():
    reply = lambda payload, i: "Score: 7" if "must begin with exactly" in payload["messages"][-1]["content"] else "?"
    with FakeOpenAI(reply_fn=reply, accepts=STANDARD) as server:
        backend = backend_for(server)
        backend.check()
        [c] = backend.chat([PREFILLED], GenerationParams(max_tokens=4, regex="[0-9]+"))
        [sent] = server.requests
    assert set(sent) <= STANDARD and [m["role"] for m in sent["messages"]] == ["user"]
    assert c.error is None and c.texts == [" 7"]  # the continuation of "Score:", as a native prefill gives it
    info = backend.describe()["server"]
    assert info["prefill"] == "emulated" and info["regex"] is None and info["probed"]


def test_a_permissive_server_gets_the_extensions_it_accepted():
    with FakeOpenAI() as server:
        backend = backend_for(server)
        backend.check()
        backend.chat([PREFILLED], GenerationParams(max_tokens=4, regex="[0-9]+"))
        [sent] = server.requests
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    assert sent["structured_outputs"] == {"regex": "[0-9]+"}
    assert backend.describe()["server"]["prefill"] == "native"


def test_with_the_tokenizer_at_hand_a_prefill_continues_through_the_completions_endpoint():
    reply = lambda payload, i: " 9" if payload.get("prompt", "").endswith("Score:") else "?"
    with FakeOpenAI(reply_fn=reply, accepts=STANDARD | {"prompt"}) as server:
        backend = backend_for(server, tokenizer="embedded")
        backend.check()
        [c] = backend.chat([PREFILLED], GenerationParams(max_tokens=4))
        [sent] = server.requests
    assert backend.server.prefill == "completions" and c.texts == [" 9"]
    assert "<|im_start|>assistant\nScore:" in sent["prompt"] and "messages" not in sent


def test_a_field_rejected_by_name_is_dropped_remembered_and_the_request_resent():
    # No probe (check_server false) and extensions on: the server's 422 teaches the backend.
    reply = lambda payload, i: "Score: 7" if "must begin with exactly" in payload["messages"][-1]["content"] else "?"
    with FakeOpenAI(reply_fn=reply, accepts=STANDARD) as server:
        backend = backend_for(server, check_server=False, extensions="on")
        first = backend.chat([PREFILLED], GenerationParams(max_tokens=4, regex="x"))
        second = backend.chat([PREFILLED], GenerationParams(max_tokens=4, regex="x"))
    # The request resent emulated comes back as a continuation, like every later one.
    assert first[0].error is None and first[0].texts == [" 7"] and second[0].texts == [" 7"]
    assert set(backend.server.rejected) >= {"continue_final_message", "structured_outputs"}
    assert backend.server.prefill == "emulated"
    # Two learning round trips for the first request at most, none for the second.
    assert backend.stats.retry_reasons.get("unsupported_field", 0) <= 2


def test_samples_a_server_will_not_return_through_n_are_asked_one_by_one_with_their_own_seeds():
    reply = lambda payload, i: f"sample with seed {payload['seed']}"
    with FakeOpenAI(reply_fn=reply, honours_n=False) as server:
        backend = backend_for(server)
        backend.check()
        [c] = backend.chat([USER], GenerationParams(n=4, temperature=0.8, seed=10))
        sent = list(server.requests)
    assert backend.server.n is False
    assert sorted(c.texts) == [f"sample with seed {s}" for s in (10, 11, 12, 13)]
    assert len(sent) == 4 and all("n" not in p for p in sent)


def test_a_server_that_drops_n_unannounced_is_learned_from_its_reply():
    reply = lambda payload, i: f"seed {payload['seed']}"
    with FakeOpenAI(reply_fn=reply, honours_n=False) as server:
        backend = backend_for(server, check_server=False)
        [a] = backend.chat([USER], GenerationParams(n=3, temperature=0.8, seed=1))
        [b] = backend.chat([USER], GenerationParams(n=3, temperature=0.8, seed=5))
        sent = list(server.requests)
    assert len(set(a.texts)) == 3 and len(set(b.texts)) == 3
    assert sent[0]["n"] == 3 and all("n" not in p for p in sent[1:])  # asked with n once, then never again


def test_identical_samples_at_temperature_above_zero_warn_once(capsys):
    with FakeOpenAI(reply_fn=lambda payload, i: "always this", honours_n=False) as server:
        backend = backend_for(server)
        backend.chat([USER], GenerationParams(n=3, temperature=0.9))
        backend.chat([USER + [{"role": "user", "content": "again"}]], GenerationParams(n=3, temperature=0.9))
    err = capsys.readouterr().err
    assert err.count("identical samples") == 1 and backend.describe()["server"]["identical_samples"]


def test_a_prompt_past_the_context_drops_its_row_as_too_long():
    with FakeOpenAI() as server:
        server.faults = ["too_long"]
        backend = backend_for(server)
        [c] = backend.chat([USER], GenerationParams())
    assert c.error_reason == "too_long" and "maximum context length is 2048" in c.error
    assert backend.stats.retries == 0


def test_a_refused_key_stops_at_once_naming_the_variable(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-wrong")
    with FakeOpenAI() as server:
        server.faults = ["unauthorized"] * 5
        backend = backend_for(server, api_key_env="MY_KEY", check_server=False)
        with pytest.raises(BackendError, match=r"HTTP 401.*\$MY_KEY is set but the server refused it"):
            backend.chat([USER] * 3, GenerationParams())
        assert len(server.requests) <= 3


def test_an_unknown_model_lists_the_models_the_server_has():
    with FakeOpenAI(models=["llama-3-8b", "qwen2.5-7b"]) as server:
        backend = backend_for(server)
        with pytest.raises(BackendError, match=r"no model 'fake'.*it serves: llama-3-8b, qwen2.5-7b; set llm.model"):
            backend.check()


@pytest.mark.parametrize("url, message", [("http://127.0.0.1:9/v1", "connection refused"),
                                          ("http://no-such-host.invalid/v1", "cannot resolve the host")])
def test_unreachable_servers_are_named_with_the_cause(url, message):
    backend = OpenAIBackend(OpenAIConfig(model="m", base_url=url, timeout=5))
    with pytest.raises(BackendError, match=message):
        backend.check()


def test_one_connection_pool_serves_the_whole_run_and_every_backend_on_the_server():
    with FakeOpenAI() as server:
        backend = backend_for(server, max_concurrency=4)
        for _ in range(3):
            backend.chat([USER] * 8, GenerationParams())
        session = backend._endpoint.session()
        backend.chat([USER], GenerationParams())
        assert backend._endpoint.session() is session
        # A step with other options (another backend) on the same server shares the pool and the limits.
        other = backend_for(server, max_concurrency=4, timeout=30)
        other.chat([USER], GenerationParams())
        assert other._endpoint is backend._endpoint and other._limiter is backend._limiter
        backend.close()
        assert backend._endpoint is None and not session.closed  # still held by the other
        other.close()
        assert session.closed


def test_rejected_fields_reads_the_common_error_shapes():
    sent = ["temperature", "continue_final_message", "add_generation_prompt", "seed"]
    assert rejected_fields("Unexpected fields in the request: {'continue_final_message', 'add_generation_prompt'}",
                           sent) == ["continue_final_message", "add_generation_prompt"]
    assert rejected_fields("Unrecognized request argument supplied: seed", sent) == ["seed"]
    assert rejected_fields("temperature must be below 2", sent) == []


def test_prefill_emulation_gives_the_continuation_shape():
    conv = emulate_prefill([{"role": "system", "content": "S"}] + PREFILLED, "Score:")
    assert [m["role"] for m in conv] == ["system", "user"] and conv[-1]["content"].endswith("Score:")
    assert continuation("Score: 8", "Score:") == " 8"
    assert continuation("8, clear.", "Score:") == " 8, clear."
    assert continuation("3. Write a poem.", "1. A\n2. B\n3.") == " Write a poem."


# -- runs ------------------------------------------------------------------------------------

def _recipe(tmp_path, base_url: str, steps: str, rows: int = 6, extra: str = "") -> str:
    source = tmp_path / "tasks.jsonl"
    source.write_text("\n".join(json.dumps({"instruction": f"Task {i}: name item {i}."}) for i in range(rows)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""\
name: served
seed: 1
batch_size: 4
llm: {{backend: openai, model: fake, base_url: "{base_url}", max_retries: 1, backoff: 0.01, timeout: 2}}
source: {{path: {source}}}
{extra}steps:
{steps}""")
    return str(recipe)


def _run(recipe: str, out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "factory", "run", recipe, "--out", str(out), "--quiet"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_a_generator_whose_every_request_fails_stops_with_one_line_and_is_not_cached(tmp_path):
    with FakeOpenAI(reply_fn=lambda p, i: "1. Name a colour.\n2. Name a city.") as server:
        recipe = _recipe(tmp_path, server.base_url, "  - self_instruct: {num_tasks: 4, examples: 2}\n"
                                                   "  - solve: {}\n  - judge: {}\n  - score: {min: 1}\n")
        server.fault_fn = lambda payload, number: 400
        broken = _run(recipe, tmp_path / "out")
        assert broken.returncode == 1, broken.stderr
        lines = [line for line in broken.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "steps[0].self_instruct" in lines[0] and "HTTP 400" in lines[0]
        assert "Traceback" not in broken.stderr and not list((tmp_path / "out").glob("served/v*"))
        server.fault_fn = None
        fixed = _run(recipe, tmp_path / "out")
    assert fixed.returncode == 0, fixed.stderr
    assert read_manifest(tmp_path / "out" / "served" / "v1")["rows"] > 0


def test_failed_requests_are_not_results_a_rerun_asks_exactly_those_again(tmp_path):
    with FakeOpenAI() as server:
        recipe = _recipe(tmp_path, server.base_url, "  - solve: {}\n", rows=8)
        failing = {"Task 2: name item 2.", "Task 5: name item 5."}
        server.fault_fn = lambda payload, number: 500 if payload["messages"][-1]["content"] in failing else None
        first = _run(recipe, tmp_path / "out")
        assert first.returncode == 0, first.stderr
        rejected = read_version(tmp_path / "out" / "served" / "v1", "rejected")
        assert rejected["drop_reason"].to_list() == ["backend_error", "backend_error"]
        server.fault_fn = None
        server.requests.clear()
        second = _run(recipe, tmp_path / "out")
        asked = sorted(p["messages"][-1]["content"] for p in server.requests)
    assert second.returncode == 0, second.stderr
    assert asked == sorted(failing)
    assert read_manifest(tmp_path / "out" / "served" / "v2")["rows"] == 8


def test_an_empty_step_output_keeps_the_columns_later_steps_need(tmp_path):
    with FakeOpenAI() as server:
        # Every task is empty: solve drops them all, and judge and score still find their columns.
        source = tmp_path / "blank.jsonl"
        source.write_text("\n".join(json.dumps({"instruction": "   "}) for _ in range(3)))
        recipe = _recipe(tmp_path, server.base_url, "  - solve: {}\n  - judge: {}\n  - score: {min: 5}\n")
        text = open(recipe).read().replace(str(tmp_path / "tasks.jsonl"), str(source))
        open(recipe, "w").write(text)
        result = _run(recipe, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    version = tmp_path / "out" / "served" / "v1"
    assert read_manifest(version)["rows"] == 0
    assert set(read_version(version, "rejected")["drop_reason"]) == {"invalid_input"}


def test_too_long_prompts_drop_their_rows_and_the_run_goes_on(tmp_path):
    with FakeOpenAI() as server:
        recipe = _recipe(tmp_path, server.base_url, "  - solve: {}\n", rows=4)
        server.fault_fn = lambda payload, number: "too_long" if "item 1." in payload["messages"][-1]["content"] \
            else None
        result = _run(recipe, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    rejected = read_version(tmp_path / "out" / "served" / "v1", "rejected")
    assert rejected["drop_reason"].to_list() == ["too_long"]
    assert "2100 tokens" in rejected["drop_detail"][0]


def test_the_manifest_records_what_the_server_accepts(tmp_path):
    with FakeOpenAI(accepts=STANDARD, honours_n=False) as server:
        recipe = _recipe(tmp_path, server.base_url, "  - solve: {samples: 2, temperature: 0.8}\n", rows=2)
        result = _run(recipe, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    llm = read_manifest(tmp_path / "out" / "served" / "v1")["steps"][0]["llm"]
    assert llm["server"]["prefill"] == "emulated" and llm["server"]["n"] is False
    assert pl.DataFrame(read_version(tmp_path / "out" / "served" / "v1")).height == 4
