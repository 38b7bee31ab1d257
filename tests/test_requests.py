"""The one LLM path: seeds that do not depend on batching, a reply cache written as replies
arrive, failures never cached, usage counted, and multi-round exchanges."""

from __future__ import annotations

import pytest

from factory.cache import Cache
from factory.llm import ScriptedBackend, ScriptedConfig
from factory.llm.base import Completion, GenerationParams, Request
from factory.llm.requests import LLMClient

SEEDED = ScriptedConfig(rules=[{"match": ".", "reply": "{seed}"}])
PARAMS = GenerationParams(temperature=0.8)


def ask(text: str) -> Request:
    return Request([{"role": "user", "content": text}], PARAMS)


class Counting(ScriptedBackend):
    """A scripted backend that counts what it was asked and can fail on demand."""

    def __init__(self, config=SEEDED, fail=(), crash_after: int | None = None):
        super().__init__(config)
        self.asked: list[str] = []
        self.fail, self.crash_after = set(fail), crash_after

    def generate(self, requests, on_reply=None):
        out = []
        for i, request in enumerate(requests):
            text = request.messages[-1]["content"]
            if self.crash_after is not None and len(self.asked) == self.crash_after:
                raise KeyboardInterrupt  # the process is stopped mid-call
            self.asked.append(text)
            completion = (Completion([], error="HTTP 503 (after 5 retries)") if text in self.fail else
                          super().generate([request])[0])
            out.append(completion)
            if on_reply is not None:
                on_reply([(i, completion)])  # one reply at a time, as a server's arrive
        return out


def replies(completions) -> list[str]:
    return [c.texts[0] for c in completions]


def test_seeds_do_not_depend_on_batching_or_what_else_is_asked():
    client = LLMClient(ScriptedBackend(SEEDED), seed=3)
    together = replies(client.ask([ask("a"), ask("b")]))
    apart = replies(client.ask([ask("b")])) + replies(client.ask([ask("a")]))
    assert together == [apart[1], apart[0]]
    assert replies(LLMClient(ScriptedBackend(SEEDED), seed=4).ask([ask("a")])) != together[:1]  # the recipe seed


def test_a_request_asked_again_in_one_exchange_is_a_new_sample():
    def exchange(rows):
        first = yield [ask("same"), ask("same")]
        second = yield [ask("same")]
        return replies(first) + replies(second)

    out = LLMClient(ScriptedBackend(SEEDED), seed=3).run(exchange([]))
    assert len(set(out)) == 3
    assert out == LLMClient(ScriptedBackend(SEEDED), seed=3).run(exchange([]))  # and the same ones next time


def test_replies_are_cached_as_they_arrive_so_a_stopped_call_resends_only_the_rest(tmp_path):
    requests = [ask(f"q{i}") for i in range(6)]
    crashing = Counting(crash_after=4)
    with pytest.raises(KeyboardInterrupt):
        LLMClient(crashing, Cache(tmp_path), seed=1).ask(requests)
    assert crashing.asked == ["q0", "q1", "q2", "q3"]
    again = Counting()
    client = LLMClient(again, Cache(tmp_path), seed=1)
    out = client.ask(requests)
    assert again.asked == ["q4", "q5"]  # the four answered before the stop came from the cache
    assert replies(out) == replies(LLMClient(Counting(), seed=1).ask(requests))
    assert (client.usage.conversations, client.usage.cached_conversations, client.usage.calls) == (6, 4, 1)


def test_failures_are_never_cached(tmp_path):
    requests = [ask("ok"), ask("broken")]
    first = LLMClient(Counting(fail={"broken"}), Cache(tmp_path)).ask(requests)
    assert first[0].error is None and first[1].error.startswith("HTTP 503")
    backend = Counting()
    second = LLMClient(backend, Cache(tmp_path)).ask(requests)
    assert backend.asked == ["broken"] and second[1].error is None


def test_a_line_cut_short_by_a_crash_is_skipped_and_the_journal_goes_on(tmp_path):
    cache = Cache(tmp_path)
    journal = cache.journal("llm", "k")
    journal.append("a", 1)
    journal.close()
    with open(journal.path, "ab") as f:
        f.write(b'{"key": "b", "val')  # the process died mid-write
    journal.append("c", 3)
    journal.close()
    assert cache.journal("llm", "k").read() == {"a": 1, "c": 3}


def test_usage_counts_tokens_and_the_backends_retries():
    backend = ScriptedBackend(ScriptedConfig(default="two words"))
    generate = backend.generate

    def with_retries(requests, on_reply=None):
        backend.stats.count_retry("http_429")
        return generate(requests, on_reply)

    backend.generate = with_retries
    client = LLMClient(backend)
    client.ask([ask("x"), ask("y")])
    usage = client.usage
    assert (usage.calls, usage.conversations, usage.completion_tokens) == (1, 2, 4)
    assert (usage.retries, usage.retry_reasons) == (1, {"http_429": 1})


def test_request_keys_digest_the_same_json_as_fingerprint():
    """The client builds `fingerprint([sampling key, messages])` from the parts' JSON (one head per
    parameter set): the text must be the list's own, or every cached reply would miss."""
    from factory.hashing import canonical, digest, fingerprint

    params = GenerationParams(n=2, temperature=0.7, stop=("\n\n",), json_schema='{"type": "object"}')
    messages = [{"role": "system", "content": "Réponds « court »."}, {"role": "user", "content": 'a "b"\n\t{x}'}]
    head = "[" + canonical(params.sampling_key()) + ","
    assert digest(head + canonical(messages) + "]") == fingerprint([params.sampling_key(), messages])
