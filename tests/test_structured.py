"""Structured output: schemas from recipes, the `generate` step, re-asks where the backend cannot
enforce a schema, a grammar where it can (transformers), and servers that take `response_format`."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest

from factory.build import run_recipe
from factory.errors import ParseError, RecipeError
from factory.llm import GenerationParams, OpenAIBackend, OpenAIConfig, ScriptedBackend, ScriptedConfig
from factory.llm.base import Request
from factory.llm.requests import LLMClient
from factory.llm.schema import (SchemaSpecError, describe, problems, read_reply, schema_text, to_json_schema)
from factory.recipe import load_recipe
from factory.store import read_manifest, read_version

from .fake_openai import STANDARD, FakeOpenAI

RECORD = {"question": "str", "difficulty": ["easy", "medium", "hard"], "answer": "int", "hints": ["str"],
          "weight?": "float"}


# -- schemas ------------------------------------------------------------------------------------
def test_a_short_field_list_becomes_a_closed_json_schema_in_the_order_given():
    schema = to_json_schema(RECORD)
    assert list(schema["properties"]) == ["question", "difficulty", "answer", "hints", "weight"]
    assert schema["properties"]["difficulty"] == {"enum": ["easy", "medium", "hard"]}
    assert schema["properties"]["hints"] == {"type": "array", "items": {"type": "string"}}
    assert schema["required"] == ["question", "difficulty", "answer", "hints"]  # weight? is optional
    assert schema["additionalProperties"] is False
    assert to_json_schema({"xs": "list[int]", "inner": {"a": "bool"}})["properties"] == {
        "xs": {"type": "array", "items": {"type": "integer"}},
        "inner": {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
                  "additionalProperties": False}}
    # The order of the fields is the order the model writes them in: the text keeps it.
    assert list(json.loads(schema_text(schema))["properties"]) == list(schema["properties"])


@pytest.mark.parametrize("spec, words", [
    ({"x": "string[]"}, "has type 'string[]'"),
    ({"bad name": "str"}, "must be letters"),
    ({"x": []}, "plain values"),
    ("str", "expected a mapping"),
    ({"type": "object", "properties": {}}, "must describe an object"),
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "not a valid JSON Schema"),
])
def test_schemas_that_cannot_be_used_say_why(spec, words):
    with pytest.raises(SchemaSpecError, match=re.escape(words)):
        to_json_schema(spec)


def test_a_json_schema_is_taken_as_it_is():
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}, "required": ["n"]}
    assert to_json_schema(schema) is schema
    assert problems({"n": 0}, schema) and not problems({"n": 3}, schema)


@pytest.mark.parametrize("reply", [
    '{"question": "2+2?", "difficulty": "easy", "answer": 4, "hints": ["add"]}',
    'Here it is:\n```json\n{"question": "2+2?", "difficulty": "easy", "answer": 4, "hints": ["add"]}\n```',
    'Sure! {"question": "2+2?", "difficulty": "easy", "answer": 4, "hints": ["add"]} Hope it helps.',
])
def test_a_reply_is_read_wherever_its_object_is(reply):
    assert read_reply(reply, to_json_schema(RECORD)) == {"question": "2+2?", "difficulty": "easy", "answer": 4,
                                                         "hints": ["add"], "weight": None}


@pytest.mark.parametrize("reply, words", [
    ("no json here", "no JSON object"),
    ('{"question": "q", "difficulty": "easy", "answer": 4, "hints": [', "ends mid-object"),
    ('{"question": "q", "difficulty": "extreme", "answer": 4, "hints": []}', "'extreme' is not one of"),
    ('{"question": "q", "difficulty": "easy", "answer": "four", "hints": []}', "answer: 'four' is not of type"),
    ('[1, 2]', "not an object"),
])
def test_a_reply_that_does_not_match_is_a_schema_error_that_says_why(reply, words):
    with pytest.raises(ParseError, match=words) as err:
        read_reply(reply, to_json_schema(RECORD))
    assert err.value.reason == "schema_error"


def test_numbers_come_back_in_their_columns_type():
    schema = to_json_schema({"score": "float", "xs": "list[float]"})
    assert read_reply('{"score": 3, "xs": [1, 2.5]}', schema) == {"score": 3.0, "xs": [1.0, 2.5]}
    assert "one of \"easy\", \"medium\", \"hard\"" in describe(to_json_schema(RECORD))


# -- the generate step ------------------------------------------------------------------------------
def generate_recipe(write_recipe, tmp_path, step: str, rules: str, rows: int = 4) -> object:
    source = tmp_path / "topics.jsonl"
    source.write_text("".join(json.dumps({"topic": f"topic {i}", "level": "easy" if i % 2 else "hard"}) + "\n"
                              for i in range(rows)))
    return write_recipe(f"""\
