"""Structured output in the built-in steps that read a score, a verdict, a question or a list.

Where the backend enforces JSON Schemas (the scripted backend with ``enforces_schema: true``)
a step asks for JSON (the request carries ``json_schema``, no prefill, the fields described in
the prompt), reads the reply with the schema, and writes the same columns, typed alike, as
with its prefill; elsewhere it keeps the prefill and the text parsing.
"""

from __future__ import annotations

import json
import pickle
import re

import polars as pl
import pytest

from factory.build import run_recipe
from factory.config import build
from factory.driver import Driver
from factory.llm import ScriptedBackend, ScriptedConfig
from factory.llm.requests import LLMClient
from factory.llm.schema import schema_text
from factory.recipe import load_recipe
from factory.steps.backtranslation.self_curate import SelfCurate, SelfCurateConfig, rating_reply
from factory.steps.context import StepContext
from factory.steps.drops import DROP, DROP_DETAIL, RAW_REPLY, TRUNCATED
from factory.steps.evol_instruct import EvolInstruct, EvolInstructConfig
from factory.steps.evol_rules import EQUALITY_SCHEMA
from factory.steps.grounded.context import format_context
from factory.steps.grounded.grounded_questions import (GroundedQuestions, GroundedQuestionsConfig, question_reply,
                                                       question_schema)
from factory.steps.grounded.groundedness import Groundedness, GroundednessConfig
from factory.steps.judge import Judge, JudgeConfig, judgement_schema
from factory.steps.llm_step import LLMStep
from factory.steps.pairwise import Pairwise, PairwiseConfig, winner_schema
from factory.steps.preference_pairs import PreferencePairs, PreferencePairsConfig

from .conftest import SEEDS

JSON_CUE = "Reply with only a JSON object"


class Recorder(ScriptedBackend):
    """A scripted backend that keeps every request it is sent."""

    def __init__(self, reply_fn, enforces: bool = True):
        super().__init__(ScriptedConfig(enforces_schema=enforces), reply_fn=reply_fn)
        self.requests = []

    def generate(self, requests, on_reply=None):
        self.requests += requests
        return super().generate(requests, on_reply)


def run(step: LLMStep, table: pl.DataFrame, reply_fn, enforces: bool = True):
    """The step's output on ``table`` and the requests it sent, its model replying ``reply_fn``."""
    backend = Recorder(reply_fn, enforces)
    ctx = StepContext(llm=LLMClient(backend))
    return step.process(table, ctx), backend.requests, ctx


def make(cls, config_cls, **options):
    problems = []
    config = build(config_cls, options, ("steps", 0, cls.name), problems)
    assert not problems, problems
    return cls(config, index=0, seed=3)


def schema_of(request) -> dict:
    assert request.params.json_schema, "the request carries no JSON Schema"
    return json.loads(request.params.json_schema)


def assert_asks_json(requests, fields: list[str]) -> list[dict]:
    """Every request asks for JSON with ``fields``, without a prefill or a regex; their schemas."""
    assert requests
    schemas = []
    for request in requests:
        assert request.messages[-1]["role"] == "user", "a structured request has no prefill"
        assert JSON_CUE in request.messages[-1]["content"]
        assert request.params.regex is None and request.params.continuations == 0
        assert "\n" not in request.params.stop  # JSON may break lines between its fields
        schema = schema_of(request)
        assert list(schema["properties"]) == fields and schema["required"] == fields
        schemas.append(schema)
    return schemas


def assert_plain(requests, prefill: str | None):
    """Every request is today's: no JSON Schema, the given prefill (or none)."""
    assert requests
    for request in requests:
        assert request.params.json_schema is None
        assert JSON_CUE not in request.messages[0]["content"] + request.messages[-1]["content"]
        if prefill is None:
            assert request.messages[-1]["role"] == "user"
        else:
            assert request.messages[-1] == {"role": "assistant", "content": prefill}


def kept(out: pl.DataFrame) -> pl.DataFrame:
    return out.filter(pl.col(DROP).is_null())


def drops(out: pl.DataFrame) -> dict:
    gone = out.filter(pl.col(DROP).is_not_null())
    return dict(zip(gone["instruction"], gone[DROP]))


