"""Batch APIs: a step's requests go as one batch job, its results fill the same reply cache, and
a run killed while it waits goes on polling the same batch instead of paying again.

The server (tests/fake_batch_api.py) follows OpenAI's documented objects and states: files,
batches that validate, run, finalize and complete, expire with part of their requests done, or
fail; result lines in no particular order, failures in the error file.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factory.build import run_recipe
from factory.cache import Cache
from factory.cli import main
from factory.driver import Driver
from factory.recipe import load_recipe
from factory.store import read_version

from .conftest import ROOT
from .fake_batch_api import FakeBatchAPI
from .fake_openai import FakeOpenAI


def answer(payload: dict, index: int) -> str:
    """A deterministic 'model': the same request gets the same reply, online or in a batch."""
    return f"Answer to <{payload['messages'][-1]['content'][-30:]}> seed {payload.get('seed')} #{index}"


def write_recipe(folder: Path, base_url: str, rows: int = 12, batch: bool = True, llm: str = "",
                 extra: str = "", steps: str | None = None) -> Path:
    source = folder / "tasks.jsonl"
    source.write_text("\n".join(json.dumps({"instruction": f"Task {i}: describe item {i} in one line."})
                                for i in range(rows)))
    recipe = folder / ("batch.yaml" if batch else "online.yaml")
    options = ", batch: true, batch_poll: 0.05, backoff: 0.01" if batch else ""
    recipe.write_text(f"""\
