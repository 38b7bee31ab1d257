"""Answers compared as mathematics (`verify: {method: math}`, `solve: {answer_format: math}`,
`consistency: {method: math}`, `factory eval --method math`): equal forms match, near misses
do not, MATH and GSM8K references are read as they are, and a pathological comparison ends at
its time limit in the main thread, in a worker thread and where no timer reaches."""

from __future__ import annotations

import json
import signal
import threading
import time

import polars as pl
import pytest

from factory.answers import answer_key, answer_keys, answers_match, extract_answer, read_references, reference_answer
from factory.build import run_recipe
from factory.cache import Cache
from factory.cli import main
from factory.driver import Driver
from factory.errors import FactoryError
from factory.evolve.evaluate import accuracy, eval_step
from factory.llm import ScriptedConfig
from factory.math_answers import math_keys, math_verdicts, prepare
from factory.recipe import load_recipe
from factory.steps.context import StepContext
from factory.steps.drops import DROP, DROP_DETAIL
from factory.steps.verify import Verify, VerifyConfig
from factory.store import read_version
from factory.time_limit import TIMED_OUT, call_with_timer, map_limited
from filters.consistency import Consistency, ConsistencyConfig

EQUAL = [
    ("14/3", "\\frac{14}{3}"), ("4\\frac{2}{3}", "\\frac{14}{3}"), ("4\\frac{2}{3}", "14/3"), ("4 2/3", "14/3"),
    ("\\dfrac{14}{3}", "\\tfrac{14}{3}"), ("\\sqrt{117}", "3\\sqrt{13}"), ("3\\sqrt{13}", "\\sqrt{117}"),
    ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"), ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("0.5", "\\frac{1}{2}"), ("72.0", "72"), ("5.50", "\\$5.50"), ("1,234", "1234"), ("1{,}234", "1234"),
    ("1\\,234", "1234"), ("50\\%", "50"), ("12.5\\%", "12.5"), ("10\\text{ cm}", "10"), ("72 dollars", "72"),
    ("90^\\circ", "90"), ("x = 5", "5"), ("[1, 2)", "\\left[1,2\\right)"), ("(-\\infty, 3]", "(-\\infty,3]"),
    ("\\{3, 1, 2\\}", "\\{1,2,3\\}"), ("(x+1)^2", "x^2+2x+1"), ("3pi/2", "\\frac{3\\pi}{2}"),
    ("0.\\overline{3}", "\\frac{1}{3}"), ("1e3", "1000"), ("$\\frac{1}{2}$", "0.5"), ("\\(\\frac{1}{2}\\)", "0.5"),
    ("-\\frac{1}{2}", "\\frac{-1}{2}"), ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("\\text{Paris}", "Paris"),
]

NOT_EQUAL = [
    ("15/3", "\\frac{14}{3}"), ("4.6667", "\\frac{14}{3}"), ("4\\frac{1}{3}", "14/3"), ("\\sqrt{39}", "3\\sqrt{13}"),
    ("(\\pi/2, 3)", "\\left( 3, \\frac{\\pi}{2} \\right)"), ("(1, 2]", "[1, 2)"), ("(-\\infty, 3)", "(-\\infty, 3]"),
    ("\\{1, 2, 4\\}", "\\{1,2,3\\}"), ("0.33", "\\frac{1}{3}"), ("1,243", "1234"), ("x - 1", "x + 1"),
    ("(x-1)^2", "x^2+2x+1"), ("y = 5", "x = 6"), ("11:00", "12:00"), ("\\text{London}", "\\text{Paris}"),
    ("3", "-3"), ("100", "1000"), ("\\infty", "-\\infty"),
]


@pytest.mark.parametrize("prediction, reference", EQUAL)
def test_equal_forms_match_as_mathematics(prediction, reference):
    assert answers_match(prediction, reference, "math") is True


@pytest.mark.parametrize("prediction, reference", NOT_EQUAL)
def test_near_misses_do_not_match(prediction, reference):
    assert answers_match(prediction, reference, "math") is False


def test_numeric_keeps_reading_plain_numbers_only():
    assert answers_match("\\frac{14}{3}", "14/3", "numeric") is True
    assert answers_match("1,234", "1234", "numeric") is True
    assert answers_match("\\sqrt{117}", "3\\sqrt{13}", "numeric") is False  # what `math` is for
    assert answers_match("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)", "numeric") is False


