"""Near-duplicate removal: the `minhash` step against rensa, datasketch and datatrove.

Real text, offline: the rows are docstrings (modules, classes, functions) of the packages
installed in this interpreter's site-packages, exactly deduplicated, each of >= 8 words;
the corpus is built once and cached in ``~/.cache/factory-bench/``. Rows beyond the corpus
join 2-4 randomly drawn docstring paragraphs (seeded). Then 2% of the rows (``--planted-share``)
become planted near-duplicates: a copy of an earlier row of >= 50 words with one word replaced,
then, equally often, ``unchanged``, ``upper`` (all upper case) or ``nopunct`` (all punctuation
and symbols deleted: ``os.path.join`` -> ``ospathjoin``). Every contender runs in its own
subprocess, reading the rows from a parquet file; "whole s" is that process from start to
exit (interpreter, imports, reading the rows), "work s" the dedup alone, peak its peak RSS.

Contenders (word 5-grams unless ``--ngram``, the threshold, seed 1; the LSH bands are datasketch's
choice for the threshold, except the step's own with verify on, which favours recall):
  * minhash               -- the factory's step (``filters/minhash.py``), defaults (verify on)
  * minhash, no verify    -- the same without the exact check: LSH candidates only
  * minhash, no normalize -- the step with ``normalize: false`` (when it has the option):
                             lowercased ``\\w+`` words, what normalization buys
  * rensa                 -- polars reads and normalizes (the step's ``normalized_text``), Python
                             builds the shingle strings, then per row an ``RMinHash``, ``query``
                             the ``RMinHashLSH``, drop the row if anything earlier matches, else
                             ``insert`` it
  * datasketch loop       -- the same loop with datasketch's ``MinHash`` and ``MinHashLSH``
  * datasketch bulk       -- the same over ``MinHash.bulk`` (one set of permutations for all rows)
  * datatrove             -- its 4-stage MinHash pipeline (signatures, buckets, clusters, filter;
                             buckets of the step's bands), with its own text simplification
                             (punctuation becomes spaces) and words split at spaces (its English
                             tokenizer needs spaCy); when datatrove is installed
The datasketch loops and datatrove are slow: they run on the first ``--datasketch-rows``.

Quality, against the exact Jaccard similarity of the normalized word n-gram sets:
  * precision -- of (up to) 2,000 sampled dropped rows, the share whose exact Jaccard with the
    row they point to is >= threshold ("prec t-0.1": >= threshold - 0.1)
  * recall    -- of all planted pairs in the rows it ran on, the share found (the copy dropped,
    or the original dropped in favour of the copy), overall and per kind

Usage: python bench/minhash_dedup.py [--rows 100000] [--datasketch-rows N] [--threshold 0.8]
           [--ngram 5] [--planted-share 0.02] [--skip NAME ...] (``--skip all``: only build the rows)
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import importlib.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import unicodedata
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NUM_PERM = 128
SEED = 1
PRECISION_SAMPLE = 2_000
KINDS = ("unchanged", "upper", "nopunct")
CACHE = Path.home() / ".cache" / "factory-bench"


# -- data ---------------------------------------------------------------------------------

def corpus() -> tuple[list[str], str]:
    """The docstrings of the installed packages (cached), and how they were had."""
    site = sysconfig.get_paths()["purelib"]
    key = hashlib.sha1(site.encode()).hexdigest()[:8]
    path = CACHE / f"docstrings-py{sys.version_info.major}.{sys.version_info.minor}-{key}.parquet"
    began = time.perf_counter()
    if path.exists():
        return pl.read_parquet(path)["text"].to_list(), f"read from {path} in {time.perf_counter() - began:.1f}s"
    files = sorted(str(p) for p in Path(site).rglob("*.py"))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        texts = list(dict.fromkeys(d for ds in pool.map(_docstrings_of, files, chunksize=64) for d in ds))
    CACHE.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"text": texts}, schema={"text": pl.String}).write_parquet(path)
    return texts, f"built from {len(files):,} files of {site} in {time.perf_counter() - began:.1f}s, cached in {path}"


def _docstrings_of(path: str) -> list[str]:
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError, OSError):
        return []
    nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                          ast.AsyncFunctionDef)))
    return [d for d in map(ast.get_docstring, nodes) if d and len(d.split()) >= 8]


def make_rows(n: int, docstrings: list[str], planted_share: float, seed: int = 0
              ) -> tuple[list[str], np.ndarray, np.ndarray, int]:
    """``n`` rows: docstrings, then joined paragraphs, shuffled; then the planted copies.

    Returns:
        The texts; for each row the original it copies (-1 for others) and the kind of copy
        (an index into ``KINDS``, -1 for others); and how many rows are whole docstrings.
    """
    rng = np.random.default_rng(seed)
    texts = [docstrings[i] for i in rng.permutation(len(docstrings))[:n]]
    whole = len(texts)
    if n > whole:
        paragraphs = [p.strip() for d in docstrings for p in re.split(r"\n\s*\n", d) if len(p.split()) >= 3]
        counts = rng.integers(2, 5, size=n - whole)
        picks = iter(rng.integers(0, len(paragraphs), size=int(counts.sum())).tolist())
        texts += ["\n\n".join(paragraphs[next(picks)] for _ in range(c)) for c in counts.tolist()]
        texts = [texts[i] for i in rng.permutation(n)]
    words = pl.Series(texts).str.count_matches(r"\S+").to_numpy()
    copies = np.sort(rng.choice(np.arange(1, n), size=round(planted_share * n), replace=False))
    eligible = np.flatnonzero(words >= 50)
    eligible = eligible[~np.isin(eligible, copies)]  # a copy's original is no copy itself
    before = np.searchsorted(eligible, copies)
    copies, before = copies[before > 0], before[before > 0]
    copy_of, kind = np.full(n, -1), np.full(n, -1)
    copy_of[copies] = eligible[(rng.random(len(copies)) * before).astype(int)]
    kind[copies] = rng.permutation(np.arange(len(copies)) % len(KINDS))
    vocabulary = sorted({w for d in docstrings[:5_000] for w in re.findall(r"[A-Za-z]{3,}", d)})
    for row in copies.tolist():
        text = texts[copy_of[row]]
        spans = [m.span() for m in re.finditer(r"[^\W\d_]+", text)]
        start, end = spans[rng.integers(len(spans))]
        text = text[:start] + vocabulary[rng.integers(len(vocabulary))] + text[end:]
        if KINDS[kind[row]] == "upper":
            text = text.upper()
        elif KINDS[kind[row]] == "nopunct":
            text = text.translate({ord(c): None for c in set(text) if unicodedata.category(c)[0] in "PS"})
        texts[row] = text
    return texts, copy_of, kind, whole


# -- text as everyone but datatrove shingles it ------------------------------------------

def bench_normalized_text(texts: pl.Series, lowercase: bool = True) -> pl.Series:
    """A copy of the step's ``normalized_text``, so that the other contenders' processes do not pay
    for importing the factory (about half a second); ``main`` checks that both agree on the rows.
    Lowercase; drop accents (NFD, then no combining marks: only non-ASCII rows need it); a number
    becomes ``0``; delete punctuation and symbols; whitespace runs become one space."""
    if lowercase:
        texts = texts.str.to_lowercase()
    accented = texts.str.contains(r"[^\x00-\x7F]").fill_null(False).arg_true()
    if len(accented):
        texts = texts.scatter(accented, texts.gather(accented).str.normalize("NFD").str.replace_all(r"\p{Mn}+", ""))
    return (texts.str.replace_all(r"[\p{P}\p{S}]+", "").str.replace_all(r"\d+", "0")
            .str.replace_all(r"\s\s+|[^\S ]", " ").str.strip_chars())


def step_normalized_text() -> Callable | None:
    """The step's ``normalized_text``, if it has one (it works on series; an expression-based one also does)."""
    try:
        from filters.minhash import normalized_text
    except ImportError:
        return None
    return normalized_text