def prompt_of(conversation) -> str:
    return next(m["content"] for m in conversation if m["role"] == "user")


# -- the base: who asks for JSON -----------------------------------------------------------

def test_only_steps_that_read_fields_switch_and_only_on_a_copy():
    judge = make(Judge, JudgeConfig)
    plain, enforcing = LLMClient(Recorder(None, enforces=False)), LLMClient(Recorder(None))
    assert judge.reads_fields and judge.for_client(plain) is judge
    copy = judge.for_client(enforcing)
    assert copy is not judge and copy.asks_json and not judge.asks_json
    assert copy.fingerprint() == judge.fingerprint()  # the driver adds the backend's capability to the key
    assert pickle.loads(pickle.dumps(copy)).asks_json
    from factory.steps.solve import Solve, SolveConfig
    solve = Solve(SolveConfig())
    assert not solve.reads_fields and solve.for_client(enforcing) is solve
    for cls in (Judge, Pairwise, Groundedness, GroundedQuestions, SelfCurate, EvolInstruct, PreferencePairs):
        assert cls.reads_fields, cls.__name__


def test_the_schemas_compile_to_grammars_that_bound_scores_and_texts():
    oc = pytest.importorskip("outlines_core")
    from factory.llm.grammar import WHITESPACE

    def regex(schema):
        return oc.json_schema.build_regex_from_schema(schema_text(schema), WHITESPACE)

    judge = regex(judgement_schema(make(Judge, JudgeConfig, max_tokens=40).config))  # reasoning: (40-24)*3 chars
    assert re.fullmatch(judge, '{"reasoning": "Fine.", "score": 10}')
    assert not re.fullmatch(judge, '{"reasoning": "Fine.", "score": 12}')
    assert not re.fullmatch(judge, '{"reasoning": "%s", "score": 3}' % ("x" * 49))
    assert re.fullmatch(judge, '{"reasoning": "%s", "score": 3}' % ("x" * 48))
    for schema in [judgement_schema(make(Judge, JudgeConfig, mode="binary", reasoning=False).config),
                   winner_schema(True, 192), EQUALITY_SCHEMA, question_reply(GroundedQuestionsConfig()),
                   rating_reply(SelfCurateConfig()), make(Groundedness, GroundednessConfig).reply_schema()]:
        assert regex(schema)


def test_a_template_of_the_recipe_gets_the_fields_described_after_it():
    template = "Rate {{ response }}{% if not structured %}, then write Score: N{% endif %}."
    _, requests, _ = run(make(Judge, JudgeConfig, template=template), JUDGE_ROWS.head(1),
                         lambda conv, k: '{"reasoning": "ok", "score": 3}')
    prompt = requests[0].messages[-1]["content"]
    assert prompt.startswith("Rate r1.\n\n" + JSON_CUE) and "- reasoning: text" in prompt
    _, requests, _ = run(make(Judge, JudgeConfig, template="Rate {{ response }}."), JUDGE_ROWS.head(1),
                         lambda conv, k: "Score: 3", enforces=False)
    assert requests[0].messages[-1]["content"] == "Rate r1."


# -- judge -----------------------------------------------------------------------------------

JUDGE_ROWS = pl.DataFrame({"instruction": ["good", "bad", "over", "prose"], "response": ["r1", "r2", "r3", "r4"]})


def judge_json(conv, k):
    task = re.search(r"Instruction: (\w+)", prompt_of(conv)).group(1)
    return {"good": '{"reasoning": "Correct and clear.", "score": 9}',
            "bad": '```json\n{"reasoning": "Wrong.", "score": 2}\n```',
            "over": '{"reasoning": "Great.", "score": 11}',
            "prose": "Correct and clear. Score: 9"}[task]


