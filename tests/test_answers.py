"""Answer extraction (math, multiple choice, free text) and programmatic verification."""

from __future__ import annotations

import polars as pl
import pytest

from factory.answers import (
    answer_key,
    answers_match,
    extract_answer,
    extract_choice,
    extract_number,
    extract_text,
    split_after_answer,
)
from factory.steps.drops import DROP
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
    ("Paris", "text"),
])
def test_a_reply_that_ends_with_its_answer_or_marks_none_is_not_cut(reply, answer_format):
    assert split_after_answer(reply, answer_format) == (reply, "")