name: batched
seed: 5
llm: {{backend: openai, model: fake, base_url: "{base_url}"{options}{llm}}}
source: {{path: {source}}}
{extra}steps:
{steps or "  - solve: {samples: 2, temperature: 0.8}"}
""")
    return recipe


def run(recipe: Path, out: Path):
    return run_recipe(load_recipe(recipe), out, driver=Driver(Cache(out / ".cache"), progress=False))


def test_a_batched_step_makes_the_rows_an_online_one_does_in_one_batch_job(tmp_path):
    with FakeBatchAPI(answer) as server:
        version, manifest, _ = run(write_recipe(tmp_path, server.base_url), tmp_path / "batch")
        online_version, _, _ = run(write_recipe(tmp_path, server.base_url, batch=False), tmp_path / "online")
        assert len(server.created) == 1  # the step's 12 rows, 2 samples each: one job
        assert len(server.batch_requests) == 12
        line = json.loads(server.files[server.batches[server.created[0]]["input_file_id"]]["content"].splitlines()[0])
        assert line["method"] == "POST" and line["url"] == "/v1/chat/completions" and line["body"]["n"] == 2
    batched, online = read_version(version), read_version(online_version)
    assert batched.height == 24 and batched.equals(online)
    assert manifest["steps"][0]["llm"]["batch"] is True


def test_kill_while_polling_then_the_same_command_polls_the_same_batch(tmp_path):
    with FakeBatchAPI(answer) as server:
        recipe = write_recipe(tmp_path, server.base_url, rows=20)
        server.hold()
        out = tmp_path / "out"
        command = [sys.executable, "-m", "factory", "run", str(recipe), "--out", str(out), "--quiet"]
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        [batch_id] = server.wait_for_batches(1, timeout=60)
        polls = server.polls
        deadline = time.time() + 30
        while server.polls < polls + 3 and time.time() < deadline:  # it is polling
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        server.release()
        resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        assert server.created == [batch_id]  # no second batch: nothing paid twice
        assert len(server.batch_requests) == 20
        assert not server.requests  # nothing went online either
    kept = read_version(out / "batched" / "v1")
    assert kept.height == 40 and kept["instruction"].n_unique() == 20


def test_a_batch_created_just_before_a_crash_is_found_on_the_server(tmp_path, monkeypatch):
    """The batch's id never reached the journal: the server's list has it, by the digest of its lines."""
    from factory.llm.batch_api import BatchRunner

    record = BatchRunner._record

    def crash(self, batch, group):
        raise RuntimeError("killed")  # the process died between creating the batch and writing its id

    with FakeBatchAPI(answer) as server:
        recipe = write_recipe(tmp_path, server.base_url, rows=6)
        monkeypatch.setattr(BatchRunner, "_record", crash)
        with pytest.raises(RuntimeError, match="killed"):
            run(recipe, tmp_path / "out")
        monkeypatch.setattr(BatchRunner, "_record", record)
        version, _, _ = run(recipe, tmp_path / "out")
        assert len(server.created) == 1 and len(server.batch_requests) == 6
    assert read_version(version).height == 12


def test_requests_that_expired_in_a_batch_go_again_in_a_new_one_and_the_rest_are_kept(tmp_path):
    with FakeBatchAPI(answer, expire_after=5) as server:
        version, manifest, _ = run(write_recipe(tmp_path, server.base_url, rows=12), tmp_path / "out")
        batches = [server.batches[b] for b in server.created]
        # 12 requests: 5 done and 7 expired, then 5 of those 7, then the last 2; each paid once.
        assert [(b["status"], b["request_counts"]["completed"]) for b in batches] == \
            [("expired", 5), ("expired", 5), ("completed", 2)]
        assert len(server.batch_requests) == 12 and len({cid for _, cid, _ in server.batch_requests}) == 12
    assert read_version(version).height == 24
    assert manifest["steps"][0]["llm"]["retry_reasons"] == {"batch_resend": 9}


def test_with_batch_retry_online_expired_requests_go_as_plain_requests(tmp_path):
    with FakeBatchAPI(answer, expire_after=4) as server:
        version, _, _ = run(write_recipe(tmp_path, server.base_url, rows=10, llm=", batch_retry: online"),
                            tmp_path / "out")
        assert len(server.created) == 1
        assert len(server.requests) == 6  # the expired ones, online
    assert read_version(version).height == 20


def test_a_request_the_server_refused_inside_a_batch_drops_its_row_and_a_5xx_goes_again(tmp_path):
    refused = {}

    def fail(custom_id, body):
        content = body["messages"][-1]["content"]
        if "Task 3:" in content:
            return 400
        if "Task 4:" in content and not refused.get(custom_id):
            refused[custom_id] = True
            return 500  # once: the resend in the next batch succeeds
        return None

    with FakeBatchAPI(answer, fail_fn=fail) as server:
        version, manifest, _ = run(write_recipe(tmp_path, server.base_url, rows=6), tmp_path / "out")
        assert len(server.created) == 2
    rejected = read_version(version, "rejected")
    assert rejected.height == 1 and rejected["drop_reason"][0] == "backend_error"
    assert "HTTP 400" in rejected["drop_detail"][0]
    assert read_version(version).height == 10


def test_a_step_larger_than_the_per_file_limit_goes_as_several_batches(tmp_path):
    with FakeBatchAPI(answer) as server:
        version, _, _ = run(write_recipe(tmp_path, server.base_url, rows=25, llm=", batch_max_requests: 10"),
                            tmp_path / "out")
        sizes = sorted(len(server.files[server.batches[b]["input_file_id"]]["content"].splitlines())
                       for b in server.created)
        assert sizes == [5, 10, 10]
    assert read_version(version).height == 50


def test_a_batch_the_server_refuses_stops_the_run_with_its_reason(tmp_path, capsys):
    with FakeBatchAPI(answer, models=["other"]) as server:
        recipe = write_recipe(tmp_path, server.base_url, rows=3, llm=", check_server: false")
        code = main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "refused batch" in err and "model" in err and "llm.batch: false" in err


def test_a_server_without_a_batch_api_says_so(tmp_path, capsys):
    with FakeOpenAI(answer) as server:
        recipe = write_recipe(tmp_path, server.base_url, rows=3)
        code = main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "has no Batch API" in err and "set llm.batch: false" in err


def test_batched_requests_are_priced_at_the_batch_price(tmp_path):
    prices = "prices: {fake: {input: 1000, output: 2000, batch: 0.5}}\n"
    with FakeBatchAPI(answer) as server:
        _, batched, _ = run(write_recipe(tmp_path, server.base_url, rows=4, extra=prices), tmp_path / "batch")
        _, online, _ = run(write_recipe(tmp_path, server.base_url, rows=4, batch=False, extra=prices),
                           tmp_path / "online")
    assert batched["cost_usd"] == pytest.approx(online["cost_usd"] / 2) and online["cost_usd"] > 0
