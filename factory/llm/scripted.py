"""A deterministic backend for tests, benchmarks and dry runs of a recipe.

Replies come from rules: the first rule whose regular expression is found in the
conversation (all its messages, joined by newlines) answers. A reply is a template that may use ``{sample}`` (the
sample index), ``{hash}`` (8 hex digits of the conversation and sample), ``{digit}`` (a
digit from that hash, 0-9), ``{score}`` (1-10 from that hash), ``{seed}`` (the sampling
seed the request was sent with, for tests of seeding) and the rule's named groups. The same
conversation always gets the same replies (with ``{seed}``: the same conversation and seed).

Example (in a recipe):
    llm:
      backend: scripted
      rules:
        - {match: "Rate the response", reply: "Clear and correct. Score: {score}"}
        - {match: ".", reply: "Answer {hash}"}
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Callable, Literal

from ..config import option
from .base import Backend, Completion, Conversation, OnReply, Request, fingerprint, trim_at_stop


@dataclass
class ScriptedConfig:
    backend: Literal["scripted"] = option("scripted", help="Deterministic replies from rules (for tests).")
    model: str = option("scripted", help="A name recorded in the manifest and cache keys.")
    rules: list[dict[str, str]] = option(default_factory=list, help="Ordered `{match: REGEX, reply: TEMPLATE}` rules.")
    default: str = option("", help="The reply when no rule matches.")
    adapter: str | None = option(None, help="Recorded (e.g. by the evolve loop) but not used: replies come from "
                                            "the rules.")

    def validate(self):
        problems = []
        for i, rule in enumerate(self.rules):
            extra = set(rule) - {"match", "reply"}
            if extra or "reply" not in rule:
                problems.append((f"rule {i} must have `match` and `reply` only, got {sorted(rule)}", "rules",
                                 "write rules as {match: REGEX, reply: TEMPLATE}"))
                continue
            try:
                re.compile(rule.get("match", ""))
            except re.error as err:
                problems.append((f"rule {i} has an invalid regular expression: {err}", "rules",
                                 "fix the `match` pattern"))
        return problems


ReplyFn = Callable[[Conversation, int], str]


class ScriptedBackend(Backend):
    """Replies from rules, or from ``reply_fn(conversation, sample_index)`` given in code."""

    name = "scripted"
    Config = ScriptedConfig

    def __init__(self, config: ScriptedConfig, reply_fn: ReplyFn | None = None):
        super().__init__(config)
        self.reply_fn = reply_fn
        self.rules = [(re.compile(r.get("match", "")), r["reply"]) for r in config.rules]
        self.calls = 0

    @property
    def model_id(self) -> str:
        rules = fingerprint([self.config.rules, self.config.default, self.config.adapter])[:12]
        return f"scripted:{self.config.model}@{rules}" + ("+fn" if self.reply_fn else "")

    def reply(self, conversation: Conversation, sample: int, seed: int = 0) -> str:
        if self.reply_fn is not None:
            return self.reply_fn(conversation, sample)
        text = "\n".join(m.get("content", "") for m in conversation)
        digest = hashlib.sha256(repr((conversation, sample)).encode()).hexdigest()
        fields = {"sample": sample, "hash": digest[:8], "digit": int(digest[:8], 16) % 10,
                  "score": int(digest[8:16], 16) % 10 + 1, "seed": seed}
        for pattern, template in self.rules:
            found = pattern.search(text)
            if found:
                return template.format(**fields, **found.groupdict())
        return self.config.default.format(**fields)

    def generate(self, requests: list[Request], on_reply: OnReply | None = None) -> list[Completion]:
        self.calls += 1
        out = []
        for request in requests:
            self.stats.requests += 1
            params = request.params
            texts = [trim_at_stop(self.reply(request.messages, k, params.seed), params.stop) for k in range(params.n)]
            prompt_tokens = sum(len(m.get("content", "").split()) for m in request.messages)
            out.append(Completion(texts, prompt_tokens, sum(len(t.split()) for t in texts)))
        if on_reply is not None:
            on_reply(list(enumerate(out)))
        return out
