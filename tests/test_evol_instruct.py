"""Evol-Instruct: operations by weight, lineage, elimination rules, parsing real replies, recipes.

What each saved reply (tests/data/evol_replies.json) must give is in tests/data/evol_verdicts.json,
written by reading the replies.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from factory.config import build
from factory.errors import ParseError, RecipeError
from factory.llm import ScriptedBackend, ScriptedConfig
from factory.llm.requests import LLMClient
from factory.recipe import load_recipe
from factory.steps.context import StepContext
from factory.steps.drops import DROP, DROP_DETAIL
from factory.steps.evol_instruct import (BREADTH_PREFILL, DEPTH_OPERATIONS, DEPTH_PREFILL, EQUALITY_PREFILL,
                                         OPERATIONS, EvolInstruct, EvolInstructConfig, clean_evolved_instruction)
from factory.steps.evol_rules import is_apologetic, is_empty_response, parse_equality

from .conftest import ROOT, SEEDS

REPLIES = json.loads((Path(__file__).parent / "data" / "evol_replies.json").read_text(encoding="utf-8"))


# -- a scripted model that plays every part ---------------------------------------------------

def kind_of(conv) -> str:
    """Which of the step's prompts a conversation is: depth, breadth, equality or response."""
    prefill = conv[-1]["content"] if conv[-1]["role"] == "assistant" else None
    return {DEPTH_PREFILL: "depth", BREADTH_PREFILL: "breadth", EQUALITY_PREFILL: "equality"}.get(prefill, "response")


def given(conv) -> str:
    """The parent task shown in an evolution prompt."""
    return conv[-2]["content"].rsplit("#Prompt#: ", 1)[1]


def fake_model(conv, k):
    kind = kind_of(conv)
    if kind == "depth":
        return f" {given(conv)} Use fewer than {len(given(conv).split())} words."  # new words every generation
    if kind == "breadth":
        return f" Name a rare bird that lives near: {given(conv)}"
    if kind == "equality":
        return " Not Equal"
    return "A helpful answer with several words in it."


def make_step(seed=3, **options) -> EvolInstruct:
    problems = []
    config = build(EvolInstructConfig, options, ("steps", 0, "evol_instruct"), problems)
    assert not problems, problems
    return EvolInstruct(config, index=0, seed=seed)


def scripted(reply_fn=fake_model) -> LLMClient:
    return LLMClient(ScriptedBackend(ScriptedConfig(), reply_fn=reply_fn))


def evolve(table: pl.DataFrame, reply_fn=fake_model, seed=3, **options) -> pl.DataFrame:
    return make_step(seed, **options).process(table, StepContext(llm=scripted(reply_fn)))


def seeds(n=None) -> pl.DataFrame:
    table = pl.read_ndjson(SEEDS)
    return table.head(n) if n else table


def kept(out: pl.DataFrame) -> pl.DataFrame:
    return out.filter(pl.col(DROP).is_null())


# -- operations, lineage, batching, determinism -----------------------------------------------

def test_operations_are_drawn_by_weight_and_zero_is_never_used():
    sent = []
    out = kept(evolve(seeds(), lambda conv, k: sent.append(conv) or fake_model(conv, k),
                      operations={"add_constraints": 3, "deepen": 0, "breadth": 1}, generations=1))
    counts = Counter(out["operation"])
    assert set(counts) == {"add_constraints", "breadth"}
    assert counts["add_constraints"] > counts["breadth"] > 0
    depth_prompts = [conv[-2]["content"] for conv in sent if kind_of(conv) == "depth"]
    assert depth_prompts and all(DEPTH_OPERATIONS["add_constraints"] in p for p in depth_prompts)
    assert not any(DEPTH_OPERATIONS["deepen"] in p for p in depth_prompts)


def test_lineage_across_two_generations():
    table = seeds(8)
    everything = evolve(table, generations=2)
    out = kept(everything)
    first, second = out.filter(pl.col("generation") == 1), out.filter(pl.col("generation") == 2)
    assert first.height == second.height == 8
    inputs = [i if not x else f"{i}\n\n{x}" for i, x in zip(table["instruction"], table["input"])]
    assert sorted(first["parent"]) == sorted(inputs)  # a task's input is folded into what is evolved
    assert set(second["parent"]) == set(first["instruction"])
    for row in second.iter_rows(named=True):
        assert row["operation"] in OPERATIONS
        if row["operation"] != "breadth":
            assert row["instruction"].startswith(row["parent"])
    assert set(out["origin"]) == {"evol_instruct"}
    assert out["response"].null_count() == 0
    assert "domain" not in everything.columns  # an evolved task is a new row, not its parent's


