"""``decontaminate``: drop rows that share word n-grams with an evaluation set.

Texts are normalised (lowercase, letters and digits only) and split into words. A row is
contaminated when it contains one of an eval item's 13-grams (``ngram``); an eval item
shorter than that counts as one n-gram of its own length, so a short eval question
copied into a training row is still found. Items shorter than ``min_words`` match only a
row whose whole text is the same. The step reports which eval items matched.

N-grams are hashed in bulk with numpy (64-bit, position-weighted sums of word hashes), so
a million rows take seconds, not a Python loop per n-gram.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl

from factory.config import option
from factory.errors import FactoryError, Problem
from factory.hashing import fingerprint
from factory.sources import Source, build_source
from factory.steps.context import StepContext

from .base import TableFilter

_WEIGHTS = np.random.RandomState(20240521).randint(1, 2**62, size=512, dtype=np.int64).astype(np.uint64) | 1


def _words(frame: pl.DataFrame, columns: list[str]) -> pl.Series:
    text = pl.concat_str([pl.col(c).cast(pl.String).fill_null("") for c in columns], separator=" ")
    norm = text.str.to_lowercase().str.replace_all(r"[^\p{L}\p{N}]+", " ").str.strip_chars()
    return frame.select(pl.when(norm == "").then(pl.lit([], dtype=pl.List(pl.String)))
                        .otherwise(norm.str.split(" ")).alias("words"))["words"]


def _hash_grams(words: pl.Series, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every n-gram of each row for the requested size per row.

    Args:
        words: a list-of-words per row.
        sizes: the n-gram size for each row (0: skip the row).

    Returns:
        (row index, n-gram size, hash) arrays, one entry per n-gram.
    """
    lengths = words.list.len().to_numpy().astype(np.int64)
    flat = words.explode().drop_nulls()
    word_hash = flat.hash(seed=7).to_numpy().astype(np.uint64) if len(flat) else np.zeros(0, np.uint64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
    counts = np.where((sizes > 0) & (lengths >= sizes), lengths - sizes + 1, 0)
    rows = np.repeat(np.arange(len(lengths)), counts)
    if rows.size == 0:
        return rows, rows, np.zeros(0, np.uint64)
    starts = np.repeat(offsets, counts) + (np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts))
    n = sizes[rows]
    acc = np.zeros(rows.size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(int(n.max())):
            use = n > k
            acc[use] += word_hash[starts[use] + k] * _WEIGHTS[k]
        acc += n.astype(np.uint64) * _WEIGHTS[-1]
    return rows, n, acc


@dataclass
class DecontaminateConfig:
    eval: str | dict[str, Any] = option(help="The evaluation set: a .jsonl/.json/.parquet/.csv file or a saved "
                                             "dataset folder (relative to the working folder, the recipe's folder "
                                             "or the project), or a mapping as `source:` takes, e.g. {hub: "
                                             "openai/gsm8k, config: main, split: test}.")
    eval_columns: list[str] = option(default_factory=lambda: ["instruction"],
                                     help="Eval columns whose text must not leak (joined with a space; "
                                          "`eval_column: x` for one).")
    eval_id_column: str | None = option(None, help="Eval column naming each item in the report (default: "
                                                   "its position, eval[17]).")
    eval_split: str = option("train", help="Split to read when `eval` is a saved DatasetDict's folder (in the "
                                           "mapping form, its `split:`).")
    eval_format: Literal["auto", "jsonl", "json", "parquet", "csv", "hf"] = option(
        "auto", help="Eval file format when `eval` is a path (in the mapping form, its `format:`).")
    columns: list[str] = option(default_factory=lambda: ["instruction"],
                                help="Our columns to check (joined with a space), e.g. [instruction, response] "
                                     "(`column: x` for one).")
    ngram: int = option(13, help="Word n-gram size (13, as in GPT-3's decontamination).", min=1, max=500)
    min_words: int = option(5, help="Eval items with fewer words match only identical whole texts.", min=1)


class Decontaminate(TableFilter):
    """Drops rows that overlap an evaluation set (reason ``contaminated``).

    Requires: the ``columns`` (default ``instruction``).
    Dropped rows carry ``matched_eval`` in ``rejected/`` (the eval items they matched); the
    manifest's report gives the number of eval items matched and their ids.

    Example:
        - decontaminate: {eval: data/eval/arithmetic.jsonl, columns: [instruction, response]}
    """

    name = "decontaminate"
    Config = DecontaminateConfig

    def requires(self):
        return list(self.config.columns)

    def eval_source(self, problems: list[Problem] | None = None) -> Source | None:
        return eval_set(self.config, self.base_dir, [] if problems is None else problems)

    def check(self):
        problems: list[Problem] = []
        source = self.eval_source(problems)
        if source is None:
            return [(p.message, "eval", p.fix) for p in problems]
        try:
            columns = source.columns()
        except FactoryError as err:
            return [(str(err), "eval", "check the eval set")]
        wanted = list(self.config.eval_columns) + ([self.config.eval_id_column] if self.config.eval_id_column else [])
        return [(f"the eval set has no column '{col}' (it has {', '.join(columns)})", "eval_columns",
                 "name one of its columns") for col in wanted if col not in columns]

    def fingerprint(self) -> str:
        # The eval set's identity (a file's size and time, a Hub dataset's commit), and polars'
        # version (its word hashes may change with it).
        source = self.eval_source()
        path = source.resolved_path if source else None
        stat = path.stat() if path and path.is_file() else None
        return fingerprint([super().fingerprint(), str(path), stat.st_size if stat else None,
                            stat.st_mtime if stat else None, source.describe() if source and source.hub_ref else None,
                            pl.__version__])

    def keep(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        c = self.config
        problems: list[Problem] = []
        source = self.eval_source(problems)
        if source is None:
            raise FactoryError(f"decontaminate: {problems[0].message}")
        evals = source.read()
        eval_ids = (evals[c.eval_id_column].cast(pl.String).to_list() if c.eval_id_column
                    else [f"eval[{i}]" for i in range(evals.height)])
        found = matches(_words(evals, c.eval_columns), _words(table, c.columns), c.ngram, c.min_words)
        names = pl.DataFrame({"e": np.arange(len(eval_ids), dtype=np.int64), "eval_id": eval_ids})
        per_row = (found.with_columns(pl.col("r", "e").cast(pl.Int64)).join(names, on="e").sort("r", "e")
                   .group_by("r", maintain_order=True).agg(pl.col("eval_id").alias("matched_eval")))
        matched_eval = (pl.DataFrame({"r": np.arange(table.height, dtype=np.int64)})
                        .join(per_row, on="r", how="left", maintain_order="left")["matched_eval"])
        matched_items = sorted(set(found["e"].to_list()))
        ctx.report.update({"eval_set": source.describe(), "eval_items": evals.height,
                           "eval_items_matched": len(matched_items), "rows_dropped": per_row.height,
                           "matched_eval_ids": [eval_ids[i] for i in matched_items[:100]]})
        return pl.DataFrame({"_matched_eval": matched_eval.cast(pl.List(pl.String))}).with_columns(
            pl.when(pl.col("_matched_eval").is_not_null()).then(pl.lit("contaminated")).alias("reason"))


def eval_set(config: DecontaminateConfig, base_dir, problems: list[Problem]) -> Source | None:
    """The eval set as a :class:`~factory.sources.Source` (a path with ``eval_split`` and
    ``eval_format``, or a mapping in the form ``source:`` takes)."""
    data = config.eval if isinstance(config.eval, dict) else {
        "path": config.eval, "split": config.eval_split, "format": config.eval_format}
    return build_source(data, ("eval",), problems, base_dir, what="eval set")


def matches(eval_words: pl.Series, row_words: pl.Series, ngram: int, min_words: int) -> pl.DataFrame:
    """Each (row ``r``, eval item ``e``) pair that shares an n-gram: long eval items give their
    ``ngram``-grams, items between ``min_words`` and ``ngram`` words one gram of their length,
    and shorter items match only a row whose whole text is the same."""
    eval_len = eval_words.list.len().to_numpy().astype(np.int64)
    eval_sizes = np.where(eval_len >= ngram, ngram, np.where(eval_len >= min_words, eval_len, 0))
    e_rows, e_sizes, e_hash = _hash_grams(eval_words, eval_sizes)
    row_len = row_words.list.len().to_numpy().astype(np.int64)
    found = []
    for size in np.unique(e_sizes):
        r_rows, _, r_hash = _hash_grams(row_words, np.full(len(row_len), size, dtype=np.int64))
        eval_side = pl.DataFrame({"h": e_hash[e_sizes == size], "e": e_rows[e_sizes == size]}).unique()
        found.append(pl.DataFrame({"h": r_hash, "r": r_rows}).join(eval_side, on="h").select("r", "e"))
    short = np.where((eval_len > 0) & (eval_len < min_words), eval_len, 0)
    if short.any():
        s_rows, _, s_hash = _hash_grams(eval_words, short)
        whole = np.where((row_len > 0) & (row_len < min_words), row_len, 0)
        w_rows, _, w_hash = _hash_grams(row_words, whole)
        found.append(pl.DataFrame({"h": w_hash, "r": w_rows})
                     .join(pl.DataFrame({"h": s_hash, "e": s_rows}).unique(), on="h").select("r", "e"))
    return (pl.concat(found) if found else pl.DataFrame(schema={"r": pl.Int64, "e": pl.Int64})).unique()