def test_judge_asks_for_reasoning_then_a_score_in_range_and_keeps_its_columns():
    out, requests, _ = run(make(Judge, JudgeConfig, scale=10, guided=True), JUDGE_ROWS, judge_json)
    for schema in assert_asks_json(requests, ["reasoning", "score"]):
        # An enum: grammars enforce it (outlines-core ignores minimum and maximum).
        assert schema["properties"]["score"] == {"type": "integer", "enum": list(range(1, 11))}
        # The reasoning must end in time for the score: (192 - 24) tokens at 3 characters.
        assert schema["properties"]["reasoning"]["maxLength"] == 504
    assert requests[0].params.max_tokens == 192  # the reasoning keeps the step's budget
    prompt = requests[0].messages[-1]["content"]
    assert "then give the score" in prompt and '"Score: "' not in prompt and "- score: one of 1, 2, 3" in prompt
    good = kept(out)
    assert good["instruction"].to_list() == ["good", "bad"]
    assert good.schema["score"] == pl.Float64 and good["score"].to_list() == [9.0, 2.0]
    assert good["judgement"].to_list()[0] == '{"reasoning": "Correct and clear.", "score": 9}'
    assert drops(out) == {"over": "schema_error", "prose": "schema_error"}
    over = out.filter(pl.col("instruction") == "over").row(0, named=True)
    assert "11 is not one of" in over[DROP_DETAIL] and over[RAW_REPLY].endswith("11}")


def test_judge_without_reasoning_asks_for_the_score_alone_in_a_few_tokens():
    out, requests, _ = run(make(Judge, JudgeConfig, reasoning=False, scale=5),
                           JUDGE_ROWS.head(1), lambda conv, k: '{"score": 4}')
    [schema] = assert_asks_json(requests, ["score"])
    assert schema["properties"]["score"]["enum"] == [1, 2, 3, 4, 5]
    assert requests[0].params.max_tokens == 32  # a JSON verdict needs more than the 8 tokens of "Score: 4"
    assert "Reply with the score only" not in requests[0].messages[-1]["content"]
    assert kept(out)["score"].to_list() == [4.0]


def test_binary_judge_asks_for_a_verdict_out_of_two():
    rows = pl.DataFrame({"instruction": ["6+6?", "6+7?", "6+8?"], "response": ["12", "12", "14"],
                         "output": ["12", "13", "14"]})

    def reply(conv, k):
        prompt = prompt_of(conv)
        assert "Reference answer:" in prompt
        if "6+8" in prompt:
            return '{"reasoning": "Fine.", "verdict": "maybe"}'
        return '{"reasoning": "Checked.", "verdict": "%s"}' % ("correct" if "Reference answer: 12" in prompt
                                                              else "incorrect")

    out, requests, _ = run(make(Judge, JudgeConfig, mode="binary", reference_column="output"), rows, reply)
    [schema, *_] = assert_asks_json(requests, ["reasoning", "verdict"])
    assert schema["properties"]["verdict"] == {"enum": ["correct", "incorrect"]}
    good = kept(out)
    assert good.schema["judge_correct"] == pl.Boolean and good["judge_correct"].to_list() == [True, False]
    assert drops(out) == {"6+8?": "schema_error"}


def test_judge_falls_back_on_its_prefill_where_the_backend_does_not_enforce():
    out, requests, _ = run(make(Judge, JudgeConfig, reasoning=False, guided=True), JUDGE_ROWS.head(1),
                           lambda conv, k: " 7", enforces=False)
    assert_plain(requests, "Score:")
    assert requests[0].params.max_tokens == 8 and requests[0].params.regex == " (10|9|8|7|6|5|4|3|2|1)"
    assert out["score"].to_list() == [7.0] and out["judgement"].to_list() == ["Score: 7"]


def test_a_json_judgement_cut_at_max_tokens_is_truncated_and_a_rambling_verdict_is_not():
    cut = lambda conv, k: ('{"reasoning": "It starts well but', "length")  # noqa: E731
    out, _, _ = run(make(Judge, JudgeConfig, max_tokens=40), JUDGE_ROWS.head(1), cut)
    assert out[DROP].to_list() == [TRUNCATED]  # raising max_tokens would help, continuing would not
    assert out[DROP_DETAIL][0].startswith("the reply stopped at the token limit (max_tokens: 40 on steps[0].judge), "
                                          "mid-text; raise max_tokens (a JSON reply cannot be continued)")
    out, _, _ = run(make(Judge, JudgeConfig, reasoning=False), JUDGE_ROWS.head(1), cut)
    assert out[DROP].to_list() == ["schema_error"]  # it ran past the 32 tokens a verdict gets
    assert "32 tokens a verdict gets" in out[DROP_DETAIL][0]


