"""Curation filters: exact dedup, self-consistency, score quantiles, heuristics, decontamination."""

from __future__ import annotations

import json

import polars as pl
import pytest

from factory.build import run_recipe
from factory.cache import Cache
from factory.errors import FactoryError, RecipeError
from factory.recipe import load_recipe
from factory.driver import Driver
from factory.steps.context import StepContext
from factory.steps.drops import DROP, DROP_DETAIL
from factory.store import read_version
from filters.consistency import Consistency, ConsistencyConfig
from filters.decontaminate import Decontaminate, DecontaminateConfig
from filters.exact import ExactConfig, ExactDedup
from filters.heuristics import Heuristics, HeuristicsConfig
from filters.score import ScoreConfig, ScoreFilter
from filters.select import Select, SelectConfig

from .conftest import ROOT, SCRIPTED_LLM, SEEDS


def reasons(frame: pl.DataFrame) -> list:
    return frame[DROP].to_list()


def test_exact_keeps_the_first_copy_after_normalisation():
    table = pl.DataFrame({"instruction": ["Write a poem.", "write  a POEM.", "Write a poem!", "Other", None, None]})
    out = ExactDedup(ExactConfig()).process(table)
    assert reasons(out) == [None, "duplicate", None, None, None, "duplicate"]
    assert out["_duplicate_of"].to_list() == [None, "Write a poem.", None, None, None, None]
    out = ExactDedup(ExactConfig(ignore_punctuation=True)).process(table)
    assert reasons(out)[:3] == [None, "duplicate", "duplicate"]


def test_exact_on_several_columns():
    table = pl.DataFrame({"instruction": ["q", "q", "q"], "response": ["a", "b", "a"]})
    out = ExactDedup(ExactConfig(columns=["instruction", "response"])).process(table)
    assert reasons(out) == [None, None, "duplicate"]


def test_consistency_majority_vote():
    table = pl.DataFrame({
        "instruction": ["t1"] * 4 + ["t2"] * 4 + ["t3"] * 2,
        "prediction": ["14", "14.0", "13", None, "5", "6", "7", "8", "1", "2"],
        "sample": list(range(4)) * 2 + [0, 1]})
    step = Consistency(ConsistencyConfig(min_agreement=0.5))
    ctx = StepContext()
    out = step.process(table, ctx)
    assert reasons(out) == [None, None, "minority_answer", "no_answer"] + ["low_agreement"] * 4 + [None, "minority_answer"]
    assert out["agreement"].to_list()[:4] == [0.5] * 4
    assert out["majority_answer"].to_list()[0] == "14"
    assert out["majority_answer"].to_list()[8] == "1"  # a 1-1 tie goes to the answer seen first
    assert out["instruction"].to_list() == table["instruction"].to_list()  # order kept
    assert ctx.report == {"tasks": 3, "tasks_kept": 2}


def test_consistency_drops_a_task_without_any_answer_even_at_min_agreement_0():
    # t1 has no answer at all: nothing to agree on, so it goes whole (agreement 0), counted as
    # not kept, and its rows stay in place; t2 agrees 2 of 3.
    table = pl.DataFrame({"instruction": ["t2", "t1", "t2", "t1", "t2"], "prediction": ["4", None, "4.0", None, None]},
                         schema={"instruction": pl.String, "prediction": pl.String})
    step = Consistency(ConsistencyConfig(min_agreement=0.0))
    out = step.process(table, ctx := StepContext())
    assert reasons(out) == [None, "low_agreement", None, "low_agreement", "no_answer"]
    assert out["agreement"].to_list() == [2 / 3, 0.0, 2 / 3, 0.0, 2 / 3]
    assert out["votes"].to_list() == [3, 2, 3, 2, 3]
    assert out["majority_answer"].to_list() == ["4", None, "4", None, "4"]
    assert out["prediction"].to_list() == table["prediction"].to_list()
    assert ctx.report == {"tasks": 2, "tasks_kept": 1}
    assert [c for c in out.columns if c not in table.columns and c != DROP] == step.produces()


def test_consistency_on_no_rows():
    table = pl.DataFrame(schema={"instruction": pl.String, "prediction": pl.String})
    out = Consistency(ConsistencyConfig()).process(table, ctx := StepContext())
    assert out.height == 0 and ctx.report == {"tasks": 0, "tasks_kept": 0}


