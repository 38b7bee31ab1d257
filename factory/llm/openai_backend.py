"""Any OpenAI-compatible chat server: vLLM, SGLang, llama.cpp server, TGI, OpenAI itself.

Requests run concurrently (asyncio + httpx) up to ``max_concurrency``. Rate limits (429,
honouring ``Retry-After``), server errors (5xx), timeouts, dropped connections and
malformed bodies are retried with exponential backoff; a request that still fails after
``max_retries`` comes back as a :class:`Completion` with ``error`` set, so that only its row
is dropped (reason ``backend_error``).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from dataclasses import dataclass
from typing import Literal

import httpx

from ..config import option
from ..errors import BackendError
from .base import Backend, Completion, Conversation, GenerationParams, OnReply, Request, split_prefill

RETRY_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class OpenAIConfig:
    model: str = option(help="The model name the server knows (e.g. the name vLLM serves).")
    backend: Literal["openai"] = option("openai", help="Any OpenAI-compatible /v1/chat/completions server.")
    base_url: str = option("http://127.0.0.1:8000/v1", help="The server's base URL, ending in /v1.")
    api_key_env: str = option("OPENAI_API_KEY", help="Environment variable holding the API key (unset: no key sent).")
    max_concurrency: int = option(16, help="Requests in flight at once.", min=1)
    timeout: float = option(120.0, help="Seconds before a request times out (and is retried).", min=0.001)
    max_retries: int = option(5, help="Retries per request on 429, 5xx, timeouts and bad bodies.", min=0)
    backoff: float = option(1.0, help="First retry delay in seconds; doubles on each retry.", min=0)
    max_backoff: float = option(60.0, help="Longest delay between retries, in seconds.", min=0)
    continue_final_message: bool = option(
        True, help="Send vLLM's `continue_final_message` when a step prefills the assistant turn; "
                   "set false for servers that reject unknown parameters (OpenAI's own API).")
    check_server: bool = option(True, help="Check that the server answers before the run starts.")


class _RequestError(Exception):
    def __init__(self, reason: str, message: str, retry_after: float | None = None, retryable: bool = True):
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after
        self.retryable = retryable


class OpenAIBackend(Backend):
    """Concurrent chat completions against an OpenAI-compatible server."""

    name = "openai"
    Config = OpenAIConfig

    @property
    def model_id(self) -> str:
        return f"openai:{self.config.base_url}#{self.config.model}"

    def _headers(self) -> dict:
        key = os.environ.get(self.config.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def check(self) -> None:
        if not self.config.check_server:
            return
        url = self.config.base_url.rstrip("/") + "/models"
        try:
            response = httpx.get(url, headers=self._headers(), timeout=min(10.0, self.config.timeout))
        except httpx.HTTPError as err:
            raise BackendError(f"cannot reach the OpenAI-compatible server at {self.config.base_url} "
                               f"({type(err).__name__}: {err}); start the server or fix llm.base_url") from None
        if response.status_code in (401, 403):
            raise BackendError(f"the server at {self.config.base_url} refused the API key (HTTP "
                               f"{response.status_code}); set ${self.config.api_key_env} to a valid key")

    def generate(self, requests: list[Request], on_reply: OnReply | None = None) -> list[Completion]:
        coro = self._generate_all(requests, on_reply)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        # Called from inside a running event loop (a notebook): run ours in a thread.
        box: dict = {}
        thread = threading.Thread(target=lambda: box.setdefault("out", asyncio.run(coro)))
        thread.start()
        thread.join()
        return box["out"]

    async def _generate_all(self, requests: list[Request], on_reply: OnReply | None):
        limits = httpx.Limits(max_connections=self.config.max_concurrency,
                              max_keepalive_connections=self.config.max_concurrency)
        semaphore = asyncio.Semaphore(self.config.max_concurrency)
        async with httpx.AsyncClient(base_url=self.config.base_url.rstrip("/") + "/", headers=self._headers(),
                                     timeout=self.config.timeout, limits=limits) as client:
            async def one(i: int, request: Request) -> Completion:
                async with semaphore:
                    completion = await self._complete(client, request.messages, request.params)
                if on_reply is not None:
                    on_reply([(i, completion)])
                return completion
            return await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))

    def _payload(self, conv: Conversation, params: GenerationParams, n: int, seed: int) -> dict:
        payload = {"model": self.config.model, "messages": conv, "n": n, "temperature": params.temperature,
                   "top_p": params.top_p, "max_tokens": params.max_tokens, "seed": seed}
        if params.stop:
            payload["stop"] = list(params.stop)
        if params.regex:
            # vLLM's server: `structured_outputs` in recent versions, `guided_regex` before.
            payload["structured_outputs"] = {"regex": params.regex}
            payload["guided_regex"] = params.regex
        if split_prefill(conv)[1] is not None and self.config.continue_final_message:
            payload["continue_final_message"] = True
            payload["add_generation_prompt"] = False
        return payload

    async def _complete(self, client: httpx.AsyncClient, conv: Conversation, params: GenerationParams) -> Completion:
        texts: list[str] = []
        prompt_tokens = completion_tokens = 0
        # Some servers return fewer choices than `n`; ask again for the rest.
        for attempt in range(params.n):
            need = params.n - len(texts)
            if need <= 0:
                break
            try:
                body = await self._post_with_retries(client, self._payload(conv, params, need, params.seed + attempt))
            except _RequestError as err:
                self.stats.failures += 1
                tries = f" (after {self.config.max_retries} retries)" if err.retryable else ""
                return Completion([], prompt_tokens, completion_tokens, error=f"{err.reason}: {err}{tries}")
            usage = body.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or prompt_tokens)
            completion_tokens += int(usage.get("completion_tokens") or 0)
            for choice in body["choices"][:need]:
                texts.append(choice["message"].get("content") or "")
        if len(texts) < params.n:
            self.stats.failures += 1
            return Completion([], prompt_tokens, completion_tokens,
                              error=f"server returned {len(texts)} of {params.n} samples")
        return Completion(texts, prompt_tokens, completion_tokens)

    async def _post_with_retries(self, client: httpx.AsyncClient, payload: dict) -> dict:
        delay = self.config.backoff
        for attempt in range(self.config.max_retries + 1):
            self.stats.requests += 1
            try:
                return await self._post(client, payload)
            except _RequestError as err:
                if attempt == self.config.max_retries or not err.retryable:
                    raise
                self.stats.count_retry(err.reason)
                wait = err.retry_after if err.retry_after is not None else delay * (1 + random.random() * 0.25)
                await asyncio.sleep(min(wait, self.config.max_backoff))
                delay = min(delay * 2, self.config.max_backoff)
        raise AssertionError("unreachable")

    async def _post(self, client: httpx.AsyncClient, payload: dict) -> dict:
        try:
            response = await client.post("chat/completions", json=payload)
        except httpx.TimeoutException as err:
            raise _RequestError("timeout", f"no answer within {self.config.timeout}s ({type(err).__name__})")
        except httpx.TransportError as err:
            raise _RequestError("connection", f"{type(err).__name__}: {err}")
        if response.status_code in RETRY_STATUSES:
            raise _RequestError(f"http_{response.status_code}", f"HTTP {response.status_code}",
                                  _retry_after(response.headers.get("retry-after")))
        if response.status_code >= 400:
            # 4xx other than rate limits will not get better by retrying: fail the request.
            raise _RequestError(f"http_{response.status_code}",
                                f"HTTP {response.status_code}: {response.text[:200]}", retryable=False)
        try:
            body = response.json()
        except ValueError:
            raise _RequestError("bad_body", f"the reply is not JSON: {response.text[:80]!r}")
        if not isinstance(body, dict) or not body.get("choices"):
            raise _RequestError("empty_choices", "the reply has no choices")
        try:
            for choice in body["choices"]:
                choice["message"]["content"]
        except (KeyError, TypeError):
            raise _RequestError("bad_body", "a choice has no message content")
        return body


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
