"""Near-duplicate removal: the `minhash` step against datasketch in a plain Python loop.

Synthetic rows (sentences of 15-40 words drawn from a Zipf-weighted vocabulary) with
planted near-duplicates: 10% of the rows copy an earlier original with 1-2 words
replaced. Every contender runs in its own subprocess, so its peak memory (RSS) is its
own; the data is generated once and read from a parquet file.

Contenders:
  * minhash            -- the factory's step (``filters/minhash.py``), verify on (default)
  * minhash, no verify -- the same without the signature check: LSH candidates only,
                          like datasketch's ``MinHashLSH``
  * datasketch loop    -- per row: a ``MinHash``, ``update_batch`` over its shingles,
                          ``query`` the ``MinHashLSH`` index, drop the row if anything
                          earlier matches, else ``insert`` it
  * datasketch bulk    -- the same loop over ``MinHash.bulk``, which shares one set of
                          permutations between all rows (datasketch's faster way)
  * distilabel         -- ``MinHashDedup`` (sets of nltk word tokens), when distilabel is
                          installed

The others use word 3-grams of lowercased ``\\w+`` tokens, num_perm 128, the threshold
(0.8 unless ``--threshold``) and the same LSH bands (datasketch's choice). Quality
against the exact Jaccard similarity of the shingle sets:
  * precision -- of (up to) 2,000 sampled dropped rows, the share whose exact Jaccard with
    the row they point to is >= threshold ("prec t-0.1": >= threshold - 0.1; the gap is
    pairs just below the threshold whose estimate landed above it)
  * recall    -- of the planted pairs whose exact Jaccard is >= threshold, the share whose
    copy was dropped

Usage: python bench/minhash_dedup.py [--rows 100000] [--datasketch-rows N] [--threshold 0.8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NUM_PERM = 128
NGRAM = 3
SEED = 1
PRECISION_SAMPLE = 2_000
_WORD = re.compile(r"\w+")


# -- data ---------------------------------------------------------------------------------

def make_rows(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``n`` sentences; 10% are copies of an earlier original with 1-2 words replaced.

    Returns:
        The texts, and for each row the original it copies (-1 for originals).
    """
    rng = np.random.default_rng(seed)
    vocabulary = np.array([_word(rng) for _ in range(20_000)])
    weights = 1.0 / np.arange(1, len(vocabulary) + 1)  # Zipf: a few words are everywhere, as in text
    weights /= weights.sum()
    lengths = rng.integers(15, 41, size=n)
    words = rng.choice(len(vocabulary), size=int(lengths.sum()), p=weights)
    bounds = np.r_[0, np.cumsum(lengths)]
    sentences = [words[bounds[i]:bounds[i + 1]] for i in range(n)]
    copies = np.sort(rng.choice(np.arange(1, n), size=n // 10, replace=False))
    is_copy = np.zeros(n, dtype=bool)
    is_copy[copies] = True
    originals = np.flatnonzero(~is_copy)
    copy_of = np.full(n, -1)
    # Each copy takes an original before it, so every planted pair is 1-2 replaced words apart.
    copy_of[copies] = originals[(rng.random(len(copies)) * np.searchsorted(originals, copies)).astype(int)]
    edits = rng.integers(1, 3, size=len(copies))
    replacements = iter(rng.choice(len(vocabulary), size=int(edits.sum()), p=weights))
    for row, edit_count in zip(copies, edits):
        sentence = sentences[copy_of[row]].copy()
        for position in rng.integers(0, len(sentence), size=edit_count):
            sentence[position] = next(replacements)
        sentences[row] = sentence
    return [" ".join(vocabulary[s]) for s in sentences], copy_of


def _word(rng) -> str:
    return "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=int(rng.integers(2, 10))))


def shingles(text: str) -> set[str]:
    """The word 3-gram shingles, as the step builds them (a shorter text is one shingle)."""
    tokens = _WORD.findall(text.lower())
    if not tokens:
        return set()
    return {" ".join(tokens[i:i + NGRAM]) for i in range(max(len(tokens) - NGRAM + 1, 1))}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


# -- contenders (each in its own process) --------------------------------------------------

def run_minhash(table, threshold: float, verify: bool) -> list[int]:
    import polars as pl

    from filters.minhash import MinHashConfig, MinHashFilter

    step = MinHashFilter(MinHashConfig(column="text", threshold=threshold, num_perm=NUM_PERM, ngram=NGRAM,
                                       seed=SEED, verify=verify))
    # A dropped row's detail names the position of the row it duplicates.
    kept_row = step.process(table)["_drop_detail"].str.extract(r"position (\d+)").cast(pl.Int64)
    return kept_row.fill_null(-1).to_list()


def run_datasketch(texts: list[str], threshold: float, bulk: bool = False) -> list[int]:
    from datasketch import MinHash, MinHashLSH

    encoded = ([s.encode("utf-8") for s in shingles(text)] for text in texts)
    if bulk:  # one set of permutations for all rows, instead of one per MinHash
        minhashes = MinHash.bulk(encoded, num_perm=NUM_PERM, seed=SEED)
    else:
        minhashes = (_minhash(values) for values in encoded)
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    duplicate_of = []
    for row, m in enumerate(minhashes):
        matches = lsh.query(m)
        if matches:
            duplicate_of.append(min(matches))
        else:
            lsh.insert(row, m)
            duplicate_of.append(-1)
    return duplicate_of


def _minhash(values: list[bytes]):
    from datasketch import MinHash

    m = MinHash(num_perm=NUM_PERM, seed=SEED)
    m.update_batch(values)
    return m


def run_distilabel(texts: list[str], threshold: float) -> list[int]:
    from distilabel.steps import MinHashDedup

    step = MinHashDedup(tokenizer="words", threshold=threshold, num_perm=NUM_PERM, seed=SEED)  # nltk word sets
    step.load()
    kept = next(step.process([{"text": t} for t in texts]))
    return [-1 if row["keep_row_after_minhash_filtering"] else -2 for row in kept]  # no pointer to the kept row


CONTENDERS = {
    "minhash": lambda table, t: run_minhash(table, t, verify=True),
    "minhash, no verify": lambda table, t: run_minhash(table, t, verify=False),
    "datasketch loop": run_datasketch,
    "datasketch bulk": lambda texts, t: run_datasketch(texts, t, bulk=True),
    "distilabel": run_distilabel,
}


def worker(name: str, data: Path, rows: int, threshold: float) -> None:
    """Runs one contender on the first ``rows`` rows; prints seconds, peak RSS and result as JSON."""
    import polars as pl

    import datasketch  # noqa: F401  imports are not what is measured

    import filters.minhash  # noqa: F401

    table = pl.read_parquet(data, n_rows=rows)
    # Each takes the rows as it would in use: the step a polars table (what the driver
    # hands it), the loops a Python list of strings.
    rows_in = table if name.startswith("minhash") else table["text"].to_list()
    baseline = _peak_rss_mb()
    start = time.perf_counter()
    duplicate_of = CONTENDERS[name](rows_in, threshold)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mb": _peak_rss_mb(), "baseline_mb": baseline,
                      "duplicate_of": duplicate_of}))