# -- pairwise and preference pairs -----------------------------------------------------------

def winner_json(conv, k):
    prompt = prompt_of(conv)
    if "broken" in prompt:
        return "Winner: A"
    a = prompt.split("Response A: ")[1].split("\n")[0]
    return '{"reasoning": "A is better.", "winner": "%s"}' % ("A" if a.startswith("good") else "B")


def test_pairwise_asks_both_orders_for_a_winner_out_of_three():
    rows = pl.DataFrame({"instruction": ["q1", "q2", "q3"], "response": ["good 1", "bad 2", "broken"],
                         "response_b": ["bad 1", "good 2", "x"]})
    out, requests, _ = run(make(Pairwise, PairwiseConfig), rows, winner_json)
    assert len(requests) == 6
    [schema, *_] = assert_asks_json(requests, ["reasoning", "winner"])
    assert schema["properties"]["winner"] == {"enum": ["A", "B", "tie"]}
    good = kept(out)
    assert good["winner"].to_list() == ["a", "b"]
    assert good["pairwise_judgements"].to_list()[0][0].startswith('{"reasoning"')
    assert drops(out) == {"q3": "schema_error"}


def test_pairwise_without_reasoning_falls_back_on_winner_prefill():
    rows = pl.DataFrame({"instruction": ["q1"], "response": ["good"], "response_b": ["bad"]})
    out, requests, _ = run(make(Pairwise, PairwiseConfig, reasoning=False), rows,
                           lambda conv, k: " A", enforces=False)
    assert_plain(requests, "Winner:")
    assert out["winner"].to_list() == ["tie"]  # A in both orders: position bias cancels
    out, requests, _ = run(make(Pairwise, PairwiseConfig, reasoning=False), rows,
                           lambda conv, k: '{"winner": "A"}')
    assert_asks_json(requests, ["winner"])
    assert requests[0].params.max_tokens == 32 and out["winner"].to_list() == ["tie"]


def test_preference_pairs_judge_in_json_too():
    rows = pl.DataFrame({"instruction": ["q"] * 3, "response": ["good answer", "bad answer", "worse answer"]})

    def reply(conv, k):
        prompt = prompt_of(conv)
        a, b = (prompt.split(f"Response {x}: ")[1].split("\n")[0] for x in "AB")
        rank = {"good answer": 0, "bad answer": 1, "worse answer": 2}
        return '{"reasoning": "r", "winner": "%s"}' % ("A" if rank[a] < rank[b] else "B")

    out, requests, _ = run(make(PreferencePairs, PreferencePairsConfig, by="pairwise"), rows, reply)
    assert_asks_json(requests, ["reasoning", "winner"])
    assert out.select("chosen", "rejected").row(0) == ("good answer", "worse answer")


# -- grounded questions and groundedness --------------------------------------------------------

CHUNKS = pl.DataFrame({"chunk_id": ["doc.md#0", "doc.md#1"], "doc_id": ["doc.md", "doc.md"],
                       "heading": ["Water", "Ice"], "position": [0, 1],
                       "chunk_text": ["Water boils at 100 degrees at sea level.", "Ice melts at 0 degrees."]})


def question_json(conv, k):
    prompt = prompt_of(conv)
    if "Ice melts" in prompt and "Water boils" not in prompt:
        return '{"question": "Why?"}'  # too short for min_words
    if "Water boils" in prompt and "Ice melts" not in prompt:
        return '{"question": "At what temperature does water boil at sea level?"}'
    return "What happens? No JSON here."


def test_grounded_questions_ask_for_a_question_field_and_keep_their_columns():
    step = make(GroundedQuestions, GroundedQuestionsConfig, types=["factual"], questions_per_chunk=1)
    out, requests, _ = run(step, CHUNKS, question_json)
    assert_asks_json(requests, ["question"])
    assert requests[0].params.stop == () and requests[0].params.max_tokens == 64
    assert "Write only the question" not in requests[0].messages[-1]["content"]
    assert dict(out.schema) == {**question_schema(step.config), DROP: pl.String, DROP_DETAIL: pl.String,
                                RAW_REPLY: pl.String}
    good = kept(out).row(0, named=True)
    assert good["instruction"] == "At what temperature does water boil at sea level?"
    assert good["chunk_ids"] == ["doc.md#0"] and good["context"] == format_context([CHUNKS.row(0, named=True)])
    assert out.filter(pl.col(DROP).is_not_null())[DROP].to_list() == ["parse_error"]  # the same rules as text

    bad = run(make(GroundedQuestions, GroundedQuestionsConfig, types=["multi_hop"]), CHUNKS, question_json)[0]
    assert set(bad[DROP]) == {"schema_error"}  # both passages shown: the reply is not JSON


