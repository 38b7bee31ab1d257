"""Few-shot demonstrations for ``backtranslate``: curated pairs of an earlier version."""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl

from ...errors import FactoryError
from ...hashing import fingerprint
from ...sources import detect_format, read_table, resolve_path
from ...text import has_text


def load_examples(path: str, base_dir: Path, instruction_column: str, response_column: str,
                  id_column: str = "doc_id") -> list[dict]:
    """The (instruction, response) pairs of a version folder, .jsonl, .parquet or .csv file.

    Returns one dict per usable pair with ``instruction``, ``response``, and ``doc_id``,
    ``parent`` and ``generation`` when the file has them (so that a segment is not shown
    pairs from its own document, and the next generation can be numbered).

    Raises:
        FactoryError: the path does not exist, cannot be read, lacks a column, or holds no
            pair with text in both columns.
    """
    resolved = resolve_path(path, base_dir)
    if resolved is None:
        raise FactoryError(f"examples_from '{path}' does not exist (looked in {Path.cwd()}, {base_dir} and the project)")
    try:
        table = read_table(resolved, detect_format(resolved))
    except (FactoryError, OSError, pl.exceptions.PolarsError) as err:
        raise FactoryError(f"examples_from '{path}' cannot be read: {err}") from None
    missing = [c for c in (instruction_column, response_column) if c not in table.columns]
    if missing:
        raise FactoryError(f"examples_from '{path}' has no column {', '.join(repr(c) for c in missing)} "
                           f"(it has {', '.join(table.columns) or 'none'})")
    keep = [instruction_column, response_column] + [c for c in (id_column, "parent", "generation")
                                                     if c in table.columns]
    pairs = []
    for row in table.select(keep).iter_rows(named=True):
        instruction, response = row[instruction_column], row[response_column]
        if has_text(instruction) and has_text(response):
            pairs.append({"instruction": instruction.strip(), "response": response.strip(),
                          "doc_id": row.get(id_column), "parent": row.get("parent"),
                          "generation": row.get("generation")})
    if not pairs:
        raise FactoryError(f"examples_from '{path}' has no row with text in both '{instruction_column}' and "
                           f"'{response_column}'")
    return pairs


def next_generation(pool: list[dict]) -> int:
    """The generation of pairs written with ``pool`` as demonstrations: 1 without any, else one
    more than the highest among them (2 when they carry none)."""
    if not pool:
        return 1
    return max((p["generation"] for p in pool if isinstance(p["generation"], int)), default=1) + 1


def choose_examples(pool: list[dict], segment: dict, count: int, seed: list, *, id_column: str,
                    response_column: str) -> list[dict]:
    """``count`` pairs of ``pool`` for ``segment``'s prompt (fewer if the pool is short), drawn
    with a generator seeded by ``seed`` and the segment: the same draw for the same segment."""
    if not pool:
        return []
    response = " ".join(segment[response_column].split())
    # A second pass over the same documents would otherwise show a segment its own pair, or
    # a neighbouring section's question, which a small model copies instead of reading.
    candidates = [p for p in pool if p["parent"] != segment["parent"] and " ".join(p["response"].split()) != response
                  and (p["doc_id"] is None or str(p["doc_id"]) != segment[id_column])]
    rng = random.Random(fingerprint([*seed, segment["parent"], response]))
    return rng.sample(candidates, min(count, len(candidates)))
