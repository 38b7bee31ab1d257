"""Answer extraction (math, multiple choice, free text) and programmatic verification."""

from __future__ import annotations

import polars as pl
import pytest

from factory.answers import (
    answer_key,
    answer_keys,
    answers_match,
    canonical_number,
    extract_answer,
    extract_choice,
    extract_number,
    extract_text,
    false_calculations,
    normalize_text,
    read_references,
    reference_answer,
    split_after_answer,
)
from factory.errors import FactoryError
from factory.steps.drops import DROP, DROP_DETAIL
from factory.steps.verify import Verify, VerifyConfig


@pytest.mark.parametrize("reply, number", [
    ("so the total is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{3}{4}}", "0.75"),
    ("First 3+4=7, then 7*2=14.\n#### 14", "14"),
    ("The answer is 1,234 apples.", "1234"),
    ("She pays $5.50 in total", "5.5"),
    ("Step 1: 12 - 5 = 7. Step 2: 7 + 3 = 10", "10"),
    ("The answer is -3.", "-3"),
    ("I have 2 cats. The answer is 9. (Double-check: 3*3 = 9)", "9"),
    ("no digits at all", None),
])
def test_extract_number(reply, number):
    assert extract_number(reply) == number


@pytest.mark.parametrize("reply, letter", [
    ("The answer is (C).", "C"), ("Answer: b", "B"), ("A) is tempting but (D) is right", "D"),
    ("B) Because water boils.", "B"), ("I am not sure.", None),
])
def test_extract_choice(reply, letter):
    assert extract_choice(reply) == letter


def test_extract_text():
    assert extract_text("Reasoning...\nAnswer: Paris") == "Paris"
    assert extract_text("Some thoughts.\n\nLyon\n") == "Lyon"
    assert extract_text("Final answer: **Xi'an**") == "Xi'an"  # bold marks go, the name's own X stays
    assert extract_text("Lyon?\nAnswer: **") is None  # a marked but empty answer is no answer
    assert extract_text(" \n  \n") is None


def test_extract_choice_reads_only_the_letters_it_is_given():
    assert extract_choice("The answer is (E).") == "E"
    assert extract_choice("The answer is (E).", letters="ABCD") is None
    assert extract_choice("The answer is (E), or maybe (B).", letters="ABCD") == "B"


def test_normalize_text_is_squad_s():
    assert normalize_text("  The Eiffel,   Tower! ") == "eiffel tower"
    assert normalize_text("An apple a day") == "apple day"


@pytest.mark.parametrize("answer, method, key", [
    ("1,000", "auto", "1000"), ("1/2", "numeric", "0.5"), ("many", "numeric", None), ("The Cat.", "auto", "cat"),
    ("The answer is (b).", "choice", "B"), (" b ", "choice", "B"), ("none of them", "choice", "NONE OF THEM"),
    (" Paris. ", "exact", "Paris."), ("The  Paris.", "normalized", "paris"), (None, "auto", None),
])
def test_answer_key_by_method(answer, method, key):
    assert answer_key(answer, method) == key


def test_answer_keys_compare_by_the_method_given():
    assert answer_keys(["1,000", "1000.0", "cat"]) == ["1000", "1000", "cat"]
    assert answer_keys(["1,000", "1000.0", " cat "], "exact") == ["1,000", "1000.0", "cat"]


@pytest.mark.parametrize("reply, wrong", [
    ("1,200 + 30 = 1,240", ["1,200 + 30 = 1,240"]),  # thousands separators are read
    ("4 × 6 = 25", ["4 × 6 = 25"]), ("4 x 6 = 23", ["4 x 6 = 23"]), ("12 ÷ 4 = 4", ["12 ÷ 4 = 4"]),
    ("10 − 4 = 7", ["10 − 4 = 7"]),  # the minus sign, not a hyphen
    ("Step 1: 12 + 5 = 18", ["12 + 5 = 18"]), ("First, 2 * 3 = 7.", ["2 * 3 = 7"]),  # after ": " and ", "
    ("10 / 0 = 0, and 2 + 2 = 5", ["2 + 2 = 5"]),  # one that cannot be computed does not end the reading
    ("7 / 3 = 2.33", []),  # rounded to cents: not false
    ("7 / 3 = 2.3", ["7 / 3 = 2.3"]),
    ("1000000 * 3 = 3000001", []),  # within the relative tolerance (1e-6)
])
def test_false_calculations_read_every_operator_and_tolerate_rounding(reply, wrong):
    assert false_calculations(reply) == wrong


def test_a_reference_without_an_option_letter_is_an_error_with_the_fix():
    assert read_references(["(B)", "The answer is C."], "choice", "answer", lambda i: f"row {i}", "fix it") == \
        ["B", "C"]
    with pytest.raises(FactoryError) as err:
        read_references(["(B)", "none of them"], "choice", "answer", lambda i: f"row {i}", "fix it")
    assert str(err.value) == ("row 1: the reference 'none of them' in column 'answer' holds no option letter; write "
                              "the letter (B), or end a worked solution with 'The answer is (B)'; fix it")


