"""A small OpenAI-compatible server for tests, able to inject faults.

Faults come from ``faults`` (a list consumed one entry per request to /chat/completions)
or from ``fault_fn(payload, number)`` (called for every request; number counts from 1).
A fault is ``"ok"``, an HTTP status such as ``429`` or ``500``, ``"retry_after"`` (429
with Retry-After: 0), ``"slow"`` (an answer due after ``slow_seconds``, past the client's timeout: see
below),
``"reset"`` (closes the connection), ``"not_json"``, ``"truncated"`` (half a JSON body)
or ``"empty_choices"``, ``"too_long"`` (vLLM's 400 for a prompt past the context),
``"unauthorized"`` (401) or ``"no_tools"`` (vLLM's 400 for ``tools`` when it was started without
a tool-call parser). Replies are ``reply_fn(payload, index)``, cut after ``max_tokens`` words
with finish reason ``length``; ``latency`` seconds are added to every request. A reply that is a
dict ``{"tool_calls": [{"name", "arguments"}, ...]}`` is a model calling tools: OpenAI's
``tool_calls`` (finish reason ``tool_calls``) for a request that carries ``tools``, else the dict as
JSON text (what a model with the tools in its prompt writes).

Like real servers it can be strict (``accepts``: the only fields it takes; others get
``transformers serve``'s 422), ignore ``n`` (``honours_n=False``) and know only some models
(``models``: others get vLLM's 404), and hold replies to a JSON Schema sent in one of
``schema_fields`` (the probe of such a field gets ``{"ok": true}``), and refuse ``tools`` like
vLLM without ``--enable-auto-tool-choice`` (``takes_tools=False``; a strict server's ``accepts``
refuses them with a 422 naming them), or take them and drop them from the prompt like a chat template
with no place for tools (``shows_tools=False``: a probe's ``prompt_tokens`` do not count its tools).
The backend's probes go to ``probes``, not ``requests``.

A ``"slow"`` request is held until the client hangs up (its timeout), for ``slow_seconds`` at most
(then answered). With a :class:`ClientClock` on the client's event loop (``clock_client(loop)``) it
also moves that clock on by ``slow_seconds``: the client's timeout fires at once, at any load of
the machine, and the client's other timeouts can be generous. The clock moves every timer of the
loop, so it is for a client with one request in flight at a time. ``wait_idle()`` waits until every
connection made so far is answered and closed (a client that was killed: what it had sent is in).
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from factory.llm.server import PROBE_PROMPT

STANDARD = {"model", "messages", "n", "temperature", "top_p", "max_tokens", "stop", "seed"}
FAULTS = [429, "retry_after", 500, 503, "slow", "reset", "not_json", "truncated", "empty_choices"]
# vLLM's answer to `tool_choice: auto` when it was started without a tool-call parser.
NO_TOOLS = {"object": "error", "message": '"auto" tool choice requires --enable-auto-tool-choice and '
            '--tool-call-parser to be set', "type": "BadRequestError", "param": None, "code": 400}


def echo(payload: dict, index: int) -> str:
    return f"echo: {payload['messages'][-1]['content'][:40]} #{index}"


def limited(text: str, payload: dict) -> tuple[str, str]:
    """A reply as a server sends it: cut after ``max_tokens`` words (a token is a word here),
    with finish reason ``length``; else whole, with ``stop``."""
    words = text.split(" ")
    limit = int(payload.get("max_tokens") or 1 << 30)
    return (" ".join(words[:limit]), "length") if len(words) > limit else (text, "stop")


def message_of(reply, payload: dict, index: int) -> tuple[dict, str]:
    """The assistant message and finish reason of a reply (text, or a dict of tool calls)."""
    if isinstance(reply, dict):
        if "tools" not in payload:
            reply = json.dumps(reply)
        else:
            calls = [{"id": f"call_{index}_{k}", "type": "function",
                      "function": {"name": c["name"], "arguments": c["arguments"] if isinstance(c["arguments"], str)
                                   else json.dumps(c["arguments"])}} for k, c in enumerate(reply["tool_calls"])]
            return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    text, finish = limited(reply, payload)
    return {"role": "assistant", "content": text}, finish


def client_left_within(connection: socket.socket, seconds: float, stopping: threading.Event) -> bool:
    """Waits up to ``seconds`` for the client at the other end of ``connection`` to hang up (or for
    ``stopping``); whether it did."""
    deadline = time.monotonic() + seconds
    while not stopping.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        readable, _, _ = select.select([connection], [], [], min(left, 0.05))
        if readable:
            try:
                if not connection.recv(1, socket.MSG_PEEK):
                    return True  # end of stream: the client closed the connection
            except OSError:
                return True  # reset
            time.sleep(0.005)  # bytes of a next request on this connection: not a hang-up
    return True


class ClientClock:
    """The clock of a client's asyncio event loop, which the server moves forward: the loop's timers
    (a request's timeout, a retry's backoff) come due as if that time had passed."""

    def __init__(self, loop):
        self.loop = loop
        self.offset = 0.0
        wall = loop.time
        loop.time = lambda: wall() + self.offset  # asyncio schedules and fires timers by loop.time()

    def skip(self, seconds: float) -> None:
        self.offset += seconds
        self.loop.call_soon_threadsafe(lambda: None)  # wakes the loop, which then sees its timers due


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 overflows under 16 concurrent clients; the kernel then drops
    # SYNs and clients wait a second for the retransmit, which looks like a timeout.
    request_queue_size = 256
    daemon_threads = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections = 0  # accepted and not yet closed
        self.stopping = threading.Event()
        self._count = threading.Lock()

    def process_request(self, request, client_address):
        with self._count:
            self.connections += 1
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        super().shutdown_request(request)
        with self._count:
            self.connections -= 1

    def handle_error(self, request, client_address):
        pass  # a client that timed out and hung up is part of the test, not news


class ServedInThread:
    """A test server (``self.httpd``, served by ``self.thread``) used as a context manager."""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class JSONHandler(BaseHTTPRequestHandler):
    """A quiet HTTP/1.1 handler of a test server, with one way to answer: :meth:`_send`."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes | dict | list, headers: dict | None = None,
              content_type: str = "application/json"):
        """Answers ``status`` with ``body`` (bytes as they are, a mapping as JSON) and ``headers``."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


class FakeOpenAI(ServedInThread):
    def __init__(self, reply_fn=echo, fault_fn=None, latency: float = 0.0, slow_seconds: float = 1.5,
                 accepts: set | None = None, honours_n: bool = True, models: list[str] | None = None,
                 schema_fields: set | None = None, takes_tools: bool = True,
                 shows_tools: bool = True):
        self.accepts = accepts
        self.takes_tools = takes_tools
        self.shows_tools = shows_tools
        self.schema_fields = schema_fields or set()
        self.honours_n = honours_n
        self.models = models
        self.probes: list[dict] = []
        self.clock: ClientClock | None = None
        self.faults: list = []
        self.fault_fn = fault_fn
        self.latency = latency
        self.slow_seconds = slow_seconds
        self.requests: list[dict] = []
        self.served: list[dict] = []   # requests answered successfully
        self.injected: list = []       # faults actually injected
        self.lock = threading.Lock()
        self.reply_fn = reply_fn
        server = self

        class Handler(JSONHandler):
            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    ids = server.models or ["fake"]
                    self._send(200, json.dumps({"data": [{"id": i, "owned_by": "fake"} for i in ids]}).encode())
                else:
                    self._send(404, b"{}")

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                try:
                    payload = json.loads(body)
                except ValueError:
                    # The client went away mid-request (a test interrupted it): that is no request to count.
                    self.close_connection = True
                    return
                extra = sorted(set(payload) - server.accepts) if server.accepts is not None else []
                if extra:
                    self._send(422, json.dumps({"detail": f"Unexpected fields in the request: {', '.join(extra)}"})
                               .encode())
                    return
                if server.models is not None and payload.get("model") not in server.models:
                    self._send(404, json.dumps({"error": {"message": f"The model `{payload.get('model')}` does "
                                                          "not exist.", "type": "NotFoundError", "code": 404}}).encode())
                    return
                if "messages" not in payload:  # /v1/completions
                    with server.lock:
                        (server.probes if payload.get("max_tokens") == 1 else server.requests).append(payload)
                    text, finish = limited(server.reply_fn(payload, 0), payload) if payload.get("max_tokens") != 1 \
                        else ("O", "length")
                    self._send(200, json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": finish}],
                                                "usage": {"prompt_tokens": 7, "completion_tokens": 3}}).encode())
                    return
                if payload["messages"][0].get("content") == PROBE_PROMPT:
                    with server.lock:
                        server.probes.append(payload)
                    if "tools" in payload and not server.takes_tools:
                        self._send(400, NO_TOOLS)
                        return
                    n = int(payload.get("n", 1)) if server.honours_n else 1
                    held = server.schema_fields & set(payload)
                    prompt = 7 + (30 * len(payload["tools"]) if "tools" in payload and server.shows_tools else 0)
                    self._send(200, json.dumps({"choices": [{"index": i, "message": {"role": "assistant",
                                                "content": '{"ok": true}' if held else "O"},
                                                "finish_reason": "length"} for i in range(n)],
                                                "usage": {"prompt_tokens": prompt, "completion_tokens": n}})
                               .encode())
                    return
                with server.lock:
                    server.requests.append(payload)
                    number = len(server.requests)
                    fault = server.faults.pop(0) if server.faults else None
                if fault is None and server.fault_fn is not None:
                    fault = server.fault_fn(payload, number)
                if "tools" in payload and not server.takes_tools:
                    fault = "no_tools"
                fault = fault or "ok"
                if fault != "ok":
                    with server.lock:
                        server.injected.append(fault)
                if server.latency:
                    time.sleep(server.latency)
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()  # with no linger: a reset, once rfile and wfile let go of it too
                    self.close_connection = True  # else the handler waits on for the next request: no reset
                    return
                if fault == "slow":
                    if server.clock is not None:
                        server.clock.skip(server.slow_seconds)
                    if client_left_within(self.connection, server.slow_seconds, server.httpd.stopping):
                        self.close_connection = True
                        return
                if isinstance(fault, int):
                    self._send(fault, b'{"error": "injected"}')
                    return
                if fault == "too_long":
                    self._send(400, json.dumps({"error": {"message": "This model's maximum context length is 2048 "
                                                          "tokens. However, you requested 2100 tokens (1844 in the "
                                                          "messages, 256 in the completion).", "code": 400}}).encode())
                    return
                if fault == "no_tools":
                    self._send(400, NO_TOOLS)
                    return
                if fault == "unauthorized":
                    self._send(401, json.dumps({"error": {"message": "Incorrect API key provided"}}).encode())
                    return
                if fault == "retry_after":
                    self._send(429, b'{"error": "slow down"}', {"Retry-After": "0"})
                    return
                if fault == "not_json":
                    self._send(200, b"<html>gateway</html>")
                    return
                if fault == "empty_choices":
                    self._send(200, json.dumps({"choices": []}).encode())
                    return
                n = int(payload.get("n", 1)) if server.honours_n else 1
                replies = [message_of(server.reply_fn(payload, i), payload, i) for i in range(n)]
                choices = [{"index": i, "message": message, "finish_reason": finish}
                           for i, (message, finish) in enumerate(replies)]
                body = json.dumps({"choices": choices, "usage": {"prompt_tokens": 7, "completion_tokens": 3 * n}})
                if fault == "truncated":
                    body = body[: len(body) // 2]
                elif fault == "ok":
                    with server.lock:
                        server.served.append(payload)
                self._send(200, body.encode())

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __exit__(self, *exc):
        self.httpd.stopping.set()  # "slow" requests still held end now
        super().__exit__(*exc)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Waits until every connection made so far is handled and closed. A connection of this
        call's own goes in behind the ones waiting to be accepted; once it is answered they are
        all accepted, and their handlers have only to read what was sent and answer it."""
        deadline = time.monotonic() + timeout
        probe = http.client.HTTPConnection("127.0.0.1", self.httpd.server_address[1], timeout=timeout)
        try:
            probe.request("GET", "/v1/models")
            probe.getresponse().read()
        finally:
            probe.close()
        while self.httpd.connections > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.httpd.connections} connections still open after {timeout}s")
            time.sleep(0.005)

    def clock_client(self, loop) -> ClientClock:
        """Puts a :class:`ClientClock` on the client's event loop, for ``"slow"`` requests to move."""
        self.clock = ClientClock(loop)
        return self.clock