name: typed
llm:
  backend: scripted
  rules:
{rules}
source: {{path: {source}}}
steps:
  - generate:
{step}
""")


def test_generate_writes_the_reply_into_a_text_column(write_recipe, tmp_path):
    path = generate_recipe(write_recipe, tmp_path, "      template: 'Write a {{ level }} question about {{ topic }}.'\n"
                           "      output: question\n      samples: 2\n      temperature: 0.7",
                           '    - {match: "about topic (?P<n>\\\\d)", reply: "What is {n} + {sample}?"}')
    version, manifest, _ = run_recipe(load_recipe(path), tmp_path / "out")
    table = read_version(version)
    assert table.height == 8 and sorted(table["sample"].unique()) == [0, 1]
    assert table.filter(pl.col("topic") == "topic 3")["question"].sort().to_list() == ["What is 3 + 0?",
                                                                                        "What is 3 + 1?"]
    assert manifest["output_format"] == "raw"


def test_generate_with_a_schema_gives_typed_columns_and_drops_what_does_not_match(write_recipe, tmp_path):
    good = '{{\\"question\\": \\"Q{n}\\", \\"difficulty\\": \\"hard\\", \\"answer\\": {n}, \\"hints\\": [\\"h\\"]}}'
    path = generate_recipe(write_recipe, tmp_path, """\
      template: "Write a {{ level }} question about {{ topic }}."
      schema:
        question: str
        difficulty: [easy, medium, hard]
        answer: int
        hints: list[str]
        score?: float""", f"""\
    - {{match: "about topic 3", reply: "not json at all"}}
    - {{match: "about topic 2", reply: '{{{{"question": "Q2", "difficulty": "extreme", "answer": 2, "hints": []}}}}'}}
    - {{match: "about topic (?P<n>\\\\d)", reply: "{good}"}}""")
    recipe = load_recipe(path)
    version, manifest, _ = run_recipe(recipe, tmp_path / "out")
    table = read_version(version)
    assert table.sort("answer")["question"].to_list() == ["Q0", "Q1"]
    assert table.schema["answer"] == pl.Int64 and table.schema["hints"] == pl.List(pl.String)
    assert table.schema["score"] == pl.Float64 and table["score"].null_count() == 2  # optional, not given
    rejected = read_version(version, "rejected").sort("topic")
    assert rejected["drop_reason"].to_list() == ["schema_error", "schema_error"]
    assert "'extreme' is not one of" in rejected["drop_detail"][0]
    assert rejected["raw_reply"][1] == "not json at all"
    # The prompt told the model the fields, and the scripted backend (no enforcement) re-asked twice.
    step = manifest["steps"][0]
    assert step["dropped"] == {"schema_error": 2}
    assert step["llm"]["reasks"] == 4 and step["llm"]["reasks_fixed"] == 0


def test_an_empty_result_keeps_the_typed_columns(write_recipe, tmp_path):
    path = generate_recipe(write_recipe, tmp_path, "      template: 'About {{ topic }}'\n"
                           "      schema: {n: int, tags: [str]}", '    - {match: ".", reply: "nope"}')
    version, _, _ = run_recipe(load_recipe(path), tmp_path / "out")
    table = read_version(version)
    assert table.height == 0 and table.schema["n"] == pl.Int64 and table.schema["tags"] == pl.List(pl.String)


@pytest.mark.parametrize("step, words", [
    ("      output: text", "steps[0].generate.template: the step needs the prompt"),
    ("      template: 'About {{ subject }}'", "needs column 'subject'"),
    ("      template: 'About {{ topic }}'\n      schema: {n: integr}", "steps[0].generate.schema: field 'n' has type"),
    ("      template: 'About {{ topic }}'\n      schema: nowhere.json", "is not a .json file that exists"),
])
def test_generate_recipe_errors_are_found_before_any_model_loads(write_recipe, tmp_path, step, words):
    path = generate_recipe(write_recipe, tmp_path, step, '    - {match: ".", reply: "x"}')
    with pytest.raises(RecipeError, match=re.escape(words)):
        load_recipe(path)


def test_a_schema_in_a_json_file_is_read_beside_the_recipe(write_recipe, tmp_path):
    (tmp_path / "record.json").write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer"}},
                                                      "required": ["n"]}))
    path = generate_recipe(write_recipe, tmp_path, "      template: 'About {{ topic }}'\n      schema: record.json",
                           '    - {match: "topic (?P<n>\\\\d)", reply: "{{{{\\"n\\": {n}}}}}"}')
    table = read_version(run_recipe(load_recipe(path), tmp_path / "out")[0])
    assert sorted(table["n"].to_list()) == [0, 1, 2, 3]


# -- the LLM path: re-asks where the backend does not enforce the schema ------------------------------
def _fixing(conversation, k):
    if "That reply is not valid" in conversation[-1]["content"]:
        return '{"n": 5}'
    return "n is five"


def test_a_reply_that_does_not_match_is_sent_back_with_what_is_wrong():
    schema = schema_text(to_json_schema({"n": "int"}))
    client = LLMClient(ScriptedBackend(ScriptedConfig(), reply_fn=_fixing))
    [c] = client.ask([Request([{"role": "user", "content": "Give n."}], GenerationParams(json_schema=schema))])
    assert c.texts == ['{"n": 5}']
    assert client.usage.reasks == 1 and client.usage.reasks_fixed == 1


def test_no_reask_when_the_backend_enforces_the_schema_or_there_is_none():
    schema = schema_text(to_json_schema({"n": "int"}))
    enforcing = LLMClient(ScriptedBackend(ScriptedConfig(enforces_schema=True), reply_fn=_fixing))
    enforcing.ask([Request([{"role": "user", "content": "Give n."}], GenerationParams(json_schema=schema))])
    plain = LLMClient(ScriptedBackend(ScriptedConfig(), reply_fn=_fixing))
    plain.ask([Request([{"role": "user", "content": "Give n."}], GenerationParams())])
    assert enforcing.usage.reasks == 0 and plain.usage.reasks == 0


# -- transformers: the grammar holds every reply to the schema ---------------------------------------
def test_the_grammar_holds_even_a_random_model_to_the_schema(tiny_model_dir):
    from factory.llm import TransformersBackend, TransformersConfig

    schema = to_json_schema({"level": ["easy", "medium", "hard"], "ok": "bool", "tags": ["easy", "hard"]})
    backend = TransformersBackend(TransformersConfig(model=str(tiny_model_dir)))
    assert backend.enforces_schema
    ask = [[{"role": "user", "content": f"Describe exercise {i}."}] for i in range(6)]
    held = backend.generate([Request(c, GenerationParams(n=2, temperature=1.0, max_tokens=40, seed=i,
                                                         json_schema=schema_text(schema)))
                             for i, c in enumerate(ask)])
    free = backend.generate([Request(c, GenerationParams(max_tokens=40)) for c in ask])
    texts = [t for c in held for t in c.texts]
    assert len(texts) == 12 and all(c.finish_reasons == ["stop", "stop"] for c in held)
    for text in texts:
        value = json.loads(text)
        assert not problems(value, schema), text
    assert not any(t.lstrip().startswith("{") for c in free for t in c.texts)  # a random model, left free


def test_the_vocabulary_spells_each_token_as_the_bytes_it_adds():
    from factory.llm.grammar import token_bytes
    from factory.models import load_tokenizer

    tokenizer = load_tokenizer("embedded")
    by_id = {i: raw for raw, ids in token_bytes(tokenizer).items() for i in ids}
    text = 'Naïve café: {"n": 12, "é": "日本"}\n'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert b"".join(by_id[i] for i in ids) == text.encode("utf-8")


# -- servers: response_format where the server holds replies to it -------------------------------------
def _json_or_chat(payload, i):
    if "response_format" in payload or "structured_outputs" in payload:
        return '{"n": 3}'
    return "n is 3" if "not valid" not in payload["messages"][-1]["content"] else '{"n": 4}'


def test_a_server_that_holds_replies_to_a_schema_gets_response_format():
    schema = to_json_schema({"n": "int"})
    with FakeOpenAI(reply_fn=_json_or_chat, schema_fields={"response_format"}) as server:
        backend = OpenAIBackend(OpenAIConfig(model="fake", base_url=server.base_url, backoff=0.01))
        client = LLMClient(backend)
        assert client.enforces_schema and backend.describe()["server"]["json_schema"] == "response_format"
        [c] = client.ask([Request([{"role": "user", "content": "n?"}], GenerationParams(json_schema=schema_text(schema)))])
        [sent] = server.requests
    assert c.texts == ['{"n": 3}'] and client.usage.reasks == 0
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema,
                                                                               "strict": True}}


def test_a_server_that_ignores_or_refuses_schemas_gets_checked_replies_and_reasks():
    schema = to_json_schema({"n": "int"})
    for accepts in (STANDARD, STANDARD | {"response_format"}):  # refuses the field / takes it and ignores it
        with FakeOpenAI(reply_fn=lambda p, i: "n is 3" if "not valid" not in p["messages"][-1]["content"]
                        else '{"n": 4}', accepts=accepts) as server:
            backend = OpenAIBackend(OpenAIConfig(model="fake", base_url=server.base_url, backoff=0.01))
            client = LLMClient(backend)
            assert not client.enforces_schema
            [c] = client.ask([Request([{"role": "user", "content": "n?"}],
                                      GenerationParams(json_schema=schema_text(schema)))])
            assert all("response_format" not in r for r in server.requests)
        assert c.texts == ['{"n": 4}'] and client.usage.reasks == 1


def test_the_manifest_says_whether_the_backend_enforced_schemas(write_recipe, tmp_path):
    path = generate_recipe(write_recipe, tmp_path, "      template: 'About {{ topic }}'\n      schema: {n: int}",
                           '    - {match: ".", reply: "{{\\"n\\": 1}}"}\n  enforces_schema: true')
    manifest = read_manifest(run_recipe(load_recipe(path), tmp_path / "out")[0])
    assert manifest["steps"][0]["llm"]["enforces_schema"] is True


@pytest.mark.timeout(600)
def test_on_the_embedded_model_every_kept_row_matches_the_schema(write_recipe, tmp_path):
    source = tmp_path / "topics.jsonl"
    source.write_text("".join(json.dumps({"topic": t}) + "\n" for t in ("fractions", "prime numbers", "area")))
    path = write_recipe(f"""\
