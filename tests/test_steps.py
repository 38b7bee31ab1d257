"""The first steps: robust parsing of real model replies, self_instruct, solve, judge, score."""

from __future__ import annotations

import polars as pl
import pytest

from factory.errors import ParseError
from factory.llm import ScriptedBackend, ScriptedConfig
from factory.llm.requests import LLMClient
from factory.recipe import load_recipe
from factory.steps.context import StepContext
from factory.steps.drops import DROP, DROP_DETAIL, RAW_REPLY
from factory.steps.judge import parse_score
from factory.steps.self_instruct import clean_task

from .conftest import SCRIPTED_LLM, SEEDS


@pytest.mark.parametrize("reply, score", [
    ("The answer is right. Score: 8", 8.0),
    ("Score: 9.5", 9.5),
    ("**Score:** 7", 7.0),
    ("The response is rated 10 out of 10.", 10.0),
    ("The response is rated 1 out of 5 based on feedback.", 2.0),  # rescaled to the 1-10 scale
    ("I'd give it a 6/10.", 6.0),
    ("Score: 9.10 out of ", 9.1),
    ("On a scale of 1 to 10, my score is 4", 4.0),
    (" 7\n\nThe response is", 7.0),  # a bare number after a 'Score:' prefill
    ("Rating: 3", 3.0),
])
def test_parse_score_reads_what_models_write(reply, score):
    assert parse_score(reply, 10) == score


@pytest.mark.parametrize("reply", ["Score: N", " N, where N is a number from 1 to 10.", "Score: 99.9999",
                                   "It is good.", "", "Score: 0"])
def test_parse_score_refuses_what_is_not_a_score(reply):
    with pytest.raises(ParseError):
        parse_score(reply, 10)


@pytest.mark.parametrize("reply, task", [
    (" What is the probability of rolling a six on a single die?\n", "What is the probability of rolling a six on a single die?"),
    ("8. Task: Write a song about summer.", "Write a song about summer."),
    (' "Explain recursion to a child."\n9. more', "Explain recursion to a child."),
    ("- List three fruits", "List three fruits"),
])
def test_clean_task_takes_one_line_without_numbering(reply, task):
    assert clean_task(reply) == task


def steps_of(write_recipe, steps: str, llm: str = SCRIPTED_LLM):
    return load_recipe(write_recipe(f"name: s\n{llm}source: {{path: {SEEDS}}}\nsteps:\n{steps}output: {{format: raw}}\n"))


def bind(step, rules=None, reply_fn=None) -> StepContext:
    """A context whose client is the step's scripted backend (or ``reply_fn``)."""
    config = ScriptedConfig(rules=rules or step.llm_config.rules, default=step.llm_config.default)
    return StepContext(llm=LLMClient(ScriptedBackend(config, reply_fn=reply_fn)))


def test_self_instruct_filters_candidates_and_reports_reasons(write_recipe):
    recipe = steps_of(write_recipe, "  - self_instruct: {num_tasks: 6, prompts_per_round: 10, max_rounds: 2}\n")
    distinct = [" Explain why leaves change colour in autumn", " Translate 'good morning' into Spanish",
                " Give three tips for a job interview", " Classify these fruits by colour: lemon, cherry, lime",
                " Summarize the rules of chess in five sentences"]
    replies = iter([" Draw a picture of a cat", " Hi", " Why does the Moon show phases?", "",
                    " Describe how rain forms in two sentences", " Describe how rain forms in two short sentences"]
                   + distinct + [f" Unused candidate number {i}" for i in range(20)])
    client = LLMClient(ScriptedBackend(ScriptedConfig(), reply_fn=lambda conv, k: next(replies)))
    out = recipe.steps[0].process(recipe.source.read(), StepContext(llm=client))
    kept = out.filter(pl.col(DROP).is_null())
    dropped = out.filter(pl.col(DROP).is_not_null())
    assert kept["instruction"].to_list() == ["Describe how rain forms in two sentences"] + [d.strip() for d in distinct]
    assert set(kept["origin"]) == {"self_instruct"} and set(kept["operation"]) == {"bootstrap"}
    assert dropped[DROP].to_list()[:6] == ["blacklisted", "too_short", "too_similar", "parse_error", "too_similar",
                                          "over_quota"]
    details = dropped[DROP_DETAIL].to_list()
    assert details[0] == "mentions 'picture'"
    assert details[2] == "ROUGE-L 1.00 with: Why does the Moon show phases?"
    assert details[4].startswith("ROUGE-L 0.9") and details[4].endswith("Describe how rain forms in two sentences")
    assert kept["generation"].to_list() == [1] * 5 + [2]  # the second round asked for the sixth


def test_rouge_l_matches_its_definition():
    from factory.steps.self_instruct import rouge_l, tokens

    a, b = tokens("Write a poem about the sea"), tokens("Write a short poem about the ocean")
    # LCS = write a poem about the (5); F1 = 2*5 / (6 + 7)
    assert rouge_l(a, [b, a, []]) == [pytest.approx(10 / 13), 1.0, 0.0]


