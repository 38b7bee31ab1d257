"""Is the client ever the bottleneck? The OpenAI-compatible backend against what a user would
otherwise run, on one local server, in one run.

A small asyncio server in its own process answers every chat completion after a fixed
latency (a real server's think time, without its compute), so what differs between the
contenders is only what the client side costs. Two figures:

1. Requests/s of the client alone, at each ``--concurrency`` (default 64 and 256):
     * factory backend -- ``OpenAIBackend.generate`` with an ``on_reply`` callback that
                          counts replies (the reply cache's per-reply work, minus the disk)
     * aiohttp loop    -- the least a Python client does: one ``ClientSession`` with a
                          ``TCPConnector(limit=concurrency)``, a semaphore, ``gather``; the
                          reference every ratio is taken against
     * httpx loop      -- the same with one ``httpx.AsyncClient``; slow at high concurrency,
                          so it runs on the first ``--slow-requests`` requests only
     * OpenAI SDK      -- ``openai.AsyncOpenAI`` with its default HTTP client, a semaphore,
                          ``gather`` (what most hand-written scripts use)
   Each contender runs twice, alternating with the others; the best is kept. Target: the
   factory backend at >= 0.9 of the aiohttp loop's requests/s.

2. The whole process, start to exit, on ``--rows`` tasks at ``--process-concurrency``:
   ``factory run`` of a one-step recipe (solve) with a fresh cache, so every request is
   sent, against a hand-written aiohttp script that reads the same tasks, sends the same
   chat requests and writes each reply as a JSON line. Both run twice as subprocesses,
   alternating; the best is kept. Target: ``factory run`` at <= 1.5x the script's time.

The server counts the POSTs it answers, so every figure is checked to have sent all its
requests. Only ratios from one run count (the machines vary from day to day).

Usage: python bench/openai_backend.py [--requests 5000] [--concurrency 64,256] [--latency 0.05]
           [--slow-requests 1000] [--rows 5000] [--process-concurrency 64] [--skip-clients] [--skip-process]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "bench"
REPLY_TOKENS = 32
TEMPERATURE = 0.7
MAX_TOKENS = 64


# -- the server -------------------------------------------------------------------------------
def serve(port: int, latency: float, ready, posts) -> None:
    """A keep-alive HTTP/1.1 server that answers each POST after ``latency`` seconds and counts
    the POSTs in ``posts`` (shared memory; only this process writes it)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                if head.startswith(b"GET"):  # /v1/models: the backend's check
                    out = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode()
                else:
                    payload = json.loads(body)
                    posts.value += 1
                    await asyncio.sleep(latency)
                    text = " ".join(["word"] * REPLY_TOKENS) + f" {payload.get('seed')}"
                    # A complete chat.completion object, so that the OpenAI SDK reads it as a real one.
                    out = json.dumps({
                        "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": MODEL,
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": 20, "completion_tokens": REPLY_TOKENS,
                                  "total_tokens": 20 + REPLY_TOKENS}}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(out)).encode() + b"\r\n\r\n" + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        # A big backlog: 256 clients connecting at once must not wait on SYN retries.
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class Server:
    """The server in a process of its own, so that its work does not slow the client's loop."""

    def __init__(self, latency: float):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.posts = multiprocessing.RawValue("q", 0)
        ready = multiprocessing.Event()
        self.process = multiprocessing.Process(target=serve, args=(self.port, latency, ready, self.posts), daemon=True)
        self.process.start()
        if not ready.wait(30):
            raise RuntimeError("the bench server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.join()


# -- part 1: the clients ----------------------------------------------------------------------
def conversations(count: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}] for i in range(count)]


def chat_body(i: int, conv: list[dict]) -> dict:
    """The request every plain contender sends: the fields the factory backend sends for it."""
    return {"model": MODEL, "messages": conv, "temperature": TEMPERATURE, "top_p": 1.0, "max_tokens": MAX_TOKENS,
            "seed": i}


async def aiohttp_loop(base_url: str, convs: list, concurrency: int) -> int:
    import aiohttp

    url = base_url + "/chat/completions"
    semaphore = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def one(i, conv) -> str:
            async with semaphore:
                async with session.post(url, json=chat_body(i, conv)) as response:
                    response.raise_for_status()
                    reply = await response.json()
            return reply["choices"][0]["message"]["content"]

        texts = await asyncio.gather(*(one(i, c) for i, c in enumerate(convs)))
    return sum(1 for t in texts if t)