def test_every_llm_call_of_a_generation_is_one_batch():
    client = scripted()
    make_step(generations=2).process(seeds(6), StepContext(llm=client))
    assert client.backend.calls == 6  # (evolve, equality, answer) x 2 generations
    assert client.usage.conversations == 6 * 3 * 2


def test_same_seed_same_rows_other_seed_other_operations():
    first = evolve(seeds(12), seed=5)
    again = evolve(seeds(12), seed=5)
    other = evolve(seeds(12), seed=6)
    assert first.equals(again)
    assert first["operation"].to_list() != other["operation"].to_list()


def test_progress_counts_each_generation():
    calls = []

    class Bar:
        def reset(self, total=None):
            calls.append(("reset", total))

        def update(self, n=1):
            calls.append(("update", n))

        def set_postfix_str(self, text, refresh=True):
            pass

    make_step(generations=2).process(seeds(5), StepContext(llm=scripted(), progress=Bar()))
    assert calls == [("reset", 5), ("update", 5), ("reset", 5), ("update", 5)]


# -- elimination --------------------------------------------------------------------------------

CRAFTED = {  # parent -> (evolution reply, equality reply, answer)
    "Task leak": (" Rewrite the given prompt to make it harder.", " Not Equal", "Fine answer here."),
    "Task copy": (" Task copy add one more constraint or requirement to it please.", " Not Equal", "Fine answer."),
    "Task same: write a poem.": (" Task same - write a poem", " Not Equal", "Fine answer."),
    "Task piece, then more words": (" Task piece, then more", " Not Equal", "Fine answer."),
    "Task judged": (" Task judged with a twist of lemon.", " Equal", "Fine answer."),
    "Task sorry": (" Task sorry, but in French.", " Not Equal", "I'm sorry, but I cannot help with that."),
    "Task empty": (" Task empty, but longer.", " Not Equal", " ... the, of and! "),
    "Task junk": (" 3.", " Not Equal", "Fine answer."),
    "Task good": (" Task good, in under fifty words.", " Not Equal", "A good answer."),
}
EXPECTED = {"Task leak": "template_leak", "Task copy": "template_leak",
            "Task same: write a poem.": "no_information_gain", "Task piece, then more words": "no_information_gain",
            "Task judged": "no_information_gain", "Task sorry": "apologetic_response", "Task empty": "empty_response",
            "Task junk": "parse_error", "Task good": None}


def crafted_model(conv, k):
    kind = kind_of(conv)
    if kind == "depth":
        return CRAFTED[given(conv)][0]
    if kind == "equality":
        first = conv[-2]["content"].split("First instruction: ")[1].split("\n")[0]
        return CRAFTED[first][1]
    evolved = conv[-1]["content"]
    return next(answer for reply, _, answer in CRAFTED.values() if reply.strip() == evolved)


def run_crafted(**options) -> dict:
    table = pl.DataFrame({"instruction": list(CRAFTED)})
    out = evolve(table, crafted_model, operations={"add_constraints": 1}, generations=1, **options)
    return {row["parent"]: row for row in out.iter_rows(named=True)}


def test_each_rule_drops_with_its_own_reason():
    rows = run_crafted()
    assert {parent: row[DROP] for parent, row in rows.items()} == EXPECTED
    assert rows["Task leak"][DROP_DETAIL] == "mentions 'given prompt'"
    assert rows["Task copy"][DROP_DETAIL] == "copies 'add one more constraint or' from the evolving prompt"
    assert rows["Task same: write a poem."][DROP_DETAIL] == "identical to its parent"
    assert rows["Task piece, then more words"][DROP_DETAIL] == "no word that its parent lacks"
    assert rows["Task judged"][DROP_DETAIL].startswith("judged equal")
    assert rows["Task sorry"]["response"] == "I'm sorry, but I cannot help with that."  # explains the drop
    assert rows["Task good"]["instruction"] == "Task good, in under fifty words."


