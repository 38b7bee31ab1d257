"""Rate limits: learned from the server, paced on the client, shared by every request to it.

Hosted APIs cap requests and tokens per minute and say where a client stands in the headers of
every reply: OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (Groq, Together,
OpenRouter and most gateways use the same names), Anthropic's
``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}``; a request past a limit gets
HTTP 429, usually with ``Retry-After``. A client that only retries each refused request on its
own sends the whole wave again at once and is refused again.

:class:`RateLimiter` instead keeps a bucket per limit that mirrors the server's -- capacity (the
limit), refill rate (from how fast the server says it refills: ``(limit - remaining) / reset``)
and level (lowered to what the server says remains, less what was sent since) -- and lets a
request go only when the buckets hold enough for it: one request, and its tokens (its prompt,
estimated from its size, plus ``max_tokens``; corrected by the usage that comes back). After a
429 every request waits until ``Retry-After``, not only the refused one, and the refused
request goes first when sending resumes. A server that sends no limit headers is paced at the
rate it was seen to sustain, raised slowly while it keeps answering and cut on each 429.

Concurrency follows what the server sustains too: a 429 that no known limit explains (the
server said requests and tokens remained: a limit on concurrent requests) halves it, at most
once per round of requests in flight, and each success grows it back by about one per round.

Waiting is bounded: a request held back longer than ``max_wait`` (by 429s, or by a limit that
resets hours later) stops the run with one line (:class:`ThrottledTooLong`). A 429 is never a
failure: it counts neither toward a request's retries nor toward the run's failure rate.
"""

from __future__ import annotations

import asyncio
import math
import re
import statistics
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from ..errors import BackendError

MIN_RATE = 0.05  # requests/s: the slowest a server that sends no limit headers is paced at
RATE_SAMPLES = 16  # refill-rate estimates the median is taken over
UNSTATED_AFTER = 64  # replies without limit headers after which a server's headers are read only on a 429
INITIAL_TOKENS_PER_BYTE = 1 / 3  # before usage comes back: English runs ~4 bytes a token, CJK ~3


class ThrottledTooLong(BackendError):
    """The server's limits held a request back longer than ``max_wait``."""


@dataclass
class Limit:
    """One limit as a reply's headers state it: capacity, what remains, seconds until full again."""

    limit: float
    remaining: float
    reset: float | None


@dataclass
class LimitHeaders:
    requests: Limit | None = None
    tokens: Limit | None = None
    retry_after: float | None = None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str) -> float | None:
    """Seconds in OpenAI's reset format (``1s``, ``120ms``, ``6m0s``, ``1h2m3.5s``) or a plain number."""
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def _seconds_until(text: str, now_wall: float) -> float | None:
    """Seconds from now until a reset given as a duration, an RFC 3339 time, an HTTP date or epoch seconds."""
    seconds = parse_duration(text)
    if seconds is not None:
        return seconds - now_wall if seconds > 1e9 else seconds  # epoch seconds, or seconds from now
    for parse in (lambda t: datetime.fromisoformat(t.replace("Z", "+00:00")), parsedate_to_datetime):
        try:
            when = parse(text.strip())
        except (ValueError, TypeError, IndexError):
            continue
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, when.timestamp() - now_wall)
    return None