def test_exact_reports_its_duplicates_and_reads_a_missing_text_as_empty():
    table = pl.DataFrame({"instruction": ["e.g. this", "eg this", "", None, "a  b", "a b", " a b "]})
    out = ExactDedup(ExactConfig(ignore_punctuation=True)).process(table, ctx := StepContext())
    assert reasons(out) == [None, "duplicate", None, "duplicate", None, "duplicate", "duplicate"]
    assert out["_duplicate_of"].to_list() == [None, "e.g. this", None, "", None, "a  b", "a  b"]
    assert ctx.report == {"duplicates": 4}


@pytest.mark.parametrize("options, problems", [
    ({"min_words": 5, "max_words": 5}, []),
    ({"min_words": 6, "max_words": 5}, [("min_words 6 is above max_words 5", "min_words", "lower it")]),
    ({"refusal_patterns": [r"\bsorry\b", "(unclosed"]},
     [("refusal pattern 1 is not a valid regular expression: missing ), unterminated subpattern at position 0",
       "refusal_patterns", "fix or quote the pattern")]),
])
def test_heuristics_options_that_cannot_work_are_problems(options, problems):
    assert HeuristicsConfig(**options).validate() == problems


def test_score_top_k_and_quantile_per_task():
    table = pl.DataFrame({"instruction": ["a", "a", "a", "b", "b"], "score": [3.0, 9.0, 7.0, 5.0, 5.0]})
    best_of_n = ScoreFilter(ScoreConfig(top_k=1, group_by="instruction")).process(table)
    assert reasons(best_of_n) == ["not_top_k", None, "not_top_k", None, "not_top_k"]
    top_third = ScoreFilter(ScoreConfig(top_quantile=0.34, group_by="instruction")).process(table)
    assert reasons(top_third)[:3] == ["below_quantile", None, "below_quantile"]
    assert reasons(ScoreFilter(ScoreConfig(min=6)).process(table)) == ["below_min", None, None, "below_min",
                                                                        "below_min"]


SAMPLES = pl.DataFrame({
    "instruction": ["t1", "t1", "t1", "t1", "t2", "t2", "t3"],
    "correct": [True, False, True, True, None, True, False],
    "prediction": ["4", "5", "4", "4.0", None, "7", "1"],
    "score": [7.0, 9.0, 6.0, 9.0, None, float("nan"), 2.0],
    "response": ["short", "wrong answer", "short", "a longer answer", "x", "short", "one"]})


@pytest.mark.parametrize("options, expected, tasks_kept", [
    ({"verifier": "programmatic"},
     [None, "not_correct", None, None, "not_correct", None, "not_correct"], 2),
    ({"verifier": "math"},  # a reference check by another name: the same `correct` column
     [None, "not_correct", None, None, "not_correct", None, "not_correct"], 2),
    # t1's accepted answers: row 2 repeats row 0's response (row 5 gives it too, in another task:
    # no repeat); of the others the shortest stays.
    ({"verifier": "programmatic", "per_task": 1},
     [None, "not_correct", "duplicate", "over_per_task", "not_correct", None, "not_correct"], 2),
    ({"verifier": "programmatic", "per_task": 2},
     [None, "not_correct", "duplicate", None, "not_correct", None, "not_correct"], 2),
    # t1 votes 4 (rows 0, 2, 3: 3 of 4); t2 answers once in 2 samples (0.5 reaches the minimum).
    ({"verifier": "majority"},
     [None, "minority_answer", None, None, "no_answer", None, None], 3),
    ({"verifier": "majority", "min_agreement": 0.6},
     [None, "minority_answer", None, None, "low_agreement", "low_agreement", None], 2),
    # Scores: 7 reaches min_score 7; a null or NaN score is missing; the best scored go first
    # (rows 1 and 3 score 9; the shorter, row 1, first), row 0 is the third in t1.
    ({"verifier": "judge", "min_score": 7, "per_task": 2},
     ["over_per_task", None, "below_min_score", None, "missing_score", "missing_score", "below_min_score"], 1),
    ({"verifier": "judge", "min_score": 7},
     [None, None, "below_min_score", None, "missing_score", "missing_score", "below_min_score"], 1),
])
def test_select_keeps_what_its_verifier_accepts_at_most_per_task(options, expected, tasks_kept):
    out = Select(SelectConfig(**options)).process(SAMPLES, ctx := StepContext())
    assert reasons(out) == expected
    assert out.drop(DROP).equals(SAMPLES, null_equal=True)
    assert ctx.report == {"verifier": options["verifier"], "tasks": 3, "tasks_kept": tasks_kept}