async def httpx_loop(base_url: str, convs: list, concurrency: int) -> int:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url + "/", limits=limits, timeout=60) as client:
        async def one(i, conv) -> str:
            async with semaphore:
                response = await client.post("chat/completions", json=chat_body(i, conv))
            response.raise_for_status()
            return response.json()["choices"][0]["message"]["content"]

        texts = await asyncio.gather(*(one(i, c) for i, c in enumerate(convs)))
    return sum(1 for t in texts if t)


async def openai_sdk(base_url: str, convs: list, concurrency: int) -> int:
    import openai

    # Its default HTTP client and connection limits, as a script would have them; no retries,
    # so that a failure shows instead of being hidden in the time.
    semaphore = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0) as client:
        async def one(i, conv) -> str:
            async with semaphore:
                completion = await client.chat.completions.create(
                    model=MODEL, messages=conv, temperature=TEMPERATURE, top_p=1.0, max_tokens=MAX_TOKENS, seed=i)
            return completion.choices[0].message.content

        texts = await asyncio.gather(*(one(i, c) for i, c in enumerate(convs)))
    return sum(1 for t in texts if t)


def factory_contender(backend, convs: list):
    """``generate`` over the requests, counting replies as the reply cache receives them."""
    from factory.llm import GenerationParams
    from factory.llm.base import Request

    params = GenerationParams(temperature=TEMPERATURE, top_p=1.0, max_tokens=MAX_TOKENS)
    # Built outside the timing: a step builds its requests before it calls the backend.
    requests = [Request(c, params.with_seed(i)) for i, c in enumerate(convs)]

    def run() -> int:
        replies = 0

        def on_reply(ready) -> None:
            nonlocal replies
            replies += len(ready)

        completions = backend.generate(requests, on_reply)
        errors = [c.error for c in completions if c.error is not None]
        assert not errors, f"{len(errors)} factory requests failed, e.g. {errors[0]}"
        assert replies == len(requests), f"on_reply saw {replies} of {len(requests)} replies"
        return sum(1 for c in completions if c.texts and c.texts[0])

    return run


def bench_clients(server: Server, args, concurrency: int) -> None:
    from factory.llm import OpenAIBackend, OpenAIConfig

    convs = conversations(args.requests)
    slow_convs = convs[:min(args.slow_requests, args.requests)]
    backend = OpenAIBackend(OpenAIConfig(model=MODEL, base_url=server.base_url, max_concurrency=concurrency))
    backend.check()  # its probes go before the timing: they are a run's start-up, measured in part 2

    def plain(loop, these):
        return lambda: asyncio.run(loop(server.base_url, these, concurrency))

    # name -> (requests it sends, a function that sends them and returns the replies it got)
    contenders = {
        "aiohttp loop": (convs, plain(aiohttp_loop, convs)),
        "factory backend": (convs, factory_contender(backend, convs)),
        "httpx loop": (slow_convs, plain(httpx_loop, slow_convs)),
        "OpenAI SDK": (convs, plain(openai_sdk, convs)),
    }
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(2):
        for name, (sent, run) in contenders.items():
            posts = server.posts.value
            start = time.perf_counter()
            replies = run()
            seconds = time.perf_counter() - start
            answered = server.posts.value - posts
            assert replies == len(sent) == answered, \
                f"{name}: {replies} replies, {answered} requests answered, {len(sent)} sent"
            best[name] = min(best[name], seconds)
    backend.close()

    rate = {name: len(contenders[name][0]) / seconds for name, seconds in best.items()}
    print(f"\nconcurrency {concurrency}: {args.requests} requests, server latency {args.latency * 1000:.0f} ms "
          f"(ideal {concurrency / args.latency:.0f} requests/s: concurrency / latency)")
    print(f"{'contender':<16} {'requests':>8} {'seconds':>8} {'requests/s':>11} {'vs aiohttp':>11}")
    for name, seconds in best.items():
        count = len(contenders[name][0])
        mark = "*" if count < args.requests else ""
        print(f"{name:<16} {str(count) + mark:>8} {seconds:>8.2f} {rate[name]:>11.1f} "
              f"{rate[name] / rate['aiohttp loop']:>11.2f}")
    if len(slow_convs) < args.requests:
        print(f"* the httpx loop sends only the first {len(slow_convs)} requests (--slow-requests); "
              f"its requests/s is on that count")
    print(f"factory backend / aiohttp loop: {rate['factory backend'] / rate['aiohttp loop']:.2f} (target >= 0.9)")


# -- part 2: the whole process ----------------------------------------------------------------
RECIPE = """\
name: bench-whole
llm: {{backend: openai, model: {model}, base_url: "{base_url}", max_concurrency: {concurrency}}}
source: {{path: tasks.jsonl}}
steps:
  - solve: {{max_tokens: {max_tokens}, temperature: {temperature}}}
"""

