"""Replies cut at max_tokens: every backend says why a reply ended, steps drop, keep or
continue cut replies, and the manifest, the summary, `inspect` and the evolve eval count them."""

from __future__ import annotations

import dataclasses
import json

import polars as pl
import pytest

from factory.build import run_recipe
from factory.cache import Cache
from factory.driver import StepStats
from factory.inspect import render, summarize
from factory.llm import OpenAIBackend, OpenAIConfig, ScriptedBackend, ScriptedConfig
from factory.llm.base import GenerationParams, Request
from factory.llm.requests import LLMClient
from factory.printing import format_summary
from factory.llm.transformers_backend import TransformersBackend, TransformersConfig
from factory.recipe import load_recipe
from factory.steps.context import StepContext
from factory.steps.solve import Solve, SolveConfig
from factory.steps.truncation import truncation_facts
from factory.store import read_version
from factory.driver import Driver
from factory.evolve.evaluate import accuracy

from .fake_openai import FakeOpenAI

LONG = "one two three four five six seven eight nine ten eleven twelve"
TASKS = [{"instruction": f"Task {i}: tell a story"} for i in range(3)] + \
        [{"instruction": f"Task {i}: be brief"} for i in range(3, 5)]


def ask(backend, max_tokens: int, messages=None, **params):
    messages = messages or [{"role": "user", "content": "Task 0: tell a story"}]
    return backend.generate([Request(messages, GenerationParams(max_tokens=max_tokens, **params))])[0]


# -- every backend says why a reply ended --------------------------------------------------------

def test_scripted_cuts_at_max_tokens_words_and_rules_can_set_the_finish_reason():
    backend = ScriptedBackend(ScriptedConfig(rules=[
        {"match": "story", "reply": LONG},
        {"match": "forced", "reply": "short", "finish": "length"},
        {"match": ".", "reply": "ok. END more"}]))
    cut = ask(backend, 4)
    assert cut.texts == ["one two three four"] and cut.finish_reasons == ["length"] and cut.cut()
    whole = ask(backend, 40)
    assert whole.texts == [LONG] and whole.finish_reasons == ["stop"] and not whole.cut()
    assert ask(backend, 40, [{"role": "user", "content": "forced"}]).finish_reasons == ["length"]
    # A stop string ends the reply before the limit: not cut.
    stopped = ask(backend, 2, [{"role": "user", "content": "x"}], stop=("END",))
    assert stopped.texts == ["ok. "] and stopped.finish_reasons == ["stop"]


def test_scripted_continues_a_prefilled_reply():
    backend = ScriptedBackend(ScriptedConfig(rules=[{"match": "story", "reply": LONG}]))
    rest = ask(backend, 40, [{"role": "user", "content": "tell a story"},
                             {"role": "assistant", "content": "one two three"}])
    assert rest.texts == [" four five six seven eight nine ten eleven twelve"]


def test_transformers_reports_length_when_the_token_limit_ends_a_reply(tiny_model_dir):
    backend = TransformersBackend(TransformersConfig(model=str(tiny_model_dir)))
    try:
        out = backend.generate([Request([{"role": "user", "content": f"Say {w}."}],
                                        GenerationParams(n=2, max_tokens=5, temperature=1.0))
                                for w in ("a", "b")])
    finally:
        backend.close()
    # A random 2-layer model never emits its end token within 5 tokens.
    assert [c.finish_reasons for c in out] == [["length", "length"]] * 2
    assert all(c.completion_tokens == 10 for c in out)


