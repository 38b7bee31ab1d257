"""A small OpenAI-compatible server for tests, able to inject faults.

Faults come from ``faults`` (a list consumed one entry per request to /chat/completions)
or from ``fault_fn(payload, number)`` (called for every request; number counts from 1).
A fault is ``"ok"``, an HTTP status such as ``429`` or ``500``, ``"retry_after"`` (429
with Retry-After: 0), ``"slow"`` (sleeps ``slow_seconds``, past the client's timeout),
``"reset"`` (closes the connection), ``"not_json"``, ``"truncated"`` (half a JSON body)
or ``"empty_choices"``. Replies are ``reply_fn(payload, index)``; ``latency`` seconds
are added to every request.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = [429, "retry_after", 500, 503, "slow", "reset", "not_json", "truncated", "empty_choices"]


def echo(payload: dict, index: int) -> str:
    return f"echo: {payload['messages'][-1]['content'][:40]} #{index}"


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 overflows under 16 concurrent clients; the kernel then drops
    # SYNs and clients wait a second for the retransmit, which looks like a timeout.
    request_queue_size = 256
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that timed out and hung up is part of the test, not news


class FakeOpenAI:
    def __init__(self, reply_fn=echo, fault_fn=None, latency: float = 0.0, slow_seconds: float = 1.5):
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

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, body: bytes, headers=None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, json.dumps({"data": [{"id": "fake"}]}).encode())
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
                with server.lock:
                    server.requests.append(payload)
                    number = len(server.requests)
                    fault = server.faults.pop(0) if server.faults else None
                if fault is None and server.fault_fn is not None:
                    fault = server.fault_fn(payload, number)
                fault = fault or "ok"
                if fault != "ok":
                    with server.lock:
                        server.injected.append(fault)
                if server.latency:
                    time.sleep(server.latency)
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                    return
                if fault == "slow":
                    time.sleep(server.slow_seconds)
                if isinstance(fault, int):
                    self._send(fault, b'{"error": "injected"}')
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
                n = int(payload.get("n", 1))
                choices = [{"index": i, "message": {"role": "assistant", "content": server.reply_fn(payload, i)},
                            "finish_reason": "stop"} for i in range(n)]
                body = json.dumps({"choices": choices, "usage": {"prompt_tokens": 7, "completion_tokens": 3 * n}})
                if fault == "truncated":
                    body = body[: len(body) // 2]
                elif fault == "ok":
                    with server.lock:
                        server.served.append(payload)
                self._send(200, body.encode())

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
