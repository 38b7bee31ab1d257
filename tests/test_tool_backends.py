"""Requests with tools on every backend: natively on OpenAI-compatible servers that take `tools`,
with the tools in the prompt everywhere else, and one cache for both."""

from __future__ import annotations

import json

import pytest

from factory.cache import Cache
from factory.hashing import canonical
from factory.llm import GenerationParams, OpenAIBackend, OpenAIConfig
from factory.llm.base import Request
from factory.llm.batch_api import BatchRunner
from factory.llm.requests import LLMClient
from factory.llm.scripted import ScriptedBackend, ScriptedConfig
from factory.llm.server import RequestError, refuses_tools
from factory.llm.tool_format import reply_schema
from factory.tools import tools_text

from .fake_openai import NO_TOOLS, STANDARD, FakeOpenAI

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
TOOLS = [WEATHER]
# A chat after one round of calls, as the tool_calls step stores it (read back from a table: every
# key of every message, the missing ones None).
CHAT = [
    {"role": "system", "content": "You are helpful.", "tool_calls": None, "tool_call_id": None, "name": None},
    {"role": "user", "content": "Weather in Paris and Rome?", "tool_calls": None, "tool_call_id": None, "name": None},
    {"role": "assistant", "content": "", "tool_call_id": None, "name": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "content": '{"temp": 18}', "tool_calls": None, "tool_call_id": "call_1", "name": "get_weather"},
]
# What a server that takes tools must get: OpenAI's layout, each message with its own keys only.
NATIVE_CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "content": '{"temp": 18}', "tool_call_id": "call_1", "name": "get_weather"},
]
CALL_ROME = {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]}
SCHEMA = reply_schema(TOOLS)
PARAMS = GenerationParams(max_tokens=64, tools=tools_text(TOOLS), json_schema=canonical(SCHEMA))


def calls_rome(payload: dict, index: int):
    """The model: calls get_weather for Rome (tool_calls natively, the JSON as text otherwise)."""
    return CALL_ROME


def backend_for(server, **kw) -> OpenAIBackend:
    return OpenAIBackend(OpenAIConfig(model="fake", base_url=server.base_url, backoff=0.01, **kw))


def tool_probes(server) -> list[dict]:
    return [p for p in server.probes if "tools" in p]