def test_missing_or_empty_answers_never_match():
    assert math_verdicts([(None, "1"), ("1", None), ("", "1"), ("  ", "1"), ("1", "1")]) == \
        [False, False, False, False, True]


@pytest.mark.parametrize("answer, prepared", [
    ("4 2/3", "4\\frac{2}{3}"), ("-4 2/3", "-4\\frac{2}{3}"), ("0.1\\overline{6}", "\\frac{1}{6}"),
    ("0.\\overline{3}", "\\frac{1}{3}"), ("1\\,234\\,567", "1234567"), ("3pi/2", "3\\pi/2"), ("\\pi", "\\pi"),
    ("72 dollars", "72"), ("2 pi", "2 \\pi"), ("1.5e-3", "1.5\\times10^{-3}"), ("$x$", "x"), ("\\(x\\)", "x"),
    ("−3", "-3"), ("\\varnothing", "\\emptyset"), ("\\frac{1}{2}", "\\frac{1}{2}"),
])
def test_prepare_rewrites_only_the_plain_forms_math_verify_misreads(answer, prepared):
    assert prepare(answer) == prepared


# -- references: MATH and GSM8K as they are ---------------------------------------------------

MATH_SOLUTION = ("The triangle's height is $\\sqrt{3}$, so the ratio is\n$$\\frac{\\sqrt{3}}{2} = "
                 "\\boxed{\\frac{\\sqrt{3}}{2}}.$$")
MATH_NESTED = "Converting, we get $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$"
GSM8K = "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 1,234"


@pytest.mark.parametrize("reference, read", [
    (MATH_SOLUTION, "\\frac{\\sqrt{3}}{2}"), (MATH_NESTED, "\\left( 3, \\frac{\\pi}{2} \\right)"),
    (GSM8K, "1,234"), ("#### 72", "72"), ("The answer is $\\frac{1}{2}$.", "$\\frac{1}{2}$."),
    ("\\frac{14}{3}", "\\frac{14}{3}"), ("(3, \\pi/2)", "(3, \\pi/2)"),
    ("", None), ("   ", None), (None, None), ("so $\\boxed{}$", None), ("so $\\boxed{\\frac{1}{2}$", None),
])
def test_math_references_are_read_as_they_are(reference, read):
    assert reference_answer(reference, "math") == read


def test_math_and_gsm8k_references_match_their_answers():
    assert answers_match("\\frac{\\sqrt3}{2}", reference_answer(MATH_SOLUTION, "math"), "math")
    assert answers_match("(3, \\pi/2)", reference_answer(MATH_NESTED, "math"), "math")
    assert answers_match("1234", reference_answer(GSM8K, "math"), "math")
    assert answers_match("0.5", reference_answer("The answer is $\\frac{1}{2}$.", "math"), "math")
    assert not answers_match("1243", reference_answer(GSM8K, "math"), "math")


def test_a_math_reference_without_an_answer_is_an_error_naming_it():
    with pytest.raises(FactoryError) as err:
        read_references(["#### 72", "so $\\boxed{}$"], "math", "answer", lambda i: f"row {i}", "fix it")
    assert str(err.value) == ("row 1: the reference 'so $\\\\boxed{}$' in column 'answer' holds no answer (empty, or "
                              "an empty or unclosed \\boxed{}); write the answer (14/3, \\frac{14}{3}), or end a "
                              "worked solution with `\\boxed{14/3}` or `#### 72`; fix it")


# -- solve: {answer_format: math} -------------------------------------------------------------