def test_rules_can_be_switched_off():
    rows = run_crafted(eliminate=["template_leak"])
    reasons = {parent: row[DROP] for parent, row in rows.items() if row[DROP]}
    assert reasons == {"Task leak": "template_leak", "Task copy": "template_leak", "Task junk": "parse_error"}


def test_without_responses_the_response_rules_are_skipped():
    step, client = make_step(operations={"add_constraints": 1}, generations=1, respond=False), scripted(crafted_model)
    out = step.process(pl.DataFrame({"instruction": list(CRAFTED)}), StepContext(llm=client))
    assert "response" not in out.columns and "response" not in step.produces()
    assert set(kept(out)["parent"]) == {"Task sorry", "Task empty", "Task good"}
    assert client.backend.calls == 2  # evolve and equality only


def test_unclear_equality_verdicts_keep_the_task_and_are_counted():
    ctx = StepContext(llm=scripted(lambda conv, k: " Hmm." if kind_of(conv) == "equality" else fake_model(conv, k)))
    out = make_step(generations=1).process(seeds(4), ctx)
    assert kept(out).height == 4 and ctx.report["equality_unclear"] == 4


def test_max_rows_caps_the_kept_tasks():
    out = evolve(seeds(4), generations=3, max_rows=5)
    assert kept(out).height == 5
    assert out.filter(pl.col(DROP) == "over_quota").height == 3
    assert kept(out)["generation"].max() == 2  # the cap stops the run before generation 3


def test_keep_parents_outputs_generation_zero_with_answers():
    table = seeds(3).with_columns(pl.lit(None, dtype=pl.String).alias("response"))
    step = make_step(generations=1, keep_parents=True)
    out = kept(step.process(table, StepContext(llm=scripted())))
    parents = out.filter(pl.col("generation") == 0)
    assert parents.height == 3 and set(parents["origin"]) == {"seed"}
    assert parents["parent"].null_count() == 3 and parents["response"].null_count() == 0
    assert parents["domain"].to_list() == table["domain"].to_list()  # input columns travel with them
    assert step.output_columns(["instruction", "domain"]) == ["instruction", "domain", "parent", "operation",
                                                              "generation", "origin", "response"]


def test_rows_without_a_task_are_invalid_input():
    out = evolve(pl.DataFrame({"instruction": ["Name a bird.", None, "  "]}), generations=1)
    assert out.filter(pl.col(DROP) == "invalid_input").height == 2 and kept(out).height == 1


# -- parsing -------------------------------------------------------------------------------------

EVOLUTIONS = [r for r in REPLIES if r["kind"] in ("depth", "breadth")]
EQUALITY = [r for r in REPLIES if r["kind"] == "equality"]


def test_the_saved_replies_cover_every_kind():
    assert len(EVOLUTIONS) >= 50 and len(EQUALITY) >= 20
    assert (Path(__file__).parent / "data" / "evol_replies.json").stat().st_size < 100_000
    assert {r["operation"] for r in EVOLUTIONS} == set(OPERATIONS)


# What each saved reply must give, pinned by reading the replies (tests/data/evol_verdicts.json).
VERDICTS = json.loads((Path(__file__).parent / "data" / "evol_verdicts.json").read_text(encoding="utf-8"))


def outcome(parse, reply):
    """``("ok", value)``, or ``("refused", reason, message)`` for a ParseError."""
    try:
        return ("ok", parse(reply))
    except ParseError as err:
        return ("refused", err.reason, str(err))


def check_verdict(parse, reply: str, verdict: dict, field: str):
    got = outcome(parse, reply)
    if "refused" in verdict:
        assert got[:2] == ("refused", verdict["refused"]), f"expected a refusal ({verdict['because']}), got {got}"
        assert verdict["because"] in got[2]
        return None
    assert got == ("ok", verdict[field])
    return got[1]


@pytest.mark.parametrize("kind, records", [("evolutions", EVOLUTIONS), ("equality", EQUALITY)])
def test_a_verdict_is_pinned_for_every_saved_reply(kind, records):
    assert [v["reply"] for v in VERDICTS[kind]] == [r["reply"][:40] for r in records]


@pytest.mark.parametrize("record, verdict", zip(EVOLUTIONS, VERDICTS["evolutions"]),
                         ids=[f"{i}-{r['kind']}-{r['parent'][:24]}" for i, r in enumerate(EVOLUTIONS)])
