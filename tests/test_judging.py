"""Judges (binary, pairwise both orders), preference pairs for DPO, and SELF refinement."""

from __future__ import annotations

import polars as pl
import pytest

from factory.errors import ParseError, RecipeError
from factory.llm import ScriptedBackend, ScriptedConfig
from factory.llm.requests import LLMClient
from factory.recipe import load_recipe
from factory.steps.context import StepContext
from factory.steps.drops import DROP, RAW_REPLY
from factory.steps.judge import parse_verdict
from factory.steps.pairwise import combine_orders, parse_winner

from .conftest import SCRIPTED_LLM, SEEDS


def step_from(write_recipe, steps: str, index: int = -1, reply_fn=None):
    recipe = load_recipe(write_recipe(f"name: j\n{SCRIPTED_LLM}source: {{path: {SEEDS}}}\nsteps:\n{steps}"
                                      "output: {format: raw}\n"))
    return recipe.steps[index], StepContext(llm=LLMClient(ScriptedBackend(ScriptedConfig(), reply_fn=reply_fn)))


@pytest.mark.parametrize("reply, verdict", [
    ("The sum is right. Verdict: correct", True), ("Verdict: incorrect", False), ("Verdict: **Incorrect**", False),
    ("It is not correct.", False), ("Verdict: yes", True), ("The answer is wrong.", False),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) is verdict


def test_parse_verdict_refuses_replies_without_one():
    with pytest.raises(ParseError):
        parse_verdict("Hmm, hard to say.")


def test_binary_judge_sees_the_reference_and_labels(write_recipe):
    seen = []

    def reply(conv, k):
        seen.append(conv[-1]["content"])
        return "It matches the reference. Verdict: correct" if "Reference answer: 12" in conv[-1]["content"] \
            else "Verdict: incorrect"

    step, ctx = step_from(write_recipe, "  - solve: {}\n  - judge: {mode: binary, reference_column: output}\n",
                     reply_fn=reply)
    out = step.process(pl.DataFrame({"instruction": ["6+6?", "6+7?"], "response": ["12", "12"],
                                     "output": ["12", "13"]}), ctx)
    assert out["judge_correct"].to_list() == [True, False]
    assert "Reference answer: 13" in seen[1]
    assert step.produces() == ["judge_correct", "judgement"]


@pytest.mark.parametrize("reply, winner", [
    ("A is more detailed. Winner: A", "A"), ("Winner: **B**", "B"), ("They are equal. Winner: tie", "tie"),
    ("Response B is better because...", "B"),
])
def test_parse_winner(reply, winner):
    assert parse_winner(reply) == winner


def test_both_orders_cancel_position_bias():
    assert combine_orders("A", "B") == "a"      # a won in both orders
    assert combine_orders("A", "A") == "tie"    # the judge always picks the first slot
    assert combine_orders("tie", "B") == "a"
    assert combine_orders("B", "tie") == "b"


def test_pairwise_asks_both_orders(write_recipe):
    asked = []

    def judge(conv, k):
        text = conv[-1]["content"]
        asked.append(text)
        a = text.split("Response A: ")[1].split("\n")[0]
        return "Winner: A" if a == "good answer" else "Winner: B"

    step, ctx = step_from(write_recipe, "  - solve: {}\n  - pairwise: {b_column: output}\n", reply_fn=judge)
    out = step.process(pl.DataFrame({"instruction": ["q1", "q2"], "response": ["good answer", "bad answer"],
                                     "output": ["bad answer", "good answer"]}), ctx)
    assert out["winner"].to_list() == ["a", "b"]
    assert len(asked) == 4
    assert "Response A: good answer" in asked[0] and "Response A: bad answer" in asked[1]


def test_pairwise_position_biased_judge_gives_ties(write_recipe):
    step, ctx = step_from(write_recipe, "  - solve: {}\n  - pairwise: {b_column: output}\n",
                     reply_fn=lambda conv, k: "Winner: A")
    out = step.process(pl.DataFrame({"instruction": ["q"], "response": ["x"], "output": ["y"]}), ctx)
    assert out["winner"].to_list() == ["tie"]


def test_preference_pairs_by_score(write_recipe):
    step, ctx = step_from(write_recipe, "  - solve: {samples: 3}\n  - judge: {}\n  - preference_pairs: {min_margin: 2}\n")
    table = pl.DataFrame({
        "instruction": ["t1", "t1", "t1", "t2", "t2", "t3"],
        "response": ["meh", "great", "bad", "ok", "fine", "alone"],
        "score": [5.0, 9.0, 2.0, 6.0, 7.0, 8.0]})
    out = step.process(table, ctx)
    pairs = out.filter(pl.col(DROP).is_null())
    assert pairs.select("prompt", "chosen", "rejected", "chosen_score", "rejected_score").rows() == [
        ("t1", "great", "bad", 9.0, 2.0)]
    reasons = dict(out.filter(pl.col(DROP).is_not_null()).group_by(DROP).len().iter_rows())
    assert reasons == {"small_margin": 2, "single_response": 1}


def test_preference_pairs_by_pairwise_round_robin(write_recipe):
    quality = {"best": 3, "middle": 2, "worst": 1}

    def judge(conv, k):
        text = conv[-1]["content"]
        a = text.split("Response A: ")[1].split("\n")[0]
        b = text.split("Response B: ")[1].split("\n")[0]
        return "Winner: A" if quality[a] > quality[b] else "Winner: B"

    step, ctx = step_from(write_recipe, "  - solve: {samples: 3}\n  - preference_pairs: {by: pairwise}\n", reply_fn=judge)
    out = step.process(pl.DataFrame({"instruction": ["t"] * 3, "response": ["middle", "worst", "best"]}), ctx)
    row = out.filter(pl.col(DROP).is_null()).row(0, named=True)
    assert (row["chosen"], row["rejected"], row["chosen_score"], row["rejected_score"]) == ("best", "worst", 2.0, 0.0)


def test_preference_pairs_validates_columns(write_recipe):
    with pytest.raises(RecipeError, match="needs column 'score'"):
        load_recipe(write_recipe(f"name: j\n{SCRIPTED_LLM}source: {{path: {SEEDS}}}\nsteps:\n"
                                 "  - solve: {samples: 2}\n  - preference_pairs: {}\noutput: {format: raw}\n"))


def test_self_refine_loops_until_the_feedback_says_correct(write_recipe):
    def model(conv, k):
        text = conv[-1]["content"]
        if text.startswith("Here is a task and an answer"):
            answer = text.split("Answer: ")[1].split("\n")[0]
            return "Looks good. Verdict: correct" if answer == "v2" else f"{answer} has a mistake. Verdict: incorrect"
        answer = text.split("Answer: ")[1].split("\n")[0]
        return {"v0": "v1", "v1": "v2"}[answer]

    step, ctx = step_from(write_recipe, "  - solve: {}\n  - self_refine: {max_rounds: 3}\n", reply_fn=model)
    out = step.process(pl.DataFrame({"instruction": ["task a", "task b"], "response": ["v0", "v2"]}), ctx)
    a, b = out.to_dicts()
    assert (a["initial_response"], a["response"], a["refined_response"], a["refine_rounds"]) == ("v0", "v2", "v2", 2)
    assert a["feedback_history"] == ["v0 has a mistake. Verdict: incorrect", "v1 has a mistake. Verdict: incorrect",
                                     "Looks good. Verdict: correct"]
    assert a["verdict"] == "correct"
    assert (b["refine_rounds"], b["response"], b["verdict"]) == (0, "v2", "correct")


def test_self_refine_stops_at_max_rounds_and_drops_rows_without_feedback(write_recipe):
    def model(conv, k):
        text = conv[-1]["content"]
        if text.startswith("Here is a task and an answer"):
            return "" if "task b" in text else "Still wrong. Verdict: incorrect"
        return "better"

    step, ctx = step_from(write_recipe, "  - solve: {}\n  - self_refine: {max_rounds: 2}\n", reply_fn=model)
    out = step.process(pl.DataFrame({"instruction": ["task a", "task b"], "response": ["v0", "v0"]}), ctx)
    kept = out.filter(pl.col(DROP).is_null()).row(0, named=True)
    assert kept["refine_rounds"] == 2 and kept["verdict"] == "incorrect"
    dropped = out.filter(pl.col(DROP).is_not_null())
    assert dropped[DROP].to_list() == ["parse_error"] and dropped[RAW_REPLY].to_list() == [""]


def test_feedback_then_refine_as_separate_steps(write_recipe):
    recipe_steps = "  - solve: {}\n  - feedback: {}\n  - refine: {}\n"
    feedback, feedback_ctx = step_from(write_recipe, recipe_steps, index=1, reply_fn=lambda c, k: "Add units. Verdict: unsure")
    refine, refine_ctx = step_from(write_recipe, recipe_steps, index=2, reply_fn=lambda c, k: "12 apples")
    table = feedback.process(pl.DataFrame({"instruction": ["6+6 apples?"], "response": ["12"]}), feedback_ctx)
    assert table["verdict"].to_list() == ["unclear"]
    out = refine.process(table.drop(DROP, strict=False), refine_ctx)
    row = out.row(0, named=True)
    assert (row["initial_response"], row["response"], row["refined_response"]) == ("12", "12 apples", "12 apples")
    assert row["feedback"] == "Add units. Verdict: unsure"


def test_judge_on_a_different_model_than_the_solver(write_recipe):
    recipe = load_recipe(write_recipe(f"""\
        name: j
        {SCRIPTED_LLM.replace(chr(10), chr(10) + '        ')}
        source: {{path: {SEEDS}}}
        steps:
          - solve: {{}}
          - judge: {{llm: {{model: strong-judge, default: "Score: 9"}}}}
        """))
    solve, judge = recipe.steps
    assert solve.llm_config.model == "scripted" and judge.llm_config.model == "strong-judge"