@pytest.mark.parametrize("reply, answer", [
    ("So the ratio is $\\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),
    ("First \\boxed{2}, then corrected: \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("Adding up: 9 * 2 = 18.\n#### 1,234", "1,234"),
    ("We simplify. The answer is $\\frac{14}{3}$. Done.", "\\frac{14}{3}"),
    ("The final answer is 14/3.", "14/3"),
    ("**Answer:** \\(4\\frac{2}{3}\\)", "4\\frac{2}{3}"),
    ("Thus $x = 5$ and so $y = \\sqrt{2}$", "y = \\sqrt{2}"),
    ("Hence \\[\\{1, 2, 3\\}\\] is the set.", "\\{1, 2, 3\\}"),
    ("It costs $5 and $7 more, so 12 in total", "12"),
    ("There are 3 cats and 4 dogs, 7 animals", "7"),
    ("I cannot tell.", None), ("", None), ("\\boxed{}", None),
])
def test_solve_math_answer_format_takes_the_final_answer_as_written(reply, answer):
    assert extract_answer(reply, "math") == answer


def scripted(replies: dict[str, str]) -> ScriptedConfig:
    """Rules that give each reply (written as the model writes it) to the tasks that match."""
    return ScriptedConfig(rules=[{"match": match, "reply": reply.replace("{", "{{").replace("}", "}}")}
                                 for match, reply in replies.items()])


REPLIES = scripted({"ratio": "The ratio is $\\frac{\\sqrt{3}}{2}$, so \\boxed{\\frac{\\sqrt{3}}{2}}.",
                    "polar": "The point is $\\left( 3, \\frac{\\pi}{2} \\right)$.",
                    "eggs": "She makes 9 * 2 = 18 dollars. The answer is 18.",
                    "mixed": "The answer is $4\\frac{2}{3}$.",
                    "wrong": "It is \\boxed{\\sqrt{39}}.",
                    ".": "I do not know."})
LLM = "llm: " + json.dumps({"backend": "scripted", "rules": REPLIES.rules}) + "\n"


def _run(write_recipe, tmp_path, rows, steps):
    source = tmp_path / "math.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows))
    recipe = write_recipe(f"name: math\n{LLM}source: {{path: {source}}}\nsteps:\n{steps}")
    version, manifest, _ = run_recipe(load_recipe(recipe), tmp_path / "out",
                                      driver=Driver(Cache(tmp_path / "cache"), progress=False))
    return read_version(version), read_version(version, "rejected"), manifest


def test_solve_and_verify_compare_as_mathematics_in_a_run(write_recipe, tmp_path):
    rows = [{"id": "ratio", "instruction": "What is the ratio?", "answer": MATH_SOLUTION},
            {"id": "polar", "instruction": "Convert to polar.", "answer": MATH_NESTED},
            {"id": "eggs", "instruction": "How much from the eggs?", "answer": "9 * 2 = 18\n#### 18"},
            {"id": "mixed", "instruction": "What is 14 over 3 as a mixed number?", "answer": "\\frac{14}{3}"},
            {"id": "wrong", "instruction": "A wrong radical", "answer": "\\boxed{3\\sqrt{13}}"},
            {"id": "none", "instruction": "Unknown.", "answer": "#### 1"}]
    kept, rejected, manifest = _run(write_recipe, tmp_path, rows, "  - solve: {answer_format: math}\n"
                                    "  - verify: {method: math, drop_incorrect: true}\n")
    assert dict(zip(kept["id"], kept["prediction"])) == {
        "ratio": "\\frac{\\sqrt{3}}{2}", "polar": "\\left( 3, \\frac{\\pi}{2} \\right)", "eggs": "18",
        "mixed": "4\\frac{2}{3}"}
    assert kept["correct"].to_list() == [True] * 4
    assert dict(zip(rejected["id"], rejected["drop_reason"])) == {"wrong": "incorrect", "none": "no_answer"}
    assert manifest["steps"][1]["report"] == {"math_timeouts": 0}


# -- verify over a table: labels, drop reasons, the time limit --------------------------------

PATHOLOGICAL = ("(x+1)^{100000}", "3")  # sympy expands it for minutes


def test_verify_labels_and_drops_with_reasons_and_counts_comparisons_past_the_limit():
    batch = pl.DataFrame({"id": ["a", "b", "c", "d"],
                          "answer": ["#### 1,234", "\\boxed{\\frac{14}{3}}", "\\boxed{[1, 2)}", PATHOLOGICAL[1]],
                          "prediction": ["1234", "4\\frac{2}{3}", "(1, 2]", PATHOLOGICAL[0]]})
    labelled = Verify(VerifyConfig(method="math", math_timeout=0.5)).process(batch, ctx := StepContext())
    assert labelled["correct"].to_list() == [True, True, False, False]
    assert labelled[DROP].to_list() == [None] * 4
    assert ctx.report == {"math_timeouts": 1}

    out = Verify(VerifyConfig(method="math", drop_incorrect=True, math_timeout=0.5)).process(batch, ctx := StepContext())
    assert out[DROP].to_list() == [None, None, "incorrect", "incorrect"]
    assert out[DROP_DETAIL].to_list() == [None, None, None, "the math comparison ran past its 0.5 s limit "
                                                             "(math_timeout); counted as incorrect"]
    assert ctx.report == {"math_timeouts": 1}


def test_verify_gives_each_math_comparison_its_math_timeout(monkeypatch):
    import factory.steps.verify as verify

    asked = []
    monkeypatch.setattr(verify, "math_verdicts", lambda pairs, seconds: asked.append((pairs, seconds)) or [True, None])
    batch = pl.DataFrame({"answer": ["#### 7", "\\boxed{2}"], "prediction": ["7", "x"]})
    out = Verify(VerifyConfig(method="math", math_timeout=2.5)).process(batch, ctx := StepContext())
    assert asked == [([("7", "7"), ("x", "2")], 2.5)]
    assert out["correct"].to_list() == [True, False] and ctx.report == {"math_timeouts": 1}
    # A second batch of the same step adds to the count; a late comparison's detail comes first.
    batch = batch.with_columns(pl.Series("response", ["3 + 4 = 7", "1 + 1 = 3"]))
    out = Verify(VerifyConfig(method="math", math_timeout=2.5, check_calculations=True, drop_incorrect=True)).process(
        batch, ctx)
    assert ctx.report == {"math_timeouts": 2}
    assert out[DROP_DETAIL].to_list() == [None, "the math comparison ran past its 2.5 s limit (math_timeout); counted "
                                                "as incorrect; false: 1 + 1 = 3"]


def _verdict_and_seconds(pairs, seconds):
    started = time.monotonic()
    verdicts = math_verdicts(pairs, seconds)
    return verdicts, time.monotonic() - started


def test_a_pathological_comparison_is_not_equal_at_its_limit_in_the_main_thread():
    verdicts, took = _verdict_and_seconds([PATHOLOGICAL, ("14/3", "\\frac{14}{3}")], 0.5)
    assert verdicts == [None, True]
    assert took < 30  # without the limit it runs for minutes


def test_a_pathological_comparison_is_not_equal_at_its_limit_in_a_worker_thread():
    found = {}
    worker = threading.Thread(target=lambda: found.update(zip(("verdicts", "took"), _verdict_and_seconds(
        [PATHOLOGICAL, ("\\sqrt{117}", "3\\sqrt{13}")], 0.5))))
    worker.start()
    worker.join(120)
    assert found["verdicts"] == [None, True]
    assert found["took"] < 60  # a fresh worker process imports sympy first; the comparison alone runs for minutes
    assert math_keys(["\\frac{14}{3}", "4\\frac{2}{3}"], where="process") == ["14/3", "14/3"]


def _ignore_the_timer(seconds: float) -> str:
    """Code the timer cannot interrupt (as a long C call): only killing its process ends it."""
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "finished"


def _import_this_module(_) -> None:
    """A setup: unpickling it imports this module in the worker outside the calls' 0.2 s (the replaced
    worker's import of it took over 1.2 s on a loaded machine and ended the second call as late)."""


def test_a_worker_the_timer_cannot_stop_is_killed_and_replaced():
    assert map_limited(_ignore_the_timer, [600.0, 0.0], 0.2, where="process",
                       setup=_import_this_module) == [TIMED_OUT, "finished"]


def _swallow_the_first_interruption(seconds: float) -> str:
    try:
        time.sleep(seconds)
    except BaseException:  # as careless library code does
        pass
    time.sleep(seconds)
    return "finished"


def test_code_that_swallows_the_interruption_is_interrupted_again():
    assert call_with_timer(_swallow_the_first_interruption, 5, 0.1) is TIMED_OUT


def test_the_limit_leaves_the_callers_own_timer_and_handler_alone():
    fired = []
    mine = lambda *_: fired.append(True)  # noqa: E731
    previous = signal.signal(signal.SIGALRM, mine)
    try:
        signal.setitimer(signal.ITIMER_REAL, 100)
        assert call_with_timer(time.sleep, 5, 0.1) is TIMED_OUT
        assert call_with_timer(lambda x: x + 1, 1, 5) == 2
        assert 90 < signal.getitimer(signal.ITIMER_REAL)[0] <= 100
        assert signal.getsignal(signal.SIGALRM) is mine and fired == []
        signal.setitimer(signal.ITIMER_REAL, 0.05)  # the caller's alarm rings during a limited call
        assert call_with_timer(lambda s: time.sleep(s) or "slept", 0.3, 5) == "slept"
        assert fired == [True]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- voting: math-equal answers share a key ---------------------------------------------------

def test_math_keys_group_equal_forms_and_keep_others_apart():
    answers = ["14/3", "\\frac{14}{3}", "4\\frac{2}{3}", "4 2/3", "\\sqrt{117}", "3\\sqrt{13}", "(3, \\pi/2)",
               "\\left( 3, \\frac{\\pi}{2} \\right)", "\\{2, 1\\}", "\\{1,2\\}", "(-\\infty, 3]", "\\left(-\\infty,3\\right]",
               "x = 5", "5", "5.0", "(x+1)^2", "x^2+2x+1", "12:00", "11:00", None, ""]
    keys = answer_keys(answers, "math")
    assert keys == ["14/3"] * 4 + ["~10.8166538264"] * 2 + ["(3,~1.57079632679)"] * 2 + ["{1,2}"] * 2 + \
        ["(-oo,3]"] * 2 + ["5"] * 3 + ["x**2 + 2*x + 1"] * 2 + ["text:12:00", "text:11:00", None, None]
    assert answer_key("4\\frac{2}{3}", "math") == answer_key("\\frac{14}{3}", "math") == "14/3"


def test_consistency_votes_math_equal_answers_together():
    table = pl.DataFrame({"instruction": ["q1"] * 4 + ["q2"] * 3,
                          "prediction": ["\\frac{14}{3}", "14/3", "4\\frac{2}{3}", "5",
                                         "\\sqrt{117}", "10.8", None]})
    out = Consistency(ConsistencyConfig(method="math", min_agreement=0.5)).keep(table, StepContext())
    assert out["majority_answer"].to_list() == ["\\frac{14}{3}"] * 4 + ["\\sqrt{117}"] * 3
    assert out["agreement"].to_list() == [0.75] * 4 + [pytest.approx(1 / 3)] * 3
    assert out["reason"].to_list() == [None, None, None, "minority_answer"] + ["low_agreement"] * 3
    plain = Consistency(ConsistencyConfig(method="auto", min_agreement=0.5)).keep(table, StepContext())
    assert plain["agreement"].to_list()[:4] == [0.5] * 4  # 4\frac{2}{3} is not 14/3 as a number


# -- evaluation: factory eval --method math, and accuracy with answer_format math ------------

SCRIPTED = scripted({"ratio": "So \\boxed{\\frac{1}{\\sqrt{2}}}.", "mixed": "The answer is $4\\frac{2}{3}$.",
                     ".": "The answer is 7."})


def test_accuracy_compares_as_mathematics():
    table = pl.DataFrame({"instruction": ["What is the ratio?", "A mixed number?", "Seven?"],
                          "answer": ["\\boxed{\\frac{\\sqrt{2}}{2}}", "#### 14/3", "\\boxed{8}"]})
    for method in ("math", "auto"):  # auto compares as the answer format reads: as mathematics
        result = accuracy(Driver(progress=False), eval_step(SCRIPTED, True, "math", 64), table, "instruction",
                          "answer", method)
        assert [r["correct"] for r in result.results] == [True, True, False]
        assert [r["prediction"] for r in result.results] == ["\\frac{1}{\\sqrt{2}}", "4\\frac{2}{3}", "7"]
    numeric = accuracy(Driver(progress=False), eval_step(SCRIPTED, True, "math", 64), table, "instruction",
                       "answer", "numeric")
    assert [r["correct"] for r in numeric.results] == [False, False, False]


def test_factory_eval_method_math(tmp_path, capsys):
    eval_set = tmp_path / "math.jsonl"
    eval_set.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "What is the ratio?", "answer": "\\boxed{\\frac{\\sqrt{2}}{2}}"},
        {"instruction": "A mixed number?", "answer": "The answer is \\frac{14}{3}."}]))
    llm = json.dumps({"backend": "scripted", "rules": SCRIPTED.rules})
    assert main(["eval", str(eval_set), "--llm", llm, "--answer-format", "math", "--method", "math",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["correct"] == 2