def shingle_list(words: list[str], ngram: int) -> list[str]:
    """The word n-grams of a text's words, as the step takes them (a shorter text is one shingle)."""
    if len(words) < ngram:
        return [" ".join(words)] if words and words[0] else []
    return list(map(" ".join, zip(*(words[i:] for i in range(ngram)))))


# -- contenders (each in its own process) --------------------------------------------------

def run_minhash(table: pl.DataFrame, a: argparse.Namespace, **options) -> np.ndarray:
    from filters.minhash import MinHashConfig, MinHashFilter

    step = MinHashFilter(MinHashConfig(column="text", threshold=a.threshold, num_perm=NUM_PERM, ngram=a.ngram,
                                       seed=SEED, **options))
    # A dropped row's detail names the position of the row it duplicates.
    kept_row = step.process(table)["_drop_detail"].str.extract(r"position (\d+)").cast(pl.Int64)
    return kept_row.fill_null(-1).to_numpy()


def words_of(table: pl.DataFrame, a: argparse.Namespace) -> list[list[str]]:
    normalized = (step_normalized_text() if a.step_normalizer else None) or bench_normalized_text
    return normalized(table["text"]).str.split(" ").to_list()


def run_rensa(table: pl.DataFrame, a: argparse.Namespace) -> np.ndarray:
    from rensa import RMinHash, RMinHashLSH

    # rensa wants num_perm divisible by num_bands: bands x rows_per_band (9 x 13 = 117 at 0.8), the
    # step's LSH layout. Per row `update` beat the batch `RMinHash.from_token_sets` (0.17 s against
    # 0.20 s for 47k rows) and keeps no list of sketches; `digests_from_token_sets` gives lists,
    # which the LSH does not take, and its matrix queries flag both rows of a pair, not the later.
    num_perm = a.bands * a.rows_per_band

    def sketch(shingles: list[str]):
        m = RMinHash(num_perm=num_perm, seed=SEED)
        m.update(shingles)
        return m

    shingles = (shingle_list(words, a.ngram) for words in words_of(table, a))
    return first_match(RMinHashLSH(threshold=a.threshold, num_perm=num_perm, num_bands=a.bands),
                       (sketch(s) if s else None for s in shingles), table.height)


