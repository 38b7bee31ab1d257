"""A step's requests through an OpenAI-style Batch API: half the price, results within a window.

With ``llm: {backend: openai, batch: true}`` the openai backend does not send a call's requests
one by one; :class:`BatchRunner` writes them as JSONL request lines (``custom_id``, ``method``,
``url``, ``body``: the same body an online request has), uploads them to ``/v1/files`` (split at
the provider's per-file limits: ``batch_max_requests``, ``batch_max_bytes``), creates a batch per
file on ``/v1/batches`` and polls until each ends. The results fill the per-request reply cache as
any reply does, so everything after is unchanged.

Nothing is paid twice. A request's ``custom_id`` is a digest of its body, so the same request
asked again (the same command after a crash) has the same id. Each batch is journaled in the
cache (``batches/``) the moment the server returns its id, with the ids it holds; a later call
that asks for any of them polls that batch instead of creating another. The batch also carries
the digest of its ids in its ``metadata``, so one created just before a crash, whose id never
reached the journal, is found on the server. Requests that failed or expired inside a batch go
again (up to ``max_retries`` times): in a new batch, or online with ``batch_retry: online``;
requests the server refused for good (a 4xx) fail their rows.

The request file is what vLLM's own ``python -m vllm.entrypoints.openai.run_batch`` reads, and
its output is read here (tests/test_vllm_real.py).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field

from ..errors import BackendError
from ..hashing import canonical, digest, fingerprint
from .base import Completion, OnReply, Request
from .server import RequestError

TERMINAL = {"completed", "expired", "cancelled", "failed"}
RETRY_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504}
PROGRESS_EVERY = 60.0  # seconds between two progress lines while counts move (a status change always prints)


@dataclass
class _Ask:
    """One request line of a batch: which conversation it serves and the samples it asks for."""

    custom_id: str
    url: str
    body: dict
    want: int
    owners: list[tuple[int, int]] = field(default_factory=list)  # (request position, ask index)


class BatchRunner:
    """Answers a call's requests through the server's Batch API (see the module's docstring)."""

    def __init__(self, backend):
        self.backend = backend
        self.config = backend.config
        cache = backend.cache
        self.journal = cache.journal("batches", fingerprint([self.config.base_url, self.config.model])) \
            if cache is not None else None
        self.said_at = 0.0

    # -- the call -------------------------------------------------------------------------------
    async def generate(self, requests: list[Request], on_reply: OnReply | None) -> list[Completion]:
        try:
            return await self._generate(requests, on_reply)
        finally:
            if self.journal is not None:
                self.journal.close()

    async def _generate(self, requests: list[Request], on_reply: OnReply | None) -> list[Completion]:
        backend = self.backend
        await backend._ready()
        results: list[Completion | None] = [None] * len(requests)
        asks = self.asks(requests)
        bodies: dict[str, dict] = {}  # custom id -> reply body
        tries: dict[str, int] = {}
        pending = list(asks)
        while pending:
            known = self._journaled()
            running = {}
            fresh = []
            for ask in pending:
                batch_id = known.get(ask.custom_id)
                if batch_id is not None:
                    running.setdefault(batch_id, []).append(ask)
                else:
                    fresh.append(ask)
            for group in self._files(fresh):
                batch = await self._create(group)
                running[batch["id"]] = group
            retry: list[_Ask] = []
            for batch_id, group in running.items():
                outcome = await self._wait(batch_id, len(group))
                for ask in group:
                    got = outcome.get(ask.custom_id)
                    if isinstance(got, dict):
                        bodies[ask.custom_id] = got
                    elif isinstance(got, Completion):  # refused for good
                        for i, _ in ask.owners:
                            results[i] = results[i] or got
                    else:
                        tries[ask.custom_id] = tries.get(ask.custom_id, 0) + 1
                        if tries[ask.custom_id] > self.config.max_retries:
                            for i, _ in ask.owners:
                                results[i] = results[i] or Completion([], error=f"batch: {got or 'no result'} (after "
                                                                                f"{self.config.max_retries} resends)")
                        else:
                            retry.append(ask)
                self._deliver(requests, asks, bodies, results, on_reply)
                self._mark(batch_id, "downloaded")
            if retry and self.config.batch_retry == "online":
                await self._online(requests, retry, bodies, results)
                retry = []
            if retry:
                backend.stats.count_retry("batch_resend", len(retry))
            pending = retry
            self._deliver(requests, asks, bodies, results, on_reply)
        # Samples a server returned fewer of than asked (it ignores `n`): the rest online.
        for i, request in enumerate(requests):
            if results[i] is None:
                mine = [(bodies[a.custom_id], a.want) for a in asks if any(o[0] == i for o in a.owners)]
                results[i] = await backend._complete(request.messages, request.params, mine)
                if on_reply is not None:
                    on_reply([(i, results[i])])
        return results  # type: ignore[return-value]

    def asks(self, requests: list[Request]) -> list[_Ask]:
        """The request lines of a call, one per distinct body (identical requests share a line)."""
        by_id: dict[str, _Ask] = {}
        for i, request in enumerate(requests):
            for k, (n, seed) in enumerate(self.backend.sample_asks(request.params)):
                body = self.backend._payload(request.messages, request.params, n, seed)
                url = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
                custom_id = "f-" + digest(canonical([url, body]))[:32]
                ask = by_id.setdefault(custom_id, _Ask(custom_id, url, body, n))
                ask.owners.append((i, k))
        return list(by_id.values())

    def _deliver(self, requests, asks, bodies, results, on_reply) -> None:
        """Completions of the requests whose every line has a reply, handed to ``on_reply``."""
        lines: dict[int, list[_Ask]] = {}
        for ask in asks:
            for i, _ in ask.owners:
                lines.setdefault(i, []).append(ask)
        ready = []
        for i, mine in lines.items():
            if results[i] is not None or not all(a.custom_id in bodies for a in mine):
                continue
            got = [(bodies[a.custom_id], a.want) for a in mine]
            if sum(min(len(body.get("choices") or []), want) for body, want in got) < requests[i].params.n:
                continue  # fewer samples than asked: the rest go online at the end
            results[i] = self.backend.completion(requests[i].messages, requests[i].params, got)
            ready.append((i, results[i]))
        if ready and on_reply is not None:
            on_reply(ready)

    async def _online(self, requests, retry: list[_Ask], bodies, results) -> None:
        """Lines that failed inside a batch, sent as plain requests (``batch_retry: online``)."""
        async def one(ask: _Ask):
            try:
                bodies[ask.custom_id] = await self.backend._post_with_retries(lambda: ask.body)
            except RequestError as err:  # failed for good, as the online path records it
                for i, _ in ask.owners:
                    results[i] = results[i] or self.backend.failed(err)
        await asyncio.gather(*(one(ask) for ask in retry))

    # -- files and batches ----------------------------------------------------------------------
    def _files(self, asks: list[_Ask]) -> list[list[_Ask]]:
        """The lines split into files: one endpoint per file, at most batch_max_requests lines and
        batch_max_bytes bytes each."""
        groups: list[list[_Ask]] = []
        for url in dict.fromkeys(a.url for a in asks):
            group, size = [], 0
            for ask in (a for a in asks if a.url == url):
                line = len(request_line(ask))
                if group and (len(group) >= self.config.batch_max_requests or size + line > self.config.batch_max_bytes):
                    groups.append(group)
                    group, size = [], 0
                group.append(ask)
                size += line
            if group:
                groups.append(group)
        return groups

    async def _create(self, group: list[_Ask]) -> dict:
        """Uploads a file of ``group``'s lines and creates its batch (or finds the one a crash lost)."""
        key = fingerprint(sorted(a.custom_id for a in group))
        found = await self._lost_batch(key)
        if found is not None:
            self._record(found, group)
            return found
        import aiohttp

        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", b"".join(request_line(a) for a in group), filename=f"factory-{key[:16]}.jsonl",
                       content_type="application/jsonl")
        file = await self._call("POST", "files", form=form, what="upload the batch file")
        batch = await self._call("POST", "batches", payload={
            "input_file_id": file["id"], "endpoint": group[0].url, "completion_window": self.config.batch_window,
            "metadata": {"factory_key": key, "factory_requests": str(len(group))}}, what="create the batch")
        self._record(batch, group)
        self._say(f"batch {batch['id']}: {len(group)} requests sent to {self.config.base_url} (window "
                  f"{self.config.batch_window}); the same command resumes it if this one stops")
        return batch

    async def _lost_batch(self, key: str) -> dict | None:
        """A batch of exactly these lines that the server has but the journal lacks (created just
        before a crash), if it is not finished badly."""
        try:
            listing = await self._call("GET", "batches?limit=100", what="list the batches")
        except BackendError:
            return None
        for batch in listing.get("data") or []:
            meta = batch.get("metadata") or {}
            if meta.get("factory_key") == key and batch.get("status") not in ("failed", "cancelled", "cancelling"):
                return batch
        return None

    async def _wait(self, batch_id: str, count: int) -> dict:
        """Polls a batch until it ends; then its outcome per custom id: a reply body (dict), a
        :class:`Completion` for a request refused for good, or why it is to be sent again (str)."""
        started, last = time.monotonic(), None
        while True:
            batch = await self._call("GET", f"batches/{batch_id}", what="read the batch's status")
            status = batch.get("status")
            counts = batch.get("request_counts") or {}
            now = (status, counts.get("completed"), counts.get("failed"))
            if now != last and (now[0] != (last or (None,))[0] or time.monotonic() - self.said_at >= PROGRESS_EVERY):
                self._say(f"batch {batch_id}: {status}, {counts.get('completed', 0)} of {counts.get('total') or count} "
                          f"done, {counts.get('failed', 0)} failed ({_minutes(time.monotonic() - started)})")
            last = now
            if status in TERMINAL:
                break
            await asyncio.sleep(self.config.batch_poll)
        if status == "failed":
            self._mark(batch_id, "failed")
            errors = ((batch.get("errors") or {}).get("data") or [])[:3]
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" + (f" (line {e['line']})" if e.get("line") else "")
                               for e in errors) or "no reason given"
            raise BackendError(f"the server at {self.config.base_url} refused batch {batch_id} ({detail}); fix the "
                               "cause (the model name, the server's Batch API support) or set llm.batch: false")
        outcome: dict = {}
        for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
            if file_id:
                text = await self._call("GET", f"files/{file_id}/content", what="download the batch's results",
                                        raw=True)
                outcome.update(self.read_results(text))
        return outcome

    def read_results(self, text: bytes) -> dict:
        """Result lines (OpenAI's and vLLM's shape) by custom id."""
        outcome: dict = {}
        for raw in text.splitlines():
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            custom_id = line.get("custom_id")
            response = line.get("response") or {}
            error = line.get("error")
            status = response.get("status_code")
            body = response.get("body")
            if status == 200 and isinstance(body, dict) and body.get("choices"):
                outcome[custom_id] = body
            elif status is not None and status not in RETRY_STATUSES and status >= 400:
                message = _message(body) or f"HTTP {status}"
                outcome[custom_id] = self.backend.failed(RequestError(f"http_{status}", f"HTTP {status}: {message}",
                                                                       retryable=False, status=status))
            else:
                outcome[custom_id] = (error or {}).get("code") or (f"HTTP {status}" if status else "no result")
        return outcome

    async def _call(self, method: str, path: str, payload: dict | None = None, form=None, what: str = "",
                    raw: bool = False):
        """One Batch API call, retried on 5xx/429 and dropped connections; other errors stop the run."""

        delay = self.config.backoff
        for attempt in range(self.config.max_retries + 1):
            try:
                status, headers, body = await self.backend._send(method, path, form if form is not None else (
                    json.dumps(payload).encode() if payload is not None else None))
            except RequestError as err:
                error = err.cause or BackendError(str(err))
            else:
                if status < 300:
                    return body if raw else json.loads(body)
                message = _message(_json(body)) or body[:200].decode("utf-8", "replace")
                if status in (401, 403):
                    await self.backend._fatal(RequestError(f"http_{status}", message, status=status))
                if status not in RETRY_STATUSES:
                    raise BackendError(f"cannot {what} at {self.config.base_url} (HTTP {status}: {message}); "
                                       + ("the server has no Batch API: set llm.batch: false"
                                          if status in (404, 405) else "check the server's Batch API"))
                error = BackendError(f"cannot {what} at {self.config.base_url} (HTTP {status}: {message})")
            if attempt < self.config.max_retries:
                await asyncio.sleep(min(delay, self.config.max_backoff))
                delay *= 2
        raise error

    # -- the journal of batches -------------------------------------------------------------------
    def _journaled(self) -> dict[str, str]:
        """Custom id -> the batch that holds it, for batches neither failed nor downloaded."""
        if self.journal is None:
            return {}
        held: dict[str, str] = {}
        for batch_id, entry in self.journal.read().items():
            if entry.get("state") == "running":
                for custom_id in entry.get("ids", []):
                    held[custom_id] = batch_id
        return held

    def _record(self, batch: dict, group: list[_Ask]) -> None:
        if self.journal is not None:
            self.journal.append(batch["id"], {"state": "running", "ids": [a.custom_id for a in group],
                                              "input_file_id": batch.get("input_file_id"),
                                              "created_at": batch.get("created_at")})
            self.journal.flush()

    def _mark(self, batch_id: str, state: str) -> None:
        if self.journal is not None:
            entry = self.journal.read().get(batch_id, {})
            self.journal.append(batch_id, {**entry, "state": state, "ids": entry.get("ids", [])})
            self.journal.flush()

    def _say(self, line: str) -> None:
        self.said_at = time.monotonic()
        print(line, file=sys.stderr, flush=True)


def request_line(ask: _Ask) -> bytes:
    """A request line as OpenAI's Batch API (and vLLM's run_batch) reads it."""
    return (json.dumps({"custom_id": ask.custom_id, "method": "POST", "url": ask.url, "body": ask.body},
                       ensure_ascii=False) + "\n").encode("utf-8")


def _json(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _message(body) -> str | None:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return error.get("message")
        if isinstance(error, str):
            return error
    return None


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f} min"
