"""The `conversation` step: multi-turn chats with a simulated user (a step's second model), and
multi-turn data downstream (judge, exports)."""

from __future__ import annotations

import json

import polars as pl
import pytest

from factory.build import run_recipe
from factory.cache import Cache
from factory.driver import Driver
from factory.errors import ParseError, RecipeError
from factory.exports import export
from factory.llm import ScriptedBackend, ScriptedConfig
from factory.llm.requests import LLMClient
from factory.recipe import load_recipe
from factory.steps.context import StepContext
from factory.steps.conversation import clean_user_reply
from factory.store import read_version

ROWS = [
    {"instruction": "Tell me about tides."},                    # three full turns
    {"instruction": "Please stop early about clouds."},         # the user is done after turn 1
    {"persona": "a retired sailor", "goal": "bake bread"},      # the user writes the first message
    {"instruction": "Empty user about rivers."},                # the user's second message is empty
    {"instruction": "As assistant about stars."},               # the user's third message is the assistant's
    {"instruction": "Cut me about waves."},                     # the assistant's second reply is cut
    {"goal": "nothing to start from"},                          # no first message, no persona
]


def assistant_reply(conversation, sample):
    users = [m["content"] for m in conversation if m["role"] == "user"]
    if "Cut me" in users[0] and len(users) == 2:
        return "A reply cut at the limit", "length"
    return f"Reply {len(users)} to: {users[-1]}"


def user_reply(conversation, sample):
    prompt = conversation[0]["content"]
    done = prompt.count("\n\nAssistant: ")  # assistant turns in the transcript shown
    if done == 0:
        return 'User: "I want to bake bread."'
    if "stop early" in prompt and done == 1:
        return "[DONE]"
    if "Empty user" in prompt and done == 1:
        return 'User: ""'
    if "As assistant" in prompt and done == 2:
        return "Assistant: Happy to help with anything else!"
    return f"Follow-up {done}, please say more."


class Recording:
    """Backends that answer by the functions above (by model) and record what they were asked."""

    def __init__(self):
        self.asked: dict[str, list] = {"assistant": [], "user-sim": []}
        self.backends: dict[str, ScriptedBackend] = {}

    def __call__(self, config):
        fn = user_reply if config.model == "user-sim" else assistant_reply

        def recorded(conversation, sample):
            got = fn(conversation, sample)
            self.asked[config.model].append((conversation, got if isinstance(got, str) else got[0]))
            return got

        backend = self.backends[config.model] = ScriptedBackend(config, reply_fn=recorded)
        return backend


RECIPE = """\
name: chats
seed: 1
llm: {{backend: scripted, model: assistant}}
source: {{path: {source}}}
{extra}steps:
  - conversation: {{turns: 3, system: "Be brief.", user_llm: {{model: user-sim}}{options}}}
output: {{format: messages}}
"""


def chat_recipe(write_recipe, tmp_path, extra: str = "", options: str = ""):
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    return write_recipe(RECIPE.format(source=source, extra=extra, options=options))


def run_chats(path, tmp_path, factory=None):
    factory = factory or Recording()
    driver = Driver(Cache(tmp_path / "cache"), progress=False, backend_factory=factory)
    version, manifest, _ = run_recipe(load_recipe(path), tmp_path / "out", driver=driver)
    return version, manifest, factory


def turns(*pairs):
    """A chat: the system message, then user and assistant messages in turn."""
    out = [{"role": "system", "content": "Be brief."}]
    for user, assistant in pairs:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return out