name: embedded-typed
llm: {{backend: transformers, model: embedded}}
source: {{path: {source}}}
steps:
  - generate:
      template: "Write one short math exercise about {{{{ topic }}}}."
      schema: {{difficulty: [easy, medium, hard], answer: int, steps: {{type: array, items: {{type: string, maxLength: 40}}, maxItems: 2}}}}
      max_tokens: 96
      on_truncation: drop
""")
    version, manifest, _ = run_recipe(load_recipe(path), tmp_path / "out")
    table = read_version(version)
    schema = to_json_schema({"difficulty": ["easy", "medium", "hard"], "answer": "int",
                             "steps": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 2}})
    # A run that cut every reply would check nothing: the bounded steps leave room to finish.
    assert table.height >= 1, manifest["steps"][0]["dropped"]
    for row in table.select("difficulty", "answer", "steps").to_dicts():
        assert not problems(row, schema), row
    dropped = manifest["steps"][0]["dropped"]
    assert set(dropped) <= {"truncated"}, dropped  # the grammar leaves no other way to fail
    assert table.height + sum(dropped.values()) == 3 and manifest["steps"][0]["llm"]["reasks"] == 0


def test_a_field_may_be_a_json_schema_of_its_own():
    schema = to_json_schema({"q": "str", "hints": {"type": "array", "items": {"type": "string"}, "maxItems": 2}})
    assert schema["properties"]["hints"]["maxItems"] == 2
    with pytest.raises(ParseError, match="too long"):
        read_reply('{"q": "x", "hints": ["a", "b", "c"]}', schema)
    with pytest.raises(SchemaSpecError, match="not a valid JSON Schema"):
        to_json_schema({"hints": {"type": "array", "maxItems": -1}})
