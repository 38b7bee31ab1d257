"""Rate limits: a run against a server that enforces them finishes, near the time they allow,
with few requests refused; a 429 is throttling, never a failure; waiting has a bound.

The servers here enforce token buckets and state them in headers the way hosted APIs do
(tests/fake_limits.py). The limits are scaled up from the hosted ones (20 requests/s rather
than 5) so that each run takes seconds; bench/rate_limits.py runs the same at 5 requests/s.
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from email.utils import format_datetime
import sys
import time
from pathlib import Path

import pytest

from factory.build import run_recipe
from factory.cache import Cache
from factory.driver import Driver
from factory.errors import BackendError
from factory.llm import GenerationParams, OpenAIBackend, OpenAIConfig
from factory.llm.ratelimit import RateLimiter, parse_duration, read_limit_headers
from factory.recipe import load_recipe

from .conftest import ROOT
from .fake_limits import RateLimitedServer
from .fake_openai import FakeOpenAI

USER = [{"role": "user", "content": "Say something."}]


def write_recipe(folder: Path, base_url: str, rows: int, llm: str = "", steps: str | None = None,
                 extra: str = "") -> Path:
    source = folder / "tasks.jsonl"
    source.write_text("\n".join(json.dumps({"instruction": f"Task {i}: describe item {i} in one line."})
                                for i in range(rows)))
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"""\
name: limited
{extra}llm: {{backend: openai, model: fake, base_url: "{base_url}"{llm}}}
source: {{path: {source}}}
steps:
{steps or "  - solve: {max_tokens: 16}"}
""")
    return recipe


def run(recipe: Path, tmp_path: Path):
    began = time.monotonic()
    _, manifest, _ = run_recipe(load_recipe(recipe), tmp_path / "out", driver=Driver(Cache(tmp_path / "cache"),
                                                                                      progress=False))
    return manifest, time.monotonic() - began


# -- reading the headers ---------------------------------------------------------------------

def test_reset_durations_read_as_openai_writes_them():
    assert [parse_duration(t) for t in ("1s", "120ms", "6m0s", "1.5s", "1h2m3.5s", "0.25", "20")] == \
        [1.0, 0.12, 360.0, 1.5, 3723.5, 0.25, 20.0]
    assert parse_duration("soon") is None


def test_limit_headers_of_openai_anthropic_and_retry_after_are_read():
    openai = read_limit_headers({"x-ratelimit-limit-requests": "5000", "x-ratelimit-remaining-requests": "4999",
                                 "x-ratelimit-reset-requests": "12ms", "x-ratelimit-limit-tokens": "160000",
                                 "x-ratelimit-remaining-tokens": "159976", "x-ratelimit-reset-tokens": "9ms",
                                 "retry-after-ms": "250", "retry-after": "1"})
    assert (openai.requests.limit, openai.requests.remaining, openai.requests.reset) == (5000, 4999, 0.012)
    assert (openai.tokens.limit, openai.tokens.remaining, openai.tokens.reset) == (160000, 159976, pytest.approx(0.009))
    assert openai.retry_after == 0.25  # the millisecond header is the more precise one
    due = datetime(2027, 1, 15, 8, 0, 0, tzinfo=timezone.utc).timestamp()
    anthropic = read_limit_headers({"anthropic-ratelimit-requests-limit": "50",
                                    "anthropic-ratelimit-requests-remaining": "0",
                                    "anthropic-ratelimit-requests-reset": "2027-01-15T08:00:02Z",
                                    "retry-after": "120"}, now_wall=due)
    assert anthropic.requests.remaining == 0 and anthropic.requests.reset == pytest.approx(2.0)
    assert anthropic.retry_after == 120
    later = datetime.now(timezone.utc).timestamp() + 30
    dated = read_limit_headers({"retry-after": format_datetime(datetime.fromtimestamp(later, timezone.utc), True)})
    assert dated.retry_after == pytest.approx(30, abs=1.5)
    assert read_limit_headers({"content-type": "application/json"}).requests is None


def test_a_bucket_learns_the_refill_rate_from_what_remains_and_when_it_is_full():
    limiter = RateLimiter(16)
    ticket = limiter._grant(0.0, None)
    # A bucket of 10 refilled at 5/s: 3 left, full again in 1.4 s.
    limiter.observe(ticket, {"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "3",
                             "x-ratelimit-reset-requests": "1.4s"})
    assert limiter.requests.capacity == 10 and limiter.requests.rate == pytest.approx(5.0)
    assert limiter.requests.level <= 3


# -- runs against servers that enforce limits ------------------------------------------------

def refused_share_and_pace(server: RateLimitedServer, wall: float, requests: int, tokens: int | None = None):
    allowed = server.allowed_seconds(requests + len(server.probes), tokens)
    print(f"wall {wall:.2f}s, the limits allow {allowed:.2f}s; {len(server.refused)} of {server.sent} refused")
    return server.refused_share, wall / max(allowed, 1e-9), allowed


@pytest.mark.parametrize("headers", ["openai", "anthropic"])
def test_a_run_under_a_request_limit_finishes_near_the_time_it_allows_with_few_refusals(tmp_path, headers):
    rows = 150
    # Each answer takes longer than the bucket takes to refill one request: a reset stated as a time
    # (Anthropic's) is already past when the reply arrives, and must be read from when the request went.
    with RateLimitedServer(requests_per_second=20, burst=5, latency=0.1, headers=headers) as server:
        manifest, wall = run(write_recipe(tmp_path, server.base_url, rows), tmp_path)
        share, pace, allowed = refused_share_and_pace(server, wall, rows)
    assert manifest["rows"] == rows and manifest["backend_failures"] == 0
    assert share <= 0.15
    assert wall <= 1.3 * allowed + 1.0  # a second for the process's own start and the writing
    limits = manifest["steps"][0]["llm"]["rate_limits"]
    assert limits["requests"]["source"] == "headers" and limits["requests"]["burst"] == 5
    assert 15 * 60 <= limits["requests"]["per_minute"] <= 30 * 60


def test_a_run_under_a_token_limit_finishes_near_the_time_it_allows_with_few_refusals(tmp_path):
    rows = 120
    # Each request costs its prompt (~40 words with the solve template) and max_tokens 16.
    with RateLimitedServer(requests_per_second=None, tokens_per_minute=60 * 1500, token_burst=600,
                           latency=0.02) as server:
        manifest, wall = run(write_recipe(tmp_path, server.base_url, rows), tmp_path)
        with server.lock:
            tokens = sum(server_cost(p) for _, p in server.accepted) + sum(server_cost(p) for _, p, _ in server.probes)
        share, pace, allowed = refused_share_and_pace(server, wall, rows, tokens)
    assert manifest["rows"] == rows and manifest["backend_failures"] == 0
    assert share <= 0.15
    assert wall <= 1.3 * allowed + 1.0
    assert manifest["steps"][0]["llm"]["rate_limits"]["tokens"]["source"] == "headers"


def server_cost(payload: dict) -> int:
    from .fake_limits import max_output, prompt_tokens

    return prompt_tokens(payload) + (max_output(payload) or 0) * int(payload.get("n") or 1)


def test_a_server_that_states_no_limits_is_paced_at_the_rate_it_sustains(tmp_path):
    rows = 120
    with RateLimitedServer(requests_per_second=20, burst=5, latency=0.02, headers="none") as server:
        manifest, wall = run(write_recipe(tmp_path, server.base_url, rows), tmp_path)
        share, pace, allowed = refused_share_and_pace(server, wall, rows)
    assert manifest["rows"] == rows and manifest["backend_failures"] == 0
    assert share <= 0.3  # it has to find the limit by being refused, and keeps probing upwards
    assert wall <= 2.0 * allowed + 1.0
    assert manifest["steps"][0]["llm"]["rate_limits"]["requests"]["source"] == "observed"


def test_steps_on_one_server_share_its_limits(tmp_path):
    """The judge has options of its own (another backend): it still paces against the same limits."""
    rows = 60
    steps = "  - solve: {max_tokens: 16}\n  - judge: {llm: {timeout: 30}}"
    with RateLimitedServer(requests_per_second=20, burst=5, latency=0.02,
                           reply_fn=lambda payload, i: "Fine. Score: 7") as server:
        manifest, wall = run(write_recipe(tmp_path, server.base_url, rows, steps=steps), tmp_path)
        share, pace, allowed = refused_share_and_pace(server, wall, 2 * rows)
    assert manifest["rows"] == rows
    assert share <= 0.15


def test_a_limit_the_user_states_paces_a_server_that_states_none(tmp_path):
    rows = 50
    with FakeOpenAI() as server:
        manifest, wall = run(write_recipe(tmp_path, server.base_url, rows, llm=", requests_per_minute: 600"),
                             tmp_path)
    assert manifest["rows"] == rows
    # 50 requests (and the probes) at 10/s, one second's worth at once: 4 s or more; unpaced, well under 1.
    assert wall >= 4.0
    limits = manifest["steps"][0]["llm"]["rate_limits"]["requests"]
    assert limits == {"per_minute": 600.0, "burst": 10.0, "source": "option"}


def test_a_limit_stated_by_a_later_run_paces_a_server_an_open_backend_already_uses(tmp_path):
    """A notebook: a backend made by hand is still open on the server when a recipe that states a
    limit runs against it; the run shares that backend's limiter and is paced all the same."""
    rows = 30
    with FakeOpenAI() as server:
        earlier = OpenAIBackend(OpenAIConfig(model="fake", base_url=server.base_url, check_server=False))
        earlier.chat([USER], GenerationParams(max_tokens=4))
        try:
            manifest, wall = run(write_recipe(tmp_path, server.base_url, rows, llm=", requests_per_minute: 600"),
                                 tmp_path)
        finally:
            earlier.close()
    assert manifest["rows"] == rows
    assert wall >= 2.0  # 30 requests at 10/s, 10 at once; unpaced, well under 1
    assert manifest["steps"][0]["llm"]["rate_limits"]["requests"]["source"] == "option"