def test_chats_alternate_stop_early_and_drop_with_the_turn(write_recipe, tmp_path):
    version, manifest, factory = run_chats(chat_recipe(write_recipe, tmp_path), tmp_path)
    kept = read_version(version)
    assert kept["messages"].to_list() == [
        turns(("Tell me about tides.", "Reply 1 to: Tell me about tides."),
              ("Follow-up 1, please say more.", "Reply 2 to: Follow-up 1, please say more."),
              ("Follow-up 2, please say more.", "Reply 3 to: Follow-up 2, please say more.")),
        turns(("Please stop early about clouds.", "Reply 1 to: Please stop early about clouds.")),
        turns(("I want to bake bread.", "Reply 1 to: I want to bake bread."),
              ("Follow-up 1, please say more.", "Reply 2 to: Follow-up 1, please say more."),
              ("Follow-up 2, please say more.", "Reply 3 to: Follow-up 2, please say more.")),
    ]
    assert kept["turns"].to_list() == [3, 1, 3]
    rejected = read_version(version, "rejected")
    assert rejected.select("drop_reason", "drop_detail", "raw_reply").rows() == [
        ("user_reply_empty", "turn 2: the simulated user's reply is empty", 'User: ""'),
        ("user_reply_as_assistant", "turn 3: the simulated user's reply speaks as the assistant",
         "Assistant: Happy to help with anything else!"),
        ("truncated", "turn 2: the reply stopped at the token limit (max_tokens: 512 on steps[0].conversation), "
                      "mid-text; raise max_tokens, or set on_truncation: continue (or keep)",
         "A reply cut at the limit"),
        ("invalid_input", "no 'instruction' to start the chat from, and no persona ('persona') and goal ('goal' or "
                          "the `goal` option) for the simulated user to start it", None),
    ]
    # A row dropped mid-chat keeps its messages so far in rejected/.
    assert rejected["turns"].to_list()[:3] == [1, 2, 1]
    assert manifest["steps"][0]["dropped"] == {"invalid_input": 1, "truncated": 1, "user_reply_as_assistant": 1,
                                               "user_reply_empty": 1}
    # Each turn is one round over every chat still going: 3 assistant rounds (6, 4, 2 chats) and 3 user
    # rounds (the first message of 1 chat, then 6 and 3 follow-ups).
    assert factory.backends["assistant"].calls == 3 and factory.backends["user-sim"].calls == 3
    assert (len(factory.asked["assistant"]), len(factory.asked["user-sim"])) == (12, 10)


def test_the_simulated_user_sees_its_persona_goal_and_the_chat_not_the_system_prompt(write_recipe, tmp_path):
    _, _, factory = run_chats(chat_recipe(write_recipe, tmp_path), tmp_path)
    prompts = [conversation for conversation, _ in factory.asked["user-sim"]]
    assert all(len(p) == 1 and p[0]["role"] == "user" for p in prompts)
    opening = prompts[0][0]["content"]
    assert "Who you are: a retired sailor" in opening and "What you want from this chat: bake bread" in opening
    assert "Write the first message" in opening and "The chat so far" not in opening
    follow = next(p[0]["content"] for p in prompts if "Tell me about tides." in p[0]["content"])
    assert ("The chat so far:\n\nUser (you): Tell me about tides.\n\nAssistant: Reply 1 to: Tell me about tides.\n\n"
            "Write your next message") in follow
    assert "[DONE]" in follow and "Be brief." not in follow
    # The assistant sees the system prompt first, then the chat.
    first = factory.asked["assistant"][0][0]
    assert first == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about tides."}]


def test_usage_and_cost_of_both_models(write_recipe, tmp_path):
    prices = "prices: {assistant: {input: 1, output: 2}, user-sim: {input: 3, output: 5}}\n"
    _, manifest, factory = run_chats(chat_recipe(write_recipe, tmp_path, extra=prices), tmp_path)

    def tokens(model):  # a scripted token is a word: of the joined messages asked, of the replies given
        asked = factory.asked[model]
        return (sum(len("\n".join(m["content"] for m in conv).split()) for conv, _ in asked),
                sum(len(reply.split()) for _, reply in asked))

    (ap, ac), (up, uc) = tokens("assistant"), tokens("user-sim")
    assert ap > 0 and up > 0
    step = manifest["steps"][0]["llm"]
    assert (step["prompt_tokens"], step["completion_tokens"], step["conversations"]) == (ap + up, ac + uc, 22)
    user = step["llms"]["user"]
    assert (user["model"], user["prompt_tokens"], user["completion_tokens"], user["conversations"]) == \
        ("user-sim", up, uc, 10)
    assistant_cost, user_cost = round((ap * 1 + ac * 2) / 1e6, 6), round((up * 3 + uc * 5) / 1e6, 6)
    assert user["cost_usd"] == user_cost and step["cost_usd"] == round(assistant_cost + user_cost, 6)
    usage = manifest["usage"]
    assert sorted(usage) == ["scripted:assistant", "scripted:user-sim"]
    assert (usage["scripted:assistant"]["prompt_tokens"], usage["scripted:assistant"]["completion_tokens"],
            usage["scripted:assistant"]["conversations"], usage["scripted:assistant"]["cost_usd"]) == \
        (ap, ac, 12, assistant_cost)
    assert (usage["scripted:user-sim"]["prompt_tokens"], usage["scripted:user-sim"]["completion_tokens"],
            usage["scripted:user-sim"]["steps"], usage["scripted:user-sim"]["cost_usd"]) == \
        (up, uc, ["steps[0].conversation"], user_cost)
    assert manifest["cost_usd"] == round(assistant_cost + user_cost, 6)
    assert [(m["step"], m.get("llm"), m["model"]) for m in manifest["models"]] == [
        ("steps[0].conversation", None, "assistant"), ("steps[0].conversation", "user", "user-sim")]


