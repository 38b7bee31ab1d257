"""An OpenAI-compatible fake server that enforces rate limits the way hosted APIs do.

It is meant for tests and benchmarks of a client that must learn its limits from response
headers, pace itself and never fail a run on 429s. Like :class:`tests.fake_openai.FakeOpenAI`
it serves ``/v1`` from a daemon thread of the calling process, so that tests can compare
its records (``time.monotonic()`` stamps) with their own clock.

Limits are two token buckets, both full at the start and refilled continuously:

* requests: capacity ``burst``, refilled at ``requests_per_second``; every
  ``POST /v1/chat/completions`` costs 1.
* tokens (only with ``tokens_per_minute``): capacity ``token_burst``, refilled at
  ``tokens_per_minute / 60`` per second. A request costs its prompt tokens plus
  ``max_tokens * n`` (``max_completion_tokens`` is read too; without either only the
  prompt counts), taken when the request arrives, as OpenAI counts it. ``token_burst``
  defaults to ``tokens_per_minute``: OpenAI and Anthropic both let a full minute's worth
  through at once and report that as the limit. Tests that want the token limit to bite
  within seconds pass a smaller ``token_burst``.

A token is a word here, as in ``fake_openai.limited``: prompt tokens are the
whitespace-separated words of every message's content (at least 1), completion tokens the
words of the reply, which is cut after ``max_tokens`` words with finish reason ``length``.
Both are reported in each reply's ``usage``.

A request is taken only when it fits both buckets; otherwise it gets HTTP 429 with an
OpenAI error body (``type`` ``"requests"`` or ``"tokens"``: the bucket that needs longer to
refill) and, with ``retry_after``, ``Retry-After`` (seconds as a decimal string, e.g.
``0.12``) and ``retry-after-ms`` (e.g. ``120``): the time until the request would fit, rounded
up to the millisecond. A refused request takes nothing from the buckets (OpenAI says failed
requests count against the limit; not counting them keeps the accepted rate at the limit
under any load, so a benchmark measures what a client wastes by its ``refused_share``
rather than by a starved run). A request that costs more tokens than the token bucket
holds can never fit: like OpenAI it gets 429 with ``"Request too large for ... on tokens per
min (TPM): Limit L, Requested R. The input or output tokens must be reduced in order to run
successfully."``, type ``tokens``, and no ``Retry-After`` since no wait helps; it is recorded in
``refused`` (as ``"tokens"``) and in ``too_large``.

Every chat response (200 and 429) carries the limits in the style chosen by ``headers``:

* ``"openai"``: ``x-ratelimit-limit-requests`` (the capacity), ``x-ratelimit-remaining-requests``
  (the level after this request, rounded down), ``x-ratelimit-reset-requests`` (the time
  until the bucket is full again, as OpenAI writes it: ``0s``, ``120ms``, ``1.5s``, ``6m0s``,
  ``1h2m3.25s``, rounded up to the millisecond), and the same three with ``-tokens``.
* ``"anthropic"``: ``anthropic-ratelimit-requests-limit``, ``-remaining``, ``-reset`` (the RFC 3339
  UTC time of full replenishment, with milliseconds: ``2025-01-01T12:00:01.250Z``; the real
  API writes whole seconds, so a parser must take both), and ``anthropic-ratelimit-tokens-*``.
* ``"none"``: no limit headers (only ``Retry-After`` on 429s, if ``retry_after``).

The headers of a bucket that is not set are left out. The refill rate can be read off any
response whose remaining is below the limit: ``(limit - remaining) / reset`` (slightly high,
by at most ``1 / reset``, since remaining is rounded down), which also holds for the real APIs,
whose limit header is the per-minute figure.

``GET /v1/models`` is not limited. The client's probes before a run (first message
``PROBE_PROMPT`` with ``max_tokens`` 1 or 4) count against the limits like any request, as a
real server would, and are answered ``O`` (``OK.`` for 4 tokens: no JSON Schema is held), but
they are recorded in ``probes`` only, not in ``accepted``/``refused``.
"""

from __future__ import annotations

import json
import math
import threading
import time
from datetime import datetime, timezone
from http.server import ThreadingHTTPServer

from factory.llm.server import PROBE_PROMPT

from .fake_openai import JSONHandler, ServedInThread, echo

HEADER_STYLES = ("openai", "anthropic", "none")
PROBE_MAX_TOKENS = (1, 4)
_EPSILON = 1e-9  # float slack, so that a client waiting exactly the advertised time gets in


