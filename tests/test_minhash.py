"""The `minhash` filter: near-duplicates dropped and pointed at their first row, the rest kept."""

from __future__ import annotations

import json
import re

import numpy as np
import polars as pl
import pytest

from factory.cli import main
from factory.errors import FactoryError, RecipeError
from factory.recipe import load_recipe
from factory.steps.context import StepContext
from factory.steps.drops import DROP, DROP_DETAIL
from factory.store import read_manifest, read_version
from filters import minhash
from filters.minhash import MinHashConfig, MinHashFilter

VOCABULARY = [f"{a}{b}{c}" for a in "bcdfghklmnprst" for b in "aeiou" for c in "dgklmnrstxz"]  # 770 words


def sentence(rng: np.random.Generator, words: int) -> list[str]:
    return [VOCABULARY[i] for i in rng.integers(0, len(VOCABULARY), size=words)]


def dedup(texts, **options) -> pl.DataFrame:
    step = MinHashFilter(MinHashConfig(**options))
    return step.process(pl.DataFrame({"instruction": texts}, schema={"instruction": pl.String}))


def pointers(out: pl.DataFrame, column: str = "instruction") -> list:
    """Where each row's `duplicate_of` points: the position of the first row with that text."""
    texts = out[column].to_list()
    return [None if kept is None else texts.index(kept) for kept in out["_duplicate_of"].to_list()]


def dropped_rows(out: pl.DataFrame) -> list[int]:
    return out.with_row_index().filter(pl.col(DROP).is_not_null())["index"].to_list()


def shingles(text: str, n: int = 3) -> set[tuple[str, ...]]:
    tokens = re.findall(r"\w+", text.lower())
    return {tuple(tokens[i:i + n]) for i in range(max(len(tokens) - n + 1, 1))} if tokens else set()


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def test_one_word_changed_is_dropped_and_points_to_the_first_occurrence():
    rng = np.random.default_rng(0)
    words = sentence(rng, 60)
    edited = list(words)
    edited[30] = "different"
    again = list(words)
    again[45] = "changed"
    texts = [" ".join(words), " ".join(sentence(rng, 60)), " ".join(edited), " ".join(again)]
    assert jaccard(texts[0], texts[2]) == pytest.approx(55 / 61)
    out = dedup(texts)
    assert out[DROP].to_list() == [None, None, "near_duplicate", "near_duplicate"]
    assert pointers(out) == [None, None, 0, 0]
    assert out["_duplicate_of"].dtype == pl.String
    assert re.fullmatch(r"Jaccard 0\.\d+ with the kept row \(position 0 in the step's input\)",
                        out[DROP_DETAIL][2])
    assert out["instruction"].to_list() == texts  # same rows, same order


def test_distinct_texts_are_all_kept():
    rng = np.random.default_rng(1)
    texts = [" ".join(sentence(rng, int(rng.integers(10, 40)))) for _ in range(300)]
    out = dedup(texts)
    assert out[DROP].null_count() == 300
    assert out["_duplicate_of"].null_count() == 300


def test_exact_duplicates_are_dropped_whatever_the_case():
    texts = ["Explain how a rainbow forms after the rain.", "Write a haiku about the sea.",
             "explain how a RAINBOW forms after the rain", "Explain how a rainbow forms after the rain."]
    out = dedup(texts)
    assert pointers(out) == [None, None, 0, 0]
    assert pointers(dedup(texts, lowercase=False)) == [None, None, None, 0]


@pytest.mark.parametrize("verify", [True, False])
def test_rows_without_text_are_never_near_duplicates(verify):
    texts = ["", None, "   ", "", None, "?!", "Compute 17 times 23.", "Compute 17 times 23."]
    out = dedup(texts, verify=verify)
    assert pointers(out) == [None] * 7 + [6]


@pytest.mark.parametrize("texts", [[], ["only one row"], ["one row", None]])
def test_a_table_without_two_texts_has_no_pairs(texts):
    table = pl.DataFrame({"instruction": texts}, schema={"instruction": pl.String})
    out = MinHashFilter(MinHashConfig()).process(table, ctx := StepContext())
    assert out[DROP].to_list() == [None] * len(texts)
    assert (ctx.report["candidate_pairs"], ctx.report["verified_pairs"], ctx.report["dropped"],
            ctx.report["clusters"]) == (0, 0, 0, 0)