def test_select_reads_scores_and_rewards_written_as_text_and_its_own_column_names():
    table = pl.DataFrame({"task": ["a", "a", "a", "b"], "rating": ["8", "n/a", "6.5", "7"],
                          "gain": ["0.5", "", "2", "-1"], "answer": ["3", "3", "4", None],
                          "response": ["r1", "r2", "r3", "r4"]})
    judged = Select(SelectConfig(verifier="judge", column="task", score_column="rating")).process(table)
    assert reasons(judged) == [None, "missing_score", "below_min_score", None]
    rewarded = Select(SelectConfig(verifier="reward_model", column="task", reward_column="gain")).process(table)
    assert reasons(rewarded) == ["over_per_task", "missing_reward", None, None]
    voted = Select(SelectConfig(verifier="majority", column="task", answer_column="answer", min_agreement=0.6))
    assert reasons(voted.process(table)) == [None, None, "minority_answer", "low_agreement"]


def test_select_counts_only_accepted_samples_as_repeats():
    # The first "A" is wrong; the second, accepted, is the task's first accepted "A": no repeat.
    table = pl.DataFrame({"instruction": ["t", "t", "t"], "correct": [False, True, True], "response": ["A", "A", "A"]})
    assert reasons(Select(SelectConfig(verifier="programmatic", per_task=2)).process(table)) == \
        ["not_correct", None, "duplicate"]


@pytest.mark.parametrize("options, columns", [
    ({"verifier": "programmatic"}, ["instruction", "correct"]),
    ({"verifier": "math"}, ["instruction", "correct"]),
    ({"verifier": "code", "per_task": 1, "correct_column": "passed"}, ["instruction", "passed", "response"]),
    ({"verifier": "majority", "answer_column": "answer", "column": "task"}, ["task", "answer"]),
    ({"verifier": "judge", "score_column": "rating"}, ["instruction", "rating"]),
    ({"verifier": "reward_model"}, ["instruction", "reward", "response"]),
])
def test_select_requires_its_verifier_s_column(options, columns):
    assert Select(SelectConfig(**options)).requires() == columns


@pytest.mark.parametrize("options, problems", [
    ({}, [("needs `min`, `max`, `top_quantile` or `top_k`", None, "add e.g. `min: 7`")]),
    ({"max": 9}, []), ({"top_quantile": 0.5}, []), ({"top_k": 2}, []),
    ({"min": 7, "max": 7}, []),
    ({"min": 8, "max": 7}, [("min 8 is above max 7", "min", "swap them")]),
    ({"top_quantile": 0}, [("top_quantile 0 keeps nothing", "top_quantile", "use a share above 0, e.g. 0.25")]),
    ({"top_quantile": 1}, []),
])
def test_score_options_that_cannot_work_are_problems(options, problems):
    assert ScoreConfig(**options).validate() == problems


def test_score_over_the_whole_table_with_missing_and_textual_scores():
    table = pl.DataFrame({"instruction": ["a", "a", "b", "b", "c"], "score": ["n/a", "5", "3", "8", "NaN"]})
    assert reasons(ScoreFilter(ScoreConfig(top_k=1)).process(table)) == \
        ["missing_score", "not_top_k", "not_top_k", None, "missing_score"]
    assert reasons(ScoreFilter(ScoreConfig(top_k=2)).process(table)) == \
        ["missing_score", None, "not_top_k", None, "missing_score"]
    assert reasons(ScoreFilter(ScoreConfig(top_quantile=0.5)).process(table)) == \
        ["missing_score", None, "below_quantile", None, "missing_score"]
    assert reasons(ScoreFilter(ScoreConfig(max=5)).process(table)) == \
        ["missing_score", None, None, "above_max", "missing_score"]