class TokenBucket:
    """A bucket of ``capacity`` units refilled continuously at ``rate`` units per second.

    Not thread-safe: the server calls it under its lock.

    Attributes:
        capacity: the most the bucket holds (the burst).
        rate: units added per second.
        level: units in the bucket as of ``updated`` (a ``time.monotonic()`` stamp).
    """

    def __init__(self, capacity: float, rate: float, now: float):
        if capacity < 1 or rate <= 0:
            raise ValueError(f"a bucket needs a capacity of at least 1 and a positive rate, not {capacity}, {rate}")
        self.capacity = capacity
        self.rate = rate
        self.level = float(capacity)
        self.updated = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait(self, cost: float) -> float:
        """Seconds until ``cost`` fits (0 if it fits now, inf if it never can)."""
        if cost > self.capacity:
            return math.inf
        return max(0.0, (cost - self.level) / self.rate - _EPSILON)

    def take(self, cost: float) -> None:
        self.level -= cost

    def reset_in(self) -> float:
        """Seconds until the bucket is full again."""
        return (self.capacity - self.level) / self.rate

    def snapshot(self) -> tuple[int, int, float]:
        """(limit, remaining rounded down, seconds until full), for the headers."""
        return int(self.capacity), max(0, math.floor(self.level + _EPSILON)), self.reset_in()


def openai_duration(seconds: float) -> str:
    """A duration as OpenAI's reset headers and messages write it (Go's style), rounded up to
    the millisecond so that a client that waits that long finds what it was promised:
    ``0s``, ``120ms``, ``1.5s``, ``59.999s``, ``6m0s``, ``1h2m3.25s``."""
    ms = math.ceil(seconds * 1000 - _EPSILON)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    text = _decimal_seconds(rest) + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text


def _decimal_seconds(ms: int) -> str:
    """Milliseconds as seconds without trailing zeros: 1500 -> ``1.5``, 120 -> ``0.12``, 0 -> ``0``."""
    return f"{ms // 1000}.{ms % 1000:03d}".rstrip("0").rstrip(".")


