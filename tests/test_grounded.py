"""Knowledge-grounded QA: chunking, questions, cited answers, groundedness.

Fast tests use the scripted backend. The parsers are also run on real replies of the
embedded model saved in tests/data/grounded_replies.json; to record them again (minutes
on CPU): ``python -m tests.test_grounded record``, then write what each new reply must give
in tests/data/grounded_verdicts.json by reading it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from factory.build import run_recipe
from factory.config import build
from factory.driver import Driver
from factory.errors import ParseError, RecipeError
from factory.llm import ScriptedBackend, ScriptedConfig
from factory.llm.requests import LLMClient
from factory.recipe import load_recipe
from factory.sources import read_documents
from factory.steps.context import StepContext
from factory.steps.drops import DROP, RAW_REPLY
from factory.steps.grounded.chunk import Chunk, ChunkConfig, markdown_sections, pack_section
from factory.steps.grounded.context import format_context, passages_in
from factory.steps.grounded.grounded_answer import GroundedAnswer, GroundedAnswerConfig, clean_answer, parse_citations
from factory.steps.grounded.grounded_questions import (DIFFICULTIES, QUESTION_TYPES, GroundedQuestions,
                                                       GroundedQuestionsConfig, clean_question, plan_questions)
from factory.steps.grounded.groundedness import Groundedness, GroundednessConfig, parse_supported

from .conftest import ROOT

DOCUMENTS = ROOT / "data" / "documents"
REPLIES = Path(__file__).parent / "data" / "grounded_replies.json"
RECIPE = ROOT / "recipes" / "grounded_qa.yaml"


def scripted(reply_fn) -> StepContext:
    """The context of a step whose model replies ``reply_fn(conversation, k)``."""
    return StepContext(llm=LLMClient(ScriptedBackend(ScriptedConfig(), reply_fn=reply_fn)))


def chunk_table(**options) -> pl.DataFrame:
    return Chunk(ChunkConfig(**options)).process(read_documents(DOCUMENTS))


def kept(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.filter(pl.col(DROP).is_null()) if DROP in frame.columns else frame


def dropped(frame: pl.DataFrame) -> dict[str, int]:
    return dict(frame.filter(pl.col(DROP).is_not_null()).group_by(DROP).len().iter_rows())


# -- chunking ------------------------------------------------------------------------------

def test_sections_follow_the_heading_path_and_ignore_hashes_in_code():
    text = ("# Guide\n\nIntro line one\nwraps here.\n\n## Setup\n\n- step a\n- step b\n\n```bash\n# a comment\n"
            "git init\n\ngit add .\n```\n\n### Details\n\nMore text.\n\n## Empty\n\n## Last\nEnd.\n")
    assert markdown_sections(text) == [
        ("Guide", ["Intro line one wraps here."]),
        ("Guide > Setup", ["- step a\n- step b", "```bash\n# a comment\ngit init\n\ngit add .\n```"]),
        ("Guide > Setup > Details", ["More text."]),
        ("Guide > Last", ["End."]),
    ]


def test_chunks_split_at_headings():
    chunks = kept(chunk_table()).filter(pl.col("doc_id") == "water-cycle.md")
    assert chunks["heading"].to_list() == [
        "The Water Cycle", "The Water Cycle > Evaporation and transpiration", "The Water Cycle > Condensation and clouds",
        "The Water Cycle > Precipitation", "The Water Cycle > Collection and runoff"]
    assert chunks["chunk_text"][3].startswith("Inside a cloud, droplets collide and merge.")
    assert "## " not in "".join(chunks["chunk_text"].to_list())


@pytest.mark.parametrize("max_words, overlap_words", [(40, 10), (25, 5), (60, 0)])
def test_chunks_respect_max_words_and_overlap(max_words, overlap_words):
    chunks = kept(chunk_table(max_words=max_words, overlap_words=overlap_words)).to_dicts()
    assert max(len(c["chunk_text"].split()) for c in chunks) <= max_words
    pairs = [(a, b) for a, b in zip(chunks, chunks[1:]) if (a["doc_id"], a["heading"]) == (b["doc_id"], b["heading"])]
    assert len(pairs) >= 5  # the short limit splits sections
    for a, b in pairs:
        tail, head = a["chunk_text"].split(), b["chunk_text"].split()
        shared = next((n for n in range(overlap_words, 0, -1) if tail[-n:] == head[:n]), 0)
        assert (shared > 0) == (overlap_words > 0), (a["chunk_id"], b["chunk_id"])
        assert shared <= overlap_words
    # Nothing is lost: every word of every section is in some chunk, and nothing is made up:
    # every chunk is a run of the document's words.
    for doc in read_documents(DOCUMENTS).iter_rows(named=True):
        words = body_words(doc["text"])
        covered = [False] * len(words)
        for c in chunks:
            if c["doc_id"] != doc["doc_id"]:
                continue
            piece = c["chunk_text"].split()
            starts = [i for i in range(len(words) - len(piece) + 1) if words[i:i + len(piece)] == piece]
            assert starts, f"{c['chunk_id']} is not a run of the words of {doc['doc_id']}: {c['chunk_text']!r}"
            for i in starts:
                covered[i:i + len(piece)] = [True] * len(piece)
        lost = [words[i] for i, seen in enumerate(covered) if not seen]
        assert not lost, f"{doc['doc_id']}: {len(lost)} of {len(words)} words are in no chunk, from {lost[:12]}"


def body_words(markdown: str) -> list[str]:
    """The words of a document without its heading lines (a chunk's heading is in its own column)."""
    return " ".join(line for line in markdown.splitlines() if not re.match(r"#{1,6}\s", line)).split()


def test_a_sentence_longer_than_the_limit_becomes_word_windows():
    paragraph = " ".join(f"w{i}" for i in range(50)) + "."
    chunks = pack_section(["Short one.", paragraph], max_words=20, overlap_words=4)
    # Windows of 20 - 4 words, so that one always fits after the 4 carried words.
    assert [len(c.split()) for c in chunks] == [18, 20, 20, 6]
    assert chunks[0] == "Short one.\n\n" + " ".join(f"w{i}" for i in range(16))
    assert chunks[1].startswith("w12 w13 w14 w15 w16")
    assert chunks[3] == "w44 w45 w46 w47 w48 w49."


def test_chunk_ids_are_stable_and_positional():
    table = read_documents(DOCUMENTS)
    step = Chunk(ChunkConfig(max_words=40, overlap_words=10))
    whole = step.process(table)
    one_by_one = pl.concat([step.process(table.slice(i, 1)) for i in range(table.height)])
    assert whole.equals(one_by_one)  # a chunk's id does not depend on the other documents in its batch
    water = whole.filter(pl.col("doc_id") == "water-cycle.md")
    assert water["chunk_id"].to_list() == [f"water-cycle.md#{i}" for i in range(water.height)]
    assert water["position"].to_list() == list(range(water.height))
    assert "text" not in whole.columns and "title" in whole.columns
    assert Chunk(ChunkConfig()).output_columns(["doc_id", "title", "text"]) == [
        "doc_id", "title", "chunk_id", "heading", "chunk_text", "position"]


def test_documents_without_text_are_dropped():
    out = Chunk(ChunkConfig()).process(pl.DataFrame({"doc_id": ["a.md", "b.md"], "text": ["# Only a title\n", "Body."]}))
    assert dropped(out) == {"empty_document": 1}
    assert kept(out).select("chunk_id", "heading", "chunk_text").rows() == [("b.md#0", "", "Body.")]


def test_overlap_must_leave_room_for_new_text():
    problems = []
    assert build(ChunkConfig, {"max_words": 40, "overlap_words": 30}, ("steps", 0, "chunk"), problems) is None
    assert "overlap_words (30) must be at most half of max_words (40)" in problems[0].format()
    assert "set it to 20 or less" in problems[0].format()


# -- questions -------------------------------------------------------------------------------

def passage_question(conv, k):
    return f" What does passage {len(conv[0]['content'])} say?"


def question_step(seed=0, **options):
    return GroundedQuestions(GroundedQuestionsConfig(**options), seed=seed, index=1)


def ask_questions(table, reply_fn=passage_question, seed=0, **options) -> pl.DataFrame:
    return question_step(seed, **options).process(table, scripted(reply_fn))


def test_questions_carry_types_difficulties_context_and_lineage():
    prompts = []

    def reply(conv, k):
        prompts.append(conv[0]["content"])
        assert conv[-1] == {"role": "assistant", "content": "Question:"}
        return f" What is said in prompt {len(prompts)}?"

    step = question_step(questions_per_chunk=3)
    chunks = kept(chunk_table())
    out = step.process(chunks, scripted(reply))
    assert out.height == 3 * chunks.height and dropped(out) == {}
    assert set(out["question_type"]) == set(QUESTION_TYPES) and set(out["difficulty"]) == set(DIFFICULTIES)
    row = out.row(0, named=True)
    assert row["instruction"] == "What is said in prompt 1?"
    assert (row["origin"], row["generation"], row["operation"]) == ("grounded", 1, row["question_type"])
    assert row["context"].startswith(f"[{row['chunk_ids'][0]}] Compound Interest\n")
    assert out.columns == step.output_columns(chunks.columns) + [DROP]
    for row, prompt in zip(out.iter_rows(named=True), prompts):
        assert f"Write one {row['difficulty']} question" in prompt
        assert row["parent"] == " + ".join(row["chunk_ids"])
        texts = [c["chunk_text"] for c in passages_in(row["context"], row["chunk_ids"])]
        assert all(text in prompt for text in texts)
        if row["question_type"] == "multi_hop":
            assert len(row["chunk_ids"]) == 2 and "Passage 2" in prompt
        else:
            assert len(row["chunk_ids"]) == 1 and "Passage 2" not in prompt


def test_multi_hop_pairs_two_sections_of_the_same_document():
    out = ask_questions(kept(chunk_table()), types={"multi_hop": 1.0})
    by_id = {c["chunk_id"]: c for c in kept(chunk_table()).to_dicts()}
    assert set(out["question_type"]) == {"multi_hop"}
    partners = []
    for first, second in out["chunk_ids"].to_list():
        assert by_id[first]["doc_id"] == by_id[second]["doc_id"]
        assert by_id[first]["heading"] != by_id[second]["heading"]
        partners.append(second)
    assert len(set(partners)) > 10  # drawn, not always the neighbour


def test_multi_hop_in_a_one_chunk_document_becomes_reasoning():
    ctx = scripted(passage_question)
    out = question_step(types=["multi_hop"]).process(
        Chunk(ChunkConfig()).process(pl.DataFrame({"doc_id": ["a.md"], "text": ["One short text."]})), ctx)
    assert out.select("question_type", "chunk_ids").rows() == [("reasoning", ["a.md#0"])]
    assert ctx.report == {"multi_hop_fallbacks": 1}


def test_question_draws_are_deterministic_and_per_chunk():
    chunks = kept(chunk_table())
    first = ask_questions(chunks, questions_per_chunk=2)
    assert first.equals(ask_questions(chunks, questions_per_chunk=2))
    other_seed = ask_questions(chunks, seed=1, questions_per_chunk=2)
    assert first["question_type"].to_list() != other_seed["question_type"].to_list()
    # A chunk's draws do not depend on which other chunks are in the table.
    alone = ask_questions(chunks.filter(pl.col("doc_id") == "vaccines.md"), questions_per_chunk=2)
    same = first.filter(pl.col("doc_id") == "vaccines.md")
    assert alone.select("question_type", "difficulty", "chunk_ids").equals(
        same.select("question_type", "difficulty", "chunk_ids"))


def test_weights_pick_the_types_and_difficulties():
    out = ask_questions(kept(chunk_table()), types={"factual": 1, "reasoning": 0}, difficulties=["hard"])
    assert set(out["question_type"]) == {"factual"} and set(out["difficulty"]) == {"hard"}


def test_unparseable_and_repeated_questions_are_dropped():
    def reply(conv, k):
        return " What is this passage about?" if "Compound" in conv[0]["content"] else " I cannot help."

    out = ask_questions(kept(chunk_table()).filter(pl.col("doc_id").is_in(["compound-interest.md", "sourdough.md"])),
                        reply, questions_per_chunk=2, types=["factual"])
    assert dropped(out) == {"duplicate": 5, "parse_error": 10}
    assert kept(out).height == 5
    bad = out.filter(pl.col(DROP) == "parse_error").row(0, named=True)
    assert bad[RAW_REPLY] == " I cannot help." and bad["chunk_ids"] and bad["instruction"] is None


@pytest.mark.parametrize("reply, question", [
    (" What is evaporation?", "What is evaporation?"),
    ("Question 1: How do clouds form?\nAnswer: by condensation.", "How do clouds form?"),
    ('1. "Why does rain fall?"', "Why does rain fall?"),
    ("**Question:** What is a starter?", "What is a starter?"),
    ("Sure! Here is a question about the passage: What is a branch in Git?", "What is a branch in Git?"),
    ("\n\nHow long does money take to double at 6 percent?", "How long does money take to double at 6 percent?"),
    (" Explain how vaccines train memory cells. Then give an example.", "Explain how vaccines train memory cells."),
    (" What is compounding? What is the rule of 72?", "What is compounding?"),
    (' How do you define the term "storytelling?"', 'How do you define the term "storytelling?"'),
    (' "What is a "fast-forward" merge?"', 'What is a "fast-forward" merge?'),
    ("A question about evaporation: Where does most evaporation happen?", "Where does most evaporation happen?"),
    ("Great passage. Why is 72 / 6 = 12 years?", "Why is 72 / 6 = 12 years?"),
])
def test_clean_question(reply, question):
    assert clean_question(reply) == question


@pytest.mark.parametrize("reply", ["", " I cannot help with that.", " What?", "The passage is about water.",
                                   " Why " + "very " * 70 + "long?",
                                   ' What is the answer to the question "When do memory cells form?"'])
def test_clean_question_refuses_replies_without_a_question(reply):
    with pytest.raises(ParseError):
        clean_question(reply)


def test_type_and_difficulty_names_are_checked():
    problems = []
    build(GroundedQuestionsConfig, {"types": ["factual", "multihop"], "difficulties": {"easy": -1}},
          ("steps", 1, "grounded_questions"), problems)
    text = "\n".join(p.format() for p in problems)
    assert "steps[1].grounded_questions.types: unknown type 'multihop'; did you mean 'multi_hop'?" in text
    assert "steps[1].grounded_questions.difficulties: weights must not be negative" in text


# -- answers ---------------------------------------------------------------------------------

IDS = ["water-cycle.md#2", "water-cycle.md#4"]


@pytest.mark.parametrize("answer, text, citations", [
    ("Clouds form by condensation [water-cycle.md#2].", "Clouds form by condensation [water-cycle.md#2].", IDS[:1]),
    ("According to [Water-Cycle.md #2], clouds form.", "According to [water-cycle.md#2], clouds form.", IDS[:1]),
    ("Rain [water-cycle#4] and clouds [water-cycle.md#2].", "Rain [water-cycle.md#4] and clouds [water-cycle.md#2].",
     ["water-cycle.md#4", "water-cycle.md#2"]),
    ("Both [water-cycle.md#2, water-cycle.md#4; water-cycle.md#2].",
     "Both [water-cycle.md#2, water-cycle.md#4, water-cycle.md#2].", IDS),
    ("See [the docs](https://x.org) and [water-cycle.md#4].", "See [the docs](https://x.org) and [water-cycle.md#4].",
     IDS[1:]),
])
def test_parse_citations(answer, text, citations):
    assert parse_citations(answer, IDS) == (text, citations)


@pytest.mark.parametrize("answer, reason", [
    ("Clouds form by condensation.", "no_citation"),
    ("See [the docs](https://x.org).", "no_citation"),
    ("According to [the passage], clouds form.", "bad_citation"),
    ("Clouds form [water-cycle.md#9].", "bad_citation"),
    ("Clouds [water-cycle.md#2] and rain [water-cycle.md#7].", "bad_citation"),  # one made-up id is enough
])
def test_parse_citations_refuses(answer, reason):
    with pytest.raises(ParseError) as err:
        parse_citations(answer, IDS)
    assert err.value.reason == reason


@pytest.mark.parametrize("text, cleaned", [
    ("It rains. Then the water", "It rains."),
    ("It rains [a.md#1].\n\nQuestion: What else?", "It rains [a.md#1]."),
    ("No sentence end", "No sentence end"),
    ('He said "yes."', 'He said "yes."'),
])
def test_clean_answer(text, cleaned):
    assert clean_answer(text) == cleaned


def answer_rows() -> pl.DataFrame:
    chunks = {c["chunk_id"]: c for c in kept(chunk_table()).to_dicts()}
    rows = [{"instruction": f"Question {i}?", "chunk_ids": ids, "context": format_context([chunks[x] for x in ids])}
            for i, ids in enumerate([["water-cycle.md#2"], ["water-cycle.md#2", "water-cycle.md#4"],
                                     ["sourdough.md#1"], ["sourdough.md#3"], ["vaccines.md#0"]])]
    return pl.DataFrame(rows)


def test_answers_cite_the_passages_or_are_dropped():
    prompts = []
    replies = iter(["water-cycle.md#2], clouds form when vapour condenses.",
                    "water-cycle.md#4] and [water-cycle.md#2], rain collects in rivers.",
                    "the passage], bread rises.",
                    "sourdough.md#3], the dough proofs overnight [sourdough.md#9].",
                    "], vaccines train the immune system."])

    def reply(conv, k):
        prompts.append(conv)
        return next(replies)

    out = GroundedAnswer(GroundedAnswerConfig()).process(answer_rows(), scripted(reply))
    assert kept(out).select("response", "citations").rows() == [
        ("According to [water-cycle.md#2], clouds form when vapour condenses.", ["water-cycle.md#2"]),
        ("According to [water-cycle.md#4] and [water-cycle.md#2], rain collects in rivers.",
         ["water-cycle.md#4", "water-cycle.md#2"])]
    assert out[DROP].to_list()[2:] == ["bad_citation", "bad_citation", "no_citation"]
    assert out[RAW_REPLY][2] == "the passage], bread rises."
    prompt = prompts[1][0]["content"]
    assert "like [water-cycle.md#2]" in prompt and "Question: Question 1?" in prompt
    assert "[water-cycle.md#4] The Water Cycle > Collection and runoff\n" in prompt
    assert prompts[1][-1] == {"role": "assistant", "content": "According to ["}


def test_answers_without_a_prefill_and_too_short_ones():
    replies = iter(["Clouds form by condensation [water-cycle.md#2].", "[water-cycle.md#2] [water-cycle.md#4] Yes."])
    step = GroundedAnswer(GroundedAnswerConfig(prefill=None))
    out = step.process(answer_rows().head(2), scripted(lambda conv, k: next(replies)))
    assert out["response"][0] == "Clouds form by condensation [water-cycle.md#2]."
    assert out[DROP].to_list() == [None, "parse_error"]


def test_rows_whose_context_lacks_a_chunk_are_invalid():
    rows = answer_rows().head(1).with_columns(pl.Series("chunk_ids", [["water-cycle.md#3"]]))
    out = GroundedAnswer(GroundedAnswerConfig()).process(rows, scripted(lambda conv, k: "x"))
    assert out[DROP].to_list() == ["invalid_input"]
    assert "chunk 'water-cycle.md#3' has no passage in the context" in out["_drop_detail"][0]


# -- groundedness ----------------------------------------------------------------------------

@pytest.mark.parametrize("reply, supported", [
    ("Supported: yes", True), ("Supported: No", False), ("Supported: **yes**", True), ("Supported: partly", False),
    ("The answer is not supported by the passage.", False), ("The claim is supported by passage 2.", True),
    ("Supported: no. On second thought, Supported: yes", True), ("Yes, it is.", True), ("no", False),
])
def test_parse_supported(reply, supported):
    assert parse_supported(reply) is supported


@pytest.mark.parametrize("reply", ["Supported:", "The answer mentions clouds.", ""])
def test_parse_supported_refuses_replies_without_a_verdict(reply):
    with pytest.raises(ParseError):
        parse_supported(reply)


def test_the_judge_sees_only_the_cited_passages_and_drops_unsupported_answers():
    rows = answer_rows().head(3).with_columns(
        pl.Series("response", ["Clouds form [water-cycle.md#2].", "Rivers [water-cycle.md#4].", "Bread [sourdough.md#1]."]),
        pl.Series("citations", [["water-cycle.md#2"], ["water-cycle.md#4"], ["sourdough.md#1"]]))
    contexts = rows["context"].to_list()
    chunks = {c["chunk_id"]: c["chunk_text"] for c in kept(chunk_table()).to_dicts()}
    seen = []

    def judge(conv, k):
        prompt = conv[0]["content"]
        seen.append(prompt)
        return {"Question 0?": " yes", "Question 1?": " no", "Question 2?": " maybe"}[prompt.split("Question: ")[1]
                                                                                      .split("\n")[0]]

    out = Groundedness(GroundednessConfig()).process(rows, scripted(judge))
    assert out["grounded"].to_list() == [True, False, None]
    assert out[DROP].to_list() == [None, "ungrounded", "parse_error"]
    assert out["groundedness_judgement"][1] == "Supported: no"
    assert chunks["water-cycle.md#4"] in seen[1] and chunks["water-cycle.md#2"] not in seen[1]
    assert "[water-cycle.md#2]" in contexts[1]  # the uncited passage was in the row's context
    assert 'Reply with "Supported: yes" or "Supported: no" only.' in seen[0]


def test_the_judge_can_reason_first():
    rows = answer_rows().head(1).with_columns(pl.Series("response", ["Clouds form [water-cycle.md#2]."]),
                                              pl.Series("citations", [["water-cycle.md#2"]]))
    step = Groundedness(GroundednessConfig(reasoning=True))
    out = step.process(rows, scripted(lambda conv, k: "The passage says so.\nSupported: yes" if len(conv) == 1
                                      else "prefilled"))
    assert out["groundedness_judgement"].to_list() == ["The passage says so.\nSupported: yes"]
    assert step.generation_params().max_tokens == 128


# -- real replies of the embedded model --------------------------------------------------------

REAL = json.loads(REPLIES.read_text(encoding="utf-8")) if REPLIES.is_file() else {}


# What each saved reply must give, pinned by reading the replies (tests/data/grounded_verdicts.json).
VERDICTS = json.loads((Path(__file__).parent / "data" / "grounded_verdicts.json").read_text(encoding="utf-8"))
KINDS = ("questions", "answers", "judgements")


def outcome(parse, reply):
    """``("ok", value)``, or ``("refused", reason, message)`` for a ParseError."""
    try:
        return ("ok", parse(reply))
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


def answer_of(record):
    step = GroundedAnswer(GroundedAnswerConfig(prefill=record["prefill"]))
    return lambda reply: step.parse(reply, {"chunk_ids": record["chunk_ids"]})


def verdict_of(record):
    return lambda reply: parse_supported((record["prefill"] or "") + reply)


def pinned(kind: str):
    records = REAL.get(kind, [])
    return pytest.mark.parametrize("record, verdict", list(zip(records, VERDICTS[kind])),
                                   ids=[f"{i}-{r['chunk_ids'][0]}" for i, r in enumerate(records)])


@pytest.mark.parametrize("kind", KINDS)
def test_a_verdict_is_pinned_for_every_saved_reply(kind):
    assert [v["reply"] for v in VERDICTS[kind]] == [r["reply"][:40] for r in REAL[kind]]


@pinned("questions")
def test_every_real_question_reply_gives_its_pinned_question(record, verdict):
    got = outcome(clean_question, record["reply"])
    if check_refusal(got, verdict):
        return
    question = got[1]
    assert question == verdict["question"]
    assert question == question.strip() and "\n" not in question
    assert not question.lower().startswith(("question", "q:", "sure", "here"))


@pinned("answers")
def test_every_real_answer_reply_gives_its_pinned_citations(record, verdict):
    got = outcome(answer_of(record), record["reply"])
    if check_refusal(got, verdict):
        return
    columns = got[1]
    assert columns["citations"] == verdict["citations"]
    assert columns["response"].endswith(verdict["ends"])
    # The response is the start of the prefilled reply (ids written as given: case aside).
    assert ((record["prefill"] or "") + record["reply"]).lower().startswith(columns["response"].lower())
    assert all(f"[{c}" in columns["response"] for c in columns["citations"])
    assert "Question:" not in columns["response"]


@pinned("judgements")
def test_every_real_judgement_reply_gives_its_pinned_verdict(record, verdict):
    got = outcome(verdict_of(record), record["reply"])
    if not check_refusal(got, verdict):
        assert got[1] is verdict["supported"]


def test_most_real_replies_parse():
    """A parser that refuses everything fails here even if the table were pinned from it."""
    questions = [outcome(clean_question, r["reply"]) for r in REAL["questions"]]
    prefilled = [r for r in REAL["answers"] if r["prefill"]]
    answers = [outcome(answer_of(r), r["reply"]) for r in prefilled]
    judgements = [outcome(verdict_of(r), r["reply"]) for r in REAL["judgements"]]
    for name, got, share in (("questions", questions, 0.85), ("prefilled answers", answers, 0.8),
                             ("judgements", judgements, 0.9)):
        parsed = sum(g[0] == "ok" for g in got)
        assert parsed >= share * len(got), f"{parsed} of {len(got)} {name} parse"
    assert {g[1] for g in judgements if g[0] == "ok"} == {True, False}  # not one verdict for everything


def test_real_replies_were_recorded():
    assert REAL, f"{REPLIES} is missing; record it with `python -m tests.test_grounded record`"
    assert REPLIES.stat().st_size < 100_000
    assert len(REAL["questions"]) >= 40 and len(REAL["answers"]) >= 40 and len(REAL["judgements"]) >= 40


# -- recipes -------------------------------------------------------------------------------------

SCRIPTED_GROUNDED_LLM = """\
llm:
  backend: scripted
  rules:
    - {match: "Check whether the answer is supported", reply: " yes"}
    - {match: "like \\\\[(?P<id>[^\\\\]]+)\\\\]", reply: "{id}], it is explained in the passage."}
    - {match: "Write one", reply: " What does the passage explain {hash}?"}
"""


def test_the_recipe_validates():
    recipe = load_recipe(RECIPE)
    assert [s.name for s in recipe.steps] == ["chunk", "grounded_questions", "grounded_answer", "heuristics",
                                              "groundedness"]
    assert {"instruction", "response", "citations", "grounded", "origin", "parent", "operation",
            "generation"} <= set(recipe.columns_after())


def test_a_recipe_without_chunks_names_the_missing_column(write_recipe):
    path = write_recipe(f"name: g\nsource: {{path: {DOCUMENTS}}}\nsteps:\n  - grounded_questions: {{}}\n"
                        "output: {format: raw}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "steps[0].grounded_questions: needs column 'chunk_id'" in str(err.value)


def test_the_recipe_runs_end_to_end_on_a_scripted_model(tmp_path):
    recipe_text = RECIPE.read_text(encoding="utf-8").replace("llm: {backend: transformers, model: embedded}",
                                                            SCRIPTED_GROUNDED_LLM.strip())
    assert "backend: scripted" in recipe_text
    path = tmp_path / "grounded.yaml"
    path.write_text(recipe_text, encoding="utf-8")
    version, manifest, _ = run_recipe(load_recipe(path), tmp_path / "out", driver=Driver(progress=False))
    counts = {s["name"]: (s["rows_in"], s["rows_out"]) for s in manifest["steps"]}
    chunks = counts["chunk"][1]
    assert counts["grounded_questions"] == (chunks, chunks) and manifest["rows"] == chunks
    rows = pl.read_parquet(version / "data")
    row = rows.row(0, named=True)
    assert row["origin"] == "grounded" and row["generation"] == 1 and row["grounded"] is True
    assert row["response"].startswith(f"According to [{row['chunk_ids'][0]}]")
    assert row["citations"] == row["chunk_ids"][:1]


@pytest.mark.slow
@pytest.mark.timeout(960)  # the run below may take its 900 s
def test_grounded_recipe_end_to_end_on_the_embedded_model(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "factory", "run", str(RECIPE), "--out", str(tmp_path), "--quiet",
         "--set", "source.limit=2", "--set", "steps[2].grounded_answer.max_tokens=96"],
        capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    version = Path(proc.stdout.strip().splitlines()[-1])
    manifest = json.loads((version / "manifest.json").read_text())
    steps = {s["name"]: s for s in manifest["steps"]}
    assert steps["chunk"]["rows_out"] == 10
    assert steps["grounded_questions"]["rows_in"] == 10
    assert steps["grounded_answer"]["rows_in"] == steps["grounded_questions"]["rows_out"]
    assert manifest["rows"] + manifest["rejected_rows"] >= 10
    columns = pl.read_parquet_schema(next((version / "data").glob("*.parquet")))
    assert {"origin", "parent", "operation", "generation", "chunk_ids", "citations", "grounded"} <= set(columns)
    check_grounded_rows(version, manifest, {f"{doc}#{i}" for doc in ("compound-interest.md", "git-branches.md")
                                            for i in range(5)})


def check_grounded_rows(version: Path, manifest: dict, chunk_ids: set[str]) -> None:
    """Rows are kept, and each is what the recipe promises: a question, an answer that opens with
    a citation of its own passages, the passages, and the judge's yes. (One run on 2 CPU cores
    kept 2 of 10: 4 questions were refused, 2 answers cited nothing and 2 hit max_tokens.)"""
    rows = pl.read_parquet(version / "data").to_dicts()
    drops = {s["name"]: s["dropped"] for s in manifest["steps"]}
    assert len(rows) == manifest["rows"] >= 1, drops
    # A row is lost only for what the model wrote, never for a failure of the pipeline.
    assert {r for d in drops.values() for r in d} <= {"parse_error", "no_citation", "bad_citation", "truncated",
                                                      "too_short", "too_long", "repetitive", "ungrounded"}, drops
    for row in rows:
        assert row["instruction"].strip() and len(row["instruction"].split()) >= 3, row
        assert set(row["chunk_ids"]) <= chunk_ids and 1 <= len(row["chunk_ids"]) <= 2, row
        assert row["citations"] and set(row["citations"]) <= set(row["chunk_ids"]), row
        assert row["response"].startswith(f"According to [{row['citations'][0]}]"), row
        assert len(row["response"].split()) >= 6, row  # the recipe's heuristics: min_words 6
        assert all(f"[{c}]" in row["context"] for c in row["chunk_ids"]), row  # the passages travel with it
        assert row["grounded"] is True and row["groundedness_judgement"], row
        assert (row["origin"], row["generation"]) == ("grounded", 1), row


# -- recording the real replies --------------------------------------------------------------------

def record_replies(path: Path = REPLIES) -> None:
    """Runs the embedded model on the grounded prompts over data/documents and saves the raw
    replies: questions (2 per chunk, every type), answers with and without the prefill, and
    groundedness verdicts (also on answers swapped between questions, which are unsupported)."""
    from factory.llm import TransformersBackend, TransformersConfig

    client = LLMClient(TransformersBackend(TransformersConfig(model="embedded")))
    chunks = kept(chunk_table()).to_dicts()
    by_id = {c["chunk_id"]: c for c in chunks}
    asker = GroundedQuestions(GroundedQuestionsConfig(questions_per_chunk=2, types=list(QUESTION_TYPES)), index=1)
    plan, _ = plan_questions(chunks, asker.config, asker.seed, asker.index)
    completions = client.chat([asker.question_messages(item) for item in plan], asker.generation_params())
    questions = [{"chunk_ids": [p["chunk_id"] for p in item["passages"]], "question_type": item["question_type"],
                  "difficulty": item["difficulty"], "reply": c.texts[0]} for item, c in zip(plan, completions)]
    rows = []
    for q in questions:
        try:
            rows.append({"instruction": clean_question(q["reply"]), "chunk_ids": q["chunk_ids"],
                         "context": format_context([by_id[i] for i in q["chunk_ids"]])})
        except ParseError:
            continue
    answers = []
    for prefill, subset in (("According to [", rows), (None, rows[:16])):
        answerer = GroundedAnswer(GroundedAnswerConfig(prefill=prefill))
        completions = client.chat([answerer.build_messages(r) for r in subset], answerer.generation_params())
        answers += [{"chunk_ids": r["chunk_ids"], "question": r["instruction"], "prefill": prefill,
                     "reply": c.texts[0]} for r, c in zip(subset, completions)]
    judged = []
    for row, answer in zip(rows, answers):
        try:
            columns = GroundedAnswer(GroundedAnswerConfig()).parse(answer["reply"], row)
        except ParseError:
            continue
        judged.append({**row, **columns, "swapped": False})
    swapped = [{**judged[k], "response": judged[(k + 7) % len(judged)]["response"], "swapped": True}
               for k in range(min(12, len(judged)))]
    judgements = []
    for reasoning, subset in ((False, judged + swapped), (True, judged[:10] + swapped[:6])):
        judge = Groundedness(GroundednessConfig(reasoning=reasoning))
        completions = client.chat([judge.build_messages(j) for j in subset], judge.generation_params())
        judgements += [{"chunk_ids": j["chunk_ids"], "citations": j["citations"], "swapped": j["swapped"],
                        "prefill": judge.prefill, "reply": c.texts[0]} for j, c in zip(subset, completions)]
    record = {"model": client.backend.model_id, "questions": questions, "answers": answers, "judgements": judgements}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] != ["record"]:
        sys.exit("usage: python -m tests.test_grounded record")
    record_replies()
