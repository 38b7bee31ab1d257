"""Exports of tool-use rows (the `tool_calls` step's layout): each format's records written out by
hand, and one TRL SFTTrainer step on the trl-sft export with a chat template that renders tools."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from factory.errors import FactoryError
from factory.exports import export
from factory.store import write_version

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "returns": {"type": "object", "properties": {"temp_c": {"type": "number"}}}}}
TO_F = {"type": "function", "function": {
    "name": "to_fahrenheit", "description": "Celsius to Fahrenheit.",
    "parameters": {"type": "object", "properties": {"celsius": {"type": "number"}}, "required": ["celsius"]}}}
# What every export writes for the definitions: OpenAI's standard keys, `returns` left out.
WEATHER_OUT = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS_OUT = [WEATHER_OUT, TO_F]
TOOLS_TEXT = ('[{"type":"function","function":{"name":"get_weather","description":"Current weather in a city.",'
              '"parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}},'
              '{"type":"function","function":{"name":"to_fahrenheit","description":"Celsius to Fahrenheit.",'
              '"parameters":{"type":"object","properties":{"celsius":{"type":"number"}},"required":["celsius"]}}}]')


def calls(*items):
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in items]}


def result(call_id, name, content):
    return {"role": "tool", "content": content, "tool_call_id": call_id, "name": name}


ROWS = [
    # 0: one call, one round, with a system prompt
    [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "Weather in Paris?"},
     calls(("call_a", "get_weather", '{"city": "Paris"}')), result("call_a", "get_weather", '{"temp_c": 21}'),
     {"role": "assistant", "content": "It is 21 C in Paris."}],
    # 1: two calls in parallel
    [{"role": "user", "content": "Weather in Oslo and Rome?"},
     calls(("call_b", "get_weather", '{"city": "Oslo"}'), ("call_c", "get_weather", '{"city": "Rome"}')),
     result("call_b", "get_weather", '{"temp_c": 5}'), result("call_c", "get_weather", '{"temp_c": 18}'),
     {"role": "assistant", "content": "Oslo 5 C, Rome 18 C."}],
    # 2: no call
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
    # 3: two rounds, each tool once
    [{"role": "user", "content": "Weather in Lima in Fahrenheit?"},
     calls(("call_d", "get_weather", '{"city": "Lima"}')), result("call_d", "get_weather", '{"temp_c": 20}'),
     calls(("call_e", "to_fahrenheit", '{"celsius": 20}')), result("call_e", "to_fahrenheit", '{"temp_f": 68}'),
     {"role": "assistant", "content": "68 F in Lima."}],
]


def tool_version(folder: Path) -> Path:
    tools = json.dumps([WEATHER, TO_F])
    table = pl.DataFrame({"messages": ROWS, "tools": [tools] * len(ROWS),
                          "simulated": [[], ["get_weather"], [], []], "calls": [1, 2, 0, 2]})
    return write_version(folder, "weather", table, pl.DataFrame({"drop_reason": ["format"]}), {})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_messages_read_back_keep_tool_calls_without_the_null_keys_of_the_table(tmp_path):
    export(tool_version(tmp_path), "trl-sft", tmp_path / "sft")
    rows = read_jsonl(tmp_path / "sft" / "train.jsonl")
    assert [row["messages"] for row in rows] == ROWS
    assert [row["tools"] for row in rows] == [TOOLS_TEXT] * 4
    assert json.loads(TOOLS_TEXT) == TOOLS_OUT


def test_trl_sft_prompt_completion_keeps_the_rounds_in_the_prompt(tmp_path):
    export(tool_version(tmp_path), "trl-sft", tmp_path / "pc", style="prompt-completion")
    row = read_jsonl(tmp_path / "pc" / "train.jsonl")[3]
    assert row == {"prompt": ROWS[3][:-1], "completion": [{"role": "assistant", "content": "68 F in Lima."}],
                   "tools": TOOLS_TEXT}


def test_openai_export_is_openais_training_layout(tmp_path):
    export(tool_version(tmp_path), "openai", tmp_path / "oa")
    rows = read_jsonl(tmp_path / "oa" / "train.jsonl")
    assert rows[1] == {"messages": [
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {"role": "assistant", "tool_calls": [
            {"id": "call_b", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_c", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "content": '{"temp_c": 5}', "tool_call_id": "call_b"},
        {"role": "tool", "content": '{"temp_c": 18}', "tool_call_id": "call_c"},
        {"role": "assistant", "content": "Oslo 5 C, Rome 18 C."}], "tools": TOOLS_OUT}
    assert rows[2] == {"messages": ROWS[2], "tools": TOOLS_OUT}


SHAREGPT = [
    {"conversations": [
        {"from": "system", "value": "Use the tools."}, {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp_c": 21}'}, {"from": "gpt", "value": "It is 21 C in Paris."}],
     "tools": TOOLS_TEXT},
    {"conversations": [
        {"from": "human", "value": "Weather in Oslo and Rome?"},
        {"from": "function_call", "value": '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
                                           '{"name": "get_weather", "arguments": {"city": "Rome"}}]'},
        {"from": "observation", "value": '[{"temp_c": 5}, {"temp_c": 18}]'},
        {"from": "gpt", "value": "Oslo 5 C, Rome 18 C."}], "tools": TOOLS_TEXT},
    {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}], "tools": TOOLS_TEXT},
    {"conversations": [
        {"from": "human", "value": "Weather in Lima in Fahrenheit?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Lima"}}'},
        {"from": "observation", "value": '{"temp_c": 20}'},
        {"from": "function_call", "value": '{"name": "to_fahrenheit", "arguments": {"celsius": 20}}'},
        {"from": "observation", "value": '{"temp_f": 68}'}, {"from": "gpt", "value": "68 F in Lima."}],
     "tools": TOOLS_TEXT},
]


def test_sharegpt_and_llama_factory_use_function_call_and_observation(tmp_path):
    version = tool_version(tmp_path)
    export(version, "sharegpt", tmp_path / "sg")
    assert json.loads((tmp_path / "sg" / "train.json").read_text()) == SHAREGPT
    export(version, "llama-factory", tmp_path / "lf")
    assert json.loads((tmp_path / "lf" / "weather_v1.json").read_text()) == SHAREGPT
    assert json.loads((tmp_path / "lf" / "dataset_info.json").read_text()) == {"weather_v1": {
        "file_name": "weather_v1.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "tools": "tools"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "system_tag": "system", "observation_tag": "observation", "function_tag": "function_call"}}}


def test_axolotl_rows_carry_tools_and_the_snippet_names_the_field(tmp_path):
    export(tool_version(tmp_path), "axolotl", tmp_path / "ax")
    rows = read_jsonl(tmp_path / "ax" / "train.jsonl")
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}'}}
    to_f = {"type": "function", "function": {
        "name": "to_fahrenheit", "description": "Celsius to Fahrenheit.",
        "parameters": '{"type": "object", "properties": {"celsius": {"type": "number"}}, "required": ["celsius"]}'}}
    assert rows[3] == {"messages": ROWS[3], "tools": [weather, to_f]}
    text = (tmp_path / "ax" / "axolotl.yaml").read_text()
    [dataset] = yaml.safe_load(text)["datasets"]
    assert dataset["field_tools"] == "tools" and dataset["field_messages"] == "messages"
    assert "use a chat_template that renders tools" in text


def test_alpaca_refuses_tool_calls_and_names_the_formats_that_keep_them(tmp_path):
    with pytest.raises(FactoryError) as err:
        export(tool_version(tmp_path), "alpaca", tmp_path / "al")
    assert str(err.value) == ("row 0 calls tools, and alpaca (one instruction, one output) cannot hold tool calls or "
                              "their results; export the version as one of trl-sft, openai, sharegpt, "
                              "llama-factory, axolotl. Nothing was written")
    assert not (tmp_path / "al" / "train.json").exists()


def test_unreadable_tools_name_the_row(tmp_path):
    table = pl.DataFrame({"messages": ROWS[2:], "tools": [json.dumps([TO_F]), "not json"]})
    version = write_version(tmp_path, "bad", table, pl.DataFrame({"drop_reason": ["x"]}), {})
    with pytest.raises(FactoryError, match=r"^row 1: its `tools` value cannot be exported: the tools are not JSON"):
        export(version, "openai", tmp_path / "e")


# Qwen-like; every newline is an expression, since transformers renders with trim_blocks.
TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content + '\\n' }}{% endif %}"
    "{{- 'Tools:' }}{% for tool in tools %}{{ '\\n' + tool | tojson }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{{ '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if message.content %}{{ message.content }}{% endif %}"
    "{%- if message.tool_calls %}{% for call in message.tool_calls %}"
    "{{ '<tool_call>{\"name\": \"' + call.function.name + '\", \"arguments\": ' }}"
    "{%- if call.function.arguments is string %}{{ call.function.arguments }}"
    "{%- else %}{{ call.function.arguments | tojson }}{% endif %}{{ '}</tool_call>' }}"
    "{%- endfor %}{% endif %}{{ '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>' + message.content + '</tool_response><|im_end|>\\n' }}"
    "{%- endif %}{% endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_trl_sft_trainer_trains_one_step_on_the_tool_export(tiny_model_dir, tmp_path):
    import math

    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    export(tool_version(tmp_path), "trl-sft", tmp_path / "sft")
    data = datasets.load_dataset("json", data_files=str(tmp_path / "sft" / "train.jsonl"), split="train",
                                 cache_dir=str(tmp_path / "hf"))
    # Arrow kept each call's arguments as text (no struct unified over both tools' arguments).
    assert data[3]["messages"][3]["tool_calls"][0]["function"]["arguments"] == '{"celsius": 20}'
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TEMPLATE
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), processing_class=tokenizer,
                         train_dataset=data,
                         args=SFTConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2,
                                        report_to="none", use_cpu=True, save_strategy="no"))
    output = trainer.train()
    assert output.global_step == 1 and math.isfinite(output.training_loss)
    text = tokenizer.decode(trainer.train_dataset[3]["input_ids"])
    assert text == (
        "<|im_start|>system\nTools:\n" + "\n".join(json.dumps(t) for t in TOOLS_OUT) + "<|im_end|>\n"
        "<|im_start|>user\nWeather in Lima in Fahrenheit?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": {"city": "Lima"}}</tool_call>'
        "<|im_end|>\n"
        '<|im_start|>user\n<tool_response>{"temp_c": 20}</tool_response><|im_end|>\n'
        '<|im_start|>assistant\n<tool_call>{"name": "to_fahrenheit", "arguments": {"celsius": 20}}</tool_call>'
        "<|im_end|>\n"
        '<|im_start|>user\n<tool_response>{"temp_f": 68}</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n68 F in Lima.<|im_end|>\n")