def rfc3339(epoch_seconds: float) -> str:
    """A UTC time in RFC 3339 with milliseconds, as ``2025-01-01T12:00:01.250Z``."""
    moment = datetime.fromtimestamp(epoch_seconds, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def count_words(content) -> int:
    """The tokens of a message's content: its words (text parts of a list content too)."""
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(len(str(part.get("text", "")).split()) for part in content if isinstance(part, dict))
    return 0


def prompt_tokens(payload: dict) -> int:
    return max(1, sum(count_words(m.get("content")) for m in payload.get("messages") or [] if isinstance(m, dict)))


def max_output(payload: dict) -> int | None:
    """The completion limit of a request (``max_completion_tokens`` is OpenAI's newer name)."""
    value = payload.get("max_completion_tokens") or payload.get("max_tokens")
    return int(value) if value else None


def cut(text: str, limit: int | None) -> tuple[str, str]:
    """A reply cut after ``limit`` words with finish reason ``length``; else whole, ``stop``."""
    words = text.split(" ")
    return (" ".join(words[:limit]), "length") if limit is not None and len(words) > limit else (text, "stop")


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 overflows when 64 clients connect at once; the kernel then
    # drops SYNs and a client waits a second for the retransmit, which skews every timing.
    request_queue_size = 1024
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that hung up mid-request is part of a test, not news


class RateLimitedServer(ServedInThread):
    """A fake OpenAI-compatible server with request and token rate limits (see the module).

    Args:
        requests_per_second: refill rate of the request bucket; None: no request limit.
        burst: capacity of the request bucket.
        tokens_per_minute: refill rate of the token bucket, per minute; None: no token limit.
        token_burst: capacity of the token bucket; None: ``tokens_per_minute``.
        latency: seconds added to every accepted request (429s are answered at once).
        reply_fn: ``reply_fn(payload, index)`` gives the text of choice ``index``.
        headers: the style of the limit headers: ``"openai"``, ``"anthropic"`` or ``"none"``.
        retry_after: send ``Retry-After`` and ``retry-after-ms`` on 429s that a wait can cure.
        models: the model ids served (others get a 404); None: any model, ``fake`` listed.

    Attributes:
        accepted: ``(monotonic time, payload)`` of every chat request answered 200 (probes aside).
        refused: ``(monotonic time, "requests" | "tokens")`` of every 429 (probes aside).
        too_large: ``(monotonic time, payload)`` of the requests that can never fit (also in ``refused``).
        probes: ``(monotonic time, payload, status)`` of the client's probes, 200 or 429.
        base_url: ``http://127.0.0.1:PORT/v1``.
    """

    def __init__(self, requests_per_second: float | None = 5.0, burst: int = 10,
                 tokens_per_minute: float | None = None, token_burst: int | None = None, latency: float = 0.0,
                 reply_fn=echo, headers: str = "openai", retry_after: bool = True, models: list[str] | None = None):
        if headers not in HEADER_STYLES:
            raise ValueError(f"headers={headers!r}: expected one of {', '.join(HEADER_STYLES)}")
        now = time.monotonic()
        self.requests_per_second = requests_per_second
        self.burst = burst
        self.tokens_per_minute = tokens_per_minute
        self.token_burst = (token_burst or tokens_per_minute) if tokens_per_minute else None
        self.request_bucket = TokenBucket(burst, requests_per_second, now) if requests_per_second else None
        self.token_bucket = TokenBucket(self.token_burst, tokens_per_minute / 60, now) if tokens_per_minute else None
        self.latency = latency
        self.reply_fn = reply_fn
        self.headers = headers
        self.retry_after = retry_after
        self.models = models
        self.accepted: list[tuple[float, dict]] = []
        self.refused: list[tuple[float, str]] = []
        self.too_large: list[tuple[float, dict]] = []
        self.probes: list[tuple[float, dict, int]] = []
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # -- what happened ------------------------------------------------------------------
    @property
    def sent(self) -> int:
        """Chat requests received, accepted or refused (probes aside)."""
        with self.lock:
            return len(self.accepted) + len(self.refused)

    @property
    def refused_share(self) -> float:
        """The share of chat requests refused with 429 (0.0 before any)."""
        with self.lock:
            total = len(self.accepted) + len(self.refused)
            return len(self.refused) / total if total else 0.0

    @property
    def first_time(self) -> float | None:
        """Monotonic time of the first accepted chat request (None before any)."""
        with self.lock:
            return self.accepted[0][0] if self.accepted else None

    @property
    def last_time(self) -> float | None:
        """Monotonic time of the last accepted chat request (None before any)."""
        with self.lock:
            return self.accepted[-1][0] if self.accepted else None

    def served_rate(self, skip: int = 0) -> float:
        """Accepted requests per second between the first and the last accepted.

        Args:
            skip: accepted requests to leave out at the start, e.g. ``burst`` to measure the
                steady rate after the bucket's first burst.

        Returns:
            The rate, or 0.0 with fewer than two requests to measure.
        """
        with self.lock:
            times = [t for t, _ in self.accepted[skip:]]
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    def allowed_seconds(self, requests: int, tokens: int | None = None) -> float:
        """The least time the limits allow for ``requests`` requests costing ``tokens`` in all,
        from full buckets: the bursts go at once, the rest at the refill rates.

        It is the time from the first accepted request to the last, to compare with a run's
        wall time. Probes drain the buckets too: add them to ``requests``/``tokens`` to be exact.
        """
        least = 0.0
        if self.request_bucket is not None:
            least = max(0, requests - self.burst) / self.requests_per_second
        if self.token_bucket is not None and tokens is not None:
            least = max(least, max(0, tokens - self.token_burst) / (self.tokens_per_minute / 60))
        return least

    # -- admission ----------------------------------------------------------------------
    def _admit(self, payload: dict, probe: bool) -> tuple[str | None, float, dict, str | None]:
        """Takes the request from the buckets, or refuses it, and records which.

        Returns:
            (the refusal's kind, ``"requests"`` or ``"tokens"``, or None when accepted; seconds
            until it would fit, inf when it never can; the limit headers; the refusal's message).
        """
        cost = prompt_tokens(payload) + (max_output(payload) or 0) * int(payload.get("n") or 1)
        with self.lock:
            now = time.monotonic()
            buckets = {"requests": (self.request_bucket, 1), "tokens": (self.token_bucket, cost)}
            waits = {}
            for kind, (bucket, amount) in buckets.items():
                if bucket is not None:
                    bucket.refill(now)
                    waits[kind] = bucket.wait(amount)
            # The bucket that needs longer names the refusal, as the request waits on it.
            kind = max(waits, key=waits.get) if waits and max(waits.values()) > 0 else None
            if kind is None:
                for bucket, amount in buckets.values():
                    if bucket is not None:
                        bucket.take(amount)
            if probe:
                self.probes.append((now, payload, 200 if kind is None else 429))
            elif kind is None:
                self.accepted.append((now, payload))
            else:
                self.refused.append((now, kind))
                if waits[kind] == math.inf:
                    self.too_large.append((now, payload))
            headers = self._limit_headers()
            if kind is None:
                return None, 0.0, headers, None
            return kind, waits[kind], headers, self._refusal(kind, cost, waits[kind], payload)

    def _refusal(self, kind: str, cost: int, wait: float, payload: dict) -> str:
        """OpenAI's message for a refusal (called under the lock, for the bucket's level)."""
        bucket, amount, unit = (self.request_bucket, 1, "requests per min (RPM)") if kind == "requests" \
            else (self.token_bucket, cost, "tokens per min (TPM)")
        limit, remaining, _ = bucket.snapshot()
        where = f"{payload.get('model') or 'fake'} in organization org-fake on {unit}"
        if wait == math.inf:
            return (f"Request too large for {where}: Limit {limit}, Requested {amount}. The input or output "
                    "tokens must be reduced in order to run successfully.")
        return (f"Rate limit reached for {where}: Limit {limit}, Used {limit - remaining}, Requested {amount}. "
                f"Please try again in {openai_duration(wait)}.")

    def _limit_headers(self) -> dict:
        """The limit headers in the chosen style (called under the lock, after the request)."""
        headers = {}
        if self.headers == "none":
            return headers
        for kind, bucket in (("requests", self.request_bucket), ("tokens", self.token_bucket)):
            if bucket is None:
                continue
            limit, remaining, reset = bucket.snapshot()
            if self.headers == "openai":
                headers[f"x-ratelimit-limit-{kind}"] = str(limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
                headers[f"x-ratelimit-reset-{kind}"] = openai_duration(reset)
            else:
                headers[f"anthropic-ratelimit-{kind}-limit"] = str(limit)
                headers[f"anthropic-ratelimit-{kind}-remaining"] = str(remaining)
                # Rounded up like the OpenAI style, so the bucket is full by the stated time.
                headers[f"anthropic-ratelimit-{kind}-reset"] = rfc3339(time.time() + math.ceil(reset * 1000) / 1000)
        return headers

    # -- replies ------------------------------------------------------------------------
    def _completion(self, payload: dict, probe: bool) -> dict:
        n = int(payload.get("n") or 1)
        limit = max_output(payload)
        if probe:
            replies = [("O", "length") if limit == 1 else ("OK.", "stop")] * n
        else:
            replies = [cut(self.reply_fn(payload, i), limit) for i in range(n)]
        prompt = prompt_tokens(payload)
        completion = sum(len(text.split()) for text, _ in replies)
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": payload.get("model") or "fake",
                "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                            for i, (text, finish) in enumerate(replies)],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}

    def _handler(self):
        server = self

        class Handler(JSONHandler):
            # Buffer the headers and the body into one send (handle_one_request flushes it):
            # two small writes on a keep-alive socket meet Nagle and the peer's delayed ACK,
            # which adds 40 ms to a reply.
            wbufsize = 1 << 16
            disable_nagle_algorithm = True

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    ids = server.models or ["fake"]
                    self._send(200, {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "fake"}
                                                                for i in ids]})
                else:
                    self._send(404, {"error": {"message": f"Unknown path {self.path}", "code": 404}})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    payload = json.loads(body)
                except ValueError:
                    # The client went away mid-request (a test interrupted it): no request to count.
                    self.close_connection = True
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"Unknown path {self.path}", "code": 404}})
                    return
                if server.models is not None and payload.get("model") not in server.models:
                    self._send(404, {"error": {"message": f"The model `{payload.get('model')}` does not exist.",
                                               "type": "invalid_request_error", "code": "model_not_found"}})
                    return
                messages = payload.get("messages") or [{}]
                probe = messages[0].get("content") == PROBE_PROMPT and max_output(payload) in PROBE_MAX_TOKENS
                kind, wait, headers, message = server._admit(payload, probe)
                if kind is not None:
                    if server.retry_after and wait != math.inf:
                        ms = math.ceil(wait * 1000 - _EPSILON) or 1
                        headers["Retry-After"] = _decimal_seconds(ms)
                        headers["retry-after-ms"] = str(ms)
                    self._send(429, {"error": {"message": message, "type": kind, "param": None,
                                               "code": "rate_limit_exceeded"}}, headers)
                    return
                if server.latency:
                    time.sleep(server.latency)
                self._send(200, server._completion(payload, probe), headers)

        return Handler