def run_datasketch(table: pl.DataFrame, a: argparse.Namespace, bulk: bool = False) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH

    def sketch(values: list[bytes]) -> MinHash:
        m = MinHash(num_perm=NUM_PERM, seed=SEED)
        m.update_batch(values)
        return m

    encoded = [[s.encode("utf-8") for s in shingle_list(w, a.ngram)] for w in words_of(table, a)]
    # bulk: one set of permutations for all rows, instead of one per MinHash
    minhashes = MinHash.bulk(encoded, num_perm=NUM_PERM, seed=SEED) if bulk else map(sketch, encoded)
    return first_match(MinHashLSH(threshold=a.threshold, num_perm=NUM_PERM, params=(a.bands, a.rows_per_band)),
                       (m if values else None for m, values in zip(minhashes, encoded)), table.height)


def first_match(lsh, sketches: Iterable, rows: int) -> np.ndarray:
    """Per row: ``query`` the LSH index; a match makes the row a duplicate of the lowest, else ``insert`` it.
    A row without shingles (sketch None) is nobody's duplicate."""
    duplicate_of = np.full(rows, -1)
    for row, m in enumerate(sketches):
        if m is None:
            continue
        matches = lsh.query(m)
        if matches:
            duplicate_of[row] = min(matches)
        else:
            lsh.insert(row, m)
    return duplicate_of