def test_every_real_evolution_reply_gives_its_pinned_task(record, verdict):
    task = check_verdict(clean_evolved_instruction, record["reply"], verdict, "task")
    if task is None:
        return
    assert task == task.strip() and len(task.split()) >= 3
    assert "Harder Prompt#" not in task and "New Prompt#" not in task  # a second labelled item is cut
    assert not task.lower().startswith(("sure", "here's", "here is", "#", "task:", "prompt:"))


@pytest.mark.parametrize("record, verdict", zip(EQUALITY, VERDICTS["equality"]),
                         ids=[f"{i}-{r['reply'][:24]}" for i, r in enumerate(EQUALITY)])
def test_every_real_equality_reply_gives_its_pinned_verdict(record, verdict):
    check_verdict(parse_equality, record["reply"], verdict, "equal")


def test_most_real_replies_parse():
    """A parser that refuses everything fails here even if the table were pinned from it."""
    tasks = [outcome(clean_evolved_instruction, r["reply"])[0] for r in EVOLUTIONS]
    verdicts = [outcome(parse_equality, r["reply"]) for r in EQUALITY]
    assert tasks.count("ok") >= 0.9 * len(EVOLUTIONS), f"{tasks.count('ok')} of {len(EVOLUTIONS)} evolutions parse"
    assert sum(v[0] == "ok" for v in verdicts) >= 0.8 * len(EQUALITY), verdicts
    # Both verdicts occur: a parser that always says "equal" (or never) fails too.
    assert {v[1] for v in verdicts if v[0] == "ok"} == {True, False}


def saved(kind: str, parent_start: str) -> str:
    return next(r["reply"] for r in REPLIES if r["kind"] == kind and r["parent"].startswith(parent_start))


@pytest.mark.parametrize("kind, parent, task", [
    ("depth", "A shirt costs", "What's the price of a shirt that is on sale for 25% off?"),  # then "#Proximity#: ..."
    ("depth", "What is the sum of the interior", "What is the sum of the interior angles of a hexagon?"),  # "In this.."
    ("depth", "Which planet", "Which planet in our solar system has the most moons known so far?"),  # "Note: ..."
    ("depth", "If all bloops", "If all bloops are razzies and all razzies are lazzies, are all bloops definitely "
                               "lazzies?"),  # "This is a tricky one ... The answer is yes."
    ("breadth", "Write a haiku", "The first snow of winter."),  # quoted, then a run of "#New Prompt#" lines
    ("breadth", "Find the bug", "Find the bug in this function that returns the largest number in a list of size 10."),
])
def test_real_replies_lose_their_chatter(kind, parent, task):
    assert clean_evolved_instruction(saved(kind, parent)) == task


@pytest.mark.parametrize("kind, parent", [("depth", "Write a shell command"), ("breadth", "Maria has 3 boxes")])
def test_real_replies_without_a_task_are_parse_errors(kind, parent):
    with pytest.raises(ParseError):
        clean_evolved_instruction(saved(kind, parent))  # "Python\n#Write a shell...", "3 x 12 = 36"


def replay(kind: str):
    """A model that gives the saved replies of ``kind`` to the evolution prompts."""
    def reply(conv, k):
        role = kind_of(conv)
        if role in ("depth", "breadth"):
            return saved(kind, given(conv))
        return " Not Equal" if role == "equality" else "A fine answer in a few words."
    return reply


def test_real_replies_through_the_elimination():
    parents = sorted({r["parent"] for r in REPLIES if r["kind"] == "breadth"})
    out = evolve(pl.DataFrame({"instruction": parents}), replay("breadth"), operations={"breadth": 1}, generations=1)
    def reason(parent_start):
        return next(row[DROP] for row in out.iter_rows(named=True) if row["parent"].startswith(parent_start))

    assert reason("Compute 17 multiplied by") == "no_information_gain"  # the parent again
    assert reason("Write a haiku") == "no_information_gain"  # a piece of it
    assert reason("Write a short thank-you note") == "template_leak"  # the template's example
    assert reason("Maria has 3 boxes") == "parse_error"
    assert reason("Solve for x") is None
    depth = evolve(pl.DataFrame({"instruction": parents}), replay("depth"), operations={"add_constraints": 1},
                   generations=1)
    leaks = depth.filter(pl.col(DROP) == "template_leak")
    assert "Sort these events in chronological order" in " ".join(leaks["parent"])
    assert all("fruit that is" in detail for detail in leaks[DROP_DETAIL])
    assert depth.filter(pl.col("parent").str.starts_with("Write a short thank-you"))[DROP_DETAIL].to_list() == [
        "no word that its parent lacks"]  # "short" left out