@pytest.mark.parametrize("prediction, reference, method, expected", [
    ("42", "42.0", "numeric", True),
    ("0.3334", "1/3", "numeric", False),
    ("0.33333334", "1/3", "numeric", True),
    ("The Eiffel Tower!", "eiffel tower", "normalized", True),
    ("eiffel tower", "Eiffel Tower", "exact", False),
    ("(b)", "B", "choice", True),
    ("5", "five", "auto", False),
    ("7", "7", "auto", True),
    (None, "7", "auto", False),
])
def test_answers_match(prediction, reference, method, expected):
    assert answers_match(prediction, reference, method) is expected


@pytest.mark.parametrize("prediction, reference, method, expected", [
    ("The answer is (B).", "B", "choice", True),  # letters, not text: normalized text would differ
    ("e", "E", "choice", True), ("e.", "E", "choice", True), ("The answer is (B).", "(C)", "choice", False),
    ("E", "e", "choice", True), ("(E)", "e.", "choice", True), ("B", "The answer is (B).", "choice", True),
    ("1000000", "1000000.5", "numeric", True),  # within the relative tolerance (1e-6)
    ("0.0000001", "0", "numeric", True),  # within the absolute tolerance (1e-6)
    ("0.00001", "0", "numeric", False),
    ("five", "five", "numeric", False),  # numeric compares numbers only
    (None, None, "exact", False),  # no answer matches nothing, not even no reference
    (None, "None", "exact", False), ("None", None, "exact", False),  # nor the word None
])
def test_answers_match_by_method(prediction, reference, method, expected):
    assert answers_match(prediction, reference, method) is expected


def test_answers_match_is_auto_by_default():
    assert answers_match("42", "42.0") and answers_match("The Eiffel Tower!", "eiffel tower")


@pytest.mark.parametrize("text, number", [
    (".5", "0.5"), ("−3", "-3"), ("3 / 4", "0.75"), ("1,234.", "1234"), ("$5.50", "5.5"), ("inf", None),
    ("nan", None), ("1/0", None), ("three", None),
])
def test_canonical_number(text, number):
    assert canonical_number(text) == number


def test_the_none_format_is_the_whole_reply():
    assert extract_answer("  Paris  ", "none") == "Paris"
    assert extract_answer("   ", "none") is None


@pytest.mark.parametrize("reference, method, value", [
    ("The answer is **Paris**", "text", "Paris"), ("Final answer: **Xi'an**", "text", "Xi'an"),
    ("b.", "choice", "B"), ("ab", "choice", None), ("z", "choice", None), ("x", "choice", None),
])
def test_reference_answer_reads_marks_and_letters(reference, method, value):
    assert reference_answer(reference, method) == value


def test_answer_keys_vote_numbers_numerically():
    assert answer_key("1,000") == answer_key("1000.0") == "1000"
    assert answer_key("The Cat.") == answer_key("cat") == "cat"


def test_verify_labels_and_optionally_drops():
    batch = pl.DataFrame({"answer": ["14", "3", "10"], "prediction": ["14.0", "4", None]})
    out = Verify(VerifyConfig()).process(batch)
    assert out["correct"].to_list() == [True, False, False]
    assert out[DROP].null_count() == 3
    out = Verify(VerifyConfig(drop_incorrect=True)).process(batch)
    assert out[DROP].to_list() == [None, "incorrect", "incorrect"]


def test_verify_with_check_calculations_labels_a_right_answer_reached_by_a_false_sum():
    batch = pl.DataFrame({
        "answer": ["17", "1", "12", "5", "3"], "prediction": ["17", "1", "12", "6", "3"],
        "response": ["12 + 5 = 17. The answer is 17.", "10 / 6 = 1. The answer is 1.",
                     "1 + 1 = 3; 2 + 2 = 5; 3 + 3 = 7; 4 + 4 = 9; so 3 * 4 = 12.", "2 + 2 = 5. The answer is 6.",
                     None]})
    step = Verify(VerifyConfig(check_calculations=True, drop_incorrect=True))
    assert step.requires() == ["answer", "prediction", "response"]
    out = step.process(batch)
    assert out["correct"].to_list() == [True, False, False, False, True]
    assert out[DROP].to_list() == [None, "false_calculation", "false_calculation", "incorrect", None]
    assert out[DROP_DETAIL].to_list() == [None, "false: 10 / 6 = 1", "false: 1 + 1 = 3; 2 + 2 = 5; 3 + 3 = 7",
                                          "false: 2 + 2 = 5", None]
    labelled = Verify(VerifyConfig(check_calculations=True)).process(batch)
    assert labelled["correct"].to_list() == [True, False, False, False, True]
    assert labelled[DROP].to_list() == [None] * 5