def test_score_groups_by_its_task_column_only_when_asked():
    assert ScoreFilter(ScoreConfig(min=1, group_by="instruction")).requires() == ["score", "instruction"]
    assert ScoreFilter(ScoreConfig(min=1, column="rating")).requires() == ["rating"]
    assert ScoreFilter(ScoreConfig(top_k=1, group_by="instruction")).group_key() == "instruction"
    assert ScoreFilter(ScoreConfig(top_k=1)).group_key() is None


def test_heuristics_reasons_and_details():
    texts = ["Paris is the capital of France.",
             "Hi",
             "I'm sorry, but I cannot help with that request.",
             "Le chat est assis sur le tapis et regarde la pluie tomber doucement dehors.",
             "Baby " * 40,
             "line\nline\nline\nother",
             "Sure! I'm sorry to hear that your plant died, " + "here is a long helpful answer " * 20]
    step = Heuristics(HeuristicsConfig(min_words=2, refusal_window=60))
    out = step.process(pl.DataFrame({"response": texts}))
    assert reasons(out) == [None, "too_short", "refusal", "wrong_language", "repetitive", "repetitive", "refusal"]
    assert out[DROP_DETAIL][1] == "response has 1 words (min_words 2)"
    assert "fr" in out[DROP_DETAIL][3]
    only_length = Heuristics(HeuristicsConfig(min_words=2, checks=["length"])).process(pl.DataFrame({"response": texts}))
    assert reasons(only_length) == [None, "too_short", None, None, None, None, None]


@pytest.mark.parametrize("options, text, verdict", [
    ({"min_words": 3}, "one two", ("too_short", "response has 2 words (min_words 3)")),
    ({"min_words": 3}, "one two three", None),
    ({"max_words": 3}, "one two three", None),
    ({"max_words": 3}, "one two three four", ("too_long", "response has 4 words (max_words 3)")),
    ({}, None, ("too_short", "response is not text")),
    ({}, "I'M SORRY, but no.", ("refusal", "response says \"I'M SORRY\"")),  # case does not hide a refusal
    ({"refusal_patterns": []}, "I'm sorry, but no.", None),  # no patterns: no refusal check
    # "a b c a b c": 4 word 3-grams, 1 repeats (0.25); "x x y z": 1 line of 4 repeats (0.25)
    ({"max_repeated_ngrams": 0.25}, "a b c a b c", None),
    ({"max_repeated_ngrams": 0.2}, "a b c a b c", ("repetitive", "response: 25% of word 3-grams repeat")),
    ({"max_repeated_lines": 0.25}, "x\nx\ny\nz", None),
    ({"max_repeated_lines": 0.2}, "x\nx\ny\nz", ("repetitive", "response: 25% of lines repeat")),
])
def test_heuristics_bounds_are_inclusive_and_each_reason_has_its_detail(options, text, verdict):
    step = Heuristics(HeuristicsConfig(checks=["length", "refusal", "repetition"], **options))
    out = step.process(pl.DataFrame({"response": [text]}, schema={"response": pl.String}))
    assert (out[DROP][0], out[DROP_DETAIL][0]) == (verdict or (None, None))


def test_repeated_fractions():
    from filters.heuristics import repeated_line_fraction, repeated_ngram_fraction

    assert repeated_ngram_fraction("a b c a b c".split(), 3) == 0.25
    assert repeated_ngram_fraction("a b c d".split(), 2) == 0.0
    assert repeated_ngram_fraction("a b".split(), 3) == 0.0  # no 3-gram at all: nothing repeats
    assert repeated_line_fraction("x\n\n x \ny\nz\n") == 0.25
    assert repeated_line_fraction(" \n") == 0.0


def test_a_filter_step_keeps_its_place_in_the_recipe():
    assert Heuristics(HeuristicsConfig(), index=3).label == "steps[3].heuristics"