def test_real_answers_are_not_empty_or_apologetic():
    answers = [r["reply"] for r in REPLIES if r["kind"] == "response"]
    assert answers and not any(is_empty_response(a) or is_apologetic(a) for a in answers)


@pytest.mark.parametrize("reply, task", [
    # labelled lists the model keeps going: the first item only
    (" Name a plant native to the Amazon.\n#New Prompt#: Name a bird.\n#New Prompt#: Name a fish.",
     "Name a plant native to the Amazon."),
    # chatter before, explanation after
    ("Sure! Here's a harder version of the prompt:\n\nWrite a haiku about the first snow, using no adjectives.\n\n"
     "This rewritten prompt adds a constraint.", "Write a haiku about the first snow, using no adjectives."),
    ('"Compute 17 multiplied by 23, then round to the nearest ten."', "Compute 17 multiplied by 23, then round to "
                                                                       "the nearest ten."),
    ("**Harder Prompt:** Sort these events by date and give the year of each.", "Sort these events by date and "
                                                                                 "give the year of each."),
    ("Task: Classify the sentiment of this review.\nThis is a tough one.", "Classify the sentiment of this review."),
    # input data on later lines stays
    (" Find the largest number in this table.\n| a | b |\n| 3 | 9 |", "Find the largest number in this table.\n"
                                                                     "| a | b |\n| 3 | 9 |"),
])
def test_clean_evolved_instruction_keeps_the_task_only(reply, task):
    assert clean_evolved_instruction(reply) == task


@pytest.mark.parametrize("reply", ["", "   ", " 3.", " 3.\n#Maria has 3.", "#Harder Prompt#:", " 12, 10, 15, 18",
                                   "Sure! Here's the rewritten prompt:"])
def test_clean_evolved_instruction_refuses_replies_without_a_task(reply):
    with pytest.raises(ParseError):
        clean_evolved_instruction(reply)


@pytest.mark.parametrize("reply, equal", [
    (' "Equal"', True), (" Not Equal", False), (" No, not equal.", False), (" No", False),
    ("Yes, the instructions are equal. Both instructions are identical in", True),
    ("No, the two instructions are not equal. The first instruction", False), (" They are different.", False),
    (" The same.", True), (" Unequal", False), (" Both instructions are equivalent, meaning they convey", True),
    (" No, the second instruction is not equivalent", False), (" False", False), (' "Yes"', True),
])
def test_parse_equality(reply, equal):
    assert parse_equality(reply) is equal


@pytest.mark.parametrize("reply", [" Hmm, let me think", " 3x + 7 \u2260", " Which planet in our solar system has the"])
def test_parse_equality_refuses_replies_without_a_verdict(reply):
    with pytest.raises(ParseError):
        parse_equality(reply)


@pytest.mark.parametrize("response, empty", [("", True), (" ... !", True), ("The, of and it.", True),
                                             ("Paris.", False), ("42", False)])
def test_empty_responses_are_punctuation_and_stop_words(response, empty):
    assert is_empty_response(response) is empty


# -- recipes -------------------------------------------------------------------------------------

# The scripted backend's rules play every part: evolve (the parent plus a new demand), judge
# (never equal), answer.
EVOL_LLM = """\
llm:
  backend: scripted
  rules:
    - {match: '(?s).*#Prompt#: (?P<parent>[^\\n]+)', reply: " {parent} Mention the number {hash}."}
    - {match: "First instruction", reply: " Not Equal"}
    - {match: ".", reply: "An answer ({hash}) in several words."}
"""


def recipe_with(write_recipe, options: str, after: str = "", output: str = "{format: raw}", llm: str = EVOL_LLM):
    return load_recipe(write_recipe(f"name: e\n{llm}source: {{path: {SEEDS}}}\nsteps:\n"
                                    f"  - evol_instruct: {options}\n{after}output: {output}\n"))


