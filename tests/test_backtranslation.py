"""Instruction backtranslation (Humpback): segments, lineage, parsing real replies, self-curation,
a second pass with few-shot demonstrations, and the recipe end to end on the embedded model.

The replies in tests/data/backtranslation_replies.json are what SmolLM2-135M-Instruct wrote for
these prompts over data/documents; re-record them after changing a prompt with
``python -m tests.test_backtranslation``, then write what each new reply must give in
tests/data/backtranslation_verdicts.json by reading it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import polars as pl
import pytest

from factory.build import run_recipe
from factory.cache import Cache
from factory.driver import Driver
from factory.errors import ParseError, RecipeError
from factory.llm import ScriptedBackend, ScriptedConfig, create_backend
from factory.llm.requests import LLMClient
from factory.recipe import load_recipe, recipe_from_text
from factory.steps.backtranslation.instructions import clean_backtranslated_instruction
from factory.steps.backtranslation.segments import split_segments
from factory.steps.backtranslation.self_curate import split_rating
from factory.steps.context import StepContext
from factory.steps.drops import DROP, DROP_DETAIL, RAW_REPLY
from factory.store import read_version

from .conftest import ROOT

DOCUMENTS = ROOT / "data" / "documents"
REPLIES_FILE = ROOT / "tests" / "data" / "backtranslation_replies.json"
REPLIES = json.loads(REPLIES_FILE.read_text(encoding="utf-8"))


def recipe_text(steps: str, source: str = f"{{path: {DOCUMENTS}}}", name: str = "bt") -> str:
    return (f"name: {name}\nseed: 3\nllm: {{backend: scripted, default: 'Question: What is it?'}}\n"
            f"source: {source}\nsteps:\n{textwrap.indent(textwrap.dedent(steps), '  ')}output: {{format: raw}}\n")


def step_from(write_recipe, steps: str, reply_fn, index: int = 0, **kwargs):
    recipe = load_recipe(write_recipe(recipe_text(steps, **kwargs)))
    ctx = StepContext(llm=LLMClient(ScriptedBackend(ScriptedConfig(), reply_fn=reply_fn)))
    return recipe, recipe.steps[index], ctx


def segment_of(conversation) -> str:
    """The text a backtranslation prompt asks about (the last one, after any demonstrations)."""
    prompt = next(m["content"] for m in conversation if m["role"] == "user")
    return prompt.rsplit("Text:\n", 1)[1].rsplit("\n\nThis text answers", 1)[0]


def kept(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.filter(pl.col(DROP).is_null()) if DROP in frame.columns else frame


def dropped(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.filter(pl.col(DROP).is_not_null()) if DROP in frame.columns else frame.clear()


# -- segments ----------------------------------------------------------------------------

def test_segments_follow_paragraphs_and_keep_headings_with_their_text():
    text = ("# Title\n\nOne two three\nfour five.\n\n## Part\n\nSix seven eight nine.\n\n"
            "Ten eleven twelve. Thirteen fourteen.")
    assert split_segments(text, max_words=8) == ["# Title\n\nOne two three four five.",
                                                 "## Part\n\nSix seven eight nine.",
                                                 "Ten eleven twelve. Thirteen fourteen."]
    assert split_segments(text, max_words=100) == [
        "# Title\n\nOne two three four five.\n\n## Part\n\nSix seven eight nine.\n\n"
        "Ten eleven twelve. Thirteen fourteen."]
    assert split_segments(text) == split_segments(text, max_words=100)  # no max_words: the whole document
    assert split_segments(text, join_lines=False)[0].startswith("# Title\n\nOne two three\nfour five.")


def test_a_long_paragraph_is_cut_at_sentence_ends_then_at_words():
    text = "Alpha beta gamma. Delta epsilon zeta eta. Theta iota kappa lambda mu nu xi omicron pi rho."
    assert split_segments(text, max_words=4) == ["Alpha beta gamma.", "Delta epsilon zeta eta.",
                                                 "Theta iota kappa lambda", "mu nu xi omicron", "pi rho."]
    assert all(len(s.split()) <= 4 for s in split_segments(text, max_words=4))


def test_lists_and_code_keep_their_lines():
    text = "Steps:\n- mix\n- bake\n\n```\nx = 1\n\ny = 2\n```"
    assert split_segments(text, max_words=100) == [text]


def test_documents_become_segments_with_lineage(write_recipe):
    recipe, step, ctx = step_from(write_recipe, "- backtranslate: {max_words: 80}\n",
                                  lambda conv, k: " What does this section explain about " + segment_of(conv).split()[1] + "?")
    docs = recipe.source.read()
    out = step.process(docs, ctx)
    assert dropped(out).height == 0
    assert out.height == sum(len(split_segments(t, 80)) for t in docs["text"]) > docs.height
    assert "text" not in out.columns  # the segment is in `response`
    assert step.output_columns(["doc_id", "title", "text"]) == [
        "doc_id", "title", "instruction", "response", "segment", "origin", "parent", "operation", "generation"]
    sourdough = out.filter(pl.col("doc_id") == "sourdough.md").sort("segment")
    assert sourdough["segment"].to_list() == list(range(sourdough.height))
    assert sourdough["parent"].to_list() == [f"sourdough.md#{k}" for k in range(sourdough.height)]
    assert sourdough["response"].to_list() == split_segments(docs.filter(pl.col("doc_id") == "sourdough.md")["text"][0], 80)
    assert set(out["origin"]) == {"backtranslation"} and set(out["operation"]) == {"backtranslate"}
    assert set(out["generation"]) == {1}
    assert sourdough["instruction"][0] == "What does this section explain about Sourdough?"


def test_prompt_shows_the_segment_and_title_and_prefills_the_question(write_recipe):
    recipe, step, _ = step_from(write_recipe, "- backtranslate: {max_words: 80}\n", lambda conv, k: "")
    row = step.expand(recipe.source.read().row(3, named=True))[1]
    conversation = step.build_messages(row)
    assert conversation[-1] == {"role": "assistant", "content": "Question:"}
    assert conversation[0]["content"] == (f"Text:\n{row['response']}\n\n"
                                          "This text answers a question about Sourdough Bread. Write that question.")


def test_jsonl_texts_without_ids_get_ids_from_their_text(write_recipe, tmp_path):
    path = tmp_path / "texts.jsonl"
    rows = [{"body": "Tea is brewed from leaves."}, {"body": "Tea is brewed from leaves."}, {"body": "  "},
            {"body": "Coffee is brewed from roasted beans."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, step, ctx = step_from(write_recipe, "- backtranslate: {column: body}\n",
                             lambda conv, k: " Explain how tea is made.", source=f"{{path: {path}}}")
    out = step.process(pl.read_ndjson(path), ctx)
    good = kept(out)
    assert good["doc_id"][0] == good["doc_id"][1] != good["doc_id"][2]
    assert good["parent"].to_list() == good["doc_id"].to_list()  # unsplit: the parent is the document
    assert good["segment"].to_list() == [0, 0, 0]
    assert dropped(out)[DROP_DETAIL].to_list() == ["column 'body' is empty"]


# -- cleaning replies --------------------------------------------------------------------

@pytest.mark.parametrize("reply, instruction", [
    (" What is the rule of 72?", "What is the rule of 72?"),
    ("Instruction: Explain how a sourdough starter is made.", "Explain how a sourdough starter is made."),
    ("**Question:** How does git rebase work?", "How does git rebase work?"),
    ('Sure! Here is the question:\n\n"How do vaccines train the immune system?"', "How do vaccines train the immune system?"),
    ("Here's a possible instruction: Describe the water cycle.", "Describe the water cycle."),
    (' "What is the best way to merge two branches in Git?"\n\nThe AI assistant\'s response:\n\nUse git merge.',
     "What is the best way to merge two branches in Git?"),
    (" How long does it take to double at 4.5 percent? The answer is: 16 years.",
     "How long does it take to double at 4.5 percent?"),
    (" What is the answer to the question: What is the process of evaporation?", "What is the process of evaporation?"),
    (" \"What is Gutenberg's Bible?", "What is Gutenberg's Bible?"),
    ("1. Question - How is a loaf shaped?", "How is a loaf shaped?"),
    (" I'm looking for a simple explanation of compound interest. Can you help me with that?",
     "I'm looking for a simple explanation of compound interest. Can you help me with that?"),
    (" How to bake sourdough bread", "How to bake sourdough bread"),
])
def test_clean_backtranslated_instruction(reply, instruction):
    assert clean_backtranslated_instruction(reply) == instruction


@pytest.mark.parametrize("reply, detail", [
    ("", "no instruction"),
    ('  ""  ', "no instruction"),
    ("Sure! Here is the question:", "no instruction"),
    (" What question does this text answer?", "this text"),
    (" What is the user's request?", "user's"),
    (" What does the article say about the water cycle?", "the article"),
    (" How to write a question about Git?", "write a question"),
    (" What question is this?", "What question"),
    (" A branch in Git is a movable label that points to one commit.", "not a question or an instruction"),
    (' "The Water Cycle"', "not a question or an instruction"),
    (" What is the process of making bread that involves baking it in a hot oven for 20", "question mark"),
    (" What is the answer to the question: What is the answer to the question: What is the answer to the",
     "repeats itself"),
])
def test_garbage_replies_are_parse_errors(reply, detail):
    with pytest.raises(ParseError, match=detail) as caught:
        clean_backtranslated_instruction(reply)
    assert caught.value.reason == "parse_error"


# -- the embedded model's own replies -----------------------------------------------------

QUESTION_START = re.compile(r"^(What|How|Why|When|Where|Who|Which|Is|Are|Was|Were|Do|Does|Did|Can|Could|Should)\b")


@pytest.fixture(scope="module")
def fewshot_step(tmp_path_factory):
    """The few-shot step the replies were recorded with (its demonstrations from ``examples``),
    and its rows by parent."""
    path = tmp_path_factory.mktemp("examples") / "pairs.jsonl"
    pl.DataFrame(REPLIES["examples"]).write_ndjson(path)
    recipe = recipe_from_text(recipe_text(f"- backtranslate: {{max_words: 80, examples_from: {path}}}\n"),
                              base_dir=ROOT)
    step = recipe.steps[0]
    return step, {r["parent"]: r for doc in recipe.source.read().iter_rows(named=True) for r in step.expand(doc)}


def parse_recorded(record: dict, fewshot_step) -> str:
    if record["pass"] == "zero_shot":
        return clean_backtranslated_instruction(record["reply"])
    step, rows = fewshot_step
    return step.parse(record["reply"], rows[record["parent"]])["instruction"]


# What each saved reply must give, pinned by reading the replies (tests/data/backtranslation_verdicts.json).
VERDICTS = json.loads((ROOT / "tests" / "data" / "backtranslation_verdicts.json").read_text(encoding="utf-8"))


def outcome(parse, *args):
    """``("ok", value)``, or ``("refused", reason, message)`` for a ParseError."""
    try:
        return ("ok", parse(*args))
    except ParseError as err:
        return ("refused", err.reason, str(err))


def check_refusal(got, verdict: dict) -> bool:
    """Whether the verdict is a refusal, after checking that ``got`` is that refusal."""
    if "refused" not in verdict:
        assert got[0] == "ok", f"expected a parse, got {got}"
        return False
    assert got[:2] == ("refused", verdict["refused"]), f"expected a refusal ({verdict['because']}), got {got}"
    assert verdict["because"] in got[2]
    return True


@pytest.mark.parametrize("kind", ["backtranslate", "self_curate"])
def test_a_verdict_is_pinned_for_every_recorded_reply(kind):
    assert [v["reply"] for v in VERDICTS[kind]] == [r["reply"][:40] for r in REPLIES[kind]]


@pytest.mark.parametrize("record, verdict", list(zip(REPLIES["backtranslate"], VERDICTS["backtranslate"])),
                         ids=[f"{i}-{r['pass']}-{r['parent']}-t{r['temperature']}"
                              for i, r in enumerate(REPLIES["backtranslate"])])
def test_every_recorded_backtranslation_reply_gives_its_pinned_instruction(record, verdict, fewshot_step):
    got = outcome(parse_recorded, record, fewshot_step)
    if check_refusal(got, verdict):
        assert verdict["refused"] == "parse_error" or record["pass"] == "few_shot"  # only shown demonstrations
        return
    instruction = got[1]
    assert instruction == verdict["instruction"]
    assert instruction == instruction.strip() and "\n" not in instruction
    assert not re.match(r"(?i)^[\"'“*]|^(?:question|instruction|user|sure|here)\b", instruction)
    assert instruction.endswith("?") or not QUESTION_START.match(instruction)
    assert instruction in " ".join(record["reply"].split()).replace('"', "") or instruction in record["reply"]


def test_most_recorded_backtranslation_replies_parse(fewshot_step):
    """A parser that refuses everything fails here even if the table were pinned from it."""
    for pass_, share in (("zero_shot", 0.75), ("few_shot", 0.6)):
        records = [r for r in REPLIES["backtranslate"] if r["pass"] == pass_]
        parsed = sum(outcome(parse_recorded, r, fewshot_step)[0] == "ok" for r in records)
        assert parsed >= share * len(records), f"{parsed} of {len(records)} {pass_} replies parse"


def recorded(pass_: str, parent: str, temperature: float = 0.0) -> str:
    return next(r["reply"] for r in REPLIES["backtranslate"]
                if (r["pass"], r["parent"], r["temperature"]) == (pass_, parent, temperature))


def test_tricky_recorded_replies():
    # A degenerate loop of the model's favourite wrapper: nothing usable in it.
    loop = recorded("zero_shot", "compound-interest.md#0")
    assert loop.count("What is the answer to the question") >= 3
    with pytest.raises(ParseError):
        clean_backtranslated_instruction(loop)
    # The model echoing its own task instead of writing one.
    with pytest.raises(ParseError, match="write a question"):
        clean_backtranslated_instruction(recorded("zero_shot", "git-branches.md#4"))
    # A plain, clean question comes through as it is.
    clean = clean_backtranslated_instruction
    assert clean(recorded("zero_shot", "compound-interest.md#4")) == "What is the rule of 72?"
    assert clean(recorded("zero_shot", "git-branches.md#3")) == "How does Git merge branches?"


@pytest.mark.parametrize("record, verdict", list(zip(REPLIES["self_curate"], VERDICTS["self_curate"])),
                         ids=[f"{i}-{r['parent']}" for i, r in enumerate(REPLIES["self_curate"])])
def test_every_recorded_curation_reply_gives_its_pinned_score(record, verdict):
    got = outcome(split_rating, record["reply"])
    if check_refusal(got, verdict):
        return
    score, reasoning = got[1]
    assert score == verdict["score"]
    assert not re.search(r"(?i)score\s*:", reasoning)


def test_recorded_curation_replies_hold_scores_and_failures():
    outcomes = []
    for record in REPLIES["self_curate"]:
        try:
            outcomes.append(split_rating(record["reply"])[0])
        except ParseError:
            outcomes.append(None)
    assert any(o is None for o in outcomes) and any(o is not None for o in outcomes)
    assert sum(o is not None for o in outcomes) >= 0.9 * len(outcomes)  # a rater that reads nothing fails
    assert {1, 5} <= set(outcomes)  # and so does one that gives every reply the same score


# -- self-curation -------------------------------------------------------------------------

@pytest.mark.parametrize("reply, score, reasoning", [
    ("The answer is on topic and complete.\nScore: 5", 5.0, "The answer is on topic and complete."),
    ("Reasoning: It reads like an article excerpt.\n\n**Score: 3**", 3.0, "It reads like an article excerpt."),
    ("It misses the question. Rating: 2/5", 2.0, "It misses the question."),
    ("Score: 4", 4.0, ""),
])
def test_split_rating(reply, score, reasoning):
    assert split_rating(reply) == (score, reasoning)


@pytest.mark.parametrize("reply", ["A great answer.", "Score: 9", "Score: 0"])
def test_split_rating_refuses_missing_or_out_of_range_scores(reply):
    with pytest.raises(ParseError):
        split_rating(reply)


RATINGS = {"q5": "Complete and helpful.\nScore: 5", "q4": "Clear.\nScore: 4", "q3": "Reads like an article.\nScore: 3",
           "q1": "Off-topic. Score: 1", "q2": "Misses most of what was asked.", "qx": "I cannot rate this."}


def rate(conversation, k):
    """A rater that ends some reasonings without a score; asked to go on from "Score:", it
    gives a number for q2 and none for qx."""
    pair = re.search(r"Instruction: (\w+)", conversation[0]["content"]).group(1)
    if conversation[-1]["role"] == "assistant":
        return {"q2": " 2", "qx": " n/a"}[pair]
    return RATINGS[pair]


def test_curation_keeps_pairs_at_or_above_min_score_and_says_why_others_went(write_recipe):
    _, step, ctx = step_from(write_recipe, "- backtranslate: {}\n- self_curate: {}\n", rate, index=1)
    out = step.process(pl.DataFrame({"instruction": list(RATINGS), "response": ["text"] * len(RATINGS)}), ctx)
    good = kept(out)
    assert good["instruction"].to_list() == ["q5", "q4"]
    assert good["curation_score"].to_list() == [5.0, 4.0]
    assert good["curation_reasoning"].to_list() == ["Complete and helpful.", "Clear."]
    bad = dropped(out)
    assert dict(zip(bad["instruction"], bad[DROP])) == {"q3": "below_min_score", "q1": "below_min_score",
                                                        "q2": "below_min_score", "qx": "parse_error"}
    below = bad.filter(pl.col(DROP) == "below_min_score")
    assert below["curation_score"].to_list() == [3.0, 1.0, 2.0]
    assert below["curation_reasoning"].to_list() == ["Reads like an article.", "Off-topic.",
                                                     "Misses most of what was asked."]
    assert below[DROP_DETAIL][0] == "score 3 is below min_score 4"
    assert bad.filter(pl.col(DROP) == "parse_error")[RAW_REPLY].to_list() == ["I cannot rate this.\nScore: n/a"]
    assert step.produces() == ["curation_score", "curation_reasoning"]


def test_curation_asks_for_the_missing_score_only_when_told_to(write_recipe):
    asked = []
    _, step, ctx = step_from(write_recipe, "- backtranslate: {}\n- self_curate: {force_score: false, min_score: 3}\n",
                             lambda conv, k: asked.append(conv) or rate(conv, k), index=1)
    out = step.process(pl.DataFrame({"instruction": list(RATINGS), "response": ["text"] * len(RATINGS)}), ctx)
    assert len(asked) == len(RATINGS)
    assert kept(out)["instruction"].to_list() == ["q5", "q4", "q3"]
    assert dict(zip(dropped(out)["instruction"], dropped(out)[DROP])) == {
        "q1": "below_min_score", "q2": "parse_error", "qx": "parse_error"}


def test_curation_prompt_carries_the_rubric_and_asks_for_reasoning_first(write_recipe):
    _, step, _ = step_from(write_recipe, "- backtranslate: {}\n- self_curate: {}\n", lambda conv, k: "", index=1)
    prompt = step.build_messages({"instruction": "What is a starter?", "response": "A culture of yeasts."})[-1]["content"]
    assert "Instruction: What is a starter?\n\nAnswer: A culture of yeasts." in prompt
    assert all(f"\n{n}: " in prompt for n in range(1, 6))
    assert prompt.index("Explain your rating") < prompt.index('"Score: "')


# -- a second pass with demonstrations -----------------------------------------------------

def first_and_second_pass(write_recipe, tmp_path, second_options: str = ""):
    """Runs the two-step recipe (scripted) and a second pass over a version of the first."""
    llm = ("llm:\n  backend: scripted\n  rules:\n"
           "    - {match: 'How well does this answer', reply: 'On topic. Score: 5'}\n"
           "    - {match: 'This text answers', reply: ' What is point {hash}?'}\n")
    steps = "steps:\n  - backtranslate: {max_words: 80}\n  - self_curate: {min_score: 1}\n"
    first = write_recipe(f"name: bt\nseed: 3\n{llm}source: {{path: {DOCUMENTS}}}\n{steps}", name="first.yaml")
    v1, manifest, _ = run_recipe(load_recipe(first), tmp_path / "out",
                                 driver=Driver(Cache(tmp_path / "cache"), progress=False))
    prompts: list[list] = []

    def recording_backend(config):
        backend = create_backend(config)
        generate = backend.generate

        def recording_generate(requests, on_reply=None):
            prompts.extend(request.messages for request in requests)
            return generate(requests, on_reply)

        backend.generate = recording_generate
        return backend

    second = write_recipe(f"name: bt\nseed: 3\n{llm}source: {{path: {DOCUMENTS}}}\nsteps:\n"
                          f"  - backtranslate: {{max_words: 80, examples_from: {v1}{second_options}}}\n",
                          name="second.yaml")
    v2, manifest2, _ = run_recipe(load_recipe(second), tmp_path / "out",
                                  driver=Driver(Cache(tmp_path / "cache"), progress=False,
                                                backend_factory=recording_backend))
    return v1, v2, prompts


def test_second_pass_shows_curated_pairs_of_the_first_as_demonstrations(write_recipe, tmp_path):
    v1, v2, prompts = first_and_second_pass(write_recipe, tmp_path)
    first, second = read_version(v1), read_version(v2)
    assert set(first["generation"]) == {1} and set(first["operation"]) == {"backtranslate"}
    assert set(second["generation"]) == {2} and set(second["operation"]) == {"backtranslate_fewshot"}
    assert second.height == first.height
    pairs = dict(zip(first["response"], first["instruction"]))
    assert len(prompts) == second.height
    for conversation in prompts:
        prompt = conversation[0]["content"]
        shown = re.findall(r"Text:\n(.*?)\n\nQuestion: (.*?)\n\n", prompt, re.S)
        assert len(shown) == 2
        assert all(pairs[response] == instruction for response, instruction in shown)
        own = segment_of(conversation)
        documents = {first.filter(pl.col("response") == response)["doc_id"][0] for response, _ in shown}
        assert first.filter(pl.col("response") == own)["doc_id"][0] not in documents  # never its own document
        assert prompt.startswith("Each text below answers a question.")


def test_demonstrations_are_deterministic_per_seed_and_row(write_recipe, tmp_path):
    v1, _, prompts = first_and_second_pass(write_recipe, tmp_path)
    source = f"{{path: {DOCUMENTS}}}"
    steps = f"- backtranslate: {{max_words: 80, examples_from: {v1}, examples: 3}}\n"
    recipe, step, _ = step_from(write_recipe, steps, lambda conv, k: "")
    rows = [s for row in recipe.source.read().iter_rows(named=True) for s in step.expand(row)]
    again = load_recipe(write_recipe(recipe_text(steps, source=source))).steps[0]
    other_seed = load_recipe(write_recipe(recipe_text(steps, source=source).replace("seed: 3", "seed: 4"))).steps[0]
    assert [step.demonstrations(r) for r in rows] == [again.demonstrations(r) for r in rows]
    assert [step.demonstrations(r) for r in rows] != [other_seed.demonstrations(r) for r in rows]
    assert all(len(step.demonstrations(r)) == 3 for r in rows)
    assert len({tuple(d["instruction"] for d in step.demonstrations(r)) for r in rows}) > 1


def test_examples_from_a_jsonl_file_and_its_generation(write_recipe, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"instruction": "What is yeast?", "response": "A fungus.", "generation": 2}) + "\n")
    _, step, ctx = step_from(write_recipe, f"- backtranslate: {{examples_from: {path}}}\n", lambda conv, k: " Why is it?")
    out = step.process(pl.DataFrame({"doc_id": ["a"], "text": ["Bread rises because yeast makes gas."]}), ctx)
    assert out.select("operation", "generation").row(0) == ("backtranslate_fewshot", 3)
    assert "Text:\nA fungus.\n\nQuestion: What is yeast?" in step.build_messages(kept(out).row(0, named=True))[0]["content"]


def test_an_instruction_copied_from_a_demonstration_is_dropped(write_recipe, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"instruction": "What is yeast?", "response": "A fungus."}) + "\n")
    _, step, ctx = step_from(write_recipe, f"- backtranslate: {{examples_from: {path}}}\n",
                             lambda conv, k: ' "what is yeast?"')
    out = step.process(pl.DataFrame({"doc_id": ["a"], "text": ["Bread rises because yeast makes gas."]}), ctx)
    assert dropped(out).select(DROP, RAW_REPLY).row(0) == ("copied_example", ' "what is yeast?"')


def test_examples_from_problems_are_recipe_errors(write_recipe, tmp_path):
    with pytest.raises(RecipeError, match=r"steps\[0\]\.backtranslate\.examples_from: examples_from 'out/nothing/v1' "
                                          r"does not exist .*; point it at a version written by a first pass"):
        load_recipe(write_recipe(recipe_text("- backtranslate: {examples_from: out/nothing/v1}\n")))
    path = tmp_path / "questions.jsonl"
    path.write_text('{"question": "Why?", "response": "Because."}\n')
    with pytest.raises(RecipeError, match="has no column 'instruction' \\(it has question, response\\)"):
        load_recipe(write_recipe(recipe_text(f"- backtranslate: {{examples_from: {path}}}\n")))
    path.write_text('{"instruction": "", "response": "Because."}\n')
    with pytest.raises(RecipeError, match="has no row with text in both"):
        load_recipe(write_recipe(recipe_text(f"- backtranslate: {{examples_from: {path}}}\n")))


def test_changed_examples_file_invalidates_the_cached_step(write_recipe, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"instruction": "What is yeast?", "response": "A fungus."}) + "\n")
    steps = f"- backtranslate: {{examples_from: {path}}}\n"
    before = load_recipe(write_recipe(recipe_text(steps))).steps[0].fingerprint()
    path.write_text(json.dumps({"instruction": "What is salt?", "response": "A mineral."}) + "\n")
    assert load_recipe(write_recipe(recipe_text(steps))).steps[0].fingerprint() != before


def test_the_recipe_validates(write_recipe):
    recipe = load_recipe(ROOT / "recipes" / "backtranslation.yaml")
    assert [s.name for s in recipe.steps][0] == "backtranslate"
    assert {"instruction", "response", "parent", "curation_score"} <= set(recipe.columns_after())


# -- the real model ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_backtranslation_recipe_end_to_end_on_the_embedded_model(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "factory", "run", str(ROOT / "recipes" / "backtranslation.yaml"), "--out", str(tmp_path),
         "--quiet", "--set", "source.limit=2"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    version = tmp_path / "backtranslation" / "v1"
    assert proc.stdout.strip().splitlines()[-1] == str(version)
    manifest = json.loads((version / "manifest.json").read_text())
    segments = manifest["steps"][0]["rows_out"] + sum(manifest["steps"][0]["dropped"].values())
    assert segments > 2  # two documents, cut into sections
    assert manifest["rows"] + manifest["rejected_rows"] == segments
    rows = pl.concat([read_version(version), read_version(version, "rejected").filter(
        pl.col("drop_step") != "steps[0].backtranslate")], how="diagonal_relaxed")
    assert rows.height > 0
    assert set(rows["origin"]) == {"backtranslation"} and set(rows["operation"]) == {"backtranslate"}
    assert set(rows["generation"]) == {1}
    assert all(p.startswith(f"{d}#") for p, d in zip(rows["parent"], rows["doc_id"]))
    assert set(rows["doc_id"]) <= {"compound-interest.md", "git-branches.md"}


# -- recording the replies used above -----------------------------------------------------------

def record_replies() -> dict:
    """What the embedded model replies to the default prompts over data/documents (80-word
    segments): a greedy and a sampled zero-shot pass, a few-shot pass with demonstrations from
    the greedy one (its pairs kept as ``examples``), and self-curation of those pairs."""
    import dataclasses
    import tempfile

    from factory.llm import TransformersBackend, TransformersConfig

    backend = TransformersBackend(TransformersConfig(model="embedded"))

    def ask(step, rows, temperature=0.0):
        params = dataclasses.replace(step.generation_params(), temperature=temperature, top_p=0.95, seed=7)
        conversations = [step.build_messages(r) for r in rows]
        completions = backend.chat(conversations, params)
        if step.name == "self_curate":  # what the step parses: the reasoning, continued from "Score:" if need be
            completions = LLMClient(backend).run(step.complete_scores(conversations, completions))
        return [c.texts[0] for c in completions]

    recipe = recipe_from_text(recipe_text("- backtranslate: {max_words: 80}\n- self_curate: {}\n"), base_dir=ROOT)
    backtranslate, curate = recipe.steps
    rows = [s for doc in recipe.source.read().iter_rows(named=True) for s in backtranslate.expand(doc)]
    records: dict = {"model": "SmolLM2-135M-Instruct (embedded)", "documents": "data/documents", "max_words": 80,
                     "backtranslate": [], "self_curate": []}
    greedy = ask(backtranslate, rows)
    for temperature, replies in ((0.0, greedy), (1.0, ask(backtranslate, rows, 1.0))):
        records["backtranslate"] += [{"pass": "zero_shot", "parent": r["parent"], "temperature": temperature,
                                      "reply": reply} for r, reply in zip(rows, replies)]
    pairs = []
    for row, reply in zip(rows, greedy):
        try:
            pairs.append({**row, "instruction": clean_backtranslated_instruction(reply)})
        except ParseError:
            continue
    records["examples"] = pl.DataFrame(pairs).select("instruction", "response", "parent").to_dicts()
    with tempfile.TemporaryDirectory() as tmp:
        pl.DataFrame(records["examples"]).write_ndjson(f"{tmp}/pairs.jsonl")
        fewshot = recipe_from_text(recipe_text(f"- backtranslate: {{max_words: 80, examples_from: {tmp}/pairs.jsonl}}\n"),
                                   base_dir=ROOT).steps[0]
        records["backtranslate"] += [{"pass": "few_shot", "parent": r["parent"], "temperature": 0.0, "reply": reply}
                                     for r, reply in zip(rows, ask(fewshot, rows))]
    records["self_curate"] = [{"parent": p["parent"], "instruction": p["instruction"], "reply": reply}
                              for p, reply in zip(pairs, ask(curate, pairs))]
    return records


if __name__ == "__main__":
    REPLIES_FILE.parent.mkdir(exist_ok=True)
    REPLIES_FILE.write_text(json.dumps(record_replies(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {REPLIES_FILE}")