def test_a_filter_s_verdicts_become_the_drop_columns():
    from filters.base import Filter

    class Verdicts(Filter):
        name = "verdicts"
        Config = dict
        default_reason = "filtered_out"

        def keep(self, row):
            return row["verdict"]

    table = pl.DataFrame({"verdict": [True, False, (False, "bad"), (False, "bad", "why"), (True, "ignored", "x"), 1]},
                         schema={"verdict": pl.Object})
    out = Verdicts({}).process(table)
    assert reasons(out) == [None, "filtered_out", "bad", "bad", None, None]
    assert out[DROP_DETAIL].to_list() == [None, None, None, "why", None, None]
    kept = Verdicts({}).process(pl.DataFrame({"verdict": [True]}, schema={"verdict": pl.Object}))
    assert kept.schema[DROP] == kept.schema[DROP_DETAIL] == pl.String  # a batch without drops has the same columns


def test_heuristics_unknown_check_is_a_recipe_error(write_recipe):
    with pytest.raises(RecipeError, match=r"steps\[1\]\.heuristics\.checks\[0\]: 'lenght' is not one of .*did you "
                                          r"mean 'length'"):
        load_recipe(write_recipe(f"name: h\n{SCRIPTED_LLM}source: {{path: {SEEDS}}}\nsteps:\n  - solve: {{}}\n"
                                 "  - heuristics: {checks: [lenght]}\n"))


def decontaminate_recipe(write_recipe, eval_path, extra=""):
    return load_recipe(write_recipe(f"name: d\n{SCRIPTED_LLM}source: {{path: {SEEDS}}}\nsteps:\n"
                                    f"  - decontaminate: {{eval: {eval_path}{extra}}}\noutput: {{format: raw}}\n"))


def test_decontaminate_finds_long_and_short_overlaps_and_reports_them(write_recipe, tmp_path):
    seeds = [json.loads(line) for line in SEEDS.open()]
    long_item = "  Tell me: " + seeds[0]["instruction"].upper() + " Please hurry."
    evals = [{"id": "e-long", "instruction": long_item},                      # shares a 13-gram with seed 0
             {"id": "e-short", "instruction": "Compute 17 multiplied by 23."},  # 5 words, inside seed 1
             {"id": "e-none", "instruction": "A question that appears nowhere in the training data at all."}]
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("\n".join(json.dumps(e) for e in evals))
    recipe = decontaminate_recipe(write_recipe, eval_path, ", eval_id_column: id")
    step, ctx = recipe.steps[0], StepContext()
    out = step.process(recipe.source.read(), ctx)
    dropped = out.filter(pl.col(DROP).is_not_null())
    assert dropped["id"].to_list() == ["seed-000", "seed-001"]
    assert dropped["_matched_eval"].to_list() == [["e-long"], ["e-short"]]
    assert ctx.report["eval_items"] == 3 and ctx.report["eval_items_matched"] == 2
    assert ctx.report["matched_eval_ids"] == ["e-long", "e-short"]


