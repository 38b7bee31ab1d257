"""Page timings of ``factory view`` on a 1,000,000-row version, against loading the version whole.

The version is written once by the factory's own writer (``factory.store.write_version``: parquet
shards of 100,000 rows, zstd, a manifest like a real run's) into ``--work`` (default: a folder under
the system temp dir) and reused while its manifest is there. Its rows are shaped like an SFT
dataset made by an evol-instruct -> solve -> judge -> score -> minhash recipe: ``instruction``
(50-300 chars), ``response`` (200-2,000 chars), ``messages`` (user + assistant), ``origin``,
``operation``, ``generation``, ``sample``, ``score``, ``judgement``; the text is drawn from an
English word list with Zipf weights (seeded, vectorised). ``rejected/`` holds a tenth as many
rows, dropped by 4 steps (``no_information_gain``, ``parse_error``, ``below_min``,
``near_duplicate``) with ``drop_step``, ``drop_reason``, ``drop_detail`` and ``raw_reply``. One
word that is not in the word list (``quokka``, half of the time capitalised) is planted in the
responses of 2 rows in 10,000: the rare word searched for.

Ours: the real server (``python -m factory view OUT --port 0``, a subprocess), timed over HTTP by
a plain ``http.client`` keep-alive client (connected before any clock starts; time to the last byte
of the body; the JSON is parsed after the clock stops). Each request is sent once as a warm-up
("first", before any cache of the server has seen it), then ``--repeat`` times (median, p95; a
request whose warm-up took over a second: a quarter as many, at least 3). "cold" is the very first
request after the start: page 1 of the data. "srv ms" is the median of the answer's own ``ms``.
The requests: /api/index, /api/version, pages of 50 rows (data at offsets 0, 500,000 and the last;
rejected; rejected by one step and reason; a search for the rare word; a facet, origin=
backtranslation, ~5% of the rows), /api/count of the search, /api/row in the middle, /api/sample
(20 rows), and "page 1 beside a count": page 1 while a second connection waits for the count of
the search, as when the page asks for both after a search is typed.

The alternatives, in the same run, on the same files (all already in the OS page cache: the
generation wrote them, and ours read them first):
  * datasets -- ``load_dataset("parquet", data_files=<shards>, split="train")``, then
                ``ds[offset:offset + 50]``. The first load converts the shards to an Arrow
                cache (a fresh ``cache_dir`` each run, so it is measured); the second one maps
                that cache. Load and slice are reported apart.
  * pyarrow  -- ``pyarrow.parquet.read_table`` of all shards, then ``slice(offset, 50)`` to
                Python rows: what a naive viewer does.
  * polars   -- ``polars.read_parquet`` of all shards, then each request as a query of the frame
                in memory (slice; filter by step and reason; any text column contains the word,
                case-insensitive; the facet's equality; the count), rows to Python dicts.
Columns: "alt mem" is the fastest alternative's query once the version is in memory; "open+q" the
fastest alternative's load plus that query, on a version it has not seen (datasets' first load);
"cached" the same with datasets' Arrow cache already built (its second load, the conversion given
to it for free). The ratios: ``open+q / ours`` and ``cached / ours`` (above 1: ours shows a page
of a version it has just opened sooner) and ``ours / mem`` (what reading the shards per request
costs against a viewer that holds the whole version in memory).

Each answer of ours is checked against the API's contract and against the same rows of the polars
frame: ``_index``, ``_hash``, the instruction texts, ``total``, ``more``, the counts, the facet
and group counts, the sample's rows (those ``factory.annotations.stratified_sample`` picks).

Target (the issue): a page of 50 rows of a 1,000,000-row version in under 300 ms; PASS when the
p95 of ours is below it, per page request (paging, a drop reason, a facet). A text search reads
every text column of every row whatever the page size: it is timed and printed without a verdict.

Usage: python bench/viewer.py [--rows 1000000] [--repeat 20] [--work DIR] [--skip datasets|server ...]
       (a quick run: python bench/viewer.py --rows 20000 --repeat 5)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import deque
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEED = 11
DATA = f"{SEED}-2"  # the seed and the generator's revision: a cached version of another is made again
PAGE = 50
SAMPLE = 20  # `factory view --sample`'s default
TARGET_MS = 300.0
SHARD_ROWS = 100_000
RARE = "quokka"  # planted; not in WORDS
RARE_SHARE = 0.0002
REJECTED_SHARE = 0.1
FACET = ("origin", "backtranslation")  # a value held by ~5% of the rows
REASON = ("steps[4].minhash", "near_duplicate")

# A plain English vocabulary, most common first (the Zipf weights follow this order).
WORDS = """
the of and to a in is that for it as with was on be by this are or from at an which have not but
can you they we one all their has more if will there when would been so what each other its about
into than them these two some may only also many then use time such how first most like over
value data function number list string return model example step result word case line name
file error output input first set new used make way work each part need type code test point
write read call form order table row column key text answer question task system process user
reason method because while where between through both before after without under same given
different following three every small large should could must however because example problem
simple first second next last value values result results order sorted sort count sum total
average mean maximum minimum index length size loop variable class object method field array
map filter reduce element elements item items pair pairs node tree graph path edge edges cost
score judge response instruction explain describe write compute find show prove solve give
define compare consider assume suppose note therefore thus hence since until unless whether
always never often usually sometimes already still again once twice half double whole each
people person city country world history science language music water light energy money health
school student teacher book story paper idea plan design market price product customer service
team project week month year day hour minute second morning evening night season weather river
mountain forest ocean island garden house room door window table chair kitchen food bread fruit
green blue red white black bright dark warm cold fast slow early late young old strong weak
better best worse worst higher lower longer shorter easier harder clear careful quick quiet
""".split()
WORDS = list(dict.fromkeys(WORDS))
STARTS = ["Explain", "Write", "Describe", "Summarize", "List", "Compare", "Give", "Solve", "Rewrite", "Classify",
          "Translate", "Suggest", "Outline", "Compute", "Find"]
ORIGINS = {"evol_instruct": 0.50, "self_instruct": 0.35, "seed": 0.10, "backtranslation": 0.05}
OPERATIONS = {"evol_instruct": ["deepen", "concretize", "reasoning", "constraints", "breadth"],
              "self_instruct": ["bootstrap"], "seed": ["seed"], "backtranslation": ["backtranslate"]}
DROPS = [("steps[0].evol_instruct", "no_information_gain", 0.20), ("steps[2].judge", "parse_error", 0.10),
         ("steps[3].score", "below_min", 0.45), ("steps[4].minhash", "near_duplicate", 0.25)]
REQUESTS = ["index", "version", "page 1", "page middle", "page last", "rejected page", "rejected by reason",
            "search page 1", "facet page 1", "count of search", "row (middle)", "sample"]
BESIDE = "page 1 beside a count"  # page 1 sent while another connection waits for the count of the search
SLOW_MS = 1000.0  # a request whose warm-up takes longer is repeated max(3, repeat // 4) times
# Pages the target is about: paging, a drop reason, a facet. A text search decodes every text column of
# every row (~1 GB here) whatever the page size, so it and a page beside it are timed, not judged.
PAGE_REQUESTS = ["page 1", "page middle", "page last", "rejected page", "rejected by reason", "facet page 1"]
SEARCHES = ["search page 1", BESIDE]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the version ---------------------------------------------------------------------------

class Text:
    """Seeded word salad, built column-wise: word ids drawn with Zipf weights, joined with
    arrow list offsets (no Python loop over rows)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        weights = 1.0 / np.arange(1, len(WORDS) + 1) ** 0.9
        self.cdf = np.cumsum(weights) / weights.sum()
        # ids 0..n-1: the words; n..2n-1: the word ending a sentence; 2n..3n-1: ending a paragraph
        self.vocab = pl.Series([*WORDS, *(w + "." for w in WORDS), *(w + ".\n\n" for w in WORDS)])

    def column(self, n: int, low: int, high: int, first: list[str] | None = None) -> pl.Series:
        import pyarrow as pa

        chars = self.rng.integers(low, high + 1, n)
        count = np.maximum(2, np.rint(chars / 4.7)).astype(np.int64)  # ~4.7 chars a word with its space
        total = int(count.sum())
        ids = np.searchsorted(self.cdf, self.rng.random(total)).astype(np.int32)
        ids = np.minimum(ids, len(WORDS) - 1)
        ends = self.rng.random(total)
        ids += (ends < 1 / 14).astype(np.int32) * len(WORDS) + (ends < 1 / 90).astype(np.int32) * len(WORDS)
        offsets = np.concatenate([[0], np.cumsum(count)])
        last = offsets[1:] - 1
        ids[last] = ids[last] % len(WORDS) + len(WORDS)  # every text ends a sentence
        words = self.vocab.gather(ids)
        if first is not None:  # a leading verb, as instructions start
            words = words.scatter(offsets[:-1], pl.Series(first).gather(self.rng.integers(0, len(first), n)))
        lists = pa.LargeListArray.from_arrays(pa.array(offsets), words.to_arrow())
        text = pl.Series(lists).list.join(" ")
        return text.str.slice(0, high)


