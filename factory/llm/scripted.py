"""A deterministic backend for tests, benchmarks and dry runs of a recipe.

Replies come from rules: the first rule whose regular expression is found in the
conversation (all its messages, joined by newlines) answers. A reply is a template that may use ``{sample}`` (the
sample index), ``{hash}`` (8 hex digits of the conversation and sample), ``{digit}`` (a
digit from that hash, 0-9), ``{score}`` (1-10 from that hash), ``{seed}`` (the sampling
seed the request was sent with, for tests of seeding) and the rule's named groups. The same
conversation always gets the same replies (with ``{seed}``: the same conversation and seed).

A token is a word here: a reply longer than ``max_tokens`` words is cut there and ends with
finish reason ``length``, like a real model's; a rule's ``finish`` sets the finish reason
of its replies outright (``length`` to test a cut reply of any size). A conversation that
ends with an assistant turn is continued: when the reply to it starts with that turn's
text, only the rest comes back (so a cut reply can be asked to go on). A conversation that
ends with an open user turn (the model writes the user's message, Magpie) is searched with
``<|user|>`` after its messages: rules tell the two kinds of request apart by it.

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
import string
from dataclasses import dataclass
from typing import Callable, Literal

from ..config import option
from ..hashing import fingerprint
from .base import LENGTH, Backend, Completion, Conversation, OnReply, Request, split_prefill, trim_at_stop, writes_user


@dataclass
class ScriptedConfig:
    backend: Literal["scripted"] = option("scripted", help="Deterministic replies from rules (for tests).")
    model: str = option("scripted", help="A name recorded in the manifest and cache keys.")
    rules: list[dict[str, str]] = option(default_factory=list, help="Ordered `{match: REGEX, reply: TEMPLATE}` rules; "
                                         "`finish: length` makes a rule's replies count as cut at max_tokens.")
    default: str = option("", help="The reply when no rule matches.")
    adapter: str | None = option(None, help="Recorded (e.g. by the evolve loop) but not used: replies come from "
                                            "the rules.")
    enforces_schema: bool = option(False, help="Act as a backend that holds replies to their JSON Schema while "
                                               "decoding (steps then ask for JSON); replies still come from the rules.")

    def validate(self):
        problems = []
        for i, rule in enumerate(self.rules):
            extra = set(rule) - {"match", "reply", "finish"}
            if extra or "reply" not in rule:
                problems.append((f"rule {i} must have `match`, `reply` and optionally `finish`, got {sorted(rule)}",
                                 "rules", "write rules as {match: REGEX, reply: TEMPLATE}"))
                continue
            try:
                re.compile(rule.get("match", ""))
            except re.error as err:
                problems.append((f"rule {i} has an invalid regular expression: {err}", "rules",
                                 "fix the `match` pattern"))
        return problems


# Returns the reply, or ``(reply, finish_reason)``.
ReplyFn = Callable[[Conversation, int], "str | tuple[str, str]"]

_WORD = re.compile(r"\S+")


class ScriptedBackend(Backend):
    """Replies from rules, or from ``reply_fn(conversation, sample_index)`` given in code."""

    name = "scripted"
    Config = ScriptedConfig

    def __init__(self, config: ScriptedConfig, reply_fn: ReplyFn | None = None):
        super().__init__(config)
        self.reply_fn = reply_fn
        self.rules = [(pattern, r["reply"], r.get("finish"), _hashed(r["reply"], pattern))
                      for r in config.rules for pattern in [re.compile(r.get("match", ""))]]
        self._default_hashed = _hashed(config.default)
        self.calls = 0

    @property
    def model_id(self) -> str:
        rules = fingerprint([self.config.rules, self.config.default, self.config.adapter])[:12]
        return f"scripted:{self.config.model}@{rules}" + ("+fn" if self.reply_fn else "")

    @property
    def enforces_schema(self) -> bool:
        return self.config.enforces_schema

    @property
    def writes_user_turns(self) -> bool:
        return True

    def answer(self, conversation: Conversation, sample: int, seed: int = 0) -> tuple[str, str | None]:
        """The reply and the finish reason its rule sets (None: decided by the token limit)."""
        if self.reply_fn is not None:
            got = self.reply_fn(conversation, sample)
            return got if isinstance(got, tuple) else (got, None)
        return self._answer(conversation, _joined(conversation), sample, seed)

    def _answer(self, conversation: Conversation, text: str, sample: int, seed: int) -> tuple[str, str | None]:
        """:meth:`answer` by the rules, ``text`` the conversation's messages joined."""
        for pattern, template, finish, hashed in self.rules:
            found = pattern.search(text)
            if found:
                fields = _fields(conversation, sample, seed, hashed)
                return template.format(**fields, **found.groupdict()), finish
        return self.config.default.format(**_fields(conversation, sample, seed, self._default_hashed)), None

    def sample(self, conversation: Conversation, k: int, params, text: str | None = None) -> tuple[str, str]:
        """One reply as a model gives it: continued from a prefill it repeats, cut at a stop
        string, or at ``max_tokens`` words (``text``: the conversation's messages joined, when known)."""
        if text is not None and self.reply_fn is None and type(self).answer is ScriptedBackend.answer:
            text, finish = self._answer(conversation, text, k, params.seed)
        else:
            text, finish = self.answer(conversation, k, params.seed)
        prefill = split_prefill(conversation)[1]
        if prefill and text.startswith(prefill):
            text = text[len(prefill):]
        stopped = trim_at_stop(text, params.stop)
        if finish is None:
            # str.split and the regex's \S split at the same (Unicode) whitespace: the words are
            # found one by one only for a reply that is cut.
            if len(stopped.split()) > params.max_tokens:
                words = list(_WORD.finditer(stopped))
                return stopped[:words[params.max_tokens - 1].end()], LENGTH
            finish = "stop"
        return stopped, finish

    def generate(self, requests: list[Request], on_reply: OnReply | None = None) -> list[Completion]:
        self.calls += 1
        out = []
        for request in requests:
            self.stats.requests += 1
            params, messages = request.params, request.messages
            # The messages joined: what the rules search, and (split) the prompt's tokens.
            text = _joined(messages)
            if params.n == 1:
                reply, finish = self.sample(messages, 0, params, text)
                out.append(Completion([reply], len(text.split()), len(reply.split()), finish_reasons=[finish]))
                continue
            replies = [self.sample(messages, k, params, text) for k in range(params.n)]
            texts = [reply for reply, _ in replies]
            out.append(Completion(texts, len(text.split()), sum(len(t.split()) for t in texts),
                                  finish_reasons=[finish for _, finish in replies]))
        if on_reply is not None:
            on_reply(list(enumerate(out)))
        return out