def test_decontaminate_validates_its_eval_set(write_recipe, tmp_path):
    with pytest.raises(RecipeError, match=r"steps\[0\]\.decontaminate\.eval: eval set 'nope.jsonl' does not exist"):
        decontaminate_recipe(write_recipe, "nope.jsonl")
    (tmp_path / "e.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(RecipeError, match="the eval set has no column 'instruction'"):
        decontaminate_recipe(write_recipe, tmp_path / "e.jsonl")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_decontaminate_long_between_and_short_eval_items(tmp_path):
    """ngram 4, min_words 3: e0 (5 words) leaks by any of its 4-grams, e1 (3 words) as a whole
    3-gram anywhere, e2 and e4 (under 3 words) only as a row's whole text; e3 (empty) never."""
    evals = [{"id": "e0", "instruction": "The quick brown fox jumps"}, {"id": "e1", "instruction": "red green blue"},
             {"id": "e2", "instruction": "Hello, world!"}, {"id": "e3", "instruction": ""},
             {"id": "e4", "instruction": "seven"}]
    rows = ["A QUICK brown fox jumps over",  # e0's second 4-gram
            "The quick brown cat",  # no 4-gram of e0
            "I like red-green blue things",  # e1
            "hello world",  # e2, the whole text
            "hello world again",  # e2 is short: inside a longer text it is not a leak
            "Seven.",  # e4, the whole text
            None, "",  # no text: nothing leaks, not even the empty item
            "red green",  # two of e1's three words
            "seven days later",  # e4 inside a longer text
            "Fox!",  # one word of e0, which is long: not a leak
            "the quick brown fox jumps; red, green, blue"]  # e0 and e1
    step = Decontaminate(DecontaminateConfig(eval=str(write_jsonl(tmp_path / "eval.jsonl", evals)), eval_id_column="id",
                                             ngram=4, min_words=3), base_dir=tmp_path)
    out = step.process(pl.DataFrame({"instruction": rows}, schema={"instruction": pl.String}), ctx := StepContext())
    contaminated = {0: ["e0"], 2: ["e1"], 3: ["e2"], 5: ["e4"], 11: ["e0", "e1"]}
    assert reasons(out) == ["contaminated" if i in contaminated else None for i in range(len(rows))]
    assert out["_matched_eval"].to_list() == [contaminated.get(i) for i in range(len(rows))]
    assert ctx.report == {"eval_set": {"path": str(tmp_path / "eval.jsonl")}, "eval_items": 5, "eval_items_matched": 4,
                          "rows_dropped": 5, "matched_eval_ids": ["e0", "e1", "e2", "e4"]}


def test_decontaminate_joins_its_columns_with_a_space_and_reads_a_missing_one_as_empty(tmp_path):
    evals = [{"q": "The quick brown fox", "a": "jumps"}, {"q": "hello", "a": None}]
    table = pl.DataFrame({"instruction": ["a note: the quick", None, "hello"],
                          "response": ["brown fox jumps", "hello", None]})
    eval_path = write_jsonl(tmp_path / "eval.jsonl", evals)
    step = Decontaminate(DecontaminateConfig(eval=str(eval_path), eval_columns=["q", "a"],
                                             columns=["instruction", "response"], ngram=4, min_words=3),
                         base_dir=tmp_path)
    out = step.process(table, StepContext())
    assert out["_matched_eval"].to_list() == [["eval[0]"], ["eval[1]"], ["eval[1]"]]


def test_decontaminate_reads_an_eval_file_by_the_format_it_is_given(tmp_path):
    write_jsonl(tmp_path / "eval.data", [{"instruction": "What is the capital of France today?"}])
    table = pl.DataFrame({"instruction": ["Q: what is the capital of France today?", "Other"]})
    for options in ({"eval": "eval.data", "eval_format": "jsonl"}, {"eval": {"path": "eval.data", "format": "jsonl"}}):
        step = Decontaminate(DecontaminateConfig(ngram=5, **options), base_dir=tmp_path)
        assert reasons(step.process(table, StepContext())) == ["contaminated", None]


@pytest.mark.parametrize("evals, rows", [
    (["The quick brown fox jumps"], ["hello world", "hi"]),  # no row is as long as the eval's n-gram
    (["", "?!"], ["", "?!", "Hello"]),  # no eval item has a word
])
def test_decontaminate_finds_nothing_where_nothing_can_match(tmp_path, evals, rows):
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": text} for text in evals])
    step = Decontaminate(DecontaminateConfig(eval=str(eval_path), ngram=4, min_words=3), base_dir=tmp_path)
    out = step.process(pl.DataFrame({"instruction": rows}), ctx := StepContext())
    assert reasons(out) == [None] * len(rows)
    assert (ctx.report["eval_items_matched"], ctx.report["rows_dropped"]) == (0, 0)


def test_decontaminate_reports_at_most_100_eval_ids(tmp_path):
    evals = [{"instruction": f"item {i}"} for i in range(102)]
    step = Decontaminate(DecontaminateConfig(eval=str(write_jsonl(tmp_path / "eval.jsonl", evals))), base_dir=tmp_path)
    step.process(pl.DataFrame({"instruction": [f"Item {i}." for i in range(102)]}), ctx := StepContext())
    assert ctx.report["eval_items_matched"] == 102 and ctx.report["rows_dropped"] == 102
    assert ctx.report["matched_eval_ids"] == [f"eval[{i}]" for i in range(100)]


def test_decontaminate_without_its_eval_set_at_run_time_says_so(tmp_path):
    step = Decontaminate(DecontaminateConfig(eval="gone.jsonl"), base_dir=tmp_path)
    with pytest.raises(FactoryError, match=r"^decontaminate: eval set 'gone.jsonl' does not exist"):
        step.process(pl.DataFrame({"instruction": ["x"]}), StepContext())


def test_decontaminate_checks_every_eval_column_it_reads_and_the_split(tmp_path):
    import datasets

    write_jsonl(tmp_path / "e.jsonl", [{"question": "x", "answer": "y"}])
    check = Decontaminate(DecontaminateConfig(eval="e.jsonl", eval_columns=["question"], eval_id_column="id"),
                          base_dir=tmp_path).check()
    assert check == [("the eval set has no column 'id' (it has question, answer)", "eval_columns",
                      "name one of its columns")]
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"instruction": ["a b c"]})})
    saved.save_to_disk(tmp_path / "hf")
    assert Decontaminate(DecontaminateConfig(eval="hf", eval_split="test"), base_dir=tmp_path).check() == [
        (f"{tmp_path / 'hf'}: no split 'test' (splits: train); set source.split", "eval", "check the eval set")]
    assert Decontaminate(DecontaminateConfig(eval="hf"), base_dir=tmp_path).check() == []