def choice(rng: np.random.Generator, shares: dict[str, float], n: int) -> np.ndarray:
    names = list(shares)
    p = np.array([shares[k] for k in names])
    return np.array(names, dtype=object)[rng.choice(len(names), n, p=p / p.sum())]


def frame(n: int, rng: np.random.Generator, text: Text, kept: bool) -> pl.DataFrame:
    """``n`` rows of instruction, response, origin, operation, generation, sample, score, judgement."""
    origin = choice(rng, ORIGINS, n)
    operation = np.empty(n, dtype=object)
    for name, ops in OPERATIONS.items():
        where = origin == name
        operation[where] = np.array(ops, dtype=object)[rng.integers(0, len(ops), int(where.sum()))]
    score = rng.choice(np.arange(5, 11) if kept else np.arange(1, 11), n,
                       p=[.08, .12, .2, .3, .2, .1] if kept else None).astype(float)
    judgement = pl.Series(["Score: "] * n) + pl.Series(score.astype(int).astype(str)) + ". " + \
        text.column(n, 40, 240)
    return pl.DataFrame({
        "instruction": text.column(n, 50, 300, STARTS),
        "origin": pl.Series(origin, dtype=pl.String),
        "operation": pl.Series(operation, dtype=pl.String),
        "generation": rng.integers(0, 5, n),
        "response": text.column(n, 200, 2000),
        "sample": rng.integers(0, 4, n),
        "score": score,
        "judgement": judgement,
    })