@pytest.mark.parametrize("options, fragments", [
    ("{operations: {add_constrains: 1}}", ["unknown operation 'add_constrains'", "did you mean 'add_constraints'?"]),
    ("{operations: {deepen: -1, breadth: 1}}", ["operation 'deepen' has a negative weight (-1)",
                                                 "use a weight of 0 or more"]),
    ("{operations: {deepen: 0, breadth: 0}}", ["no operation has a weight above 0"]),
    ("{eliminate: [template_leaks]}", ["'template_leaks' is not one of", "did you mean 'template_leak'?"]),
    ("{template: x.j2}", ["evol_instruct has three prompts", "set `depth_template`"]),
    ("{depth_template: missing.j2}", ["template file 'missing.j2' does not exist"]),
    ("{breadth_template: 'New task like {{ task }}'}", ["the breadth template does not render: 'task' is undefined"]),
])
def test_recipe_errors_name_the_fix(write_recipe, options, fragments):
    with pytest.raises(RecipeError) as err:
        recipe_with(write_recipe, options)
    assert all(fragment in str(err.value) for fragment in fragments), str(err.value)
    assert "steps[0].evol_instruct." in str(err.value)


def test_recipe_column_flow(write_recipe):
    recipe = recipe_with(write_recipe, "{}", "  - judge: {}\n", "{format: messages}")
    assert recipe.columns_after()[:6] == ["instruction", "parent", "operation", "generation", "origin", "response"]
    with pytest.raises(RecipeError, match="needs column 'response'"):
        recipe_with(write_recipe, "{respond: false}", "  - judge: {}\n")
    with pytest.raises(RecipeError, match="column 'domain' does not exist"):
        recipe_with(write_recipe, "{}", output="{format: raw, columns: [domain]}")
    assert "domain" in recipe_with(write_recipe, "{keep_parents: true}").columns_after()


def test_templates_from_files_beside_the_recipe(write_recipe, tmp_path):
    (tmp_path / "depth.j2").write_text("Harder, please ({{ operation }}): {{ instruction }}\n#Prompt#: {{ prompt }}")
    recipe = recipe_with(write_recipe, "{depth_template: depth.j2, operations: {concretize: 1}, generations: 1}")
    sent = []
    recipe.steps[0].process(seeds(1), StepContext(llm=scripted(lambda conv, k: sent.append(conv)
                                                               or fake_model(conv, k))))
    assert sent[0][0]["content"] == (f"Harder, please (concretize): {DEPTH_OPERATIONS['concretize']}\n"
                                     f"#Prompt#: {seeds(1)['instruction'][0]}")


def test_recipe_runs_on_the_scripted_backend(write_recipe):
    from factory.driver import Driver

    recipe = recipe_with(write_recipe, "{generations: 2}")
    result = Driver(progress=False).run(recipe)
    assert result.table.height == 80 and set(result.table["generation"]) == {1, 2}
    assert result.table["instruction"].n_unique() == 80
    assert result.steps[0].report["kept_per_generation"] == {"1": 40, "2": 40}
    assert "_raw_reply" not in result.table.columns


# -- the real model -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(1500)  # minutes on 2 CPU cores, more when they are shared
def test_evol_instruct_recipe_end_to_end(tmp_path):
    # Shorter answers only: the evolutions and equality checks are those of the recipe as it is.
    proc = subprocess.run(
        [sys.executable, "-m", "factory", "run", str(ROOT / "recipes" / "evol_instruct.yaml"), "--out", str(tmp_path),
         "--quiet", "--set", "steps[0].evol_instruct.response_max_tokens=48"],
        capture_output=True, text=True, cwd=ROOT, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    version = tmp_path / "evol-instruct" / "v1"
    rows = pl.read_parquet(version / "data")
    rejected = pl.read_parquet(version / "rejected")
    step = json.loads((version / "manifest.json").read_text())["steps"][0]
    assert rows.height > 0 and rows["parent"].null_count() == 0 and rows["response"].null_count() == 0
    assert rows["generation"].min() >= 1 and set(rows["operation"]) <= set(OPERATIONS)
    assert set(rows["origin"]) == {"evol_instruct"}
    # Every candidate is accounted for, with its lineage even when dropped.
    assert step["rows_out"] + sum(step["dropped"].values()) >= 12
    assert rejected.filter(pl.col("drop_step") == "steps[0].evol_instruct")["parent"].null_count() == 0