def test_grounded_questions_fall_back_on_their_prefill():
    step = make(GroundedQuestions, GroundedQuestionsConfig, types=["factual"])
    out, requests, _ = run(step, CHUNKS, lambda conv, k: " What is the boiling point of water?", enforces=False)
    assert_plain(requests, "Question:")
    assert requests[0].params.stop == ("\n",)
    assert kept(out).height == 2


def grounded_rows() -> pl.DataFrame:
    context = format_context(CHUNKS.to_dicts())
    return pl.DataFrame({"instruction": ["yes?", "no?", "odd?"], "response": ["a1", "a2", "a3"],
                         "context": [context] * 3, "chunk_ids": [["doc.md#0", "doc.md#1"]] * 3,
                         "citations": [["doc.md#0"]] * 3})


def test_groundedness_asks_for_a_boolean_and_drops_unsupported_answers():
    replies = {"yes?": '{"supported": true}', "no?": '{"supported": false}', "odd?": '{"supported": "yes"}'}
    out, requests, _ = run(make(Groundedness, GroundednessConfig), grounded_rows(),
                           lambda conv, k: replies[re.search(r"Question: (\S+)", prompt_of(conv)).group(1)])
    [schema, *_] = assert_asks_json(requests, ["supported"])
    assert schema["properties"]["supported"]["type"] == "boolean" and requests[0].params.max_tokens == 32
    good = kept(out)
    assert good["grounded"].to_list() == [True] and good["groundedness_judgement"].to_list() == ['{"supported": true}']
    assert drops(out) == {"no?": "ungrounded", "odd?": "schema_error"}


def test_groundedness_reasons_first_when_asked_and_falls_back_on_its_prefill():
    out, requests, _ = run(make(Groundedness, GroundednessConfig, reasoning=True), grounded_rows().head(1),
                           lambda conv, k: '{"reasoning": "All stated.", "supported": true}')
    assert_asks_json(requests, ["reasoning", "supported"])
    assert kept(out).height == 1
    out, requests, _ = run(make(Groundedness, GroundednessConfig), grounded_rows().head(1),
                           lambda conv, k: " yes", enforces=False)
    assert_plain(requests, "Supported:")
    assert out["groundedness_judgement"].to_list() == ["Supported: yes"]


# -- self_curate -------------------------------------------------------------------------------

def test_self_curate_reads_reasoning_and_score_in_one_round():
    replies = {"q5": '{"reasoning": " Complete and helpful. ", "score": 5}',
               "q2": '{"reasoning": "Misses most.", "score": 2}', "qx": "Misses most. Score: 2"}
    rows = pl.DataFrame({"instruction": list(replies), "response": ["text"] * 3})
    out, requests, _ = run(make(SelfCurate, SelfCurateConfig), rows,
                           lambda conv, k: replies[re.search(r"Instruction: (\w+)", prompt_of(conv)).group(1)])
    assert len(requests) == 3  # force_score's second round is for replies without a score: JSON has one
    [schema, *_] = assert_asks_json(requests, ["reasoning", "score"])
    assert schema["properties"]["score"]["enum"] == [1, 2, 3, 4, 5]
    assert schema["properties"]["reasoning"]["maxLength"] == (96 - 24) * 3
    assert '"Score: "' not in requests[0].messages[-1]["content"]
    good = kept(out)
    assert good.schema["curation_score"] == pl.Float64
    assert good.select("curation_score", "curation_reasoning").row(0) == (5.0, "Complete and helpful.")
    assert drops(out) == {"q2": "below_min_score", "qx": "schema_error"}
    assert out.filter(pl.col("instruction") == "q2")["curation_score"].to_list() == [2.0]