def test_a_pair_at_exactly_the_threshold_is_a_near_duplicate():
    # Ten pairs: 12 words and their first 10 (10 and 8 word 3-grams): Jaccard exactly 0.8. Which
    # pairs LSH offers is up to the hashes (each about 95 % at the threshold); each one offered is dropped.
    rng = np.random.default_rng(11)
    texts = []
    for _ in range(10):
        words = sentence(rng, 12)
        texts += [" ".join(words), " ".join(words[:10])]
    assert {jaccard(texts[i], texts[i + 1]) for i in range(0, 20, 2)} == {0.8}
    out = MinHashFilter(MinHashConfig(threshold=0.8)).process(pl.DataFrame({"instruction": texts}),
                                                              ctx := StepContext())
    candidates = ctx.report["candidate_pairs"]
    assert candidates > 0 and ctx.report["verified_pairs"] == candidates
    assert ctx.report["dropped"] == ctx.report["clusters"] == candidates
    assert all(row % 2 == 1 and pointer == row - 1 for row, pointer in enumerate(pointers(out)) if pointer is not None)


def test_short_texts_are_one_shingle():
    out = dedup(["hello", "Hello!", "hello there", "goodbye"])
    assert pointers(out) == [None, 0, None, None]


def test_same_input_and_seed_same_output():
    rng = np.random.default_rng(2)
    base = [sentence(rng, 30) for _ in range(50)]
    texts = [" ".join(w) for w in base] + [" ".join(w[:-1] + ["tail"]) for w in base[:20]]
    first, second = dedup(texts), dedup(texts)
    assert first.equals(second)
    assert dropped_rows(first) == list(range(50, 70))
    other_seed = dedup(texts, seed=7)
    assert dropped_rows(other_seed) == list(range(50, 70))
    # Verified pairs carry their exact Jaccard, whatever the hash functions; the estimates differ.
    assert other_seed[DROP_DETAIL].to_list() == first[DROP_DETAIL].to_list()
    estimates = [dedup(texts, seed=seed, verify=False)[DROP_DETAIL].to_list() for seed in (1, 7)]
    assert estimates[0] != estimates[1]


def test_columns_joins_every_column():
    rng = np.random.default_rng(3)
    task = " ".join(sentence(rng, 12))
    table = pl.DataFrame({"instruction": [task, task, task],
                          "response": [" ".join(sentence(rng, 40)), " ".join(sentence(rng, 40)), None]})
    instruction_only = MinHashFilter(MinHashConfig()).process(table)
    assert pointers(instruction_only) == [None, 0, 0]
    step = MinHashFilter(MinHashConfig(columns=["instruction", "response"]))
    assert step.requires() == ["instruction", "response"]
    assert step.process(table)["_duplicate_of"].to_list() == [None, None, None]


def test_columns_are_joined_by_a_line_break_and_a_missing_one_is_left_out():
    words = sentence(np.random.default_rng(8), 30)
    split = [(" ".join(words[:10]), " ".join(words[10:])), (" ".join(words[:20]), " ".join(words[20:])),
             (" ".join(words), None), (None, " ".join(words))]
    table = pl.DataFrame(split, schema={"instruction": pl.String, "response": pl.String}, orient="row")
    out = MinHashFilter(MinHashConfig(columns=["instruction", "response"])).process(table)
    assert out[DROP].to_list() == [None] + ["near_duplicate"] * 3  # the same 30 words, cut in other places


@pytest.mark.parametrize("normalize", [True, False])
def test_char_shingles_of_empty_rows_are_none(normalize):
    assert dedup(["", "", "abc def", "abc def", None], shingle="char", ngram=3, normalize=normalize)[DROP].to_list() \
        == [None, None, None, "near_duplicate", None]


def test_without_normalize_char_shingles_still_collapse_whitespace_and_case_is_an_option():
    assert dropped_rows(dedup(["a  b", "A b", "a\tb"], shingle="char", ngram=3, normalize=False)) == [1, 2]
    texts = ["Hello world there friend", "hello world there friend"]
    assert dropped_rows(dedup(texts, normalize=False)) == [1]
    assert dropped_rows(dedup(texts, normalize=False, lowercase=False)) == []


