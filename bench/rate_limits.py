"""A run against a server that enforces rate limits the way hosted APIs do, beside the OpenAI SDK.

The server (tests/fake_limits.py, in this process) holds token buckets for requests and tokens,
states them in every reply's headers (OpenAI's ``x-ratelimit-*``, Anthropic's, or none) and
refuses with 429 and ``Retry-After`` what does not fit. The factory runs a ``solve`` recipe over
the rows with its default options; the OpenAI SDK (``AsyncOpenAI`` with its default retries, the
same 16 requests in flight) sends the same requests, as a hand-written script would. Printed per
setting: rows made, wall time against the least the limits allow, and the share of requests the
server refused. The targets: every row, at most 1.3x the allowed time, at most 15% refused.

Usage: python bench/rate_limits.py [--rows 300] [--rps 5] [--burst 10] [--tpm 9000 --token-burst 1500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fake_limits import RateLimitedServer, max_output, prompt_tokens  # noqa: E402

CONCURRENCY = 16


def tasks(rows: int) -> list[str]:
    return [f"Task {i}: describe item {i} in one line." for i in range(rows)]


def factory_run(server: RateLimitedServer, rows: int, folder: Path) -> tuple[int, float]:
    from factory.build import run_recipe
    from factory.cache import Cache
    from factory.driver import Driver
    from factory.recipe import load_recipe

    (folder / "tasks.jsonl").write_text("\n".join(json.dumps({"instruction": t}) for t in tasks(rows)))
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"""\
name: limited
llm: {{backend: openai, model: fake, base_url: "{server.base_url}"}}
source: {{path: {folder / 'tasks.jsonl'}}}
steps:
  - solve: {{max_tokens: 16}}
""")
    began = time.monotonic()
    _, manifest, _ = run_recipe(load_recipe(recipe), folder / "out", driver=Driver(Cache(folder / "cache"),
                                                                                    progress=False))
    return manifest["rows"], time.monotonic() - began


def sdk_run(server: RateLimitedServer, rows: int) -> tuple[int, float]:
    import openai

    async def main() -> int:
        semaphore = asyncio.Semaphore(CONCURRENCY)
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x") as client:
            async def one(text: str) -> bool:
                async with semaphore:
                    try:
                        await client.chat.completions.create(model="fake", max_tokens=16, messages=[
                            {"role": "user", "content": text}])
                        return True
                    except openai.APIError:
                        return False
            return sum(await asyncio.gather(*(one(t) for t in tasks(rows))))

    began = time.monotonic()
    made = asyncio.run(main())
    return made, time.monotonic() - began


def measure(name: str, make_server, run, rows: int) -> str:
    with make_server() as server, tempfile.TemporaryDirectory() as folder:
        made, wall = run(server, rows, Path(folder)) if name == "factory" else run(server, rows)
        with server.lock:
            requests = len(server.accepted) + sum(1 for *_, status in server.probes if status == 200)
            tokens = sum(prompt_tokens(p) + (max_output(p) or 0) for _, p in server.accepted)
        allowed = server.allowed_seconds(requests, tokens if server.token_bucket is not None else None)
        return (f"  {name:<22} {made:>5}/{rows:<5} {wall:>8.1f}s {allowed:>8.1f}s {wall / max(allowed, 1e-9):>7.2f}x "
                f"{server.refused_share:>8.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--rps", type=float, default=5.0, help="requests per second the server allows")
    parser.add_argument("--burst", type=int, default=10)
    parser.add_argument("--tpm", type=float, default=9000.0, help="tokens per minute of the token-limit setting")
    parser.add_argument("--token-burst", type=int, default=1500)
    parser.add_argument("--skip-sdk", action="store_true")
    args = parser.parse_args()

    settings = [
        (f"{args.rps:g} requests/s (burst {args.burst}), OpenAI headers",
         lambda: RateLimitedServer(requests_per_second=args.rps, burst=args.burst, latency=0.05)),
        (f"{args.rps:g} requests/s (burst {args.burst}), Anthropic headers",
         lambda: RateLimitedServer(requests_per_second=args.rps, burst=args.burst, latency=0.05, headers="anthropic")),
        (f"{args.rps:g} requests/s (burst {args.burst}), no limit headers, Retry-After only",
         lambda: RateLimitedServer(requests_per_second=args.rps, burst=args.burst, latency=0.05, headers="none")),
        (f"{args.tpm:g} tokens/min (burst {args.token_burst}), OpenAI headers",
         lambda: RateLimitedServer(requests_per_second=None, tokens_per_minute=args.tpm,
                                   token_burst=args.token_burst, latency=0.05)),
    ]
    print(f"{args.rows} rows of `solve`, max_tokens 16, {CONCURRENCY} requests in flight; 50 ms per answer")
    print(f"  {'client':<22} {'rows':>11} {'wall':>9} {'allowed':>9} {'ratio':>8} {'refused':>8}")
    for title, make in settings:
        print(title)
        print(measure("factory", make, factory_run, args.rows), flush=True)
        if not args.skip_sdk:
            print(measure("OpenAI SDK (retries 2)", make, sdk_run, args.rows), flush=True)
    print("targets: every row, at most 1.3x the allowed time, at most 15% of the requests refused")


if __name__ == "__main__":
    main()
