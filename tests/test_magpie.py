"""Magpie: the model writes the user's turn from its own chat template, then answers, for several turns."""

from __future__ import annotations

import json

import polars as pl
import pytest

from factory.build import run_recipe
from factory.errors import FactoryError, RecipeError
from factory.llm.base import GenerationParams, Request, user_turn, writes_user
from factory.llm.chat_template import end_of_user_turn, render_user_turn
from factory.recipe import recipe_from_text
from factory.steps.magpie import template_echo

from .fake_openai import FakeOpenAI

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    from factory.models import EMBEDDED, load_tokenizer

    return load_tokenizer(EMBEDDED)


def test_the_prompt_is_the_template_up_to_the_start_of_a_user_turn(tokenizer):
    # SmolLM2's template puts its own system prompt first when the conversation has none.
    assert render_user_turn(tokenizer, [user_turn()]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n")
    conversation = [{"role": "system", "content": "You are a chef."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, user_turn("Can")]
    assert render_user_turn(tokenizer, conversation) == (
        "<|im_start|>system\nYou are a chef.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nCan")
    assert end_of_user_turn(tokenizer) == "<|im_end|>"


def test_other_templates_and_one_that_hides_the_message(tokenizer):
    saved = tokenizer.chat_template
    try:
        tokenizer.chat_template = LLAMA3
        assert render_user_turn(tokenizer, [{"role": "system", "content": "Be brief."}, user_turn()]) == (
            f"{tokenizer.bos_token}<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n")
        assert end_of_user_turn(tokenizer) == "<|eot_id|>"
        tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: ...\n{% endfor %}"
        with pytest.raises(FactoryError, match="does not show the user's message"):
            render_user_turn(tokenizer, [user_turn()])
    finally:
        tokenizer.chat_template = saved


@pytest.mark.parametrize("text, why", [
    ("<|im_start|>user\nWhat is rain?", "markup '<|im_start|>'"),
    ("What is rain?<|eot_id|>", "markup '<|eot_id|>'"),
    ("[INST] Tell me a joke [/INST]", "markup '[INST]'"),
    ("User: how do magnets work?", "role label"),
    ("assistant\nSure, here is", "role label"),
    ("You are a helpful AI assistant named SmolLM.", "describes the assistant"),
    ("I am an AI language model trained to help.", "describes the assistant"),
    ("Friendly, loves cooking and helps home cooks plan their week. Why?", "repeats the system prompt"),
])
def test_template_echoes_are_told_apart(text, why):
    system = "You are a friendly assistant who loves cooking and helps home cooks plan their week."
    assert why in template_echo(text, system)


@pytest.mark.parametrize("text", [
    "How do I keep basil fresh for a week?",
    "You are given a list of numbers. Sort them in descending order.",  # a task that addresses the reader
    "I'm planning a trip to Kyoto in April. What should I pack?",
    "Which user interface toolkit should I learn first?",
])
def test_real_questions_are_not_echoes(text):
    assert template_echo(text, "You are a friendly assistant who loves cooking and helps home cooks.") is None


def recipe(tmp_path, steps: str, rules: list[dict], name: str = "mp", source: str = ""):
    llm = json.dumps({"backend": "scripted", "rules": rules})
    text = f"name: {name}\nseed: 5\nllm: {llm}\n{source}steps:\n{steps}output: {{format: raw}}\n"
    return recipe_from_text(text, base_dir=tmp_path)


def run(tmp_path, steps, rules, **kwargs):
    version, manifest, result = run_recipe(recipe(tmp_path, steps, rules, **kwargs), tmp_path / "out",
                                           progress=False)
    return result.table, result.rejected, manifest


USER_RULES = [
    # The reply depends on the sample's seed, as a sampled model's does.
    {"match": r"chef\.\n<\|user\|>$", "reply": "How long should I rest dough number {seed}?"},  # the first turn
    {"match": r"(?s)poet.*<\|user\|>$", "reply": "<|im_start|>user"},
    {"match": r"(?s)judge.*<\|user\|>$", "reply": "Why?"},
    {"match": r"(?s)mime.*<\|user\|>$", "reply": "   "},
    {"match": r"(?s)talker.*<\|user\|>$", "reply": "one two three four five six seven eight nine ten eleven"},
    {"match": r"(?s)<\|user\|>$", "reply": "And what about the oven, number {seed}?"},
    {"match": "rest dough|oven", "reply": "About an hour."},
]


def test_each_failure_has_its_reason_and_kept_rows_hold_every_turn(tmp_path):
    steps = """  - magpie: {num_rows: 40, turns: 2, max_tokens: 10, systems: [You are a chef., You are a poet.,
      You are a judge., You are a mime., You are a talker.]}
"""
    kept, rejected, manifest = run(tmp_path, steps, USER_RULES)
    drops = manifest["steps"][0]["dropped"]
    systems = pl.concat([kept.select("system"), rejected.select("system")])["system"].value_counts()
    counts = dict(systems.iter_rows())
    assert sum(counts.values()) == 40
    assert drops == {"template_echo": counts["You are a poet."], "too_short": counts["You are a judge."],
                     "empty_instruction": counts["You are a mime."], "truncated": counts["You are a talker."]}
    assert kept.height == counts["You are a chef."] > 0
    for row in kept.to_dicts():
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant", "user", "assistant"]  # no system: keep_system is off
        assert row["messages"][0]["content"] == row["instruction"].strip()
        assert row["messages"][1]["content"] == row["response"] == "About an hour."
        assert row["messages"][2]["content"].startswith("And what about the oven")
        assert row["turns"] == 2
    # Identical prompts are different samples: each gets its own seed.
    assert kept["instruction"].n_unique() == kept.height
    details = rejected.filter(pl.col("drop_reason") == "truncated")["drop_detail"].to_list()
    assert set(details) == {"turn 1, user: cut at max_tokens=10"}
    echo = rejected.filter(pl.col("drop_reason") == "template_echo").row(0, named=True)
    assert echo["raw_reply"] == "<|im_start|>user" and "markup" in echo["drop_detail"]


def test_input_rows_shape_their_conversations(tmp_path):
    personas = tmp_path / "personas.jsonl"
    personas.write_text("".join(json.dumps({"persona": p}) + "\n" for p in ["a beekeeper", "a violinist"]))
    steps = """  - magpie: {per_row: 3, response: false, system: "You help {{ persona }} with their work."}
"""
    rules = [{"match": r"(?s)beekeeper.*<\|user\|>$", "reply": "How do I calm my bees, case {seed}?"},
             {"match": r"(?s)violinist.*<\|user\|>$", "reply": "How do I tune my violin, case {seed}?"}]
    kept, _, _ = run(tmp_path, steps, rules, source=f"source: {{path: {personas}}}\n")
    assert kept.columns == ["persona", "instruction", "system"]
    assert kept.height == 6
    for row in kept.to_dicts():
        assert row["system"] == f"You help {row['persona']} with their work."
        assert ("bees" in row["instruction"]) == (row["persona"] == "a beekeeper")
    assert kept["instruction"].n_unique() == 6


def test_the_same_seed_draws_the_same_conversations(tmp_path):
    steps = "  - magpie: {num_rows: 12, systems: [You are a chef., S2, S3]}\n"
    first, _, _ = run(tmp_path / "a", steps, USER_RULES)
    again, _, _ = run(tmp_path / "b", steps, USER_RULES)
    assert first.to_dicts() == again.to_dicts()
    assert first["system"].n_unique() == 3


@pytest.mark.parametrize("options, where, says", [
    ("{turns: 2, response: false}", "steps[0].magpie.turns", "needs the answers"),
    ("{temperature: 0}", "steps[0].magpie.temperature", "would be the same"),
    ("{template: 'Ask {{ x }}'}", "steps[0].magpie.template", "has no prompt"),
    ("{system: 'You help {{ persona }}.'}", "steps[0].magpie", "persona"),
])
def test_recipe_errors_before_any_model_loads(tmp_path, options, where, says):
    with pytest.raises(RecipeError) as info:
        recipe(tmp_path, f"  - magpie: {options}\n", [])
    assert where in str(info.value) and says in str(info.value)


def test_a_server_without_the_tokenizer_at_hand_is_a_recipe_error(tmp_path):
    text = ("name: mp\nllm: {backend: openai, base_url: 'http://127.0.0.1:9/v1', model: served}\n"
            "steps:\n  - magpie: {num_rows: 2}\n")
    with pytest.raises(RecipeError) as info:
        recipe_from_text(text, base_dir=tmp_path)
    assert "steps[0].magpie.llm.tokenizer" in str(info.value) and "export-embedded" in str(info.value)


def test_a_server_writes_the_users_turn_through_completions(tmp_path, tiny_model_dir):
    """The template is applied here and the prompt goes to /v1/completions, stopped at the end of turn."""
    with FakeOpenAI(reply_fn=lambda payload, i: "What is a {}?".format(len(payload.get("prompt", "")))) as server:
        folder = tiny_model_dir  # a model folder with SmolLM2's tokenizer
        text = (f"name: mp\nseed: 1\nllm: {{backend: openai, base_url: '{server.base_url}', model: fake, "
                f"tokenizer: '{folder}'}}\nsteps:\n  - magpie: {{num_rows: 3, response: false, system: Be kind.}}\n"
                "output: {format: raw}\n")
        _, manifest, result = run_recipe(recipe_from_text(text, base_dir=tmp_path), tmp_path / "out", progress=False)
    asked = [r for r in server.requests if "prompt" in r]
    assert len(asked) == 3 and not any("messages" in r for r in asked)
    assert {r["prompt"] for r in asked} == {"<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n"}
    assert all(r["stop"] == ["<|im_end|>"] for r in asked)
    assert len({r["seed"] for r in asked}) == 3
    assert result.table["instruction"].to_list() == ["What is a 55?"] * 3


def test_a_server_without_completions_fails_before_any_request(tmp_path, tiny_model_dir):
    """A server that answers chat but not /v1/completions: one line, no request sent."""
    with FakeOpenAI(accepts={"model", "messages", "max_tokens", "temperature", "top_p", "seed", "n", "stop"}) as server:
        folder = tiny_model_dir  # a model folder with SmolLM2's tokenizer
        text = (f"name: mp\nllm: {{backend: openai, base_url: '{server.base_url}', model: fake, "
                f"tokenizer: '{folder}'}}\nsteps:\n  - magpie: {{num_rows: 3}}\n")
        with pytest.raises(FactoryError, match=r"steps\[0\]\.magpie: the server at .* does not answer /v1/completions"):
            run_recipe(recipe_from_text(text, base_dir=tmp_path), tmp_path / "out", progress=False)
    assert server.requests == []


def test_the_open_turn_is_part_of_the_cache_key():
    plain = [{"role": "user", "content": ""}]
    assert writes_user([user_turn()]) and not writes_user(plain)
    assert not writes_user([{"role": "assistant", "content": "x", "open": True}])
    assert Request([user_turn()], GenerationParams()) != Request(plain, GenerationParams())


@pytest.mark.slow
def test_the_embedded_model_writes_questions_and_answers(tmp_path):
    text = ("name: mp\nseed: 2\nllm: {backend: transformers, model: embedded}\n"
            "steps:\n  - magpie: {num_rows: 6, max_tokens: 96, response_max_tokens: 96, on_truncation: keep}\n"
            "output: {format: messages}\n")
    _, manifest, result = run_recipe(recipe_from_text(text, base_dir=tmp_path), tmp_path / "out", progress=False)
    rows = result.table.to_dicts()
    for row in rows:
        print(row["instruction"], "->", row["response"][:80])
        assert "<|im_start|>" not in row["instruction"] and "\nassistant\n" not in row["instruction"]
    assert len({row["instruction"] for row in rows}) == len(rows)
    assert len(rows) + sum(manifest["steps"][0]["dropped"].values()) == 6
    assert len(rows) >= 3
