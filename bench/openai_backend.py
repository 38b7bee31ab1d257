"""The OpenAI-compatible backend against a plain httpx async loop, on one local server.

A small asyncio server in its own process answers every chat completion after a fixed
latency (a real server's think time, without its compute), so the figure is what the
client side costs: the backend's request building, retries bookkeeping, reply parsing and
per-reply callbacks against the least a Python client can do at the same concurrency
(one ``httpx.AsyncClient``, a semaphore, ``gather``). Both sides run twice in one process,
alternating; the best of each is reported. Target: the backend at >= 0.95 of the loop.

Usage: python bench/openai_backend.py [--requests 2000] [--concurrency 64] [--latency 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REPLY_TOKENS = 32


def serve(port: int, latency: float, ready) -> None:
    """A keep-alive HTTP/1.1 server that answers each POST after ``latency`` seconds."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                if head.startswith(b"GET"):
                    out = json.dumps({"data": [{"id": "bench"}]}).encode()
                else:
                    payload = json.loads(body)
                    await asyncio.sleep(latency)
                    text = " ".join(["word"] * REPLY_TOKENS) + f" {payload.get('seed')}"
                    out = json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": text}}],
                                      "usage": {"prompt_tokens": 20, "completion_tokens": REPLY_TOKENS}}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(out)).encode() + b"\r\n\r\n" + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def conversations(count: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}] for i in range(count)]


def plain_loop(base_url: str, convs, concurrency: int) -> int:
    """The least a client does: one pooled AsyncClient, a semaphore, gather. Returns tokens."""
    import httpx

    async def run() -> int:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        semaphore = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=base_url + "/", limits=limits, timeout=60) as client:
            async def one(i, conv):
                async with semaphore:
                    response = await client.post("chat/completions", json={
                        "model": "bench", "messages": conv, "temperature": 0.7, "top_p": 1.0, "max_tokens": 64,
                        "seed": i})
                body = response.json()
                return body["usage"]["completion_tokens"]
            return sum(await asyncio.gather(*(one(i, c) for i, c in enumerate(convs))))

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the server waits per request")
    args = parser.parse_args()

    from factory.llm import GenerationParams, OpenAIBackend, OpenAIConfig
    from factory.llm.base import Request

    port = free_port()
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=serve, args=(port, args.latency, ready), daemon=True)
    server.start()
    ready.wait(30)
    base_url = f"http://127.0.0.1:{port}/v1"
    convs = conversations(args.requests)
    params = GenerationParams(temperature=0.7, max_tokens=64)
    backend = OpenAIBackend(OpenAIConfig(model="bench", base_url=base_url, max_concurrency=args.concurrency))
    backend.check()
    replies = [0]

    requests = [Request(c, params.with_seed(i)) for i, c in enumerate(convs)]

    def on_reply(ready_replies) -> None:  # what the reply cache does per reply, minus the disk
        replies[0] += len(ready_replies)

    def ours() -> int:
        out = backend.generate(requests, on_reply)
        assert all(c.error is None for c in out)
        return sum(c.completion_tokens for c in out)

    def theirs() -> int:
        return plain_loop(base_url, convs, args.concurrency)

    best = {"factory backend": float("inf"), "plain httpx loop": float("inf")}
    tokens = {}
    for _ in range(2):
        for name, fn in (("plain httpx loop", theirs), ("factory backend", ours)):
            start = time.perf_counter()
            tokens[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    backend.close()
    server.terminate()

    ideal = args.requests * args.latency / args.concurrency
    print(f"{args.requests} requests, concurrency {args.concurrency}, server latency {args.latency * 1000:.0f} ms "
          f"(ideal {ideal:.2f} s)")
    print(f"{'client':<18} {'seconds':>8} {'requests/s':>11} {'tokens/s':>9}")
    for name, seconds in best.items():
        print(f"{name:<18} {seconds:>8.2f} {args.requests / seconds:>11.1f} {tokens[name] / seconds:>9.0f}")
    ratio = best["plain httpx loop"] / best["factory backend"]
    print(f"factory / plain throughput: {ratio:.2f} (target >= 0.95)")


if __name__ == "__main__":
    main()
