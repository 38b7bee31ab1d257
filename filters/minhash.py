"""``minhash``: drop near-duplicate rows (MinHash signatures, LSH banding, connected components).

The whole pipeline is vectorised so that a million rows take seconds, not hours:

1. polars simplifies each row's text the way production dedup does (datatrove's
   ``simplify_text``: lowercase, numbers to ``0``, punctuation and symbols deleted,
   accents dropped, whitespace collapsed), tokenises it (words, or characters) and
   hashes every token;
2. numpy folds consecutive token hashes into n-gram shingle hashes (32 bits);
3. MinHash: every shingle goes through ``num_perm`` multiply-shift hash functions
   ``((a * x + b) mod 2**64) >> 32``, in blocks of shingles so memory stays bounded, and
   each row keeps the minimum per function (``np.minimum.reduceat``);
4. LSH: the signature is cut into ``bands`` of ``rows_per_band`` values and each band
   hashed to a key, on the same threads; only the keys are kept. Without ``verify`` the
   layout is datasketch's choice for the threshold (false positives and negatives
   weighed alike); with it, one that misses far fewer true pairs (a pair right at the
   threshold is a candidate 95 % of the time at 0.8, against 40 %), since the check
   below removes the extra false candidates.
   Rows with an equal key share a bucket, and each bucket member becomes a candidate
   duplicate of the bucket's first row;
5. with ``verify``, a candidate pair survives only when the exact Jaccard similarity of
   the two rows' shingle sets (hashed again, for the rows in some pair only) is at least
   ``threshold``;
6. the surviving pairs form a graph; each connected component keeps its first row.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from functools import lru_cache
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from factory.config import option
from factory.errors import FactoryError
from factory.hashing import fingerprint
from factory.steps.context import StepContext

from .base import TableFilter

REASON = "near_duplicate"
DUPLICATE_OF = "_duplicate_of"  # internal: shown as `duplicate_of` in rejected/ only

# Rows tokenised at once (one task of the thread pool: at most so many rows and about so
# much text), shingles hashed at once (a num_perm x 8192 matrix of 64-bit values: 8 MiB
# at 128), and pairs verified at once: memory stays bounded however many rows there are
# and however long their texts.
CHUNK_ROWS = 16_384
CHUNK_BYTES = 4 << 20
SHINGLE_BLOCK = 8_192
PAIR_BLOCK = 65_536
PAIR_VALUES = 4 << 20  # shingles of the pairs whose exact Jaccard is computed at once
# How much more a missed true pair weighs than a false candidate when LSH's layout is chosen
# for a verified run (the exact check removes false candidates; nothing brings a missed pair back).
VERIFIED_MISS_WEIGHT = 0.95

_MAX32 = np.uint32(0xFFFFFFFF)
# Odd, so multiplying by it is a bijection modulo 2**64: folding values into a hash with
# `hash * _FOLD + value` keeps the earlier values' bits.
_FOLD = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class MinHashConfig:
    column: str = option("instruction", help="The text column (or give `columns`, not both).")
    columns: list[str] | None = option(None, help="Several text columns, joined with a newline before "
                                                  "shingling, e.g. [instruction, response]; instead of `column`.")
    threshold: float = option(0.8, help="Jaccard similarity of two rows' shingle sets from which the later "
                                        "row is a near-duplicate; strictly between 0 and 1.")
    num_perm: int = option(128, help="Hash functions per MinHash signature; more estimate the similarity "
                                     "more precisely and cost proportionally more time.", min=16)
    ngram: int = option(3, help="Shingle size: words per shingle with `shingle: word` (3 is usual), "
                                "characters with `shingle: char` (set 5 or so there).", min=1)
    shingle: Literal["word", "char"] = option("word", help="`word`: n-grams of words (runs of letters and "
                                                          "digits); `char`: n-grams of characters, whitespace "
                                                          "runs counted as one space (for text without spaces "
                                                          "between words, such as Chinese).")
    lowercase: bool = option(True, help="Lowercase the text before shingling.")
    normalize: bool = option(True, help="Simplify the text before shingling, as datatrove's dedup does: every "
                                        "number becomes `0`, punctuation and symbols are deleted (`os.path.join` "
                                        "and `ospathjoin` are one word), accents are dropped and whitespace runs "
                                        "become one space. Copies that differ only in these still match.")
    seed: int = option(1, help="Seed of the hash functions (datasketch's `seed`); same seed, same result.",
                       min=0, max=2**32 - 1)
    verify: bool = option(True, help="Keep only candidate pairs whose shingle sets have an exact Jaccard "
                                     "similarity of at least `threshold` (no false positives; LSH then runs a "
                                     "layout that misses fewer true pairs). Off: every LSH candidate pair counts.")

    def validate(self):
        problems = []
        if not 0.0 < self.threshold < 1.0:
            problems.append((f"threshold must be strictly between 0 and 1, got {self.threshold}", "threshold",
                             "set it to e.g. 0.8 (higher drops only closer duplicates)"))
        if self.columns is not None and not self.columns:
            problems.append(("`columns` is an empty list", "columns",
                             "name at least one column, or remove `columns` to use `column`"))
        return problems


class MinHashFilter(TableFilter):
    """Drops near-duplicate rows, keeping the first row of each group of near-duplicates.

    Two rows are near-duplicates when the Jaccard similarity of their shingle sets (word
    or character n-grams of ``column``, or of ``columns`` joined) is at least
    ``threshold``, as estimated by MinHash with LSH banding. Near-duplicates are linked
    transitively (connected components): every row of a group but the first is dropped
    with reason ``near_duplicate``. Rows without any shingle (empty or null text) are
    never near-duplicates of anything; exact duplicates among them are another filter's
    job. Same input and ``seed``, same result (with the same polars version: polars does
    not promise that its string hash stays the same across versions).

    Requires: the text column (``instruction``), or every column in ``columns``.
    Dropped rows carry ``duplicate_of`` in ``rejected/``: the text of the kept row they
    duplicate (its first text column). A dropped row's ``drop_detail`` gives
    its Jaccard similarity with that row (exact with ``verify``, else the MinHash estimate).

    Example:
        - minhash: {column: instruction, threshold: 0.8, num_perm: 128}
        - minhash: {columns: [instruction, response], shingle: char, ngram: 5}
    """

    name = "minhash"
    Config = MinHashConfig

    def requires(self):
        return self.text_columns()

    def fingerprint(self) -> str:
        # Token hashes come from polars, which keeps them stable only within a version.
        return fingerprint([super().fingerprint(), pl.__version__])

    def text_columns(self) -> list[str]:
        return list(self.config.columns) if self.config.columns else [self.config.column]

    def keep(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        ctx.progress.reset(total=table.height)
        return self.verdicts(table, [self.partial(table, ctx.progress)], ctx)

    def partial(self, rows: pl.DataFrame, progress=None) -> tuple[np.ndarray, np.ndarray]:
        """The LSH band keys of ``rows`` and whether each row has shingles (row-parallel)."""
        self._check_text_columns(rows)
        bands, rows_per_band = band_layout(self.config)
        texts = rows.select(text_of(self.text_columns())).to_series()
        band_keys = np.empty((len(texts), bands), dtype=np.uint64)
        has_shingles = np.zeros(len(texts), dtype=bool)
        to_keys = lambda signatures: lsh_band_keys(signatures, bands, rows_per_band)  # noqa: E731
        for chunk, keys, counts in signatures_of(texts, self.config, then=to_keys):
            band_keys[chunk] = keys
            has_shingles[chunk] = counts > 0
            if progress is not None:
                progress.update(len(counts))
        return band_keys, has_shingles

    def combine(self, table: pl.DataFrame, partials: list, ctx: StepContext | None = None) -> pl.DataFrame:
        return self.apply(table, self.verdicts(table, partials, ctx or StepContext()))

    def verdicts(self, table: pl.DataFrame, partials: list, ctx: StepContext) -> pl.DataFrame:
        """Each row's verdict from the band keys of every row (the partials, in order)."""
        self._check_text_columns(table)
        texts = table.select(text_of(self.text_columns())).to_series()
        first, similarity, report = near_duplicates(texts, partials, self.config)
        ctx.report.update(report)
        dropped = first != np.arange(len(texts))
        kept_text = table[self.text_columns()[0]].cast(pl.String).gather(first)
        return pl.DataFrame({"dropped": dropped, "first": first, "similarity": similarity,
                             "kept_text": kept_text}).select(
            pl.when("dropped").then(pl.lit(REASON)).alias("reason"),
            pl.when("dropped").then(pl.format(("Jaccard" if self.config.verify else "estimated Jaccard") +
                                              " {} with the kept row (position {} in the step's input)",
                                              pl.col("similarity").round(2), "first")).alias("detail"),
            pl.when("dropped").then(pl.col("kept_text")).alias(DUPLICATE_OF),
        )

    def _check_text_columns(self, table: pl.DataFrame) -> None:
        for name in self.text_columns():
            if table.schema[name] not in (pl.String, pl.Null):  # Null: a column with no value at all
                raise FactoryError(f"{self.label}: column '{name}' holds {table.schema[name]}, "
                                   "not text; point `column` (or `columns`) at text columns")