def test_verify_s_tolerance_applies_to_the_answer_and_to_the_calculations():
    batch = pl.DataFrame({"answer": ["2.5", "2.5"], "prediction": ["2.45", "2.45"],
                          "response": ["10 / 4 = 2.45", "10 / 4 = 2.2"]})  # 0.05 and 0.3 off (0.1 of 2.5: 0.25)
    out = Verify(VerifyConfig(method="numeric", tolerance=0.1, check_calculations=True)).process(batch)
    assert out["correct"].to_list() == [True, False]


def test_verify_s_columns_and_their_types_do_not_depend_on_the_rows():
    assert Verify(VerifyConfig()).requires() == ["answer", "prediction"]
    assert Verify(VerifyConfig(output_column="ok")).produces() == ["ok"]
    assert Verify(VerifyConfig(method="code", tests=["test_list"])).produces() == \
        ["correct", "tests_passed", "tests_total", "code_result", "code_detail"]
    empty = pl.DataFrame(schema={"answer": pl.String, "prediction": pl.String})
    for config in (VerifyConfig(), VerifyConfig(drop_incorrect=True)):
        out = Verify(config).process(empty)
        assert (out.schema["correct"], out.schema[DROP]) == (pl.Boolean, pl.String)
    assert Verify(VerifyConfig(drop_incorrect=True)).process(empty).schema[DROP_DETAIL] == pl.String


@pytest.mark.parametrize("reply, answer_format, kept, after", [
    # The quickstart's row: the answer's sentence ends the reply; the ramble is what was cut.
    ("12 / 4 = 3. The answer is 3. It seems like you're trying to solve a math problem but you're not. What",
     "number", "12 / 4 = 3. The answer is 3.",
     "It seems like you're trying to solve a math problem but you're not. What"),
    ("The answer is 3 sweets. Bye", "number", "The answer is 3 sweets.", "Bye"),
    ("The answer is 3.5. Then", "number", "The answer is 3.5.", "Then"),  # a decimal point ends nothing
    ("**The answer is 3.** Hope this helps!", "number", "**The answer is 3.**", "Hope this helps!"),
    ("18 - 4 = 14\n#### 14\nProblem: next", "number", "18 - 4 = 14\n#### 14", "Problem: next"),
    ("So $\\boxed{18}$. I hope it is correct.", "math", "So $\\boxed{18}$.", "I hope it is correct."),
    ("\\[\n\\boxed{\\frac{1}{2}}\n\\]\nDone.", "math", "\\[\n\\boxed{\\frac{1}{2}}\n\\]", "Done."),
    ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "math", "The final answer is $\\frac{1}{2}$.",
     "I hope it is correct."),
    ("The answer is (B). The others are wrong.", "choice", "The answer is (B).", "The others are wrong."),
    ("Paris is north.\nAnswer: Paris\nIt is the capital.", "text", "Paris is north.\nAnswer: Paris",
     "It is the capital."),
    # A boxed number, then a new line: the line ends the answer's sentence.
    ("\\boxed{18}\nNext problem: 3 + 4 = 7", "number", "\\boxed{18}", "Next problem: 3 + 4 = 7"),
    ("The answer is 3 apples  \nMore text", "number", "The answer is 3 apples", "More text"),
    # The last answer is the final one: an earlier one stays, what follows the last goes.
    ("The answer is 3. Wait: 3 + 1 = 4, the answer is 4. ok", "number",
     "The answer is 3. Wait: 3 + 1 = 4, the answer is 4.", "ok"),
])
def test_a_reply_is_cut_after_the_sentence_of_its_final_answer(reply, answer_format, kept, after):
    assert split_after_answer(reply, answer_format) == (kept, after)
    assert extract_answer(kept, answer_format) == extract_answer(reply, answer_format)


@pytest.mark.parametrize("reply, answer_format", [
    ("12 / 4 = 3. The answer is 3.", "number"),  # nothing after it
    ("12 + 5 = 17 apples in total. Nice", "number"),  # no mark: the last number is not known to end anything
    ("We get $\\boxed{18}$.", "math"),
    ("The answer is 3 and then a story without a full stop", "number"),  # the sentence never ends
    ("(B) is right because", "choice"),
    ("(B) is right. Because water boils.", "choice"),  # an unmarked letter ends nothing
    ("The answer is 3.  ", "number"),  # only spaces after it: the reply stays as it is
    ("no digits here. None at all", "number"), ("A reply. Another sentence", "none"),
    ("Paris", "text"),
])
def test_a_reply_that_ends_with_its_answer_or_marks_none_is_not_cut(reply, answer_format):
    assert split_after_answer(reply, answer_format) == (reply, "")
