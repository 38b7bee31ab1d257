"""A small OpenAI-compatible server for tests, able to inject faults.

``FakeOpenAI().faults`` is a list consumed one entry per request to /chat/completions:
``"ok"``, an HTTP status such as ``429`` or ``500``, ``"retry_after"`` (429 with
Retry-After: 0), ``"slow"`` (sleeps past the client timeout), ``"reset"`` (closes the
connection), ``"not_json"``, ``"truncated"``, ``"empty_choices"``. When the list is empty
every request succeeds. Replies are ``reply_fn(messages, index)``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    def __init__(self, reply_fn=None):
        self.faults: list = []
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.reply_fn = reply_fn or (lambda messages, i: f"echo: {messages[-1]['content'][:40]} #{i}")
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
                payload = json.loads(self.rfile.read(length) or b"{}")
                with server.lock:
                    server.requests.append(payload)
                    fault = server.faults.pop(0) if server.faults else "ok"
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                    return
                if fault == "slow":
                    time.sleep(1.5)
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
                choices = [{"index": i, "message": {"role": "assistant",
                                                    "content": server.reply_fn(payload["messages"], i)},
                            "finish_reason": "stop"} for i in range(n)]
                body = json.dumps({"choices": choices, "usage": {"prompt_tokens": 7, "completion_tokens": 3 * n}})
                if fault == "truncated":
                    body = body[: len(body) // 2]
                self._send(200, body.encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
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