# What a user's hand-written script does: read the tasks, send them all at the concurrency,
# write each reply as a JSON line. The same fields as the recipe's solve step sends (its
# top_p default included); the step wraps the instruction in its prompt template, this does not.
PLAIN_SCRIPT = """\
import asyncio, json, sys

import aiohttp

TASKS, BASE_URL, CONCURRENCY, OUT = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]


async def main():
    with open(TASKS) as f:
        tasks = [json.loads(line) for line in f]
    semaphore = asyncio.Semaphore(CONCURRENCY)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(i, task):
            payload = {{"model": "{model}", "messages": [{{"role": "user", "content": task["instruction"]}}],
                       "max_tokens": {max_tokens}, "temperature": {temperature}, "top_p": 0.95, "seed": i}}
            async with semaphore:
                async with session.post(BASE_URL + "/chat/completions", json=payload) as response:
                    response.raise_for_status()
                    reply = await response.json()
            return {{**task, "response": reply["choices"][0]["message"]["content"]}}

        rows = await asyncio.gather(*(one(i, task) for i, task in enumerate(tasks)))
    with open(OUT, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\\n")


asyncio.run(main())
"""


def bench_process(server: Server, args) -> None:
    rows, concurrency = args.rows, args.process_concurrency
    work = Path(tempfile.mkdtemp(prefix="bench-openai-"))
    try:
        tasks = work / "tasks.jsonl"
        tasks.write_text("".join(json.dumps({"instruction": f"Question {i}: what is {i} + {i}?"}) + "\n"
                                 for i in range(rows)))
        values = {"model": MODEL, "base_url": server.base_url, "concurrency": concurrency,
                  "max_tokens": MAX_TOKENS, "temperature": TEMPERATURE}
        recipe = work / "recipe.yaml"
        recipe.write_text(RECIPE.format(**values))
        script = work / "plain.py"
        script.write_text(PLAIN_SCRIPT.format(**values))

        def factory_run(k: int) -> list[str]:
            # A fresh output and cache folder each time, so the run really sends every request.
            out = work / f"factory-{k}"
            return [sys.executable, "-m", "factory.cli", "run", str(recipe), "--out", str(out), "--cache-dir",
                    str(out / "cache"), "--quiet"]

        def plain_process(k: int) -> list[str]:
            return [sys.executable, str(script), str(tasks), server.base_url, str(concurrency),
                    str(work / f"plain-{k}.jsonl")]

        best = {"factory run": float("inf"), "plain process": float("inf")}
        for k in range(2):
            for name, command in (("plain process", plain_process(k)), ("factory run", factory_run(k))):
                posts = server.posts.value
                start = time.perf_counter()
                done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
                seconds = time.perf_counter() - start
                if done.returncode != 0:
                    raise RuntimeError(f"{name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
                # >= rather than ==: the factory's server check sends a few probe requests first.
                answered = server.posts.value - posts
                assert answered >= rows, f"{name}: the server answered {answered} of {rows} requests"
                best[name] = min(best[name], seconds)
        written = sum(1 for _ in (work / "plain-0.jsonl").open())
        assert written == rows, f"the plain process wrote {written} of {rows} replies"
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nwhole process: {rows} rows, concurrency {concurrency}, server latency {args.latency * 1000:.0f} ms, "
          f"start to exit")
    print(f"{'contender':<16} {'seconds':>8} {'rows/s':>8}")
    print(f"{'ideal':<16} {rows * args.latency / concurrency:>8.2f} {concurrency / args.latency:>8.1f}"
          f"   (rows * latency / concurrency)")
    for name, seconds in best.items():
        print(f"{name:<16} {seconds:>8.2f} {rows / seconds:>8.1f}")
    print(f"factory run / plain process: {best['factory run'] / best['plain process']:.2f} (target <= 1.5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000, help="requests per client contender")
    parser.add_argument("--concurrency", default="64,256", help="comma-separated concurrencies for the clients")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the server waits per request")
    parser.add_argument("--slow-requests", type=int, default=1000,
                        help="requests the httpx loop sends (it is slow at high concurrency)")
    parser.add_argument("--rows", type=int, default=5000, help="tasks in the whole-process comparison")
    parser.add_argument("--process-concurrency", type=int, default=64, help="concurrency of the whole-process runs")
    parser.add_argument("--skip-clients", action="store_true", help="skip part 1 (requests/s of the clients)")
    parser.add_argument("--skip-process", action="store_true", help="skip part 2 (the whole process)")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]

    server = Server(args.latency)
    try:
        if not args.skip_clients:
            for concurrency in concurrencies:
                bench_clients(server, args, concurrency)
        if not args.skip_process:
            bench_process(server, args)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