def test_transformers_reports_stop_for_an_end_of_sequence_and_a_stop_string(tiny_model_dir):
    backend = TransformersBackend(TransformersConfig(model=str(tiny_model_dir)))
    backend.load()
    try:
        messages = [{"role": "user", "content": "Say a."}]
        prompt = backend.tokenizer(backend.render(messages), add_special_tokens=False, return_tensors="pt")
        ids = backend.model.generate(**prompt, max_new_tokens=6, do_sample=False)[0, prompt["input_ids"].shape[1]:]
        ids = ids.tolist()
        assert ask(backend, 6, messages).finish_reasons == ["length"]
        # Make the model's third greedy token its end of sequence: the reply stops there.
        backend.model.generation_config.eos_token_id = ids[2]
        ended = ask(backend, 6, messages)
        assert ended.finish_reasons == ["stop"] and ended.completion_tokens <= 3
        backend.model.generation_config.eos_token_id = backend.tokenizer.eos_token_id
        # A stop string found in the reply ends it too.
        word = next(w for w in (backend.tokenizer.decode([i]) for i in ids[1:]) if w)
        stopped = ask(backend, 6, messages, stop=(word,))
        assert stopped.finish_reasons == ["stop"] and word not in stopped.texts[0]
    finally:
        backend.close()


def test_openai_backend_passes_the_servers_finish_reason_through():
    def reply(payload, index):
        return LONG if "story" in payload["messages"][-1]["content"] else "short"

    with FakeOpenAI(reply_fn=reply) as server:
        backend = OpenAIBackend(OpenAIConfig(base_url=server.base_url, model="m"))
        try:
            cut = ask(backend, 3)
            whole = ask(backend, 3, [{"role": "user", "content": "be brief"}])
            two = ask(backend, 3, n=2)
        finally:
            backend.close()
    assert cut.texts == ["one two three"] and cut.finish_reasons == ["length"]
    assert whole.finish_reasons == ["stop"]
    assert two.finish_reasons == ["length", "length"]


# -- the three on_truncation modes -----------------------------------------------------------------

RULES = """\
llm:
  backend: scripted
  rules:
    - {match: "Rate the response", reply: "Score: {score}. The answer starts well but then it wanders off"}
    - {match: "story", reply: "Once upon a time there was a dragon who liked tea and biscuits very much"}
    - {match: ".", reply: "Done."}
"""


@pytest.fixture
def tasks_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    return path