def _joined(conversation: Conversation) -> str:
    """What the rules search: the messages' contents, one per line (``<|user|>`` last for an open user turn)."""
    text = "\n".join(m.get("content", "") for m in conversation)
    return text + "\n<|user|>" if writes_user(conversation) else text


_HASHED = {"hash", "digit", "score"}  # the reply fields drawn from the conversation's digest


def _hashed(template: str, pattern: re.Pattern | None = None) -> bool:
    """Whether a reply template (with its rule's pattern) needs the fields drawn from the digest:
    it names one, or might (a field it cannot be read for, a nested field in a format spec), or a
    group of the pattern has one's name (format then fails, as it always did)."""
    if pattern is not None and _HASHED & set(pattern.groupindex):
        return True
    try:
        for _, name, spec, _ in string.Formatter().parse(template):
            if name is None:
                continue
            if (spec and "{" in spec) or re.split(r"[.\[]", name, maxsplit=1)[0] in _HASHED | {""} or name.isdigit():
                return True
    except ValueError:  # not a valid template: format raises on it, digest or not
        return True
    return False


def _fields(conversation: Conversation, sample: int, seed: int, hashed: bool) -> dict:
    """The fields a reply template may use; those drawn from the digest only when ``hashed``."""
    if not hashed:
        return {"sample": sample, "seed": seed}
    digest = hashlib.sha256(repr((conversation, sample)).encode()).hexdigest()
    return {"sample": sample, "hash": digest[:8], "digit": int(digest[:8], 16) % 10,
            "score": int(digest[8:16], 16) % 10 + 1, "seed": seed}