def plant(table: pl.DataFrame, rng: np.random.Generator) -> pl.DataFrame:
    """The rare word, in the response of RARE_SHARE of the rows (every other time capitalised)."""
    where = np.sort(rng.choice(table.height, max(1, int(table.height * RARE_SHARE)), replace=False))
    words = [RARE.capitalize() if i % 2 else RARE for i in range(len(where))]
    response = table["response"]
    planted = (pl.Series(words) + " " + response.gather(where)).str.slice(0, 2000)
    return table.with_columns(response.scatter(where, planted))


def make_tables(rows: int, seed: int = SEED) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    rng = np.random.default_rng(seed)
    text = Text(rng)
    table = plant(frame(rows, rng, text, kept=True), rng)
    table = table.with_columns(messages=pl.concat_list(
        pl.struct(role=pl.lit("user"), content=pl.col("instruction")),
        pl.struct(role=pl.lit("assistant"), content=pl.col("response"))))
    n = max(1, int(rows * REJECTED_SHARE))
    rejected = frame(n, rng, text, kept=False)
    which = rng.choice(len(DROPS), n, p=[share for *_, share in DROPS])
    step = np.array([s for s, _, _ in DROPS], dtype=object)[which]
    reason = np.array([r for _, r, _ in DROPS], dtype=object)[which]
    similarity = pl.Series(np.round(rng.uniform(0.8, 1.0, n), 3)).cast(pl.String)
    raw_judge = pl.Series(["I think the answer is mostly right, maybe "] * n) + rejected["judgement"].str.slice(9, 80)
    raw_evol = pl.Series(["Rewritten: "] * n) + rejected["instruction"]
    rejected = rejected.with_columns(
        drop_step=pl.Series(step, dtype=pl.String), drop_reason=pl.Series(reason, dtype=pl.String),
    ).with_columns(
        drop_detail=pl.when(pl.col("drop_reason") == "near_duplicate").then("jaccard " + similarity)
        .when(pl.col("drop_reason") == "below_min").then("score " + pl.col("score").cast(pl.String) + " < 5.0")
        .otherwise(None),
        raw_reply=pl.when(pl.col("drop_reason") == "parse_error").then(raw_judge)
        .when(pl.col("drop_reason") == "no_information_gain").then(raw_evol).otherwise(None),
        # what a step had not made yet when an earlier one dropped the row
        response=pl.when(pl.col("drop_step") == "steps[0].evol_instruct").then(None).otherwise(pl.col("response")),
        score=pl.when(pl.col("drop_step").is_in(["steps[0].evol_instruct", "steps[2].judge"])).then(None)
        .otherwise(pl.col("score")),
        judgement=pl.when(pl.col("drop_step") == "steps[0].evol_instruct").then(None).otherwise(pl.col("judgement")),
    )
    dropped = {(s, r): int(((step == s) & (reason == r)).sum()) for s, r, _ in DROPS}
    return table, rejected, dropped