def build(write_recipe, tmp_path, tasks_file, solve: str, extra_steps: str = "", rules: str = RULES):
    recipe = load_recipe(write_recipe(f"name: cut\n{rules}source: {{path: {tasks_file}}}\nsteps:\n"
                                      f"  - solve: {solve}\n{extra_steps}output: {{format: raw}}\n"))
    folder, manifest, _ = run_recipe(recipe, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    return read_version(folder), read_version(folder, "rejected"), manifest, folder


def test_drop_mode_drops_cut_replies_with_the_raw_reply_and_a_hint(write_recipe, tmp_path, tasks_file):
    kept, rejected, manifest, folder = build(write_recipe, tmp_path, tasks_file, "{max_tokens: 5}")
    assert kept["response"].to_list() == ["Done."] * 2
    assert rejected["drop_reason"].to_list() == ["truncated"] * 3
    assert rejected["raw_reply"].to_list() == ["Once upon a time there"] * 3
    assert "max_tokens: 5 on steps[0].solve" in rejected["drop_detail"][0]
    t = manifest["steps"][0]["truncation"]
    assert t == {"replies": 5, "cut": 3, "dropped": 3, "kept": 0, "limits": {"max_tokens": 3}, "continued": 0,
                 "on_truncation": "drop", "hint": t["hint"]}
    assert t["hint"] == "raise max_tokens (now 5) on steps[0].solve or set on_truncation: continue"
    line = ("steps[0].solve: 3 of 5 replies hit the token limit (3 at max_tokens): 3 dropped as truncated; raise "
            "max_tokens (now 5) on steps[0].solve")
    assert line in format_summary(manifest)
    assert line in render(summarize(folder))
    assert line in (folder / "README.md").read_text()  # the dataset card


def test_keep_mode_marks_cut_replies_in_a_truncated_column(write_recipe, tmp_path, tasks_file):
    kept, rejected, manifest, _ = build(write_recipe, tmp_path, tasks_file, "{max_tokens: 5, on_truncation: keep}")
    assert rejected.height == 0
    assert kept.sort("instruction")["truncated"].to_list() == [True] * 3 + [False] * 2
    t = manifest["steps"][0]["truncation"]
    assert (t["cut"], t["dropped"], t["kept"], t["on_truncation"]) == (3, 0, 3, "keep")
    assert "3 kept (column `truncated`); raise max_tokens (now 5)" in format_summary(manifest)


def test_continue_mode_asks_the_model_to_go_on_and_joins_the_parts(write_recipe, tmp_path, tasks_file):
    kept, rejected, manifest, _ = build(write_recipe, tmp_path, tasks_file,
                                        "{max_tokens: 6, on_truncation: continue, max_continuations: 2}")
    story = "Once upon a time there was a dragon who liked tea and biscuits very much"
    assert rejected.height == 0
    assert sorted(kept["response"].to_list()) == ["Done.", "Done."] + [story] * 3
    t = manifest["steps"][0]["truncation"]
    assert (t["cut"], t["continued"], t.get("hint")) == (0, 6, None)  # 15 words: 6 + 6 + 3


def test_continue_mode_drops_what_is_still_cut_after_the_bound(write_recipe, tmp_path, tasks_file):
    kept, rejected, manifest, _ = build(write_recipe, tmp_path, tasks_file,
                                        "{max_tokens: 3, on_truncation: continue, max_continuations: 2}")
    assert rejected["drop_reason"].to_list() == ["truncated"] * 3
    assert rejected["raw_reply"].to_list() == ["Once upon a time there was a dragon who"] * 3  # 3 parts of 3
    t = manifest["steps"][0]["truncation"]
    assert (t["cut"], t["continued"], t["dropped"]) == (3, 6, 3)
    assert "set on_truncation" not in t["hint"]


def story_with_continuations(reply_fn, **server_options):
    """One request for a story of 12 words at 5 tokens a reply, continued up to 3 times, on a
    fake server: the server, the backend, the client and the completion."""
    with FakeOpenAI(reply_fn=reply_fn, **server_options) as server:
        backend = OpenAIBackend(OpenAIConfig(base_url=server.base_url, model="m"))
        try:
            client = LLMClient(backend)
            [done] = client.ask([Request([{"role": "user", "content": "tell a story"}],
                                         GenerationParams(max_tokens=5, continuations=3))])
        finally:
            backend.close()
    return server, backend, client, done


def test_continue_mode_over_a_server_that_continues_a_prefill():
    story = LONG.split(" ")

    def reply(payload, index):
        last = payload["messages"][-1]
        said = last["content"].split(" ") if last["role"] == "assistant" else []
        return " " * bool(said) + " ".join(story[len(said):])

    server, _, client, done = story_with_continuations(reply)
    assert server.requests[-1]["continue_final_message"] is True
    assert done.texts == [LONG] and done.finish_reasons == ["stop"]
    assert client.truncation == {"replies": 1, "cut": 0, "limits": {}, "continued": 2}


def test_continue_mode_on_a_server_that_cannot_continue_says_so_and_drops(capsys):
    from .fake_openai import STANDARD

    _, backend, client, done = story_with_continuations(lambda payload, index: LONG, accepts=STANDARD)
    assert backend.server.prefill == "emulated" and done.cut() and done.texts == ["one two three four five"]
    assert client.truncation["continued"] == 0
    assert "cannot continue a reply" in capsys.readouterr().err


def test_a_verdict_read_before_the_cut_is_kept_and_counted(write_recipe, tmp_path, tasks_file):
    kept, rejected, manifest, _ = build(write_recipe, tmp_path, tasks_file, "{max_tokens: 50}",
                                        "  - judge: {reasoning: true, max_tokens: 4}\n")
    assert rejected.height == 0 and kept["score"].null_count() == 0
    assert manifest["steps"][0].get("truncation") is None
    t = manifest["steps"][1]["truncation"]
    assert (t["cut"], t["dropped"], t["kept"], t.get("hint")) == (5, 0, 5, None)
    assert "steps[1].judge: 5 of 5 replies hit the token limit (5 at max_tokens): 5 kept (read before the cut)" \
        in format_summary(manifest)


def test_a_verdict_missing_from_a_reply_past_the_verdict_cap_is_a_parse_error(write_recipe, tmp_path, tasks_file):
    rambling = RULES.replace("Score: {score}. The answer", "Well, the answer is not bad and I would say that it")
    _, rejected, manifest, _ = build(write_recipe, tmp_path, tasks_file, "{max_tokens: 50}",
                                     "  - judge: {reasoning: false}\n", rules=rambling)
    # Without reasoning the judge gets 8 tokens for its verdict: raising max_tokens would not help.
    assert set(rejected["drop_reason"]) == {"parse_error"}
    assert "past the 8 tokens a verdict gets" in rejected["drop_detail"][0]
    t = manifest["steps"][1]["truncation"]
    assert (t["cut"], t["dropped"], t["kept"], t.get("hint")) == (5, 0, 0, None)
    assert "5 of 5 replies hit the token limit (5 at max_tokens): 5 dropped for another reason" \
        in format_summary(manifest)


def test_a_parse_that_fails_on_a_cut_reply_drops_it_as_truncated(write_recipe, tmp_path, tasks_file):
    _, rejected, _, _ = build(write_recipe, tmp_path, tasks_file,
                              "{max_tokens: 5, on_truncation: keep, answer_format: number}")
    # `keep` keeps what can be read; a cut reply without its answer is gone because of the cut.
    assert rejected.filter(pl.col("instruction").str.contains("story"))["drop_reason"].to_list() == ["truncated"] * 3


def test_truncation_counts_survive_a_cached_rerun(write_recipe, tmp_path, tasks_file):
    _, _, first, _ = build(write_recipe, tmp_path, tasks_file, "{max_tokens: 5}")
    _, _, again, _ = build(write_recipe, tmp_path, tasks_file, "{max_tokens: 5}")
    assert again["steps"][0]["cached_batches"] == again["steps"][0]["batches"]
    assert again["steps"][0]["truncation"] == first["steps"][0]["truncation"]


def test_cut_replies_are_counted_by_the_option_that_set_their_limit(write_recipe, tmp_path, tasks_file):
    _, rejected, manifest, _ = build(write_recipe, tmp_path, tasks_file, "{max_tokens: 50}",
                                     "  - self_refine: {feedback_max_tokens: 3, max_rounds: 1}\n")
    assert "(feedback_max_tokens: 3 on steps[1].self_refine)" in rejected["drop_detail"][0]
    t = manifest["steps"][1]["truncation"]
    assert t["limits"] == {"feedback_max_tokens": t["cut"]} and t["dropped"] == t["cut"] > 0
    assert t["hint"] == "raise feedback_max_tokens (now 3) on steps[1].self_refine or set on_truncation: continue"


def test_the_limit_option_is_no_part_of_a_request_identity(tmp_path):
    """Two requests that differ only in the option that set their limit share their cache entry."""
    plain = GenerationParams(max_tokens=4)
    feedback = dataclasses.replace(plain, max_tokens_option="feedback_max_tokens")
    assert plain == feedback and hash(plain) == hash(feedback) and plain.sampling_key() == feedback.sampling_key()
    backend = ScriptedBackend(ScriptedConfig(rules=[{"match": ".", "reply": LONG}]))
    cache = Cache(tmp_path)
    first = LLMClient(backend, cache)
    first.ask([Request([{"role": "user", "content": "go"}], plain)])
    calls = backend.stats.requests
    again = LLMClient(backend, cache)
    again.ask([Request([{"role": "user", "content": "go"}], feedback)])
    assert backend.stats.requests == calls and again.usage.cached_conversations == 1
    assert first.truncation["limits"] == {"max_tokens": 1} and again.truncation["limits"] == {"feedback_max_tokens": 1}


def test_a_batch_report_cached_with_the_limits_value_reads_as_max_tokens():
    """Batch reports cached before cut replies were counted by option hold the limit's value."""
    stats = StepStats(0, "solve", "steps[0].solve", "row", dropped={"truncated": 3},
                      report={"truncation": {"replies": 5, "cut": 3, "limits": {"5": 3}, "continued": 0}})
    facts = truncation_facts(Solve(SolveConfig(max_tokens=5)), stats)
    assert facts["limits"] == {"max_tokens": 3}
    assert facts["hint"].startswith("raise max_tokens (now 5) on steps[0].solve")


def test_a_reply_cached_without_finish_reasons_is_asked_again(tmp_path):
    backend = ScriptedBackend(ScriptedConfig(rules=[{"match": ".", "reply": LONG}]))
    cache = Cache(tmp_path)
    request = Request([{"role": "user", "content": "go"}], GenerationParams(max_tokens=4))
    LLMClient(backend, cache).ask([request])
    # Rewrite the journal as an older version wrote it: no finish reasons.
    [journal] = list((tmp_path).rglob("*.jsonl"))
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    for line in lines:
        del line["value"]["finish_reasons"]
    journal.write_text("".join(json.dumps(line) + "\n" for line in lines))
    calls = backend.stats.requests
    [again] = LLMClient(backend, cache).ask([request])
    assert backend.stats.requests == calls + 1 and again.cut()


# -- the evolve eval -----------------------------------------------------------------------------

def test_eval_counts_a_cut_answer_as_wrong_even_with_a_number_before_the_cut():
    backend = ScriptedBackend(ScriptedConfig(rules=[
        {"match": "long", "reply": "The answer is 4 because two and two make four as everyone knows"},
        {"match": ".", "reply": "The answer is 4"}]))
    table = pl.DataFrame({"question": ["2+2? long", "2+2? short"], "answer": ["4", "4"]})
    step = Solve(SolveConfig(answer_format="number", max_tokens=6, temperature=0.0)).with_llm_config(backend.config)
    result = accuracy(Driver(progress=False, backend_factory=lambda config: backend), step, table, "question", "answer")
    assert (result.correct, result.truncated, result.no_answer) == (1, 1, 1)
    assert result.summary()["truncated"] == 1


# -- the embedded model, end to end ----------------------------------------------------------------

def test_embedded_model_with_a_small_max_tokens_drops_cut_answers(write_recipe, tmp_path, tasks_file):
    recipe = load_recipe(write_recipe(f"""\
        name: embedded-cut
        llm: {{backend: transformers, model: embedded}}
        source: {{path: {tasks_file}}}
        steps:
          - solve: {{max_tokens: 8, temperature: 0.0}}
        output: {{format: raw}}
        """))
    folder, manifest, _ = run_recipe(recipe, tmp_path / "out", progress=False)
    rejected = read_version(folder, "rejected")
    t = manifest["steps"][0]["truncation"]
    assert t["cut"] >= 3 and t["dropped"] == t["cut"] == rejected.height
    assert set(rejected["drop_reason"]) == {"truncated"}
    assert "raise max_tokens (now 8) on steps[0].solve" in format_summary(manifest)


@pytest.mark.parametrize("reasoning, reason", [(True, "truncated"), (False, "parse_error")])
def test_pairwise_without_a_verdict_in_a_cut_reply(reasoning, reason):
    """With reasoning the cut came at the step's max_tokens (raise it); without, past the few
    tokens a verdict gets, which no max_tokens changes: the same rule as the other steps."""
    from factory.steps.pairwise import Pairwise, PairwiseConfig

    backend = ScriptedBackend(ScriptedConfig(rules=[{"match": ".", "reply": LONG}]))
    step = Pairwise(PairwiseConfig(a_column="response", b_column="previous", reasoning=reasoning, max_tokens=10))
    table = pl.DataFrame({"instruction": ["Say hi."], "response": ["hi"], "previous": ["hello"]})
    out = step.process(table, StepContext(llm=LLMClient(backend)))
    assert out["_drop_reason"].to_list() == [reason]