def test_char_shingles_catch_a_changed_character():
    texts = ["Summarise the plot of Hamlet in three sentences for a ten-year-old reader.",
             "Summarise the plot of Hamlet in three sentenses for a ten-year-old reader.",
             "Summarise the plot of Macbeth in two paragraphs for a university student."]
    # Words: 'sentenses' is another word, in 3 of the 11 word 3-grams (Jaccard 0.57); characters:
    # 5 of the 67 character 5-grams (Jaccard 0.86).
    assert pointers(dedup(texts, threshold=0.7)) == [None, None, None]
    out = dedup(texts, shingle="char", ngram=5, threshold=0.7)
    assert pointers(out) == [None, 0, None]


def test_the_threshold_decides():
    rng = np.random.default_rng(4)
    words = sentence(rng, 40)
    texts = [" ".join(words), " ".join(words[:27] + sentence(rng, 13))]
    assert jaccard(*texts) == pytest.approx(0.49, abs=0.01)
    assert pointers(dedup(texts, threshold=0.8)) == [None, None]
    assert pointers(dedup(texts, threshold=0.3)) == [None, 0]


def test_precision_and_recall_against_exact_jaccard():
    rng = np.random.default_rng(5)
    originals = [sentence(rng, int(rng.integers(60, 90))) for _ in range(400)]
    texts = [" ".join(w) for w in originals]
    planted = {}
    for original in rng.choice(len(originals), size=150, replace=False):
        copy = list(originals[original])
        copy[int(rng.integers(0, len(copy)))] = VOCABULARY[int(rng.integers(0, len(VOCABULARY)))]
        planted[len(texts)] = int(original)
        texts.append(" ".join(copy))
    step, ctx = MinHashFilter(MinHashConfig()), StepContext()
    out = step.process(pl.DataFrame({"instruction": texts}), ctx)
    links = {row: kept for row, kept in enumerate(pointers(out)) if kept is not None}
    assert sorted(links) == dropped_rows(out)
    for row, kept in links.items():
        assert jaccard(texts[row], texts[kept]) >= 0.8 - 0.15, (row, kept)
    recall = np.mean([row in links for row in planted])
    assert recall >= 0.9
    assert ctx.report["dropped"] == len(links)
    assert ctx.report["bands"] * ctx.report["rows_per_band"] <= 128
    assert ctx.report["clusters"] == len(set(links.values()))


def test_chunks_and_blocks_do_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(6)
    originals = [" ".join(sentence(rng, int(rng.integers(1, 120)))) for _ in range(60)]
    texts = originals + [text + " again" for text in originals[:30]] + ["", None]
    expected, estimated = dedup(texts), dedup(texts, verify=False)
    assert expected[DROP].null_count() < len(texts) and estimated[DROP].null_count() < len(texts)
    monkeypatch.setattr(minhash, "CHUNK_ROWS", 7)  # rows in threads, in chunks of 7 rows
    monkeypatch.setattr(minhash, "CHUNK_BYTES", 500)  # ... or of about 500 bytes of text
    monkeypatch.setattr(minhash, "SHINGLE_BLOCK", 5)  # long rows split between blocks of shingles
    monkeypatch.setattr(minhash, "PAIR_VALUES", 150)  # exact Jaccard of a few pairs at a time (one pair
    monkeypatch.setattr(minhash, "PAIR_BLOCK", 3)  # may hold more than that), estimates of 3 pairs
    assert dedup(texts).equals(expected)
    assert dedup(texts, verify=False).equals(estimated)


def test_the_estimate_is_the_share_of_equal_signature_values(monkeypatch):
    signatures = np.array([[1, 2, 3, 4], [1, 2, 0, 4], [9, 9, 9, 9], [1, 9, 3, 9]], dtype=np.uint32)
    left, right = np.array([0, 0, 1, 3, 2]), np.array([1, 2, 3, 0, 2])
    expected = [0.75, 0.0, 0.25, 0.5, 1.0]
    assert minhash.agreement(signatures, left, right).tolist() == expected
    monkeypatch.setattr(minhash, "PAIR_BLOCK", 2)  # pairs in blocks of 2: three blocks, the last one short
    assert minhash.agreement(signatures, left[::-1], right[::-1]).tolist() == expected[::-1]