def test_decontaminate_s_fingerprint_follows_its_eval_file(tmp_path):
    """An eval set edited in place (its size, or only its time) or another file under the same relative
    name (another recipe folder) changes the step's fingerprint: its cached verdicts are not reused."""
    import os

    def fingerprint(folder):
        return Decontaminate(DecontaminateConfig(eval="eval.jsonl"), base_dir=folder).fingerprint()

    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        (folder / "eval.jsonl").write_text('{"instruction": "What is 2 + 2?"}\n')
        os.utime(folder / "eval.jsonl", (1_700_000_000, 1_700_000_000))
    before = fingerprint(first)
    assert fingerprint(first) == before
    assert fingerprint(second) != before
    assert fingerprint(tmp_path) not in (before, fingerprint(second))  # no eval file there (yet): no stat
    (first / "eval.jsonl").write_text('{"instruction": "What is 2 + 3?"}\n')  # the same size, a later time
    os.utime(first / "eval.jsonl", (1_700_000_100, 1_700_000_100))
    assert fingerprint(first) != before
    (first / "eval.jsonl").write_text('{"instruction": "What is 20 + 3?"}\n')
    os.utime(first / "eval.jsonl", (1_700_000_000, 1_700_000_000))
    assert fingerprint(first) != before


def grams(text: str, n: int = 13) -> set:
    import re

    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_curation_chain_end_to_end_with_manifest_counts(write_recipe, tmp_path):
    """solve x4 -> verify -> consistency -> score top-1 per task -> decontaminate -> exact."""
    llm = """\
llm:
  backend: scripted
  rules:
    - {match: "Rate the response", reply: "Score: {score}"}
    - {match: "Tariq", reply: "33 + 9 * 33 = 330. The answer is 330."}
    - {match: "Problem 5", reply: "The answer is {digit}."}
    - {match: ".", reply: "Working it out. The answer is 7."}
"""
    eval_rows = [json.loads(line) for line in (ROOT / "data" / "eval" / "arithmetic.jsonl").open()][:5]
    source = tmp_path / "train.jsonl"
    rows = [{"instruction": f"Problem {i}: what is 3 + 4?", "answer": "7"} for i in range(6)]
    assert eval_rows[0]["instruction"].startswith("Tariq reads 33 pages") and eval_rows[0]["answer"] == "330"
    rows.append({"instruction": eval_rows[0]["instruction"], "answer": eval_rows[0]["answer"]})  # a leaked eval item
    source.write_text("\n".join(json.dumps(r) for r in rows))
    path = write_recipe(f"""\
name: curate
{llm}source: {{path: {source}}}
steps:
  - solve: {{samples: 4, answer_format: number}}
  - verify: {{reference: answer}}
  - consistency: {{min_agreement: 0.75}}
  - judge: {{}}
  - score: {{top_k: 1, group_by: instruction}}
  - decontaminate: {{eval: data/eval/arithmetic.jsonl}}
  - exact: {{columns: [instruction]}}
""")
    recipe = load_recipe(path)
    version, manifest, _ = run_recipe(recipe, tmp_path / "out",
                                      driver=Driver(Cache(tmp_path / "cache"), progress=False))
    steps = {s["name"]: s for s in manifest["steps"]}
    kept = read_version(version)
    assert steps["solve"]["rows_out"] == 28
    assert steps["verify"]["dropped"] == {}
    # "Problem 5" gets scattered answers: its samples disagree and the task goes.
    assert steps["consistency"]["dropped"] == {"low_agreement": 4}
    assert steps["consistency"]["report"] == {"tasks": 7, "tasks_kept": 6}
    assert steps["score"]["dropped"] == {"not_top_k": 18}
    decon = steps["decontaminate"]
    assert decon["dropped"] == {"contaminated": 1}
    # Templated problems share phrasing: every eval item with a 13-gram in common with the
    # leaked one is reported, computed here independently.
    all_evals = [json.loads(line)["instruction"] for line in (ROOT / "data" / "eval" / "arithmetic.jsonl").open()]
    leaked = grams(all_evals[0])
    expected = [f"eval[{i}]" for i, text in enumerate(all_evals) if grams(text) & leaked]
    assert decon["report"]["eval_items"] == 200 and decon["report"]["matched_eval_ids"] == expected[:100]
    assert decon["report"]["eval_items_matched"] == len(expected) and "eval[0]" in expected
    assert steps["exact"]["dropped"] == {}
    assert kept.height == manifest["rows"] == 5 and kept["correct"].all()
    assert "matched_eval" not in kept.columns
    leaked = read_version(version, "rejected").filter(pl.col("drop_reason") == "contaminated").row(0, named=True)
    assert leaked["matched_eval"] == expected and leaked["drop_step"] == "steps[5].decontaminate"
    assert sorted(kept["instruction"]) == [f"Problem {i}: what is 3 + 4?" for i in range(5)]