def test_a_rerun_asks_neither_model_again(write_recipe, tmp_path):
    path = chat_recipe(write_recipe, tmp_path)
    first, _, _ = run_chats(path, tmp_path)
    again, manifest, factory = run_chats(path, tmp_path)
    assert factory.asked == {"assistant": [], "user-sim": []}
    assert read_version(again)["messages"].to_list() == read_version(first)["messages"].to_list()
    assert manifest["steps"][0]["cached_batches"] == 1


def test_another_user_model_is_another_batch(write_recipe, tmp_path):
    # The simulated user's model changes with the recipe's llm while the step's options and its own
    # model (whose `default` the step's llm sets) stay: its finished batches must not be reused.
    path = chat_recipe(write_recipe, tmp_path, options=", llm: {default: own}")
    path.write_text(path.read_text().replace("model: assistant}", "model: assistant, default: one}"))
    run_chats(path, tmp_path)
    path.write_text(path.read_text().replace("default: one}", "default: two}"))
    _, manifest, factory = run_chats(path, tmp_path)
    assert manifest["steps"][0]["cached_batches"] == 0
    assert len(factory.asked["user-sim"]) == 10 and factory.asked["assistant"] == []  # only the user is new


def test_kept_cut_replies_are_marked(write_recipe, tmp_path):
    version, manifest, _ = run_chats(chat_recipe(write_recipe, tmp_path, options=", on_truncation: keep"), tmp_path)
    kept = read_version(version)
    cut = kept.filter(pl.col("truncated"))
    assert cut["turns"].to_list() == [3]
    assert [m["content"] for m in cut["messages"][0] if m["role"] == "assistant"][1] == "A reply cut at the limit"
    assert kept.filter(~pl.col("truncated")).height == 3
    assert manifest["steps"][0]["truncation"]["kept"] == 1


@pytest.mark.parametrize("reply, message", [
    ("User: Can you say more?", "Can you say more?"),
    ('**User:** "Why is that?"', "Why is that?"),
    ("User (you): \u201cAnd then?\u201d", "And then?"),
    ("What about salt?\nAssistant: Salt adds flavour.", "What about salt?"),
    ("Thanks, that's all. [done]", None),
    ("[DONE]", None),
])
def test_clean_user_reply(reply, message):
    assert clean_user_reply(reply, "[DONE]") == message


@pytest.mark.parametrize("reply, reason", [
    ("  ", "user_reply_empty"),
    ("User: ''", "user_reply_empty"),
    ("Assistant: Sure!", "user_reply_as_assistant"),
    ("Great question! How can I help you today?", "user_reply_as_assistant"),
    ("I'm an AI assistant, so I can explain that.", "user_reply_as_assistant"),
])
def test_clean_user_reply_refuses(reply, reason):
    with pytest.raises(ParseError) as err:
        clean_user_reply(reply, "[DONE]")
    assert err.value.reason == reason