def test_without_verify_the_detail_gives_the_minhash_estimate():
    # Copies that are the same after simplification have equal signatures: an estimate of exactly 1.
    out = dedup(["a b c d e", "x y z", "A b c d e!"], verify=False)
    assert out[DROP].to_list() == [None, None, "near_duplicate"]
    assert out[DROP_DETAIL].to_list() == [None, None, "estimated Jaccard 1.0 with the kept row (position 0 in "
                                                      "the step's input)"]


def test_the_fingerprint_changes_with_the_options_and_the_polars_version(monkeypatch):
    # Token hashes come from polars: a cached result from another polars version is not reused.
    step = MinHashFilter(MinHashConfig())
    assert step.fingerprint() == MinHashFilter(MinHashConfig()).fingerprint()
    assert step.fingerprint() != MinHashFilter(MinHashConfig(threshold=0.7)).fingerprint()
    before = step.fingerprint()
    monkeypatch.setattr(pl, "__version__", pl.__version__ + ".other")
    assert step.fingerprint() != before


def test_blocks_signed_apart_and_combined_give_the_verdicts_of_the_whole(monkeypatch):
    # As the Ray executor runs it: `partial` on each block of rows, in order, then `combine`.
    rng = np.random.default_rng(7)
    originals = [" ".join(sentence(rng, 40)) for _ in range(6)]
    table = pl.DataFrame({"instruction": originals + [text + " again" for text in originals[:3]] + [""]})
    step = MinHashFilter(MinHashConfig())
    whole = step.process(table)
    assert dropped_rows(whole) == [6, 7, 8]
    partials = [step.partial(table.slice(start, 4)) for start in range(0, table.height, 4)]
    assert step.combine(table, partials).equals(whole)


def test_progress_counts_every_row():
    class Progress:
        total = done = 0

        def reset(self, total=None):
            self.total = total

        def update(self, n=1):
            self.done += n

    progress = Progress()
    MinHashFilter(MinHashConfig()).process(pl.DataFrame({"instruction": ["a b c"] * 5}), StepContext(progress=progress))
    assert progress.total == progress.done == 5


def test_a_column_that_is_not_text_is_refused_with_the_fix():
    step = MinHashFilter(MinHashConfig(), index=2)
    with pytest.raises(FactoryError, match=r"steps\[2\]\.minhash: column 'instruction' holds Int64, not text; "
                                        r"point `column`"):
        step.process(pl.DataFrame({"instruction": [1, 2]}))


# -- through the recipe machinery (needs "minhash" in factory.steps.registry) --------------