# -- `column:` for one column, `columns:` for several, in every step -----------------------------

def filter_step(write_recipe, step: str):
    path = write_recipe(f"name: cols\nsource: {{path: {SEEDS}}}\nsteps:\n  - {step}\noutput: {{format: raw}}\n")
    return load_recipe(path).steps[0]


@pytest.mark.parametrize("step, option, expected", [
    ("exact: {column: output}", "columns", ["output"]),
    ("exact: {columns: output}", "columns", ["output"]),
    ("exact: {columns: [instruction, output]}", "columns", ["instruction", "output"]),
    ("minhash: {columns: [instruction, output]}", "columns", ["instruction", "output"]),
    ("minhash: {columns: output}", "columns", ["output"]),
    ("minhash: {column: output}", "column", "output"),
    ("heuristics: {column: output}", "columns", ["output"]),
    ("heuristics: {columns: output, checks: length}", "checks", ["length"]),
    ("decontaminate: {eval: data/eval/arithmetic.jsonl, column: output, eval_column: instruction}", "columns",
     ["output"]),
    ("decontaminate: {eval: data/eval/arithmetic.jsonl, eval_column: instruction}", "eval_columns", ["instruction"]),
    ("score: {column: output, min: 1}", "column", "output"),
    ("consistency: {column: output, answer_column: instruction}", "column", "output"),
])
def test_column_and_columns_are_accepted_everywhere(write_recipe, step, option, expected, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert getattr(filter_step(write_recipe, step).config, option) == expected


@pytest.mark.parametrize("step", ["exact: {column: output, columns: [instruction]}",
                                  "minhash: {column: output, columns: [instruction, output]}",
                                  "heuristics: {column: output, columns: output}"])
def test_column_and_columns_together_is_one_located_error(write_recipe, step):
    with pytest.raises(RecipeError) as err:
        filter_step(write_recipe, step)
    [problem] = err.value.problems
    assert problem.line == 4 and problem.key_path.endswith(".column")
    assert problem.format().endswith("column: both `column` and `columns` are given; keep one: `column: x` for one "
                                     "column, `columns: [x, y]` for several")


def test_exact_on_one_column_given_as_column(write_recipe, tmp_path):
    step = filter_step(write_recipe, "exact: {column: output}")
    table = pl.DataFrame({"instruction": ["a", "b", "c"], "output": ["same", "Same", "other"]})
    assert reasons(step.process(table)) == [None, "duplicate", None]