def test_recipe_errors_name_the_user_llm(write_recipe, tmp_path):
    path = chat_recipe(write_recipe, tmp_path)
    path.write_text(path.read_text().replace("user_llm: {model: user-sim}", "user_llm: {backend: scriptd}"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "steps[0].conversation.user_llm.backend: unknown backend 'scriptd'" in str(err.value)
    assert "scripted" in str(err.value)  # the closest valid name
    path.write_text(path.read_text().replace("user_llm: {backend: scriptd}", "template: 'Hi {{ instruction }}'"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "steps[0].conversation.template: the conversation step has no `template`" in str(err.value)


def test_the_user_model_defaults_to_the_recipe_model_and_is_resolved(write_recipe, tmp_path):
    path = chat_recipe(write_recipe, tmp_path)
    path.write_text(path.read_text().replace(", user_llm: {model: user-sim}", ""))
    recipe = load_recipe(path)
    step = recipe.steps[0]
    assert step.extra_llm_configs["user"] == step.llm_config
    assert recipe.resolved()["steps"][0]["conversation"]["user_llm"] == {
        "backend": "scripted", "model": "assistant", "rules": [], "default": "", "adapter": None,
        "enforces_schema": False}
    # A new default model (an evolve round's) reaches the simulated user too.
    moved = recipe.with_llm(ScriptedConfig(model="round-2"))
    assert moved.steps[0].extra_llm_configs["user"].model == "round-2"


EXPORTED_CHAT = turns(("Tell me about tides.", "Reply 1 to: Tell me about tides."),
                      ("Follow-up 1, please say more.", "Reply 2 to: Follow-up 1, please say more."),
                      ("Follow-up 2, please say more.", "Reply 3 to: Follow-up 2, please say more."))


@pytest.mark.parametrize("fmt, read", [
    ("trl-sft", lambda out: json.loads((out / "train.jsonl").read_text().splitlines()[0])["messages"]),
    ("openai", lambda out: json.loads((out / "train.jsonl").read_text().splitlines()[0])["messages"]),
    ("axolotl", lambda out: json.loads((out / "train.jsonl").read_text().splitlines()[0])["messages"]),
    ("sharegpt", lambda out: json.loads((out / "train.json").read_text())[0]["conversations"]),
    ("llama-factory", lambda out: json.loads((out / "chats_v1.json").read_text())[0]["conversations"]),
])
def test_every_export_keeps_every_turn(write_recipe, tmp_path, fmt, read):
    version, _, _ = run_chats(chat_recipe(write_recipe, tmp_path), tmp_path)
    export(version, fmt, tmp_path / fmt)
    chat = read(tmp_path / fmt)
    if fmt in ("sharegpt", "llama-factory"):
        roles = {"system": "system", "human": "user", "gpt": "assistant"}
        chat = [{"role": roles[m["from"]], "content": m["value"]} for m in chat]
    assert chat == EXPORTED_CHAT


def test_judge_a_whole_chat_or_its_last_turn(write_recipe, tmp_path):
    source = tmp_path / "chats.jsonl"
    source.write_text(json.dumps({"messages": EXPORTED_CHAT}) + "\n" + json.dumps({"messages": []}) + "\n")
    recipe = load_recipe(write_recipe(
        f"name: j\nllm: {{backend: scripted}}\nsource: {{path: {source}}}\nsteps:\n"
        "  - judge: {conversation: last, reasoning: false}\n  - judge: {conversation: whole, mode: binary}\n"))
    last, whole = recipe.steps
    row = recipe.source.read().to_dicts()[0]
    assert last.build_messages(row)[0]["content"] == (
        "Rate the assistant's last reply to the user's last message from 1 to 10. " + last.config.rubric + "\n\n"
        "Earlier in the conversation (context only, do not rate it):\n\n"
        "User: Tell me about tides.\n\nAssistant: Reply 1 to: Tell me about tides.\n\n"
        "User: Follow-up 1, please say more.\n\nAssistant: Reply 2 to: Follow-up 1, please say more.\n\n"
        "User's last message: Follow-up 2, please say more.\n\n"
        "Assistant's last reply: Reply 3 to: Follow-up 2, please say more.\n\n"
        'Reply with the score only, as "Score: " followed by a number from 1 to 10.')
    assert whole.build_messages(row)[0]["content"].startswith(
        "Are the assistant's replies in this conversation correct and complete answers to the user?\n\n"
        "Conversation:\n\nUser: Tell me about tides.\n\nAssistant: Reply 1 to: Tell me about tides.\n\n"
        "User: Follow-up 1, please say more.")
    assert "Assistant: Reply 3 to: Follow-up 2, please say more.\n\nFirst check the replies" in \
        whole.build_messages(row)[0]["content"]
    client = LLMClient(ScriptedBackend(ScriptedConfig(rules=[{"match": "last reply", "reply": " 8"}])))
    out = last.process(recipe.source.read(), StepContext(llm=client))
    # The row without a chat is dropped (first, as every LLM step puts the rows it cannot ask about).
    assert out["_drop_reason"].to_list() == ["invalid_input", None] and out["score"].to_list() == [None, 8.0]


def test_a_judge_without_the_option_keeps_its_cache_keys(write_recipe, tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps({"instruction": "Say hi.", "response": "Hi."}) + "\n")
    recipe = load_recipe(write_recipe(
        f"name: j\nllm: {{backend: scripted}}\nsource: {{path: {source}}}\nsteps:\n"
        "  - judge: {scale: 10, reasoning: false}\n  - judge: {mode: binary, reference_column: response}\n"))
    # The fingerprints these judges had before `conversation` and `messages_column` were added (d612f2b).
    assert [s.fingerprint() for s in recipe.steps] == [
        "5256b0e707b39aec371505376184d2e6261e79b026d874e1173f311cffacc1ef",
        "a6bdfeb851b327e0421fa6f1cbdc44943c1506db2b4bd66e42456dce743bcdca"]
    assert "conversation" not in recipe.resolved()["steps"][0]["judge"]


@pytest.mark.slow
def test_two_chats_of_two_turns_on_the_embedded_model(write_recipe, tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps({"instruction": "What is a good name for a pet goldfish?"}) + "\n"
                      + json.dumps({"persona": "a student who is new to cooking", "goal": "cook rice on a stove"})
                      + "\n")
    recipe = load_recipe(write_recipe(
        f"name: real-chats\nllm: {{backend: transformers, model: embedded}}\nsource: {{path: {source}}}\nsteps:\n"
        "  - conversation: {turns: 2, max_tokens: 96, on_truncation: keep}\n"))
    version, manifest, _ = run_recipe(recipe, tmp_path / "out", use_cache=False, progress=False)
    kept, rejected = read_version(version), read_version(version, "rejected")
    for chat in kept["messages"].to_list():
        print("\n".join(f"{m['role']}: {m['content']}" for m in chat), end="\n---\n")
    print(rejected.select([c for c in ("drop_reason", "drop_detail", "raw_reply") if c in rejected.columns]))
    assert (kept.height, rejected.height) == (2, 0) and kept["turns"].to_list() == [2, 2]
    for chat in kept["messages"].to_list():
        assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant"]
        assert all(m["content"].strip() for m in chat)
        # The simulated user's messages are one paragraph each, without a speaker's label.
        assert not any(m["content"].lower().startswith(("user", "assistant")) or "\n\n" in m["content"]
                       for m in chat if m["role"] == "user")
    user = manifest["steps"][0]["llm"]["llms"]["user"]
    assert user["conversations"] >= 1 and user["completion_tokens"] > 0


@pytest.mark.slow
def test_ray_chats_equal_local_chats(write_recipe, tmp_path):
    """On Ray the workers build both clients from the session they are sent: the same chats and usage."""
    pytest.importorskip("ray")
    from factory.executors.ray import RayExecutor

    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"Question {i}?"}) + "\n" for i in range(6)))
    path = write_recipe(
        f"name: ray-chats\nbatch_size: 2\nllm: {{backend: scripted, rules: [{{match: '.', reply: 'Answer {{hash}}'}}]}}\n"
        f"source: {{path: {source}}}\nsteps:\n  - conversation: {{turns: 2, user_llm: {{model: user-sim, rules: "
        "[{match: 'Question 3', reply: '[DONE]'}, {match: '.', reply: 'Why {hash}?'}]}}\n")
    here, local, _ = run_recipe(load_recipe(path), tmp_path / "local", driver=Driver(Cache(tmp_path / "c1"),
                                                                                      progress=False))
    executor = RayExecutor(num_cpus=2)
    there, distributed, _ = run_recipe(load_recipe(path), tmp_path / "ray", driver=Driver(
        Cache(tmp_path / "c2"), executor=executor, progress=False))
    assert read_version(there).equals(read_version(here))
    assert read_version(here)["turns"].to_list() == [2, 2, 2, 1, 2, 2]
    a, b = local["steps"][0]["llm"], distributed["steps"][0]["llm"]
    assert (a["conversations"], a["llms"]["user"]["conversations"]) == (b["conversations"],
                                                                        b["llms"]["user"]["conversations"]) == (17, 6)
    assert a["completion_tokens"] == b["completion_tokens"] and a["llms"]["user"]["model"] == "user-sim"