def run_datatrove(data: Path, a: argparse.Namespace) -> np.ndarray:
    """datatrove's pipeline in a temporary folder; the kept row of a cluster is the one not removed."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.utils.word_tokenizers import WordTokenizer

    import xxhash
    from datatrove.utils.hashes import xxhash as datatrove_xxhash

    # datatrove 0.10 hashes str shingles; xxhash >= 4 takes bytes only: encode them, keeping its default hash.
    datatrove_xxhash.xxhash64 = lambda text: xxhash.xxh64_intdigest(text.encode("utf-8"))
    # Words of its simplified text (no punctuation left) split at spaces: its English tokenizer needs spaCy.
    split_tokenizer = type("SplitTokenizer", (WordTokenizer,), {
        "word_tokenize": lambda self, text: text.split(), "sent_tokenize": lambda self, text: [text],
        "span_tokenize": lambda self, text: [(0, len(text))]})()
    config = MinhashConfig(n_grams=a.ngram, num_buckets=a.bands, hashes_per_bucket=a.rows_per_band, seed=SEED)
    work = Path(tempfile.mkdtemp(dir=a.out.parent))
    read = lambda: ParquetReader(str(data.parent), glob_pattern=data.name, limit=a.rows)  # noqa: E731
    stages = [([read(), MinhashDedupSignature(str(work / "sigs"), config=config, language=split_tokenizer)], 1),
              ([MinhashDedupBuckets(str(work / "sigs"), str(work / "dups"), config=config)], a.bands),  # 1 a bucket
              ([MinhashDedupCluster(str(work / "dups"), str(work / "ids"), config=config, save_cluster_id=True)], 1),
              ([read(), MinhashDedupFilter(str(work / "ids"))], 1)]
    for i, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=str(work / f"logs{i}")).run()
    duplicate_of = np.full(a.rows, -1)
    if (work / "ids" / "000000.remove").exists():
        removed = np.fromfile(work / "ids" / "000000.remove", dtype="<u4").astype(np.int64)
        doc, cluster = np.fromfile(work / "ids" / "000000.clusters", dtype="<u4").astype(np.int64).reshape(-1, 2).T
        gone = np.isin(doc, removed)
        kept = np.full(cluster.max() + 1, -2)  # -2: dropped, kept row unknown
        kept[cluster[~gone]] = doc[~gone]
        duplicate_of[doc[gone]] = kept[cluster[gone]]
    return duplicate_of


CONTENDERS: dict[str, tuple[Callable, str]] = {  # the function, and the module it imports
    "minhash": (run_minhash, "filters.minhash"),
    "minhash, no verify": (lambda table, a: run_minhash(table, a, verify=False), "filters.minhash"),
    "minhash, no normalize": (lambda table, a: run_minhash(table, a, normalize=False), "filters.minhash"),
    "rensa": (run_rensa, "rensa"),
    "datasketch loop": (run_datasketch, "datasketch"),
    "datasketch bulk": (lambda table, a: run_datasketch(table, a, bulk=True), "datasketch"),
    "datatrove": (run_datatrove, "datatrove.pipeline.dedup.minhash"),
}
SUBSET = ("datasketch loop", "datasketch bulk", "datatrove")  # run on --datasketch-rows


def worker(a: argparse.Namespace) -> None:
    """Runs one contender on the first ``a.rows`` rows; saves its verdicts, prints seconds and peak RSS."""
    function, module = CONTENDERS[a.worker]
    importlib.import_module(module)  # counted in the whole process, not in the work
    # Each takes the rows as it would in use: a polars table (datatrove: its own reader).
    rows_in = a.data if a.worker == "datatrove" else pl.read_parquet(a.data, n_rows=a.rows)
    start = time.perf_counter()
    duplicate_of = function(rows_in, a)
    seconds = time.perf_counter() - start
    np.save(a.out, duplicate_of)
    print(json.dumps({"seconds": seconds, "peak_mb": _peak_rss_mb()}))


def _peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM, which starts afresh at exec;
    ``ru_maxrss`` would carry over the peak of the (large) parent it was forked from."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def measure(name: str, a: argparse.Namespace, data: Path, rows: int, work: Path, step_normalizer: bool) -> dict:
    out = work / (re.sub(r"\W+", "_", name) + ".npy")
    command = [sys.executable, __file__, "--worker", name, "--data", str(data), "--rows", str(rows),
               "--threshold", str(a.threshold), "--ngram", str(a.ngram), "--out", str(out),
               "--bands", f"{a.bands},{a.rows_per_band}"] + (["--step-normalizer"] if step_normalizer else [])
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    whole = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    return {**json.loads(proc.stdout.splitlines()[-1]), "whole": whole, "rows": rows, "duplicate_of": np.load(out)}


# -- quality ------------------------------------------------------------------------------

def quality(r: dict, shingles: Callable[[int], set[str]], copy_of: np.ndarray, kind: np.ndarray,
            threshold: float, subset: int) -> dict:
    """Precision on sampled dropped rows with a pointer, recall of the planted pairs (all, per kind,
    and within the first ``subset`` rows)."""
    duplicate_of, rows = r["duplicate_of"], r["rows"]
    pointed = np.flatnonzero(duplicate_of >= 0)
    precision = near = None
    if len(pointed):
        sample = np.random.default_rng(0).choice(pointed, size=min(PRECISION_SAMPLE, len(pointed)), replace=False)
        similarity = np.array([jaccard(shingles(i), shingles(duplicate_of[i])) for i in sample])
        precision, near = float(np.mean(similarity >= threshold)), float(np.mean(similarity >= threshold - 0.1))
    copies = np.flatnonzero(copy_of[:rows] >= 0)
    found = (duplicate_of[copies] != -1) | (duplicate_of[copy_of[copies]] == copies)
    recall = {k: float(np.mean(found[kind[copies] == i])) for i, k in enumerate(KINDS)}
    return {"dropped": int(np.count_nonzero(duplicate_of != -1)), "precision": precision, "near": near,
            "recall": float(np.mean(found)), **recall, "subset_recall": float(np.mean(found[copies < subset]))}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--datasketch-rows", type=int, default=None,
                        help="rows for the slow datasketch loops and datatrove; default: all rows up to 100,000")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--ngram", type=int, default=5, help="words per shingle")
    parser.add_argument("--planted-share", type=float, default=0.02, help="share of rows that are planted copies")
    parser.add_argument("--skip", action="append", default=[], choices=[*CONTENDERS, "all"],
                        help="leave out a contender (repeatable); `all`: only build the rows")
    for hidden in ("--worker", "--data", "--out", "--bands"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--step-normalizer", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        a.data, a.out = Path(a.data), Path(a.out)
        a.bands, a.rows_per_band = map(int, a.bands.split(","))
        worker(a)
        return


    from filters.minhash import lsh_parameters

    a.bands, a.rows_per_band = lsh_parameters(a.threshold, NUM_PERM)
    subset = min(a.rows, a.datasketch_rows or 100_000)
    work = Path(tempfile.mkdtemp(prefix="minhash-bench-"))
    try:
        docstrings, how = corpus()
        print(f"corpus: {len(docstrings):,} docstrings, {how}")
        began = time.perf_counter()
        texts, copy_of, kind, whole = make_rows(a.rows, docstrings, a.planted_share)
        (work / "data").mkdir()
        data = work / "data" / "rows.parquet"
        pl.DataFrame({"text": texts}).write_parquet(data)
        copies = np.flatnonzero(copy_of >= 0)
        print(f"data: {a.rows:,} rows = {whole:,} docstrings + {a.rows - whole:,} of 2-4 joined docstring paragraphs; "
              f"{len(copies):,} planted copies of rows of >= 50 words, one word replaced, then "
              f"{'/'.join(KINDS)}: {'/'.join(str(int(np.sum(kind == i))) for i in range(len(KINDS)))}; "
              f"made in {time.perf_counter() - began:.1f}s")
        if "all" in a.skip:
            return

        step_normalize = step_normalized_text()
        normalized = (step_normalize or bench_normalized_text)(pl.Series(texts))
        differ = int((normalized != bench_normalized_text(pl.Series(texts))).sum()) if step_normalize else 0
        print("normalization: " + ("the step's normalized_text" if step_normalize else "the bench's copy (the step "
              "has no normalized_text)") + (f"; the bench's copy differs on {differ:,} rows, so every contender "
                                           "imports the step's" if differ else ""))
        simplified = normalized.to_list()
        shingles = lambda i: set(shingle_list(simplified[i].split(" "), a.ngram))  # noqa: E731
        exact = np.array([jaccard(shingles(i), shingles(copy_of[i])) for i in copies])
        print(f"planted pairs with exact Jaccard >= {a.threshold} (normalized word {a.ngram}-grams): "
              f"{np.sum(exact >= a.threshold):,} of {len(copies):,}; " + ", ".join(
                  f"{k} {np.sum(exact[kind[copies] == i] >= a.threshold):,}" for i, k in enumerate(KINDS)))

        plan = [name for name in CONTENDERS if name not in a.skip]
        results = {}
        for name in plan:
            if name in ("rensa", "datatrove") and importlib.util.find_spec(name) is None:
                print(f"{name}: not installed (pip install -e '.[bench]')")
                continue
            try:
                r = measure(name, a, data, subset if name in SUBSET else a.rows, work, bool(differ))
            except RuntimeError as error:
                print(f"{name}: skipped, it failed: {error}")
                continue
            results[name] = {**r, **quality(r, shingles, copy_of, kind, a.threshold, subset)}

        print(f"\nthreshold {a.threshold}, num_perm {NUM_PERM} (rensa, datatrove: {a.bands * a.rows_per_band}), "
              f"{a.bands} bands x {a.rows_per_band} rows, word {a.ngram}-grams, {_cpu_count()} CPU cores")
        print(f"{'contender':<22} {'rows':>9} {'whole s':>8} {'work s':>7} {'peak MB':>8} {'dropped':>8} "
              f"{'precision':>9} {'prec t-0.1':>10} {'recall':>7} " + " ".join(f"{k:>9}" for k in KINDS))
        for name, r in results.items():
            precision, near = (f"{r[k]:.3f}" if r[k] is not None else "-" for k in ("precision", "near"))
            print(f"{name:<22} {r['rows']:>9,} {r['whole']:>8.2f} {r['seconds']:>7.2f} {r['peak_mb']:>8,.0f} "
                  f"{r['dropped']:>8,} {precision:>9} {near:>10} {r['recall']:>7.3f} "
                  + " ".join(f"{r[k]:>9.3f}" for k in KINDS))
        if "minhash" in results and "rensa" in results:
            ratio = results["minhash"]["whole"] / results["rensa"]["whole"]
            print(f"whole-process time: minhash / rensa = {ratio:.2f}x (target <= 1)")
        sketch = next((results[n] for n in ("datasketch bulk", "datasketch loop") if n in results), None)
        if "minhash" in results and sketch:
            on = f" (planted pairs in the first {subset:,} rows)" if subset < a.rows else ""
            print(f"recall: minhash {results['minhash']['subset_recall']:.3f} vs datasketch "
                  f"{sketch['subset_recall']:.3f} (target >= datasketch){on}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    main()