def _number(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return float(value.split(",")[0])  # "100, 100;window=60" (IETF draft): the first is the binding one
    except ValueError:
        return None


def _limit(headers: Mapping[str, str], limit: str, remaining: str, reset: str, now_wall: float) -> Limit | None:
    cap, left = _number(headers, limit), _number(headers, remaining)
    if cap is None or left is None or cap <= 0:
        return None
    when = headers.get(reset)
    return Limit(cap, max(0.0, left), _seconds_until(when, now_wall) if when else None)


def read_limit_headers(headers: Mapping[str, str], now_wall: float | None = None) -> LimitHeaders:
    """The limits a reply's headers state (``headers`` looked up case-insensitively, as aiohttp's are);
    resets stated as times are read from ``now_wall`` (default: now), ``Retry-After`` from now."""
    now_wall = time.time() if now_wall is None else now_wall
    found = LimitHeaders()
    for prefix in ("x-ratelimit-{}-requests", "anthropic-ratelimit-requests-{}"):
        found.requests = found.requests or _limit(headers, *(prefix.format(p) for p in ("limit", "remaining", "reset")),
                                                  now_wall)
    for prefix in ("x-ratelimit-{}-tokens", "anthropic-ratelimit-tokens-{}", "anthropic-ratelimit-input-tokens-{}"):
        found.tokens = found.tokens or _limit(headers, *(prefix.format(p) for p in ("limit", "remaining", "reset")),
                                              now_wall)
    if found.requests is None:  # the generic trio (IETF draft, many gateways): a request limit
        found.requests = _limit(headers, "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", now_wall)
    milliseconds = _number(headers, "retry-after-ms")
    if milliseconds is not None:
        found.retry_after = max(0.0, milliseconds / 1000)
    elif headers.get("retry-after"):
        found.retry_after = _seconds_until(headers["retry-after"], time.time())
    return found


class Bucket:
    """A token bucket mirroring one of the server's limits (requests, or tokens).

    Attributes:
        capacity: the most it holds (the server's limit, this client's share of it).
        rate: units refilled per second.
        source: ``headers`` (the server's), ``option`` (the user's), or ``observed`` (the rate a
            server without limit headers was seen to sustain).
    """

    def __init__(self, capacity: float, rate: float, source: str, now: float):
        self.capacity, self.rate, self.source = capacity, rate, source
        self.level = capacity
        self.stamp = now
        self.samples: deque[float] = deque(maxlen=RATE_SAMPLES)
        self.ceiling: tuple[float, float] | None = None  # the user's (capacity, rate), never exceeded

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def delay(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` can be taken (a request bigger than the bucket goes when it is full)."""
        self.refill(now)
        need = min(amount, self.capacity) - self.level
        return 0.0 if need <= 0 else need / max(self.rate, 1e-9)

    def learn(self, seen: Limit, share: float, sent_since: float, now: float) -> None:
        """Takes in what the server said of this limit in a reply (``sent_since``: units this client
        sent after the request that reply answers, which the server had not counted yet)."""
        self.refill(now)
        self.source = "headers"
        capacity = seen.limit * share
        if seen.reset and seen.reset > 0 and seen.remaining < seen.limit:
            self.samples.append((seen.limit - seen.remaining) / seen.reset * share)
        rate = statistics.median(self.samples) if self.samples else capacity / 60  # no reset: a per-minute limit
        if self.ceiling is not None:
            capacity, rate = min(capacity, self.ceiling[0]), min(rate, self.ceiling[1])
        self.capacity, self.rate = capacity, rate
        self.level = min(self.level, self.capacity, seen.remaining * share - sent_since)

    def describe(self) -> dict:
        return {"per_minute": round(self.rate * 60, 1), "burst": round(self.capacity, 1), "source": self.source}


@dataclass
class Ticket:
    """A request let through: when, its token estimate, and the totals sent up to it (for syncing)."""

    at: float
    tokens: float
    requests_mark: int
    tokens_mark: float
    throttled_since: float | None = None
    wall: float = 0.0  # time.time() when it went: a reset stated as a time is read from here


class RateLimiter:
    """Paces the requests to one model on one server (see the module's docstring).

    Created and used on one event loop. Args: ``max_concurrency`` (the most requests in flight),
    ``requests_per_minute`` / ``tokens_per_minute`` (limits the user knows; the server's headers
    can only lower them), ``max_wait`` (seconds a request may be held back before the run stops),
    ``share`` (this client's share of the server's limits: 1 / the replicas sending to it).
    """

    def __init__(self, max_concurrency: int, requests_per_minute: float | None = None,
                 tokens_per_minute: float | None = None, max_wait: float = 600.0, share: float = 1.0,
                 server: str = "the server", backoff: float = 1.0, max_backoff: float = 60.0):
        now = time.monotonic()
        self.max_concurrency = max_concurrency
        self.concurrency = float(max_concurrency)
        self.max_wait = max_wait
        self.share = share
        self.server = server
        self.in_flight = 0
        self.stated = False  # the server has stated a limit in its headers
        self.requests = self._option_bucket(requests_per_minute, now)
        self.tokens = self._option_bucket(tokens_per_minute, now)
        self.resume_at = 0.0  # after a 429: nothing goes before this
        self.cut_at = -math.inf  # when concurrency was last cut (one cut per round in flight)
        self.rate_cut_at = -math.inf  # when an observed rate was last cut
        self.tokens_per_byte = INITIAL_TOKENS_PER_BYTE
        self.sent = 0
        self.tokens_sent = 0.0
        self.throttled = 0  # 429s seen
        self.throttled_seconds = 0.0  # time requests spent held back after a 429 (summed over requests)
        self.first_backoff, self.max_backoff = backoff, max_backoff
        self.backoff = backoff  # the wait after a 429 that says nothing of when to retry; doubles while refused
        self.answered = 0
        self._window = (now, 0)  # (since, answered then): what a server without limit headers sustains
        self._queue: deque[list] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = math.inf

    def _option_bucket(self, per_minute: float | None, now: float) -> Bucket | None:
        if not per_minute:
            return None
        rate = per_minute * self.share / 60
        # A limit known only per minute: a second of it at once (smooth pacing), at least one request.
        bucket = Bucket(max(1.0, rate), rate, "option", now)
        bucket.ceiling = (bucket.capacity, rate)
        return bucket

    def state(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        """Takes in the limits a backend that joins this limiter states (a later step, or a later run
        in the same process, such as a notebook's): the lower of each limit wins, as it would have
        had it been stated first."""
        now = time.monotonic()
        for name, per_minute in (("requests", requests_per_minute), ("tokens", tokens_per_minute)):
            stated = self._option_bucket(per_minute, now)
            held = getattr(self, name)
            if stated is None:
                continue
            if held is None or held.rate > stated.rate:
                if held is not None:
                    stated.level = min(stated.capacity, held.level)
                setattr(self, name, stated)
            elif held.ceiling is None or held.ceiling[1] > stated.rate:  # lower already: the option caps it
                held.ceiling = stated.ceiling

    # -- estimating a request's tokens ---------------------------------------------------------
    def estimate(self, body_bytes: int, max_tokens: int, n: int = 1) -> float:
        """Tokens a request will count for: its prompt (from its size) and ``max_tokens`` per sample."""
        return body_bytes * self.tokens_per_byte + max_tokens * max(1, n)

    # -- letting requests go -------------------------------------------------------------------
    async def acquire(self, tokens: float = 0.0, retry: Ticket | None = None) -> Ticket:
        """Waits until a request of ``tokens`` may go; ``retry``: the ticket of a refused request,
        which goes before every request that has not been sent yet."""
        throttled_since = retry.throttled_since if retry is not None else None
        if throttled_since is not None and time.monotonic() - throttled_since > self.max_wait:
            raise self._too_long(time.monotonic() - throttled_since, 0.0)
        if not self._queue and self._delay(tokens, time.monotonic()) == 0.0:
            return self._grant(tokens, throttled_since)
        future = asyncio.get_running_loop().create_future()
        entry = [future, tokens, throttled_since]
        if retry is not None:
            self._queue.appendleft(entry)
        else:
            self._queue.append(entry)
        self._dispatch()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result())  # granted as it was cancelled: give the slot back
            elif entry in self._queue:
                self._queue.remove(entry)
            raise

    def _delay(self, tokens: float, now: float) -> float | None:
        """0 when a request may go now, the seconds until it may, or None while every slot is taken."""
        if self.in_flight >= max(1, int(self.concurrency)):
            return None
        delay = self.resume_at - now
        if self.requests is not None:
            delay = max(delay, self.requests.delay(1.0, now))
        if self.tokens is not None and tokens:
            delay = max(delay, self.tokens.delay(tokens, now))
        return max(0.0, delay)

    def _grant(self, tokens: float, throttled_since: float | None) -> Ticket:
        now = time.monotonic()
        if not self.sent:
            self._window = (now, 0)
        self.in_flight += 1
        self.sent += 1
        self.tokens_sent += tokens
        if self.requests is not None:
            self.requests.level -= 1
        if self.tokens is not None:
            self.tokens.level -= tokens
        if throttled_since is not None:
            self.throttled_seconds += now - throttled_since
        return Ticket(now, tokens, self.sent, self.tokens_sent, throttled_since, time.time())

    def _dispatch(self) -> None:
        """Lets the waiting requests go, in order, as far as the limits allow; sets a timer for the rest."""
        now = time.monotonic()
        while self._queue:
            future, tokens, throttled_since = self._queue[0]
            if future.done():  # cancelled while waiting
                self._queue.popleft()
                continue
            delay = self._delay(tokens, now)
            if delay is None:
                return  # a release dispatches again
            if delay > 0:
                held = delay + (now - throttled_since if throttled_since is not None else 0.0)
                if held > self.max_wait:
                    self._queue.popleft()
                    future.set_exception(self._too_long(held, delay))
                    continue
                self._wake_in(delay, now)
                return
            self._queue.popleft()
            future.set_result(self._grant(tokens, throttled_since))

    def _wake_in(self, delay: float, now: float) -> None:
        due = now + delay
        if self._timer is not None and self._timer_due <= due + 0.001:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_due = None, math.inf
        self._dispatch()

    def release(self, ticket: Ticket) -> None:
        """The request is over (answered, refused or failed): its slot is free."""
        self.in_flight -= 1
        if self._queue:
            self._dispatch()

    # -- learning from replies -----------------------------------------------------------------
    def observe(self, ticket: Ticket, headers: Mapping[str, str], status: int = 200) -> LimitHeaders:
        """Takes in the limit headers of a reply to ``ticket``'s request. A reset stated as a time
        (Anthropic's) is read from when the request went, which is when the server counted it: a
        reply that took longer than the bucket takes to refill would otherwise read it as past.

        A server that stated no limit in its first replies is not read again until it refuses one
        (reading costs about what the rest of a reply does, at thousands a second)."""
        if not self.stated and status != 429 and self.sent > UNSTATED_AFTER:
            return LimitHeaders()
        seen = read_limit_headers(headers, ticket.wall or None)
        if seen.requests is not None or seen.tokens is not None:
            self.stated = True
        now = time.monotonic()
        if seen.requests is not None:
            if self.requests is None or self.requests.source == "observed":
                self.requests = Bucket(seen.requests.limit * self.share, seen.requests.limit * self.share / 60,
                                       "headers", now)
            self.requests.learn(seen.requests, self.share, self.sent - ticket.requests_mark, now)
        if seen.tokens is not None:
            if self.tokens is None:
                self.tokens = Bucket(seen.tokens.limit * self.share, seen.tokens.limit * self.share / 60, "headers",
                                     now)
            self.tokens.learn(seen.tokens, self.share, self.tokens_sent - ticket.tokens_mark, now)
        return seen

    def succeeded(self, ticket: Ticket, prompt_tokens: int, completion_tokens: int, body_bytes: int) -> None:
        """A reply came: grow concurrency, learn tokens per byte, give back tokens estimated but not used."""
        self.backoff = self.first_backoff
        self.answered += 1
        if self.concurrency < self.max_concurrency:
            self.concurrency = min(float(self.max_concurrency), self.concurrency + 1.0 / max(1.0, self.concurrency))
        if prompt_tokens and body_bytes:
            self.tokens_per_byte = 0.8 * self.tokens_per_byte + 0.2 * (prompt_tokens / body_bytes)
        if self.tokens is not None and ticket.tokens and (prompt_tokens or completion_tokens):
            unused = ticket.tokens - (prompt_tokens + completion_tokens)
            if unused > 0:
                self.tokens.level = min(self.tokens.capacity, self.tokens.level + unused)
        if self.requests is not None and self.requests.source == "observed":
            self.requests.rate *= 1 + 0.1 / max(1.0, self.requests.rate)  # probe upwards: about +10% a second

    def refused(self, ticket: Ticket, seen: LimitHeaders) -> Ticket:
        """A 429: every request waits (``Retry-After``, else what the buckets say, else a growing
        backoff); concurrency is cut when no known limit explains the refusal. Returns the ticket
        to retry with (it keeps when the request was first held back)."""
        now = time.monotonic()
        self.throttled += 1
        exhausted = any(limit is not None and limit.remaining < 1 for limit in (seen.requests, seen.tokens))
        wait = seen.retry_after
        if ticket.throttled_since is not None and not wait:
            wait = None  # refused again right after "retry now": back off all the same
        if wait is None:
            bucket_waits = [b.delay(1.0 if b is self.requests else ticket.tokens or 1.0, now)
                            for b in (self.requests, self.tokens) if b is not None and b.source != "observed"]
            wait = max(bucket_waits) if bucket_waits and max(bucket_waits) > 0 else self.backoff
            self.backoff = min(self.backoff * 2, self.max_backoff)
        self.resume_at = max(self.resume_at, now + wait)
        if not exhausted and ticket.at > self.cut_at:
            # No limit says it was used up: the server caps requests in flight, or says nothing at all.
            self.concurrency = max(1.0, self.concurrency / 2)
            self.cut_at = now
        if seen.requests is None and seen.tokens is None and not (seen.retry_after is not None
                                                                  and seen.retry_after <= 0):
            self._observe_refusal(ticket, seen, now)  # "Retry-After: 0" asks for no pacing
        return Ticket(ticket.at, ticket.tokens, ticket.requests_mark, ticket.tokens_mark,
                      ticket.throttled_since if ticket.throttled_since is not None else ticket.at, ticket.wall)

    def _observe_refusal(self, ticket: Ticket, seen: LimitHeaders, now: float) -> None:
        """A server without limit headers refused: pace at the rate it was seen to sustain (or, at
        the start, one request per ``Retry-After``), less a fifth; a fifth less again on each later
        round of refusals. Successes raise it by about a tenth a second (:meth:`succeeded`)."""
        since, answered = self._window
        sustained = (self.answered - answered) / max(1.0, now - since)
        if self.requests is None or self.requests.source != "observed":
            told = 1.0 / seen.retry_after if seen.retry_after else 1.0  # a bucket refills one in Retry-After
            self.requests = Bucket(1.0, max(MIN_RATE, 0.8 * max(sustained, told)), "observed", now)
            self.requests.level = 0.0
            self.rate_cut_at = now
        elif ticket.at > self.rate_cut_at:
            self.requests.rate = max(MIN_RATE, self.requests.rate * 0.8)
            self.rate_cut_at = now
        self._window = (now, self.answered)

    def _too_long(self, held: float, delay: float) -> ThrottledTooLong:
        return ThrottledTooLong(
            f"{self.server} held a request back for {held:.0f}s (its limits: {self.limits_text() or 'not stated'}; "
            f"{self.throttled} requests refused with 429), past llm.max_wait={self.max_wait:g}s; the replies so far "
            "are cached: run the same command again later (a daily quota resets), raise llm.max_wait, or lower "
            "llm.max_concurrency / set llm.requests_per_minute to what the account allows")

    # -- what to show and record ---------------------------------------------------------------
    def limits_text(self) -> str:
        parts = []
        if self.requests is not None:
            parts.append(f"{self.requests.rate * 60:.0f} requests/min")
        if self.tokens is not None:
            parts.append(f"{self.tokens.rate * 60:.0f} tokens/min")
        return ", ".join(parts)

    def describe(self) -> dict:
        """What the manifest records: the limits in force, where they came from, the throttling seen."""
        return {"requests": self.requests.describe() if self.requests else None,
                "tokens": self.tokens.describe() if self.tokens else None,
                "concurrency": round(self.concurrency, 1), "max_concurrency": self.max_concurrency,
                "throttled": self.throttled, "throttled_seconds": round(self.throttled_seconds, 1),
                "share": self.share}