def test_a_budget_prices_the_simulated_user_too(write_recipe, tmp_path):
    extra = "prices: {assistant: {input: 1, output: 2}}\nbudget: {max_usd: 1}\n"
    with pytest.raises(RecipeError) as err:
        load_recipe(chat_recipe(write_recipe, tmp_path, extra=extra))
    assert "budget.max_usd needs the price of every model the steps use, and user-sim has none" in str(err.value)
    # Priced, the run spends on both models, each at its price, and the budget counts it all.
    extra = "prices: {assistant: {input: 1, output: 2}, user-sim: {input: 3, output: 5}}\nbudget: {max_usd: 1}\n"
    _, manifest, _ = run_chats(chat_recipe(write_recipe, tmp_path, extra=extra), tmp_path)
    assert manifest["cost_usd"] == manifest["steps"][0]["llm"]["cost_usd"] > manifest["steps"][0]["llm"]["llms"][
        "user"]["cost_usd"] > 0


# -- user_mode: magpie: the user model writes the user's turn from its own chat template -----------

def magpie_user_reply(conversation, sample):
    """Stands in for a model that writes the user's turn: it sees the system prompt about the user,
    the chat so far, and an open user turn last."""
    from factory.llm.base import writes_user

    assert writes_user(conversation) and conversation[0]["role"] == "system"
    shown = conversation[1:-1]
    assert all(m["role"] in ("user", "assistant") for m in shown)  # the assistant's own system prompt is not shown
    if "a mime" in conversation[0]["content"] and len(shown) == 2:
        return "<|im_start|>assistant"
    return f"Follow-up after {len(shown)} messages."


