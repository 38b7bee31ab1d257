"""The quality section of a version: diversity, openings, duplicates left, contamination, scores, usage;
written in the manifest and the card, shown by inspect, compared by diff; old versions without it still work.

Every expected figure here is counted by hand from the table in the test (the comments show the count).
"""

from __future__ import annotations

import json

import polars as pl

from factory.cli import main
from factory.diff import diff, render as render_diff
from factory.hub import hub_card
from factory.inspect import render as render_inspect, summarize
from factory.quality import (diversity, duplicates, openings, quality_card_lines, quality_section, sampled,
                             score_spread)
from factory.store import read_manifest, write_version

INSTRUCTIONS = ["What is the capital of France?", "What is the capital of Spain?", "Name a red fruit, please.",
                "what IS the boiling point"]
# Word tokens: what is the capital of france (6) / what is the capital of spain (6) /
# name a red fruit please (5) / what is the boiling point (5): 22 unigrams, 14 distinct;
# bigrams 5+5+4+4 = 18, 12 distinct; trigrams 4+4+3+3 = 14, 10 distinct (none across two texts).


def empty_rejected() -> pl.DataFrame:
    return pl.DataFrame(schema={"drop_reason": pl.String, "drop_step": pl.String})


def test_distinct_n_counts_ngrams_within_each_text_over_all_texts():
    figures = diversity(pl.Series(INSTRUCTIONS + [None]))
    assert figures == {"texts": 4, "distinct_1": round(14 / 22, 4), "distinct_2": round(12 / 18, 4),
                       "distinct_3": round(10 / 14, 4),
                       # words 6, 6, 5, 5: p10 at rank 0.3 of [5, 5, 6, 6], p90 at rank 2.7
                       "words": {"min": 5, "p10": 5.0, "median": 5.5, "p90": 6.0, "max": 6, "mean": 5.5}}


def test_openings_are_the_first_three_lowercased_words():
    assert openings(pl.Series(INSTRUCTIONS + ["Hi", None])) == {
        "texts": 5, "shared": 3, "shared_share": 0.6,  # three of five open with "what is the"; "Hi" has no opening
        "top": [{"opening": "what is the", "count": 3}, {"opening": "name a red", "count": 1}]}


KNIGHT = "Tell me a story about a brave knight who saves a small village from a hungry dragon at"
DUPES = pl.DataFrame({
    "instruction": [f"{KNIGHT} night", f"{KNIGHT} dawn", "What is the capital of France?",
                    "what is the capital of france", None, "", "Name a red fruit."],
    "response": ["Sir Roland rode out.", "Sir Roland rode out.", "Paris.", "Paris.", "Nothing to say.", "Empty.",
                 "An apple."],
})


def test_duplicates_left_are_counted_exactly_and_by_minhash():
    # Row 3 is row 2 once normalised (exact and near). Row 1 is row 0 but for its last word: 16 of 18
    # distinct word 3-grams shared, Jaccard 0.89 (near). Null and empty instructions repeat nothing.
    assert duplicates(DUPES["instruction"]) == {"rows": 7, "exact": 1, "near": 2}
    section = quality_section(DUPES, [], {})
    # With the response, rows 0 and 1 share 18 of 24 3-grams (0.75): no longer near; rows 2 and 3 still are.
    assert section["duplicates"] == {"instructions": {"rows": 7, "exact": 1, "near": 2},
                                     "instruction_response": {"rows": 7, "exact": 1, "near": 1},
                                     "near_threshold": 0.8}
    assert section["text"] == {"from": ["instruction", "response"]}


def test_messages_count_every_user_and_assistant_turn():
    def chat(*turns):
        return [{"role": role, "content": text} for role, text in turns]

    table = pl.DataFrame({"messages": [
        chat(("system", "Be brief."), ("user", "Hi there friend"), ("assistant", "Hello!"),
             ("user", "What is two plus two?"), ("assistant", "Four.")),
        chat(("user", "Hi there friend"), ("assistant", "Hello!")),
        chat(("user", "hi there friend"), ("assistant", "Hello!")),
        None,
    ], "instruction": ["ignored"] * 4})
    section = quality_section(table, [], {})
    assert section["text"] == {"from": "messages", "mean_turns": 1.0}  # 4 user turns over 4 rows
    assert section["diversity"]["instructions"]["texts"] == 4
    assert section["diversity"]["responses"]["texts"] == 4
    assert section["diversity"]["responses"]["distinct_1"] == round(2 / 4, 4)  # hello x3, four
    assert section["openings"]["shared"] == 3 and section["openings"]["top"][0] == {"opening": "hi there friend",
                                                                                    "count": 3}
    # Per row: row 2 repeats row 1 (its user turn, and its user + assistant turns); row 0 has more turns.
    assert section["duplicates"]["instructions"] == {"rows": 4, "exact": 1, "near": 1}
    assert section["duplicates"]["instruction_response"] == {"rows": 4, "exact": 1, "near": 1}