def test_self_curate_falls_back_on_text_and_its_score_round():
    rows = pl.DataFrame({"instruction": ["q"], "response": ["text"]})
    reply = lambda conv, k: " 4" if conv[-1]["role"] == "assistant" else "Clear."  # noqa: E731
    out, requests, _ = run(make(SelfCurate, SelfCurateConfig), rows, reply, enforces=False)
    assert len(requests) == 2 and requests[0].params.json_schema is None
    assert requests[1].messages[-1] == {"role": "assistant", "content": "Clear.\nScore:"}
    assert out["curation_score"].to_list() == [4.0]


# -- evol_instruct's equality check -----------------------------------------------------------

def evol_model(equality):
    def reply(conv, k):
        if "Compare these two instructions" in prompt_of(conv):
            return equality(prompt_of(conv))
        if conv[-1]["role"] == "assistant":  # an evolution, started with its label
            return f" {conv[-2]['content'].rsplit('#Prompt#: ', 1)[1]} Answer in under fifty words."
        return "A helpful answer with several words in it."
    return reply


def test_the_equality_check_asks_for_a_boolean():
    table = pl.read_ndjson(SEEDS).head(4)
    parents = table["instruction"].to_list()
    step = make(EvolInstruct, EvolInstructConfig, generations=1, operations={"add_constraints": 1})

    def equality(prompt):
        return '{"equal": true}' if parents[0] in prompt else "Not Equal" if parents[1] in prompt \
            else '{"equal": false}'

    out, requests, ctx = run(step, table, evol_model(equality))
    checks = [r for r in requests if "Compare these two instructions" in r.messages[-1]["content"]]
    assert len(checks) == 4
    [schema, *_] = assert_asks_json(checks, ["equal"])
    assert schema["properties"]["equal"]["type"] == "boolean"
    assert checks[0].params.max_tokens == 16 and 'Answer with "Equal"' not in checks[0].messages[-1]["content"]
    assert all(r.messages[-1]["role"] == "assistant" for r in requests if r not in checks
               and "#Prompt#" in prompt_of(r.messages))  # the evolutions keep their prefill
    gone = out.filter(pl.col(DROP).is_not_null())
    assert gone["parent"].to_list() == [parents[0]] and gone[DROP].to_list() == ["no_information_gain"]
    assert ctx.report["equality_unclear"] == 1  # "Not Equal" is not JSON: no evidence, the task stays
    assert kept(out).height == 3


def test_the_equality_check_falls_back_on_its_prefill():
    table = pl.read_ndjson(SEEDS).head(2)
    step = make(EvolInstruct, EvolInstructConfig, generations=1, operations={"add_constraints": 1})
    out, requests, _ = run(step, table, evol_model(lambda prompt: " Equal"), enforces=False)
    checks = [r for r in requests if "Compare these two instructions" in prompt_of(r.messages)]
    assert_plain(checks, "Answer:")
    assert set(out[DROP]) == {"no_information_gain"}


# -- a recipe ------------------------------------------------------------------------------------

@pytest.mark.parametrize("enforces", [True, False])
def test_a_recipe_on_an_enforcing_backend_gets_the_same_columns(write_recipe, tmp_path, enforces):
    path = write_recipe(f"""\
        name: structured
        seed: 1
        llm:
          backend: scripted
          enforces_schema: {str(enforces).lower()}
          rules:
            - {{match: "{JSON_CUE}", reply: '{{{{"reasoning": "Fine.", "score": {{score}}}}}}'}}
            - {{match: "Rate the response", reply: "Fine. Score: {{score}}"}}
            - {{match: ".", reply: "Answer {{hash}}"}}
        source: {{path: {SEEDS}, limit: 6}}
        steps:
          - solve: {{}}
          - judge: {{}}
        output: {{format: raw}}
        """)
    version, manifest, _ = run_recipe(load_recipe(path), tmp_path / "out", driver=Driver(progress=False))
    rows = pl.read_parquet(version / "data")
    assert rows.height == 6 and rows.schema["score"] == pl.Float64
    assert rows["judgement"].str.starts_with('{"reasoning"').all() is enforces
    assert rows["score"].is_between(1, 10).all()