def assert_tools_in_prompt(messages: list[dict]):
    """The flattened chat: the tools in the system prompt, the call as its JSON, the result as a user turn."""
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    system = messages[0]["content"]
    assert system.startswith("You are helpful.\n\n") and system.count('"name": "get_weather"') == 1
    assert '"required": ["city"]' in system  # the tool's parameters are in the prompt
    paris = {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    assert json.loads(messages[2]["content"]) == paris
    assert messages[3]["content"] == 'Tool result (get_weather, call_1): {"temp": 18}'
    assert all(set(m) == {"role", "content"} for m in messages)


def test_a_server_that_takes_tools_gets_them_natively_and_its_calls_come_back_as_the_reply_json():
    with FakeOpenAI(reply_fn=calls_rome, schema_fields={"response_format"}) as server:
        backend = backend_for(server)
        client = LLMClient(backend)
        [first] = client.ask([Request(CHAT, PARAMS)])
        [second] = client.ask([Request(CHAT[:2], PARAMS)])
        sent = server.requests
    assert backend.server.json_schema == "response_format"  # it holds schemas, yet none is sent with tools
    for body in sent:
        assert body["tools"] == TOOLS and body["tool_choice"] == "auto"
        assert not {"response_format", "structured_outputs", "guided_json"} & set(body)
    assert sent[0]["messages"] == NATIVE_CHAT and sent[1]["messages"] == NATIVE_CHAT[:2]
    assert first.error is None and json.loads(first.texts[0]) == CALL_ROME  # arguments as an object, not text
    assert json.loads(second.texts[0]) == CALL_ROME
    # Asked once, with one small tool and tool_choice auto.
    [probe] = tool_probes(server)
    assert probe["tool_choice"] == "auto" and len(probe["tools"]) == 1 and probe["max_tokens"] == 1
    assert backend.describe()["server"]["tools"] is True


def test_a_native_reply_in_text_is_an_answer_and_tool_choice_is_passed_on():
    with FakeOpenAI(reply_fn=lambda payload, i: "It is sunny.") as server:
        client = LLMClient(backend_for(server))
        params = GenerationParams(max_tokens=64, tools=tools_text(TOOLS), tool_choice="none")
        [completion] = client.ask([Request(CHAT, params)])
        [sent] = server.requests
    assert sent["tool_choice"] == "none"
    assert json.loads(completion.texts[0]) == {"answer": "It is sunny."}


def test_a_server_that_refuses_tools_gets_them_in_the_prompt_with_the_reply_schema():
    with FakeOpenAI(reply_fn=calls_rome, takes_tools=False, schema_fields={"response_format"}) as server:
        backend = backend_for(server)
        [completion] = LLMClient(backend).ask([Request(CHAT, PARAMS)])
        [sent] = server.requests
    assert "tools" not in sent and "tool_choice" not in sent
    assert_tools_in_prompt(sent["messages"])
    assert sent["response_format"]["json_schema"]["schema"] == SCHEMA
    assert json.loads(completion.texts[0]) == CALL_ROME
    assert len(tool_probes(server)) == 1 and backend.describe()["server"]["tools"] is False


def test_a_strict_server_refusing_the_fields_by_name_is_learned_from_the_probe():
    with FakeOpenAI(reply_fn=calls_rome, accepts=STANDARD) as server:
        backend = backend_for(server)
        assert backend.takes_tools() is False
        [completion] = LLMClient(backend).ask([Request(CHAT, PARAMS)])
        [sent] = server.requests
    assert set(sent) <= STANDARD
    assert_tools_in_prompt(sent["messages"])
    assert json.loads(completion.texts[0]) == CALL_ROME


def test_a_server_that_refuses_tools_after_the_probe_answers_every_request_in_the_prompt(capsys):
    # vLLM behind a proxy that answered the probe: every request that carries tools gets vLLM's 400.
    refuse = lambda payload, number: "no_tools" if "tools" in payload else None
    chats = [CHAT[:1] + [{"role": "user", "content": f"Weather in city {i}?"}] for i in range(4)] + [CHAT]
    with FakeOpenAI(reply_fn=calls_rome, fault_fn=refuse, schema_fields={"response_format"}) as server:
        backend = backend_for(server)
        client = LLMClient(backend)
        first = client.ask([Request(chat, PARAMS) for chat in chats[:4]])
        [later] = client.ask([Request(CHAT, PARAMS)])
        refused = [r for r in server.requests if "tools" in r]
        answered = list(server.served)
    assert [json.loads(c.texts[0]) for c in first + [later]] == [CALL_ROME] * 5  # no row lost
    assert 1 <= len(refused) <= 4 and len(answered) == 5
    for body in answered:
        assert "tools" not in body and body["response_format"]["json_schema"]["schema"] == SCHEMA
        assert body["messages"][0]["content"].count("You can call these tools") == 1  # written in once
    assert_tools_in_prompt(answered[-1]["messages"])
    assert backend.server.tools is False
    assert capsys.readouterr().err.count("refused `tools`") == 1


def test_a_server_that_accepts_tools_but_drops_them_from_the_prompt_gets_them_in_the_prompt(capsys):
    # transformers serve with SmolLM2's chat template: `tools` accepted, the prompt the same without them.
    with FakeOpenAI(reply_fn=calls_rome, shows_tools=False) as server:
        backend = backend_for(server)
        [completion] = LLMClient(backend).ask([Request(CHAT, PARAMS)])
        [sent] = server.requests
    assert backend.server.tools is False and "does not show them to the model" in capsys.readouterr().err
    assert "tools" not in sent
    assert_tools_in_prompt(sent["messages"])
    assert json.loads(completion.texts[0]) == CALL_ROME


def test_native_tools_off_never_sends_tools_and_on_never_asks():
    with FakeOpenAI(reply_fn=calls_rome) as server:
        off = backend_for(server, native_tools="off")
        [completion] = LLMClient(off).ask([Request(CHAT, PARAMS)])
        [sent] = server.requests
        assert "tools" not in sent and not tool_probes(server)
        assert_tools_in_prompt(sent["messages"])
        assert json.loads(completion.texts[0]) == CALL_ROME and off.describe()["server"]["tools"] is False
        on = backend_for(server, native_tools="on", check_server=False)
        LLMClient(on).ask([Request(CHAT[:2], PARAMS)])
        assert server.requests[-1]["tools"] == TOOLS and not tool_probes(server)


def test_requests_without_tools_never_ask_the_server_about_tools():
    with FakeOpenAI() as server:
        backend = backend_for(server)
        LLMClient(backend).ask([Request(CHAT[:2], GenerationParams(max_tokens=8))])
        [sent] = server.requests
    assert "tools" not in sent and not tool_probes(server)
    assert backend.describe()["server"]["tools"] is None


def test_a_probe_that_meets_only_server_errors_sends_tools_in_the_prompt_with_a_warning(capsys):
    with FakeOpenAI(reply_fn=calls_rome) as server:
        backend = backend_for(server)
        post = backend._post

        async def failing(payload, endpoint="chat/completions"):
            if "tools" in payload:
                raise RequestError("http_503", "HTTP 503", status=503)
            return await post(payload, endpoint)

        backend._post = failing
        [completion] = LLMClient(backend).ask([Request(CHAT, PARAMS)])
        [sent] = server.requests
    assert backend.server.tools is False and "did not answer whether it takes `tools`" in capsys.readouterr().err
    assert_tools_in_prompt(sent["messages"]) and json.loads(completion.texts[0]) == CALL_ROME


@pytest.mark.parametrize("first, then", [("on", "off"), ("off", "on")])
def test_a_cached_reply_is_reused_whichever_way_it_was_asked(tmp_path, first, then):
    cache = Cache(tmp_path)
    with FakeOpenAI(reply_fn=calls_rome) as server:
        [asked] = LLMClient(backend_for(server, native_tools=first), cache, seed=3).ask([Request(CHAT, PARAMS)])
        client = LLMClient(backend_for(server, native_tools=then), cache, seed=3)
        [again] = client.ask([Request(CHAT, PARAMS)])
        assert len(server.requests) == 1
    assert ("tools" in server.requests[0]) == (first == "on")
    assert again.texts == asked.texts and json.loads(again.texts[0]) == CALL_ROME
    assert client.usage.cached_conversations == 1


def test_batch_bodies_carry_the_tools_as_online_requests_do():
    with FakeOpenAI() as server:
        backend = backend_for(server, native_tools="on", check_server=False)
        params = PARAMS.with_seed(11)
        [ask] = BatchRunner(backend).asks([Request(CHAT, params)])
        online = backend._payload(CHAT, params, 1, 11)
    assert ask.body == online and ask.body["tools"] == TOOLS and ask.body["messages"] == NATIVE_CHAT
    assert "response_format" not in ask.body


def test_the_scripted_backend_sees_the_tools_in_the_prompt_and_results_as_user_turns():
    seen = []

    def reply(conversation, sample):
        seen.append(conversation)
        return json.dumps(CALL_ROME)

    backend = ScriptedBackend(ScriptedConfig(), reply_fn=reply)
    assert backend.takes_tools() is False
    [completion] = LLMClient(backend).ask([Request(CHAT, PARAMS)])
    [conversation] = seen
    assert_tools_in_prompt(conversation)
    assert json.loads(completion.texts[0]) == CALL_ROME


@pytest.mark.parametrize("status, message, refused", [
    (400, NO_TOOLS["message"], True),
    (400, "tools param requires --jinja flag", True),
    (422, "Unexpected fields in the request: tool_choice, tools", True),
    (400, "This model's maximum context length is 2048 tokens (tools included)", False),
    (400, "temperature must be at most 2", False),
    (500, "tool server crashed", False),
])
def test_refuses_tools_reads_the_servers_answers(status, message, refused):
    assert refuses_tools(status, message) is refused