def manifest(rows: int, dropped: dict) -> dict:
    """A manifest like a real run's (the fields ``write_version`` does not fill in)."""
    llm = {"backend": "openai", "model": "Qwen/Qwen2.5-7B-Instruct", "base_url": "http://127.0.0.1:8000/v1"}
    judge_llm = {"backend": "openai", "model": "Qwen/Qwen2.5-32B-Instruct", "base_url": "http://127.0.0.1:8001/v1"}
    recipe = {"name": "sft", "description": "Evolved instructions with judged answers (viewer benchmark).",
              "seed": SEED, "batch_size": 64, "max_failure_rate": 0.5, "llm": llm,
              "source": {"path": "data/seeds/tasks.jsonl", "format": "auto", "split": "train"},
              "steps": [{"evol_instruct": {"rounds": 4, "llm": llm}},
                        {"solve": {"samples": 4, "temperature": 0.8, "llm": llm}},
                        {"judge": {"scale": 10, "llm": judge_llm}},
                        {"score": {"min": 5.0}},
                        {"minhash": {"column": "instruction", "threshold": 0.8, "num_perm": 128}}],
              "output": {"format": "messages", "shard_rows": SHARD_ROWS, "license": "other", "tags": []}}
    names = [("evol_instruct", "global", llm), ("solve", "row", llm), ("judge", "row", judge_llm),
             ("score", "row", None), ("minhash", "global", None)]
    counts, count = {}, rows  # walked back from the kept rows: rows_in = rows_out + dropped; solve makes 4 of 1
    for i in reversed(range(len(names))):
        lost = {r: n for (s, r), n in dropped.items() if s == f"steps[{i}].{names[i][0]}"}
        rows_in = count // 4 if names[i][0] == "solve" else count + sum(lost.values())
        counts[i], count = (rows_in, count, lost), rows_in
    steps = []
    for i, (name, kind, model) in enumerate(names):
        rin, rout, lost = counts[i]
        entry = {"index": i, "name": name, "label": f"steps[{i}].{name}", "kind": kind, "rows_in": rin,
                 "rows_out": rout, "dropped": lost, "seconds": round(30.0 + 17.3 * (i + 1) * rout / 1e4, 3),
                 "batches": -(-rin // 64), "cached_batches": 0, "report": {}, "truncation": None}
        if model:
            entry["llm"] = {**model, "model_id": f"openai:{model['model']}@{i:012x}", "calls": rin,
                            "conversations": rin, "cached_conversations": 0, "prompt_tokens": rin * 310,
                            "completion_tokens": rin * 240, "retries": 0, "throttled": 0, "failures": 0}
        steps.append(entry)
    models = [{"step": s["label"], "backend": "openai", "model": s["llm"]["model"], "adapter": None,
               "model_id": s["llm"]["model_id"]} for s in steps if "llm" in s]
    usage = {}
    for s in steps:
        if "llm" in s:
            u = usage.setdefault(f"openai:{s['llm']['model']}", {
                "backend": "openai", "model": s["llm"]["model"], "model_id": s["llm"]["model_id"], "steps": [],
                "prompt_tokens": 0, "completion_tokens": 0, "conversations": 0, "cached_conversations": 0})
            u["steps"].append(s["label"])
            for key in ("prompt_tokens", "completion_tokens", "conversations"):
                u[key] += s["llm"][key]
    return {"recipe": recipe, "recipe_hash": "0" * 64, "recipe_file": "recipes/sft.yaml", "overrides": [],
            "parent": None, "source": {"path": "data/seeds/tasks.jsonl", "rows_read": steps[0]["rows_in"],
                                       "dropped": {}},
            "backend": "openai", "model": llm["model"], "adapter": None, "models": models, "seed": SEED,
            "steps": steps, "usage": usage, "retries": 0, "throttled": 0, "backend_failures": 0,
            "output_format": "messages", "timings": {"started_at": 1.8e9, "run_seconds": 86400.0},
            "executor": "local"}


def version(out: Path, rows: int) -> tuple[Path, str]:
    """The benchmark's version of ``rows`` rows under ``out`` (written unless one is there)."""
    from factory.store import read_manifest, versions, write_version

    name = f"sft-{rows}"
    for number in versions(out / name):
        folder = out / name / f"v{number}"
        m = read_manifest(folder)
        if m.get("rows") == rows and m.get("bench_data") == DATA:
            log(f"version: reusing {folder}")
            return folder, name
        if "bench_data" in m or "bench_seed" in m:  # this benchmark's, from another revision of the generator
            shutil.rmtree(folder)
    began = time.perf_counter()
    table, rejected, dropped = make_tables(rows)
    made = time.perf_counter() - began
    folder = write_version(out, name, table, rejected, {**manifest(rows, dropped), "bench_data": DATA},
                          shard_rows=SHARD_ROWS)
    lengths = {c: table[c].str.len_chars() for c in ("instruction", "response")}
    log(f"version: {folder}: {table.height:,} rows, {rejected.height:,} rejected; made in {made:.1f}s, written in "
        f"{time.perf_counter() - began - made:.1f}s; " + ", ".join(
            f"{c} {s.min()}-{s.max()} chars (mean {s.mean():.0f})" for c, s in lengths.items()))
    return folder, name


def shards(folder: Path, part: str) -> list[str]:
    return [str(p) for p in sorted((folder / part).glob("*.parquet"))]


# -- ours: the server over HTTP ----------------------------------------------------------

class Server:
    """``python -m factory view OUT --port 0`` as a subprocess; its URL from the first stdout line."""

    def __init__(self, out: Path, log_path: Path):
        self.began = time.perf_counter()
        self.log_file = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "factory", "view", str(out), "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=self.log_file, cwd=ROOT)
        self.lines: deque[str] = deque(maxlen=50)
        first = self.proc.stdout.readline().decode(errors="replace")
        self.started = time.perf_counter() - self.began
        match = re.search(r"http://([^/\s]+):(\d+)/", first)
        if not match:
            self.stop()
            raise RuntimeError(f"factory view printed {first!r} first, not its URL; stderr: {self.stderr()}")
        self.host, self.port = match.group(1), int(match.group(2))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.decode(errors="replace"))

    def stderr(self) -> str:
        self.log_file.flush()
        return Path(self.log_file.name).read_text(errors="replace")[-2000:]

    def peak_rss_mib(self) -> float | None:
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        return int(match.group(1)) / 1024 if match else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


class Client:
    """One keep-alive connection, opened before any clock starts (the server prints its URL before
    it listens: the connection is retried until it is accepted); the clock runs from sending the
    request to the last byte of the body."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.connect()

    def connect(self) -> None:
        for _ in range(600):
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
            try:
                self.conn.connect()
                return
            except ConnectionRefusedError:
                self.conn.close()
                time.sleep(0.05)
        raise RuntimeError(f"factory view: nothing listens at {self.host}:{self.port} after 30 s")

    def get(self, path: str) -> tuple[float, int, bytes]:
        for _ in range(2):
            try:
                began = time.perf_counter()
                self.conn.request("GET", path)
                response = self.conn.getresponse()
                body = response.read()
                return (time.perf_counter() - began) * 1000, response.status, body
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.conn.close()
                self.connect()
        raise RuntimeError(f"GET {path}: the server closed the connection twice")


def paths(name: str, number: int, rows: int) -> dict[str, str]:
    def q(**params) -> str:
        return urllib.parse.urlencode(params, doseq=True)

    base = {"ds": name, "v": number}
    page = lambda part, offset, **more: "/api/rows?" + q(**base, part=part, offset=offset, limit=PAGE, **more)  # noqa: E731
    facet = f"{FACET[0]}={json.dumps(FACET[1])}"
    return {"index": "/api/index",
            "version": "/api/version?" + q(**base),
            "page 1": page("data", 0),
            "page middle": page("data", middle(rows)),
            "page last": page("data", last(rows)),
            "rejected page": page("rejected", 0),
            "rejected by reason": page("rejected", 0, step=REASON[0], reason=REASON[1]),
            "search page 1": page("data", 0, q=RARE),
            "facet page 1": page("data", 0, f=facet),
            "count of search": "/api/count?" + q(**base, part="data", q=RARE),
            "row (middle)": "/api/row?" + q(**base, part="data", index=middle(rows)),
            "sample": "/api/sample?" + q(**base)}


def middle(rows: int) -> int:
    return rows // 2 // PAGE * PAGE


def last(rows: int) -> int:
    return max(0, (rows - 1) // PAGE * PAGE)


def percentile(values: list[float], p: float) -> float:
    return float(np.percentile(values, p))


def run_ours(out: Path, work: Path, name: str, number: int, rows: int, repeat: int) -> dict:
    server = Server(out, work / "server.log")
    try:
        client = Client(server.host, server.port)
        listening = time.perf_counter() - server.began
        urls = paths(name, number, rows)
        result = {"start_s": server.started, "listen_s": listening, "url": f"http://{server.host}:{server.port}/",
                  "requests": {}}
        ms, status, body = client.get(urls["page 1"])
        result["cold"] = {"ms": ms, "status": status, "body": body}
        for label in REQUESTS:
            first, status, body = client.get(urls[label])
            times, server_ms = [], []
            n = 0 if status != 200 else max(3, repeat // 4) if first > SLOW_MS else repeat
            for _ in range(n):
                took, status, again = client.get(urls[label])
                times.append(took)
                server_ms.append(json_ms(again))
            server_ms = [m for m in server_ms if m is not None]
            result["requests"][label] = {
                "path": urls[label], "status": status, "body": body, "first": first, "bytes": len(body),
                "repeats": n, "median": statistics.median(times) if times else None,
                "p95": percentile(times, 95) if times else None,
                "server_ms": statistics.median(server_ms) if server_ms else None}
            log(f"ours: {label}: first {first:.1f} ms" + (f", median {result['requests'][label]['median']:.1f} ms"
                                                          if times else f", HTTP {status}"))
        result["requests"][BESIDE] = beside(server, urls, max(3, repeat // 4))
        result["peak_rss_mib"] = server.peak_rss_mib()
        return result
    finally:
        server.stop()


def beside(server: Server, urls: dict, repeat: int) -> dict:
    """Page 1 while a second connection waits for the count of the search (what the page does when a
    search is typed: it asks for the rows and for the count): does a slow query hold up the others?"""
    client, other = Client(server.host, server.port), Client(server.host, server.port)
    times, counts = [], []
    for _ in range(repeat):
        thread = threading.Thread(target=lambda: counts.append(other.get(urls["count of search"])[0]))
        thread.start()
        time.sleep(0.05)  # the count is under way
        took, status, body = client.get(urls["page 1"])
        times.append(took)
        thread.join()
    return {"path": urls["page 1"], "status": status, "body": body, "first": None, "bytes": len(body),
            "repeats": repeat, "median": statistics.median(times), "p95": percentile(times, 95), "server_ms": None,
            "count_ms": statistics.median(counts)}


def json_ms(body: bytes) -> float | None:
    try:
        value = json.loads(body).get("ms")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, (int, float)) else None


# -- the alternatives ------------------------------------------------------------------------

def timed(fn, repeat: int) -> tuple[float, object]:
    """Median ms of ``repeat`` calls after one warm-up, and the last result."""
    result = fn()
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times), result


def search_filter(frame: pl.DataFrame, word: str) -> pl.Expr:
    """Any text column (also inside ``messages``) contains ``word``, case-insensitive."""
    pattern = "(?i)" + re.escape(word)
    text = [c for c, t in frame.schema.items() if t == pl.String]
    exprs = [pl.col(c).str.contains(pattern) for c in text]
    if "messages" in frame.columns:
        exprs.append(pl.col("messages").list.eval(pl.element().struct.field("content").str.contains(pattern))
                     .list.any())
    return pl.any_horizontal(exprs)


def polars_queries(data: pl.DataFrame, rejected: pl.DataFrame, rows: int, sample_indices: dict) -> dict:
    facet = pl.col(FACET[0]) == FACET[1]
    reason = (pl.col("drop_step") == REASON[0]) & (pl.col("drop_reason") == REASON[1])
    low = [c for c in data.columns if c in ("origin", "operation", "generation", "sample", "score")]
    return {
        "version": lambda: ({c: data[c].value_counts().rows() for c in low},
                            rejected.group_by("drop_step", "drop_reason").len().rows()),
        "page 1": lambda: data.slice(0, PAGE).to_dicts(),
        "page middle": lambda: data.slice(middle(rows), PAGE).to_dicts(),
        "page last": lambda: data.slice(last(rows), PAGE).to_dicts(),
        "rejected page": lambda: rejected.slice(0, PAGE).to_dicts(),
        "rejected by reason": lambda: rejected.lazy().filter(reason).head(PAGE + 1).collect().to_dicts()[:PAGE],
        "search page 1": lambda: data.lazy().filter(search_filter(data, RARE)).head(PAGE + 1).collect()
        .to_dicts()[:PAGE],
        "facet page 1": lambda: data.lazy().filter(facet).head(PAGE + 1).collect().to_dicts()[:PAGE],
        "count of search": lambda: data.lazy().filter(search_filter(data, RARE)).select(pl.len()).collect().item(),
        "row (middle)": lambda: data.slice(middle(rows), 1).to_dicts(),
        "sample": lambda: {part: (data if part == "data" else rejected)[sorted(idx)].to_dicts()
                           for part, idx in sample_indices.items()},
    }


def run_alternatives(folder: Path, work: Path, rows: int, repeat: int, skip: set[str]) -> dict:
    import pyarrow.parquet as pq

    data_files, rejected_files = shards(folder, "data"), shards(folder, "rejected")
    alt = {"loads": {}, "memory": {}, "reference": {}, "folder": folder}

    def load(name: str, read):
        began = time.perf_counter()
        loaded = read()
        alt["loads"][name] = (time.perf_counter() - began) * 1000
        return loaded

    table = load("pyarrow read_table (data)", lambda: pq.read_table(data_files))
    rtable = load("pyarrow read_table (rejected)", lambda: pq.read_table(rejected_files))
    for label, offset, t in (("page 1", 0, table), ("page middle", middle(rows), table),
                             ("page last", last(rows), table), ("rejected page", 0, rtable)):
        alt["memory"].setdefault(label, {})["pyarrow"] = timed(lambda: t.slice(offset, PAGE).to_pylist(), repeat)[0]
    del table, rtable
    log("alternatives: pyarrow done")

    data = load("polars read_parquet (data)", lambda: pl.read_parquet(data_files))
    rejected = load("polars read_parquet (rejected)", lambda: pl.read_parquet(rejected_files))
    alt["in_memory_mib"] = (data.estimated_size() + rejected.estimated_size()) / 2 ** 20
    from factory.annotations import stratified_sample

    picked = stratified_sample(folder, SAMPLE)  # the rows the server offers (the same seed); gathered from memory
    sample_indices = {part: [i["index"] for i in picked if i["part"] == part] for part in ("data", "rejected")}
    alt["sample"] = picked
    for label, fn in polars_queries(data, rejected, rows, sample_indices).items():
        ms, result = timed(fn, max(3, repeat // 4) if label in ("version", "count of search") else repeat)
        alt["memory"].setdefault(label, {})["polars"] = ms
        alt["reference"][label] = result
    alt["expected"] = {
        "rows": data.height, "rejected": rejected.height,
        "search": data.filter(search_filter(data, RARE)).height,
        "facet": data.filter(pl.col(FACET[0]) == FACET[1]).height,
        "reason": rejected.filter((pl.col("drop_step") == REASON[0]) & (pl.col("drop_reason") == REASON[1])).height}
    alt["frames"] = (data, rejected)
    log("alternatives: polars done")

    if "datasets" not in skip:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import datasets

        datasets.disable_progress_bars()
        cache = work / "hf-cache"
        shutil.rmtree(cache, ignore_errors=True)
        loaded = {}
        for part, files in (("data", data_files), ("rejected", rejected_files)):
            for which in ("first", "second"):
                began = time.perf_counter()
                loaded[part] = datasets.load_dataset("parquet", data_files=files, split="train",
                                                     cache_dir=str(cache))
                alt["loads"][f"datasets load_dataset, {which} ({part})"] = (time.perf_counter() - began) * 1000
        for label, offset, part in (("page 1", 0, "data"), ("page middle", middle(rows), "data"),
                                    ("page last", last(rows), "data"), ("rejected page", 0, "rejected")):
            ds = loaded[part]
            alt["memory"].setdefault(label, {})["datasets"] = timed(lambda: ds[offset:offset + PAGE], repeat)[0]
        del loaded
        shutil.rmtree(cache, ignore_errors=True)
        log("alternatives: datasets done")
    return alt


def open_ms(alt: dict, label: str, contender: str, cached: bool) -> float:
    """The load a contender needs before it can answer ``label``; ``cached``: datasets' second load."""
    part = "rejected" if label.startswith("rejected") else "data"
    loads = alt["loads"]
    if contender == "pyarrow":
        return loads[f"pyarrow read_table ({part})"]
    if contender == "datasets":
        return loads[f"datasets load_dataset, {'second' if cached else 'first'} ({part})"]
    if label == "version":  # the facets need both parts
        return loads["polars read_parquet (data)"] + loads["polars read_parquet (rejected)"]
    return loads[f"polars read_parquet ({part})"]


# -- the contract ------------------------------------------------------------------------------

def check(label: str, entry: dict, alt: dict, name: str, rows: int) -> list[str]:
    """What in ours' answer to ``label`` does not match the contract or the polars frame."""
    if entry["status"] != 200:
        return [f"HTTP {entry['status']}: {entry['body'][:200]!r}"]
    try:
        body = json.loads(entry["body"])
    except ValueError:
        return [f"not JSON: {entry['body'][:200]!r}"]
    expected = alt["expected"]
    problems = []
    if label == "index":
        ids = [d.get("id") for d in body.get("datasets", [])]
        if name not in ids:
            problems.append(f"dataset {name!r} not in the index ({ids})")
        return problems
    if label == "version":
        parts = body.get("parts", {})
        for part, n in (("data", expected["rows"]), ("rejected", expected["rejected"])):
            if parts.get(part, {}).get("rows") != n:
                problems.append(f"parts.{part}.rows = {parts.get(part, {}).get('rows')}, expected {n}")
        counts = {c: dict(v) for c, v in body.get("facets", {}).get("data", {}).items()}
        if FACET[0] not in counts:
            problems.append(f"no facet {FACET[0]!r} (facets: {sorted(counts)})")
        elif counts[FACET[0]].get(FACET[1]) != expected["facet"]:
            problems.append(f"facet {FACET[0]}={FACET[1]}: {counts[FACET[0]].get(FACET[1])}, expected {expected['facet']}")
        groups = {(g.get("step"), g.get("reason")): g.get("rows") for g in body.get("groups", [])}
        if groups.get(REASON) != expected["reason"]:
            problems.append(f"groups {REASON}: {groups.get(REASON)}, expected {expected['reason']}")
        return problems
    if label == "row (middle)":
        want = alt["reference"][label][0]
        if body.get("_index") != middle(rows) or body.get("instruction") != want["instruction"]:
            problems.append(f"_index {body.get('_index')} / instruction differ from row {middle(rows)}")
        return problems
    if label == "sample":
        items = body.get("items", [])
        if body.get("n") != SAMPLE or len(items) != len(alt["sample"]):
            problems.append(f"n {body.get('n')}, {len(items)} items; expected {SAMPLE}, {len(alt['sample'])}")
        data, rejected = alt["frames"]
        for item in items:
            frame = data if item.get("part") == "data" else rejected
            index = item.get("index")
            if not isinstance(index, int) or item.get("row", {}).get("instruction") != frame["instruction"][index]:
                problems.append(f"item {item.get('part')} {index}: its row is not that row of the version")
                break
        if sorted((i.get("part"), i.get("index")) for i in items) != sorted((i["part"], i["index"])
                                                                           for i in alt["sample"]):
            problems.append("not the rows factory.annotations.stratified_sample picks")
        return problems
    if label == "count of search":
        if body.get("total") != expected["search"]:
            problems.append(f"total {body.get('total')}, expected {expected['search']}")
        return problems
    missing = {"rows", "offset", "limit", "more", "total", "ms"} - set(body)
    if missing:
        problems.append(f"keys missing: {sorted(missing)}")
    got = body.get("rows", [])
    reference = alt["reference"][label]
    if len(got) != len(reference):
        problems.append(f"{len(got)} rows, expected {len(reference)}")
    for row in got[:1]:
        if not re.fullmatch(r"[0-9a-f]{16}", str(row.get("_hash"))):
            problems.append(f"_hash {row.get('_hash')!r} is not 16 hex digits")
        if "_verdict" not in row:
            problems.append("no _verdict")
        if "messages" in row and not (isinstance(row["messages"], list) and row["messages"]
                                      and {"role", "content"} <= set(row["messages"][0])):
            problems.append(f"messages not a list of role/content: {str(row['messages'])[:80]}")
    if [r.get("instruction") for r in got] != [r["instruction"] for r in reference]:
        problems.append("not the same rows as the polars frame's (instruction differs)")
    start = {"page middle": middle(rows), "page last": last(rows)}.get(label, 0)
    if label in ("page 1", "page middle", "page last", "rejected page"):
        if [r.get("_index") for r in got] != list(range(start, start + len(got))):
            problems.append(f"_index {[r.get('_index') for r in got][:3]}..., expected {start}, {start + 1}, ...")
        total = expected["rejected" if label == "rejected page" else "rows"]
        if body.get("total") != total:
            problems.append(f"total {body.get('total')}, expected {total}")
        if body.get("more") != (start + PAGE < total):
            problems.append(f"more {body.get('more')}, expected {start + PAGE < total}")
    else:
        matches = {"rejected by reason": expected["reason"], "search page 1": expected["search"],
                   "facet page 1": expected["facet"]}[label]
        if body.get("more") != (matches > PAGE):
            problems.append(f"more {body.get('more')}, expected {matches > PAGE}")
    return problems


# -- the report ------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:,.1f}" if ms < 10_000 else f"{ms:,.0f}"


def report(ours: dict | None, alt: dict, name: str, rows: int, repeat: int, why_not: str | None) -> None:
    import pyarrow.parquet as pq

    data, rejected = alt["frames"]
    first = pq.ParquetFile(shards(alt["folder"], "data")[0]).metadata
    groups = f"row groups of {first.row_group(0).num_rows:,}" if first.num_row_groups else "no row groups"
    print(f"factory view: {rows:,} rows + {rejected.height:,} rejected in shards of {SHARD_ROWS:,}, {groups} "
          f"(in memory {alt['in_memory_mib']:,.0f} MiB); {repeat} repeats after one warm-up; "
          f"{os.cpu_count()} CPUs: {cpu_name()}")
    print("loads (ms): " + "; ".join(f"{k} {fmt(v)}" for k, v in alt["loads"].items()))
    if any("datasets" in k for k in alt["loads"]):
        print("  (datasets' first load converts the shards into its Arrow cache; the second maps that cache)")
    if ours is None:
        print(f"ours: not measured ({why_not})")
    else:
        rss = ours.get("peak_rss_mib")
        print(f"ours: URL printed {ours['start_s']:.2f}s after the start, connection accepted after "
              f"{ours['listen_s']:.2f}s; cold page 1 (the first request) {fmt(ours['cold']['ms'])} ms; server peak RSS "
              f"{fmt(rss)} MiB; {BESIDE}: the count took {fmt(ours['requests'][BESIDE]['count_ms'])} ms")
    header = (f"{'request':<20} {'first':>8} {'median':>8} {'p95':>8} {'srv ms':>7} {'KiB':>5} | "
              f"{'alt mem':>8} {'open+q':>9} {'cached':>8} | {'open+q/ours':>11} {'cached/ours':>11} {'ours/mem':>8}")
    print(header)
    print("-" * len(header))
    verdicts, searches, problems, best_names = [], [], {}, {}
    for label in [*REQUESTS, BESIDE]:
        mine = ours["requests"].get(label) if ours else None
        memory = alt["memory"].get(label, {})
        best_mem = min(memory.items(), key=lambda kv: kv[1]) if memory else None
        fresh = min(((c, open_ms(alt, label, c, False) + ms) for c, ms in memory.items()), key=lambda kv: kv[1],
                    default=None)
        cached = min(((c, open_ms(alt, label, c, True) + ms) for c, ms in memory.items()), key=lambda kv: kv[1],
                     default=None)
        best_names[label] = "/".join(dict.fromkeys(x[0] for x in (best_mem, fresh, cached) if x))
        median = mine["median"] if mine else None
        cells = [fmt(mine["first"]) if mine else "-", fmt(median), fmt(mine["p95"] if mine else None),
                 fmt(mine["server_ms"]) if mine else "-", f"{mine['bytes'] / 1024:.0f}" if mine else "-"]
        ratio = lambda alt_ms: f"{alt_ms / median:,.1f}x" if alt_ms and median else "-"  # noqa: E731
        print(f"{label:<20} {cells[0]:>8} {cells[1]:>8} {cells[2]:>8} {cells[3]:>7} {cells[4]:>5} | "
              f"{fmt(best_mem[1]) if best_mem else '-':>8} {fmt(fresh[1]) if fresh else '-':>9} "
              f"{fmt(cached[1]) if cached else '-':>8} | {ratio(fresh[1] if fresh else None):>11} "
              f"{ratio(cached[1] if cached else None):>11} "
              f"{f'{median / best_mem[1]:,.0f}x' if best_mem and median else '-':>8}")
        if mine:
            problems[label] = check(label if label != BESIDE else "page 1", mine, alt, name, rows)
            if label in PAGE_REQUESTS and mine["p95"] is not None:
                verdicts.append(f"{label} {'PASS' if mine['p95'] < TARGET_MS else 'FAIL'} ({fmt(mine['p95'])})")
            elif label in PAGE_REQUESTS:
                verdicts.append(f"{label} FAIL (HTTP {mine['status']})")
            elif label in SEARCHES and mine["p95"] is not None:
                searches.append(f"{label} {fmt(mine['p95'])}")
    print("  ms. first: the warm-up request (before any cache of the server saw it); median/p95: over the repeats, "
          "to the last byte; srv ms: the answer's own `ms`; alt mem: the fastest alternative's query with the version "
          "already in memory; open+q: the fastest alternative's load plus that query; cached: the same with "
          f"datasets' Arrow cache already built (its second load). Requests slower than {SLOW_MS:.0f} ms: "
          f"max(3, repeat / 4) repeats; sample's alternative gathers the same {SAMPLE} rows from memory. "
          "Fastest alternative per request: "
          + ", ".join(f"{k} {v}" for k, v in best_names.items() if v))
    if ours:
        cold = ours["cold"]["ms"]
        print(f"target: a page of 50 rows of a {rows:,}-row version in < {TARGET_MS:.0f} ms (p95) on {cpu_name()}: "
              + "; ".join(verdicts) + f"; cold page 1 {'PASS' if cold < TARGET_MS else 'FAIL'} ({fmt(cold)})")
        if searches:
            print("no target (a text search decodes every text column of every row): p95 " + "; ".join(searches))
        bad = {k: v for k, v in problems.items() if v}
        cold_problems = check("page 1", {**ours["cold"], "bytes": 0}, alt, name, rows)
        if cold_problems:
            bad["cold page 1"] = cold_problems
        if bad:
            print("contract: MISMATCH")
            for label, found in bad.items():
                print(f"  {label} ({ours['requests'].get(label, {}).get('path', '')}): {'; '.join(found)}")
        else:
            print(f"contract: every answer matches (rows, _index, totals, more, counts; search '{RARE}' "
                  f"{alt['expected']['search']} rows, {FACET[0]}={FACET[1]} {alt['expected']['facet']}, "
                  f"{REASON[1]} {alt['expected']['reason']})")


def server_available() -> str | None:
    """None when ``factory view`` exists, else why not."""
    if not (ROOT / "factory" / "view" / "server.py").is_file():
        return "factory/view/server.py does not exist yet"
    done = subprocess.run([sys.executable, "-m", "factory", "view", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    if done.returncode != 0:
        return f"`factory view --help` failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the version (default: 1,000,000)")
    parser.add_argument("--repeat", type=int, default=20, help="timed repeats of each request, after one warm-up")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "factory-bench-viewer",
                        help="where the version is written once and reused (OUT is WORK/out)")
    parser.add_argument("--skip", action="append", default=[], choices=["datasets", "server"],
                        help="leave out the datasets alternative or the server (repeatable)")
    args = parser.parse_args()

    out = args.work / "out"
    out.mkdir(parents=True, exist_ok=True)
    folder, name = version(out, args.rows)
    why_not = "--skip server" if "server" in args.skip else server_available()
    ours = None
    if why_not is None:
        try:
            ours = run_ours(out, args.work, name, int(folder.name[1:]), args.rows, args.repeat)
        except RuntimeError as e:
            why_not = str(e)
    alt = run_alternatives(folder, args.work, args.rows, args.repeat, set(args.skip))
    report(ours, alt, name, args.rows, args.repeat, why_not)


if __name__ == "__main__":
    main()