def test_self_instruct_writes_instances_for_kept_tasks(write_recipe):
    recipe = steps_of(write_recipe, "  - self_instruct: {num_tasks: 2, prompts_per_round: 2, instances: 2}\n")
    prompts = []
    tasks = iter([" Explain why leaves change colour in autumn", " Add the two numbers you are given"])

    def reply(conv, k):
        if conv[-1]["content"] != "Input:":  # a task prompt
            return next(tasks)
        prompts.append(conv[-2]["content"])
        if "colour" in conv[-2]["content"].rsplit("Task: ", 1)[1]:
            return " <noinput>\nOutput: Red, because of anthocyanins." if k == 0 else " gibberish"
        return f" 3 and 4\nOutput: {7 + k}"

    client = LLMClient(ScriptedBackend(ScriptedConfig(), reply_fn=reply))
    out = recipe.steps[0].process(recipe.source.read(), StepContext(llm=client))
    kept = out.filter(pl.col(DROP).is_null())
    assert kept.select("instruction", "input", "output").rows() == [
        ("Explain why leaves change colour in autumn", "", "Red, because of anthocyanins."),
        ("Add the two numbers you are given", "3 and 4", "7"),
        ("Add the two numbers you are given", "3 and 4", "8")]
    assert out.filter(pl.col(DROP).is_not_null())[DROP].to_list() == ["no_instance"]
    assert prompts[0].count("Output: ") == 2  # two seed demonstrations with their outputs


def test_self_instruct_prompts_mix_seed_and_generated_examples(write_recipe):
    recipe = steps_of(write_recipe, "  - self_instruct: {num_tasks: 4, prompts_per_round: 2, examples: 4, "
                                    "machine_examples: 2}\n")
    seen = []

    def reply(conv, k):
        seen.append(conv[-1]["content"])
        return f" Generated task number {len(seen)} about oceans"

    client = LLMClient(ScriptedBackend(ScriptedConfig(), reply_fn=reply))
    recipe.steps[0].process(recipe.source.read(), StepContext(llm=client))
    first, last = seen[0], seen[-1]
    assert first.count("\n") == 4 and first.endswith("5.")  # four examples, then the open slot
    assert "Generated task number" not in first and "Generated task number" in last


def test_solve_samples_expand_rows_and_parse_errors_keep_the_raw_reply(write_recipe):
    recipe = steps_of(write_recipe, "  - solve: {samples: 3}\n")
    step = recipe.steps[0]
    ctx = bind(step, reply_fn=lambda conv, k: "" if k == 1 else f"answer {k}")
    batch = recipe.source.read().head(2)
    out = step.process(batch, ctx)
    assert out.height == 6
    assert out.filter(pl.col(DROP).is_null())["sample"].to_list() == [0, 2, 0, 2]
    bad = out.filter(pl.col(DROP) == "parse_error")
    assert bad[RAW_REPLY].to_list() == ["", ""] and bad["sample"].to_list() == [1, 1]


def test_solve_appends_the_input_to_the_task(write_recipe):
    recipe = steps_of(write_recipe, "  - solve: {}\n")
    sent = []
    step = recipe.steps[0]
    ctx = bind(step, reply_fn=lambda conv, k: sent.append(conv[-1]["content"]) or "ok")
    rows = recipe.source.read().filter(pl.col("input") != "").head(1)
    step.process(rows, ctx)
    assert sent[0] == rows["instruction"][0] + "\n\n" + rows["input"][0]


def test_judge_without_reasoning_prefills_and_parses(write_recipe):
    recipe = steps_of(write_recipe, "  - solve: {}\n  - judge: {reasoning: false}\n")
    sent = []
    judge = recipe.steps[1]
    ctx = bind(judge, reply_fn=lambda conv, k: sent.append(conv) or " 7")
    table = pl.DataFrame({"instruction": ["q"], "response": ["a"]})
    out = judge.process(table, ctx)
    assert out["score"].to_list() == [7.0] and out["judgement"].to_list() == ["Score: 7"]
    assert sent[0][-1] == {"role": "assistant", "content": "Score:"}
    params = judge.generation_params()
    assert "\n" in params.stop and params.max_tokens == 8


def test_custom_template_and_system_prompt(write_recipe, tmp_path):
    (tmp_path / "ask.j2").write_text("Answer briefly: {{ task }}")
    recipe = steps_of(write_recipe, "  - solve: {template: ask.j2, system: Be terse.}\n")
    sent = []
    step = recipe.steps[0]
    ctx = bind(step, reply_fn=lambda conv, k: sent.append(conv) or "ok")
    step.process(pl.DataFrame({"instruction": ["2+2?"]}), ctx)
    assert sent[0] == [{"role": "system", "content": "Be terse."},
                       {"role": "user", "content": "Answer briefly: 2+2?"}]


def test_template_problems_are_recipe_errors(write_recipe):
    from factory.errors import RecipeError

    with pytest.raises(RecipeError, match="template file 'missing.j2' does not exist"):
        steps_of(write_recipe, "  - solve: {template: missing.j2}\n")
    with pytest.raises(RecipeError, match="the template does not compile"):
        steps_of(write_recipe, "  - solve: {template: 'Answer {{ task '}\n")


def test_score_filter_thresholds(write_recipe):
    recipe = steps_of(write_recipe, "  - solve: {}\n  - judge: {}\n  - score: {min: 4, max: 8}\n")
    score = recipe.steps[2]
    out = score.process(pl.DataFrame({"score": [3.0, 4.0, 8.0, 9.0, None]}))
    assert out[DROP].to_list() == ["below_min", None, None, "above_max", "missing_score"]