def test_magpie_mode_writes_the_users_turns_from_the_template(write_recipe, tmp_path):
    asked = []

    def build(config):
        if config.model == "user-sim":
            return ScriptedBackend(config, reply_fn=lambda chat, k: asked.append(chat) or magpie_user_reply(chat, k))
        return ScriptedBackend(config, reply_fn=assistant_reply)

    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps({"persona": "a beekeeper", "goal": "keep calm bees"}) + "\n"
                      + json.dumps({"persona": "a mime", "goal": "learn to juggle"}) + "\n", encoding="utf-8")
    path = write_recipe(RECIPE.format(source=source, extra="", options=", user_mode: magpie"))
    driver = Driver(Cache(tmp_path / "cache"), progress=False, backend_factory=build)
    version, manifest, _ = run_recipe(load_recipe(path), tmp_path / "out", driver=driver)
    kept = read_version(version)
    assert kept["messages"].to_list() == [turns(
        ("Follow-up after 0 messages.", "Reply 1 to: Follow-up after 0 messages."),
        ("Follow-up after 2 messages.", "Reply 2 to: Follow-up after 2 messages."),
        ("Follow-up after 4 messages.", "Reply 3 to: Follow-up after 4 messages."))]
    assert asked[0][0] == {"role": "system", "content": "You are a helpful assistant. The person you are talking with: "
                                                     "a beekeeper What they want from this chat: keep calm bees."}
    rejected = read_version(version, "rejected")
    assert rejected.select("drop_reason", "drop_detail").rows() == [
        ("template_echo", "turn 2: the simulated user's message holds the template's markup '<|im_start|>'")]
    assert manifest["steps"][0]["dropped"] == {"template_echo": 1}


def test_magpie_mode_on_a_server_needs_the_tokenizer(write_recipe, tmp_path):
    path = write_recipe("name: c\nllm: {backend: scripted}\nsteps:\n  - conversation: {user_mode: magpie, user_llm: "
                        "{backend: openai, base_url: 'http://127.0.0.1:9/v1', model: sim}}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "steps[0].conversation.user_llm.tokenizer" in str(info.value)