def test_a_recipe_runs_end_to_end_through_the_cli(write_recipe, tmp_path):
    rows = [{"id": "a", "instruction": "Write a short poem about the autumn leaves falling in the park."},
            {"id": "b", "instruction": "List three prime numbers larger than one hundred."},
            {"id": "c", "instruction": "Write a short poem about the autumn leaves falling in the park!"},
            {"id": "d", "instruction": ""}]
    source = tmp_path / "tasks.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    path = write_recipe(f"""\
        name: dedup
        source: {{path: {source}}}
        steps:
          - minhash: {{column: instruction, threshold: 0.8, num_perm: 128}}
        output: {{format: raw}}
        """)
    assert main(["validate", str(path)]) == 0
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    version = out / "dedup" / "v1"
    assert read_version(version)["id"].to_list() == ["a", "b", "d"]
    rejected = read_version(version, "rejected")
    assert rejected.select("id", "drop_reason", "drop_step", "duplicate_of").rows() == [
        ("c", "near_duplicate", "steps[0].minhash", rows[0]["instruction"])]
    assert "duplicate_of" not in read_version(version).columns
    [step] = read_manifest(version)["steps"]
    assert step["dropped"] == {"near_duplicate": 1}
    assert step["report"]["clusters"] == 1 and step["report"]["dropped"] == 1


@pytest.mark.parametrize("options, key, message", [
    ("threshold: 1.5", "threshold", "threshold must be strictly between 0 and 1, got 1.5; set it to e.g. 0.8 "
                                    "(higher drops only closer duplicates)"),
    ("threshold: 0", "threshold", "threshold must be strictly between 0 and 1, got 0.0"),
    ("threshold: 1", "threshold", "threshold must be strictly between 0 and 1, got 1.0"),
    ("num_perm: 0", "num_perm", "must be at least 16, got 0; set it to 16 or more"),
    ("shingle: words", "shingle", "'words' is not one of word, char; did you mean 'word'?"),
    ("columns: []", "columns", "`columns` is an empty list; name at least one column, or remove `columns` to use "
                               "`column`"),
    ("colum: instruction", "colum", "unknown key 'colum'; did you mean 'column'?"),
])
def test_bad_options_name_the_key_path_and_the_fix(write_recipe, options, key, message):
    path = write_recipe(f"name: t\nsource: {{path: data.jsonl}}\nsteps:\n  - minhash: {{{options}}}\n"
                        "output: {format: raw}\n")
    (path.parent / "data.jsonl").write_text('{"instruction": "x"}\n', encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    [problem] = info.value.problems
    assert problem.format().startswith(f"{path}:4: steps[0].minhash.{key}: {message}")


def test_a_missing_text_column_is_reported_before_running(write_recipe):
    path = write_recipe("name: t\nsource: {path: data.jsonl}\noutput: {format: raw}\nsteps:\n"
                        "  - minhash: {columns: [instruction, response]}\n")
    (path.parent / "data.jsonl").write_text('{"instruction": "x"}\n', encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    [problem] = info.value.problems
    assert problem.key_path == "steps[0].minhash" and "needs column 'response'" in problem.message


DOCSTRING = ("Join one or more path segments intelligently, e.g. os.path.join('a', 'b'). The return value is the "
             "concatenation of path and all members of *paths, with exactly one directory separator following "
             "each non-empty part except the last. If a segment is an absolute path (which on Windows requires "
             "both a drive and a root), then all previous segments are ignored and joining continues from the "
             "absolute path segment. Version 3.6 accepts a path-like object for path and paths.")


def test_copies_in_capitals_or_without_punctuation_are_near_duplicates():
    no_punctuation = re.sub(r"[^\w\s]", "", DOCSTRING)  # os.path.join -> ospathjoin, e.g. -> eg, 3.6 -> 36
    texts = [DOCSTRING, DOCSTRING.upper(), no_punctuation, "Return the base name of pathname path."]
    assert pointers(dedup(texts, ngram=5)) == [None, 0, 0, None]
    # Without the simplification the copy that lost its punctuation shares few 5-grams.
    assert pointers(dedup(texts, ngram=5, normalize=False)) == [None, 0, None, None]
    simplified = minhash.normalized_text(pl.Series(["Naïve café: 3.14, 1,000 & e.g.  [x]\tdone!"])).item()
    assert simplified == "naive cafe 0 0 eg x done"


def test_verified_pairs_reach_the_threshold_exactly_and_few_true_pairs_are_missed():
    """Copies with 1-12 of 80 words replaced: Jaccard from about 0.9 down to about 0.5."""
    rng = np.random.default_rng(5)
    originals = [sentence(rng, 80) for _ in range(60)]
    copies = []
    for i, words in enumerate(originals):
        edited = list(words)
        for position in rng.choice(80, size=1 + i % 12, replace=False):
            edited[position] = "replaced"
        copies.append(edited)
    texts = [" ".join(w) for w in originals + copies]
    out = dedup(texts)
    similar = {i: jaccard(texts[i], texts[i + 60]) for i in range(60)}
    dropped = set(dropped_rows(out))
    assert all(similar[i - 60] >= 0.8 for i in dropped)  # no false positive: the check is exact
    assert [i for i in range(60) if similar[i] >= 0.8 and i + 60 not in dropped] == []
    details = out[DROP_DETAIL].drop_nulls().to_list()
    assert sorted(float(d.split()[1]) for d in details) == sorted(
        round(similar[i - 60], 2) for i in dropped)
    # LSH alone (datasketch's layout) misses some of the pairs near the threshold.
    lsh_only = set(dropped_rows(dedup(texts, verify=False)))
    assert sum(similar[i] >= 0.8 for i in range(60)) > sum(similar[i - 60] >= 0.8 for i in lsh_only)


def test_lsh_layout_is_datasketchs():
    from datasketch.lsh import _optimal_param

    for threshold in (0.5, 0.7, 0.8, 0.9):
        for num_perm in (64, 128, 256):
            assert minhash.lsh_parameters(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)
    assert minhash.band_layout(MinHashConfig(threshold=0.8, verify=False)) == (9, 13)
    assert minhash.band_layout(MinHashConfig(threshold=0.8)) == (16, 8)  # verified: recall first