JUDGED = {"steps": [{"solve": {}}, {"judge": {"mode": "score", "output_column": "rating"}},
                    {"judge": {"mode": "binary", "correct_column": "judge_correct"}},
                    {"decontaminate": {"eval": "data/eval/x.jsonl", "columns": ["instruction"]}},
                    {"score": {"column": "rating", "min": 7}}]}
STEPS = [{"index": 0, "name": "solve", "label": "steps[0].solve", "dropped": {"backend_error": 1}},
         {"index": 3, "name": "decontaminate", "label": "steps[3].decontaminate", "dropped": {"contaminated": 3},
          "report": {"eval_items": 200, "eval_items_matched": 2}},
         {"index": 4, "name": "score", "label": "steps[4].score", "dropped": {"below_min": 5}}]
USAGE = {"a:x": {"prompt_tokens": 100, "completion_tokens": 40, "conversations": 5, "cached_conversations": 1,
                 "cost_usd": 0.25},
         "b:y": {"prompt_tokens": 10, "completion_tokens": 4, "conversations": 2, "cached_conversations": 0}}


def test_scores_contamination_drops_and_usage():
    table = pl.DataFrame({"instruction": ["a b c", "d e f", "g h i", "j k l", "m n o"],
                          "rating": [7.0, 8.0, 8.0, None, 10.0], "judge_correct": [True] * 5})
    section = quality_section(table, STEPS, JUDGED, USAGE, source_dropped={"empty": 2})
    assert section["rows"] == {"kept": 5, "dropped": 11, "dropped_by": {
        "source: empty": 2, "steps[0].solve: backend_error": 1, "steps[3].decontaminate: contaminated": 3,
        "steps[4].score: below_min": 5}}
    # 7, 8, 8, 10: mean 8.25, population variance (1.5625 + 0.0625 + 0.0625 + 3.0625) / 4 = 1.1875
    assert section["scores"] == {"rating": {"count": 4, "mean": 8.25, "std": round(1.1875 ** 0.5, 4), "min": 7.0,
                                            "max": 10.0, "histogram": {"7": 1, "8": 2, "10": 1}}}
    assert section["contamination"] == {"checked": True, "checks": [{
        "step": "steps[3].decontaminate", "eval": "data/eval/x.jsonl", "columns": ["instruction"],
        "eval_items": 200, "eval_items_matched": 2, "dropped": 3}]}
    assert section["usage"] == {"prompt_tokens": 110, "completion_tokens": 44, "conversations": 7,
                                "cached_conversations": 1, "cost_usd": 0.25}
    card = "\n".join(quality_card_lines(section))
    assert "- Contamination: checked by steps[3].decontaminate against `data/eval/x.jsonl` (columns instruction), " \
           "2 of 200 eval items matched, 3 rows dropped." in card
    assert "| rating | 4 | 8.25 | 1.0897 | 7 | 10 | 7: 1, 8: 2, 10: 1 |" in card
    assert quality_section(table, [], {})["contamination"] == {"checked": False, "checks": []}


def test_many_distinct_scores_are_binned():
    spread = score_spread(pl.Series([float(i) for i in range(100)]))
    assert len(spread["histogram"]) == 10 and set(spread["histogram"].values()) == {10}


def test_a_big_table_is_sampled_in_order_and_says_so():
    table = pl.DataFrame({"n": range(50), "instruction": [f"task number {i}" for i in range(50)]})
    picked = sampled(table, 20, seed=0)
    assert picked.height == 20 and picked["n"].to_list() == sorted(picked["n"].to_list())
    assert picked.equals(sampled(table, 20, seed=0))
    section = quality_section(table, [], {}, sample_rows=20)
    assert section["sample"] == {"rows": 20, "of": 50, "seed": 0}
    assert section["rows"]["kept"] == 50 and section["duplicates"]["instructions"]["rows"] == 20
    assert "- Figures over a sample of 20 of 50 rows (seed 0)." in quality_card_lines(section)


