"""What a step talks to: a backend behind the reply cache, counting usage for the step."""

from __future__ import annotations

import dataclasses

from ..cache import Cache, NullCache
from .base import Backend, Completion, Conversation, GenerationParams, fingerprint


@dataclasses.dataclass
class Usage:
    """LLM usage of one step (reported per step in the manifest)."""

    calls: int = 0
    cached_calls: int = 0
    conversations: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class LLMClient:
    """Sends a step's conversations to its backend, caching the replies.

    The sampling seed of a call is derived from the recipe seed and the conversations, so
    a call repeated after a crash samples exactly what the first attempt would have.
    """

    def __init__(self, backend: Backend, cache: Cache | None = None, seed: int = 0):
        self.backend = backend
        self.cache = cache or NullCache()
        self.seed = seed
        self.usage = Usage()
        self.on_progress = None  # see Backend.on_progress

    def chat(self, conversations: list[Conversation], params: GenerationParams) -> list[Completion]:
        if not conversations:
            return []
        content = [self.seed, params.n, params.temperature, params.top_p, params.max_tokens, list(params.stop),
                   conversations] + ([params.regex] if params.regex else [])
        seed = int(fingerprint(content)[:8], 16)
        key = fingerprint([self.backend.model_id, seed, content])
        self.usage.calls += 1
        self.usage.conversations += len(conversations)
        cached = self.cache.get_json("llm", key)
        if cached is not None and len(cached) == len(conversations):
            self.usage.cached_calls += 1
            return [Completion.from_json(c) for c in cached]
        self.backend.on_progress = self.on_progress
        try:
            completions = self.backend.chat(conversations, params.with_seed(seed))
        finally:
            self.backend.on_progress = None
        for c in completions:
            self.usage.prompt_tokens += c.prompt_tokens
            self.usage.completion_tokens += c.completion_tokens
        # Failed requests are not cached: a re-run tries them again.
        if all(c.error is None for c in completions):
            self.cache.put_json("llm", key, [c.to_json() for c in completions])
        return completions