def test_throttling_past_max_wait_stops_the_run_with_one_line():
    with FakeOpenAI(fault_fn=lambda payload, number: "retry_after") as server:
        server_backend = OpenAIBackend(OpenAIConfig(model="fake", base_url=server.base_url, max_wait=1.0,
                                                    check_server=False))
        began = time.monotonic()
        with pytest.raises(BackendError, match=r"held a request back for \d+s .*past llm.max_wait=1s; the replies "
                                               r"so far are cached"):
            server_backend.chat([USER], GenerationParams())
        assert time.monotonic() - began < 10
        server_backend.close()


def test_a_429_that_says_the_quota_is_exhausted_is_not_waited_out():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.dumps({"error": {"message": "You exceeded your current quota, please check your plan and "
                                                    "billing details.", "type": "insufficient_quota",
                                         "code": "insufficient_quota"}}).encode()
            self.send_response(429)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        backend = OpenAIBackend(OpenAIConfig(model="fake", base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1",
                                             check_server=False))
        with pytest.raises(BackendError, match="quota or credit, not its rate .*You exceeded your current quota"):
            backend.chat([USER], GenerationParams())
        backend.close()
    finally:
        httpd.shutdown()


def test_the_progress_bar_shows_the_rate_and_the_throttling(tmp_path):
    rows = 40
    with RateLimitedServer(requests_per_second=20, burst=3, latency=0.02) as server:
        recipe = write_recipe(tmp_path, server.base_url, rows)
        done = subprocess.run([sys.executable, "-m", "factory", "run", str(recipe), "--out", str(tmp_path / "out")],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "req/s" in done.stderr and "limit " in done.stderr and "requests/min" in done.stderr


def test_on_ray_each_replica_paces_to_its_share_of_the_limits(tmp_path):
    """Two replicas learn the same server's limits; each paces to half of them, so together they
    stay within the limits instead of sending twice what they allow."""
    pytest.importorskip("ray")
    rows = 120
    with RateLimitedServer(requests_per_second=20, burst=5, latency=0.05) as server:
        recipe = write_recipe(tmp_path, server.base_url, rows, extra="batch_size: 10\n")
        done = subprocess.run([sys.executable, "-m", "factory", "run", str(recipe), "--out", str(tmp_path / "out"),
                               "--quiet", "--executor", "ray", "--replicas", "2", "--cpus-per-replica", "0.5"],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        print(f"{len(server.refused)} of {server.sent} refused")
        share = server.refused_share
    assert done.returncode == 0, done.stderr[-2000:]
    assert share <= 0.15