def near_duplicates(texts: pl.Series, partials: list, c: MinHashConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """Candidate pairs from the band keys of every row, verification, then components.

    Returns:
        For each row the first row of its group of near-duplicates (itself if it has none),
        its Jaccard similarity with that row (exact with ``verify``, else estimated), and what the
        manifest reports.
    """
    bands, rows_per_band = band_layout(c)
    band_keys = np.concatenate([p[0] for p in partials]) if partials else np.empty((0, bands), np.uint64)
    has_shingles = np.concatenate([p[1] for p in partials]) if partials else np.empty(0, bool)
    left, right = candidate_pairs(band_keys, np.flatnonzero(has_shingles))
    candidates = len(left)
    similarity_of = (exact_similarity if c.verify else pair_similarity)(texts, left, right, c)
    if c.verify:
        keep = similarity_of(left, right) >= c.threshold
        left, right = left[keep], right[keep]
    first = first_of_component(len(texts), left, right)
    dropped = first != np.arange(len(texts))
    # Through transitive links a dropped row may be further from its kept row than
    # `threshold`: the detail says how far, for whoever reads the rejected rows.
    similarity = np.zeros(len(texts))
    similarity[dropped] = similarity_of(np.flatnonzero(dropped), first[dropped])
    sizes = np.bincount(first, minlength=len(texts))
    return first, similarity, {"clusters": int(np.count_nonzero(sizes > 1)), "dropped": int(dropped.sum()),
                               "bands": bands, "rows_per_band": rows_per_band, "candidate_pairs": candidates,
                               "verified_pairs": len(left)}


def text_of(columns: list[str]) -> pl.Expr:
    """One text per row: the columns joined by newlines."""
    parts = [pl.col(name).cast(pl.String) for name in columns]
    return parts[0] if len(parts) == 1 else pl.concat_str(parts, separator="\n", ignore_nulls=True)


def prepared(texts: pl.Series, config: MinHashConfig) -> pl.Series:
    """The texts as they are shingled: lowercased and simplified as configured."""
    if config.normalize:
        return normalized_text(texts, config.lowercase)
    return texts.str.to_lowercase() if config.lowercase else texts


def normalized_text(texts: pl.Series, lowercase: bool = True) -> pl.Series:
    """datatrove's text simplification for dedup, in polars: lowercase (if asked); accents
    dropped (NFD, then no combining marks); punctuation and symbols deleted; a run of digits
    becomes ``0``; whitespace runs become one space. datatrove turns punctuation into spaces,
    after the numbers; deleting it, before them, makes ``e.g.`` and ``eg``, or ``[1,2]`` and
    ``12``, one word, as copies that lost their punctuation need."""
    if lowercase:
        texts = texts.str.to_lowercase()
    # Unicode decomposition is the costliest part and a no-op on ASCII: only other rows take it.
    accented = texts.str.contains(r"[^\x00-\x7F]").fill_null(False).arg_true()
    if len(accented):
        texts = texts.scatter(accented, texts.gather(accented).str.normalize("NFD").str.replace_all(r"\p{Mn}+", ""))
    return (texts.str.replace_all(r"[\p{P}\p{S}]+", "")
            .str.replace_all(r"\d+", "0")
            .str.replace_all(r"\s\s+|[^\S ]", " ")  # a single space, the common case, is left alone
            .str.strip_chars())


def tokens_of(texts: pl.Series, config: MinHashConfig) -> pl.Series:
    """Each text's tokens: words (runs of letters and digits; with ``normalize``, the
    space-separated words of the simplified text), or characters."""
    if config.shingle == "word":
        if config.normalize:  # no punctuation is left: a split is the same as \w+ and several times faster
            return texts.replace("", None).str.split(" ")
        return texts.str.extract_all(r"\w+")
    if not config.normalize:
        texts = texts.str.replace_all(r"\s+", " ").str.strip_chars()
    return texts.replace("", None).str.split("")


def exact_similarity(texts: pl.Series, left: np.ndarray, right: np.ndarray, config: MinHashConfig):
    """A function giving the exact Jaccard similarity of the shingle sets of pairs of rows among
    ``left`` and ``right`` (sets of the 32-bit shingle hashes; the rows in some pair only are
    hashed again)."""
    involved = distinct(np.concatenate([left, right]))
    prepared_texts = prepared(texts.gather(involved), config)
    counts, shingles = shingle_hashes(tokens_of(prepared_texts, config), config.ngram, config.seed)
    # Each row's set: its shingles sorted and without repeats, rows one after the other.
    row_of = np.repeat(np.arange(len(counts), dtype=np.uint64), counts)
    keyed = distinct((row_of << np.uint64(32)) | shingles)
    rows_in_sets = (keyed >> np.uint64(32)).astype(np.int64)
    sizes = np.bincount(rows_in_sets, minlength=len(counts))
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    values = keyed & np.uint64(0xFFFFFFFF)

    def members(rows: np.ndarray, tags: np.ndarray) -> np.ndarray:
        """The sets of ``rows``, each value tagged with its pair: ``tag << 32 | value``."""
        lengths = sizes[rows]
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return (np.repeat(tags.astype(np.uint64), lengths) << np.uint64(32)) | values[
            np.repeat(starts[rows], lengths) + offsets]

    def jaccard(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = np.searchsorted(involved, x), np.searchsorted(involved, y)
        shares = np.zeros(len(x))
        per_pair = np.maximum(sizes[x] + sizes[y], 1)
        bounds = np.searchsorted(np.cumsum(per_pair), np.arange(0, per_pair.sum(), PAIR_VALUES), side="right")
        for start, stop in zip(bounds, np.r_[bounds[1:], len(x)]):
            if start >= stop:
                continue
            tags = np.arange(stop - start)
            both = np.sort(np.concatenate([members(x[start:stop], tags), members(y[start:stop], tags)]))
            # A value in both sets of a pair comes twice in a row (each set holds it once).
            common = np.bincount((both[1:][both[1:] == both[:-1]] >> np.uint64(32)).astype(np.int64),
                                 minlength=stop - start)
            union = sizes[x[start:stop]] + sizes[y[start:stop]] - common
            shares[start:stop] = np.where(union > 0, common / np.maximum(union, 1), 0.0)
        return shares

    return jaccard


def pair_similarity(texts: pl.Series, left: np.ndarray, right: np.ndarray, config: MinHashConfig):
    """A function giving the estimated Jaccard similarity of pairs of rows among ``left`` and
    ``right``. The signatures are computed again, of the rows in some pair only: keeping every
    row's from the first pass would cost num_perm x 4 bytes a row (512 MB a million rows at 128)."""
    involved = distinct(np.concatenate([left, right]))
    signatures = np.empty((len(involved), config.num_perm), dtype=np.uint32)
    for rows, chunk, _ in signatures_of(texts.gather(involved), config):
        signatures[rows] = chunk

    def estimated_jaccard(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return agreement(signatures, np.searchsorted(involved, x), np.searchsorted(involved, y))

    return estimated_jaccard


def signatures_of(texts: pl.Series, config: MinHashConfig,
                  then: Callable[[np.ndarray], np.ndarray] | None = None) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """The MinHash signatures of ``texts``, chunk by chunk and in order.

    Chunks are hashed on a few threads (numpy and polars release the GIL); no more
    than two a thread are in flight, so memory stays bounded.

    Args:
        then: applied to each chunk's signatures on its thread (e.g. cut them into LSH band keys).

    Yields:
        The chunk's rows, their signatures (rows x num_perm, uint32; all 0xFFFFFFFF
        for a row without shingles) or what ``then`` made of them, and their numbers of shingles.
    """
    a, b = permutations(config.num_perm, config.seed)

    def sign(rows: slice):
        chunk = prepared(texts[rows], config)
        counts, shingles = shingle_hashes(tokens_of(chunk, config), config.ngram, config.seed)
        signatures = np.full((len(chunk), config.num_perm), _MAX32, dtype=np.uint32)
        minhash(shingles, counts, a, b, out=signatures)
        return rows, signatures if then is None else then(signatures), counts

    workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for rows in chunks(texts.str.len_bytes().fill_null(0).to_numpy()):
            pending.append(pool.submit(sign, rows))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def chunks(text_bytes: np.ndarray) -> list[slice]:
    """Consecutive slices of rows with at most ``CHUNK_ROWS`` rows and about ``CHUNK_BYTES`` of text."""
    ends = np.cumsum(text_bytes, dtype=np.int64)
    total = int(ends[-1]) if len(ends) else 0
    by_size = np.searchsorted(ends, np.arange(CHUNK_BYTES, total, CHUNK_BYTES))
    starts = np.union1d(np.arange(0, len(text_bytes), CHUNK_ROWS), by_size).tolist()
    return [slice(start, stop) for start, stop in zip(starts, starts[1:] + [len(text_bytes)])]


def band_layout(config: MinHashConfig) -> tuple[int, int]:
    """The step's (bands, rows per band): datasketch's choice, or one that favours recall when
    candidate pairs are verified exactly."""
    return lsh_parameters(config.threshold, config.num_perm, VERIFIED_MISS_WEIGHT if config.verify else 0.5)


@lru_cache(maxsize=64)
def lsh_parameters(threshold: float, num_perm: int, false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows per band) as datasketch's ``MinHashLSH`` chooses them for ``threshold``.

    Of every ``bands x rows <= num_perm``, the one with the least area under the false-positive
    curve ``1 - (1 - s**r)**b`` below the threshold plus the false-negative area above it,
    weighted (equal weights by default, ``MinHashLSH``'s default). datasketch integrates with scipy.integrate,
    whose import alone takes longer than a 100k-row dedup; 64-point Gauss-Legendre is exact
    to far below the differences between candidates here (a test checks the choice against it).
    """
    nodes, weights = np.polynomial.legendre.leggauss(64)
    bands = np.concatenate([np.full(num_perm // b, b) for b in range(1, num_perm + 1)])
    rows = np.concatenate([np.arange(1, num_perm // b + 1) for b in range(1, num_perm + 1)])

    def area(low: float, high: float, false_negative: bool) -> np.ndarray:
        s = (high - low) / 2 * nodes + (high + low) / 2
        collide = 1 - (1 - s[None, :] ** rows[:, None]) ** bands[:, None]
        return (high - low) / 2 * ((1 - collide if false_negative else collide) @ weights)

    error = (1 - false_negative_weight) * area(0.0, threshold, False) + \
        false_negative_weight * area(threshold, 1.0, True)
    best = int(np.argmin(error))  # the first of equal errors, as datasketch's strict `<` keeps
    return int(bands[best]), int(rows[best])


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The multiply-shift hash functions: random odd multipliers ``a`` and offsets ``b``."""
    rng = np.random.RandomState(seed)
    a = rng.randint(0, 2**64, size=num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.randint(0, 2**64, size=num_perm, dtype=np.uint64)
    return a, b


def shingle_hashes(tokens: pl.Series, ngram: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The 32-bit hashes of each row's n-gram shingles, rows one after the other.

    A row with fewer than ``ngram`` tokens (but at least one) has one shingle, all its
    tokens; a row with no token has none.

    Args:
        tokens: one list of token strings per row (null for no text).
        ngram: tokens per shingle.
        seed: seed of the token hash.

    Returns:
        Shingles per row, and the shingle hashes (uint64 holding 32 bits) in row order.
    """
    lengths = tokens.list.len().fill_null(0).to_numpy().astype(np.int64)
    # Whether exploding an empty list yields a null differs between polars versions.
    token_hash = tokens.explode().drop_nulls().hash(seed).to_numpy()
    total = len(token_hash)
    row_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    position = np.arange(total) - row_start
    row_length = np.repeat(lengths, lengths)
    folded = token_hash.copy()
    for k in range(1, ngram):
        inside = position[:total - k] + k < row_length[:total - k]
        folded[:total - k] = np.where(inside, folded[:total - k] * _FOLD + token_hash[k:],
                                      folded[:total - k])
    starts = position <= np.maximum(row_length - ngram, 0)
    counts = np.where(lengths > 0, np.maximum(lengths - ngram + 1, 1), 0)
    return counts, _mix64(folded[starts]) >> np.uint64(32)


def minhash(shingles: np.ndarray, counts: np.ndarray, a: np.ndarray, b: np.ndarray, *, out: np.ndarray) -> None:
    """Lowers ``out`` (rows x num_perm, uint32) to each row's MinHash signature.

    Shingles go through the hash functions a block at a time; a row split between two
    blocks takes the minimum of both.
    """
    row_of = np.repeat(np.arange(len(counts)), counts)
    # Hash functions along the first axis: numpy's reduceat is several times faster
    # over contiguous segments of a row than over rows of a matrix.
    buffer = np.empty((len(a), SHINGLE_BLOCK), dtype=np.uint64)
    a, b = a[:, None], b[:, None]
    for start in range(0, len(shingles), SHINGLE_BLOCK):
        x = shingles[start:start + SHINGLE_BLOCK]
        rows = row_of[start:start + SHINGLE_BLOCK]
        hashed = buffer[:, :len(x)]
        np.multiply(a, x, out=hashed)
        hashed += b
        segments = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        # The shift is monotone, so it commutes with the minimum: shift only the minima.
        lowest = (np.minimum.reduceat(hashed, segments, axis=1) >> np.uint64(32)).astype(np.uint32).T
        owners = rows[segments]
        out[owners] = np.minimum(out[owners], lowest)


def lsh_band_keys(signatures: np.ndarray, bands: int, rows_per_band: int) -> np.ndarray:
    """One 64-bit key per row and band: equal bands, equal keys (and unequal, almost surely not)."""
    banded = signatures[:, :bands * rows_per_band].reshape(len(signatures), bands, rows_per_band)
    keys = np.zeros((len(signatures), bands), dtype=np.uint64)
    for column in range(rows_per_band):  # all bands at once: a few large numpy calls, not bands x rows small ones
        keys = _mix64(keys * _FOLD + banded[:, :, column])
    return keys


def candidate_pairs(band_keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of ``rows`` that share a bucket in some band, each row paired with its bucket's first.

    Returns:
        Later rows and the earlier rows they collide with (positions), each pair once.
    """
    if len(rows) < 2:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    pairs = []
    for band in range(band_keys.shape[1]):
        keys = band_keys[rows, band]
        order = np.argsort(keys)  # unstable is several times faster; bucket order does not matter below
        sorted_keys = keys[order]
        members = rows[order]
        opens = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
        first = np.minimum.reduceat(members, np.flatnonzero(opens))[np.cumsum(opens) - 1]
        later = members != first
        pairs.append(members[later] * len(band_keys) + first[later])
    unique = distinct(np.concatenate(pairs))
    return unique // len(band_keys), unique % len(band_keys)


def agreement(signatures: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The share of equal signature values of each pair: the MinHash estimate of their Jaccard."""
    shares = np.empty(len(left), dtype=np.float64)
    for start in range(0, len(left), PAIR_BLOCK):
        block = slice(start, start + PAIR_BLOCK)
        equal = signatures[left[block]] == signatures[right[block]]
        shares[block] = np.count_nonzero(equal, axis=1) / signatures.shape[1]
    return shares


def first_of_component(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """For each of ``n`` rows, the lowest row connected to it by the pairs (itself if none)."""
    graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first_rows = np.full(labels.max() + 1 if len(labels) else 0, n, dtype=np.int64)
    np.minimum.at(first_rows, labels, np.arange(n))
    return first_rows[labels]


def distinct(values: np.ndarray) -> np.ndarray:
    """``np.unique`` by sorting: numpy 2.4's hash-based unique took 3 s where sorting takes 0.02 s
    (1.6M 64-bit values)."""
    ordered = np.sort(values)
    return ordered[np.r_[True, ordered[1:] != ordered[:-1]]] if len(ordered) else ordered


def _mix64(x: np.ndarray) -> np.ndarray:
    """The MurmurHash3 64-bit finalizer: spreads every input bit over every output bit."""
    x = x ^ (x >> np.uint64(33))
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))