def test_missing_pieces_are_marked_never_a_crash():
    empty = quality_section(pl.DataFrame(schema={"instruction": pl.String, "response": pl.String}), [], {})
    assert empty == {"rows": {"kept": 0, "dropped": 0, "dropped_by": {}},
                     "text": {"from": ["instruction", "response"]},
                     "contamination": {"checked": False, "checks": []}}
    numbers = quality_section(pl.DataFrame({"x": [1, 2]}), [], {})
    assert numbers["text"] == {"from": None} and "diversity" not in numbers
    assert "- Text: none (no `messages`, `instruction` or `response` column): no diversity or duplicate figures." \
        in quality_card_lines(numbers)
    odd = quality_section(pl.DataFrame({"messages": [[{"role": "user", "content": [1, 2]}]], "instruction": [3]}),
                          [], {})
    assert odd["text"] == {"from": None}  # content that is not text, an instruction that is a number
    nulls = quality_section(pl.DataFrame({"instruction": [None, None]}, schema={"instruction": pl.String}), [], {})
    assert nulls["diversity"] == {"instructions": {"texts": 0}}
    assert nulls["duplicates"]["instructions"] == {"rows": 2, "exact": 0, "near": 0}
    for section in (empty, numbers, nulls):
        assert quality_card_lines(section)[0] == "## Quality"


def test_a_run_writes_the_section_into_manifest_card_and_inspect(scripted_recipe, tmp_path, capsys):
    assert main(["run", str(scripted_recipe()), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    version = tmp_path / "out" / "demo" / "v1"
    manifest = read_manifest(version)
    quality = manifest["quality"]
    assert quality["rows"]["kept"] == manifest["rows"]
    assert quality["rows"]["dropped"] == sum(n for s in manifest["steps"] for n in s["dropped"].values())
    assert quality["scores"]["score"]["count"] == manifest["rows"]  # the judge's column, every kept row scored
    assert quality["contamination"] == {"checked": False, "checks": []}
    assert "quality_seconds" in manifest["timings"]
    card = (version / "README.md").read_text(encoding="utf-8")
    assert "\n## Quality\n" in card and "- Contamination: not checked (the recipe has no `decontaminate` step)." in card
    assert "\n## Quality\n" in hub_card(version, "me/demo", "default")
    text = render_inspect(summarize(version))
    assert "quality:\n  Rows: " in text and "  Diversity:" in text


def test_diff_shows_each_figure_old_to_new_and_old_versions_still_work(tmp_path):
    a = pl.DataFrame({"instruction": ["What is the capital of France?", "Name a red fruit."]})
    b = pl.DataFrame({"instruction": ["What is the capital of France?", "what is the capital of france"]})
    old = write_version(tmp_path, "ds", a, empty_rejected(), {"recipe": {}})  # written before the section
    v2 = write_version(tmp_path, "ds", a, empty_rejected(), {"recipe": {}, "quality": quality_section(a, [], {})})
    v3 = write_version(tmp_path, "ds", b, empty_rejected(), {"recipe": {}, "quality": quality_section(b, [], {})})
    text = render_diff(diff(v2, v3))
    assert "  duplicates.instructions.exact: 0 -> 1 (+1)\n" in text
    assert "  openings.shared: 0 -> 2 (+2)\n" in text
    # distinct-1: 10 different words of 10 -> the same 6 words twice, 6 of 12
    assert f"  diversity.instructions.distinct_1: 1 -> {6 / 12:g} ({6 / 12 - 1:+g})\n" in text
    assert "quality: no quality section in v1" in render_diff(diff(old, v2))
    assert "quality: none recorded" in render_inspect(summarize(old))
    assert "## Quality" not in (old / "README.md").read_text(encoding="utf-8")
    assert "\n## Quality\n" in (v2 / "README.md").read_text(encoding="utf-8")
    assert json.loads((old / "manifest.json").read_text(encoding="utf-8")).get("quality") is None


def test_words_and_exact_keys_are_the_projects_normalisation():
    from factory.quality import normalized, words_of
    from factory.text import normalize

    texts = ["What's 2+2?", "  Tabs\tand\nnew lines ", "snake_case, CamelCase; ÉTÉ déjà-vu", "...", ""]
    assert normalized(pl.Series(texts)).to_list() == [normalize(t) for t in texts]
    assert words_of(pl.Series(texts)).to_list() == [normalize(t).split() for t in texts]