def _peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM, which starts afresh at exec;
    ``ru_maxrss`` would carry over the peak of the (large) parent it was forked from."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def measure(name: str, data: Path, rows: int, threshold: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", name, "--data", str(data), "--rows", str(rows),
                           "--threshold", str(threshold)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


# -- quality ------------------------------------------------------------------------------

def quality(texts: list[str], duplicate_of: np.ndarray, threshold: float,
            true_pairs: np.ndarray) -> tuple[float | None, float | None, float]:
    """Precision on sampled dropped rows (exact Jaccard with the row they point to >= threshold,
    and >= threshold - 0.1), and recall of the planted pairs with exact Jaccard >= threshold."""
    dropped = np.flatnonzero(duplicate_of != -1)
    precision = near_precision = None
    pointed = dropped[duplicate_of[dropped] >= 0]
    if len(pointed):
        sample = np.random.default_rng(0).choice(pointed, size=min(PRECISION_SAMPLE, len(pointed)), replace=False)
        similarity = np.array([jaccard(texts[i], texts[duplicate_of[i]]) for i in sample])
        precision = float(np.mean(similarity >= threshold))
        near_precision = float(np.mean(similarity >= threshold - 0.1))
    recall = float(np.mean(duplicate_of[true_pairs] != -1)) if len(true_pairs) else float("nan")
    return precision, near_precision, recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--datasketch-rows", type=int, default=None,
                        help="rows for the (slow) datasketch loop and distilabel; default: all rows up to "
                             "100,000; rows/s is then measured on this prefix")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, Path(args.data), args.rows, args.threshold)
        return

    import polars as pl

    subset = min(args.rows, args.datasketch_rows or 100_000)
    work = Path(tempfile.mkdtemp(prefix="minhash-bench-"))
    try:
        began = time.perf_counter()
        texts, copy_of = make_rows(args.rows)
        data = work / "rows.parquet"
        pl.DataFrame({"text": texts}).write_parquet(data)
        copies = np.flatnonzero(copy_of >= 0)
        exact = np.array([jaccard(texts[i], texts[copy_of[i]]) for i in copies])
        print(f"data: {args.rows:,} rows, {len(copies):,} planted copies ({np.mean(exact >= args.threshold):.0%} "
              f"with exact Jaccard >= {args.threshold}), made in {time.perf_counter() - began:.1f}s")

        try:
            import distilabel  # noqa: F401
            has_distilabel = True
        except ImportError:
            has_distilabel = False
        plan = [("minhash", args.rows), ("minhash, no verify", args.rows), ("datasketch loop", subset),
                ("datasketch bulk", subset)]
        if has_distilabel:
            plan.append(("distilabel", subset))
        results = {}
        for name, rows in plan:
            result = measure(name, data, rows, args.threshold)
            duplicate_of = np.array(result["duplicate_of"])
            true_pairs = copies[(exact >= args.threshold) & (copies < rows)]
            precision, near_precision, recall = quality(texts, duplicate_of, args.threshold, true_pairs)
            subset_pairs = copies[(exact >= args.threshold) & (copies < subset)]
            results[name] = {**result, "rows": rows, "precision": precision, "near_precision": near_precision,
                             "recall": recall, "subset_recall": float(np.mean(duplicate_of[subset_pairs] != -1)),
                             "dropped": int(np.count_nonzero(duplicate_of != -1))}

        print(f"threshold {args.threshold}, num_perm {NUM_PERM}, word {NGRAM}-grams; "
              f"{_cpu_count()} CPU cores; peak = the contender's process's peak RSS (VmHWM), "
              "input = its RSS after reading the rows")
        print(f"{'contender':<20} {'rows':>9} {'seconds':>8} {'rows/s':>9} {'peak MB':>8} {'input MB':>8} "
              f"{'dropped':>8} {'precision':>9} {'prec t-0.1':>10} {'recall':>7}")
        for name, r in results.items():
            precision, near = (f"{r[k]:.3f}" if r[k] is not None else "-" for k in ("precision", "near_precision"))
            print(f"{name:<20} {r['rows']:>9,} {r['seconds']:>8.2f} {r['rows'] / r['seconds']:>9,.0f} "
                  f"{r['peak_mb']:>8,.0f} {r['baseline_mb']:>8,.0f} {r['dropped']:>8,} {precision:>9} {near:>10} "
                  f"{r['recall']:>7.3f}")
        if not has_distilabel:
            print("distilabel: not installed")
        ours, loop = results["minhash"], results["datasketch loop"]
        rate = {name: r["rows"] / r["seconds"] for name, r in results.items()}
        note = f" (datasketch measured on the first {loop['rows']:,} rows)" if loop["rows"] < ours["rows"] else ""
        for name in ("minhash", "minhash, no verify"):
            print(f"speed, rows/s: {name} / datasketch loop = {rate[name] / rate['datasketch loop']:.1f}x, "
                  f"/ datasketch bulk = {rate[name] / rate['datasketch bulk']:.1f}x{note}")
        print(f"recall of the planted pairs in the first {subset:,} rows: " +
              ", ".join(f"{name} {r['subset_recall']:.3f}" for name, r in results.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    main()
