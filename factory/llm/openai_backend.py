"""Any OpenAI-compatible chat server: vLLM, SGLang, llama.cpp server, TGI, ``transformers serve``,
OpenAI itself.

Requests run concurrently (asyncio + httpx) up to ``max_concurrency``, over one connection
pool kept for the whole run (the backend owns an event loop in a thread of its own).
Rate limits (429, honouring ``Retry-After``), server errors (5xx), timeouts, dropped
connections and malformed bodies are retried with exponential backoff; a request that
still fails comes back as a :class:`Completion` with ``error`` set, so that only its row is
dropped. A prompt longer than the model's context drops its row as ``too_long``. A wrong
API key or model name stops the run at once with the fix.

Only standard chat-completions fields are sent unless the server is known to take an
extension (:mod:`factory.llm.server`): before the run the backend asks the server what it
accepts, and a field a server still rejects by name is dropped, remembered and the
request resent. A prefilled assistant turn is emulated where the server cannot continue
one, and samples a server will not return through ``n`` are asked for one by one.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import threading
from dataclasses import dataclass
from typing import Literal

import httpx

from ..config import option
from ..errors import BackendError
from .base import Backend, Completion, Conversation, GenerationParams, OnReply, Request, split_prefill
from .server import (JSON_SCHEMA_FIELDS, PROBE_PROMPT, PROBE_SCHEMA, ServerInfo, schema_payload, auth_error, connection_error, continuation, emulate_prefill,
                     is_too_long, model_error, rejected_fields, server_message)

RETRY_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504}
_UNSET = object()


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
    extensions: Literal["auto", "on", "off"] = option(
        "auto", help="Fields beyond the standard ones (vLLM/SGLang's `continue_final_message` for prefilled "
                     "replies, `structured_outputs` for regex-constrained ones): `auto` asks the server before the "
                     "run which it accepts, `on` sends them, `off` never does. A field the server rejects by name "
                     "is dropped and the request resent; a prefill it cannot continue is emulated in the prompt.")
    tokenizer: str | None = option(
        None, help="A local folder (or `embedded`) with the served model's tokenizer. With it, a prefilled reply on "
                   "a server that cannot continue an assistant turn goes to /v1/completions with the chat template "
                   "applied here (exactly what continuing the turn gives). Default: `model`, when it is a local "
                   "folder.")
    check_server: bool = option(True, help="Check the server (reachable, key, model, what it accepts) before the run.")


class _RequestError(Exception):
    def __init__(self, reason: str, message: str, retry_after: float | None = None, retryable: bool = True,
                 status: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after
        self.retryable = retryable
        self.status = status


class OpenAIBackend(Backend):
    """Concurrent chat completions against an OpenAI-compatible server."""

    name = "openai"
    Config = OpenAIConfig

    def __init__(self, config: OpenAIConfig):
        super().__init__(config)
        self.server = ServerInfo()
        if config.extensions == "on":
            self.server.prefill, self.server.regex = "native", "structured_outputs"
            self.server.json_schema = "structured_outputs"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: httpx.AsyncClient | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._probe_lock: asyncio.Lock | None = None
        self._start_lock = threading.Lock()
        self._tokenizer = _UNSET

    @property
    def model_id(self) -> str:
        return f"openai:{self.config.base_url}#{self.config.model}"

    @property
    def continues_replies(self) -> bool:
        # An emulated prefill asks the model to repeat the text and cuts it: not a continuation.
        return self.server.prefill != "emulated"

    @property
    def enforces_schema(self) -> bool:
        if self.config.check_server and not self.server.probed:
            self._run(self._probe())
        return self.server.json_schema is not None

    def describe(self) -> dict:
        return {**super().describe(), "base_url": self.config.base_url, "server": self.server.to_json()}

    # -- the event loop and the connection pool, one per backend -----------------------------
    def _run(self, coro):
        """Runs ``coro`` on the backend's own event loop (so the connection pool outlives a
        batch, and a caller inside a running loop, such as a notebook, is not in the way)."""
        with self._start_lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="factory-openai", daemon=True)
                self._thread.start()
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C or a fatal error: stop what is still in flight
            raise

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            limits = httpx.Limits(max_connections=self.config.max_concurrency,
                                  max_keepalive_connections=self.config.max_concurrency)
            self._client = httpx.AsyncClient(base_url=self.config.base_url.rstrip("/") + "/",
                                             headers=self._headers(), timeout=self.config.timeout, limits=limits)
            self._semaphore = asyncio.Semaphore(self.config.max_concurrency)
            self._probe_lock = asyncio.Lock()
        return self._client

    def close(self) -> None:
        if self._loop is None:
            return
        if self._client is not None:
            try:
                self._run(self._client.aclose())
            except Exception:
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = self._thread = self._client = None

    def _headers(self) -> dict:
        key = os.environ.get(self.config.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    # -- learning what the server accepts ---------------------------------------------------
    def check(self) -> None:
        if self.config.check_server:
            self._run(self._probe())

    async def _probe(self) -> None:
        """Asks the server once what it serves and accepts (a few one-token requests)."""
        client = self._http()
        async with self._probe_lock:
            if self.server.probed:
                return
            await self._list_models(client, required=True)
            prefill = [{"role": "user", "content": PROBE_PROMPT}, {"role": "assistant", "content": "O"}]
            if self.config.extensions == "auto":
                self.server.prefill = "native" if await self._accepts(
                    client, {"messages": prefill, "continue_final_message": True, "add_generation_prompt": False}) \
                    else "emulated"
                for name, value in (("structured_outputs", {"regex": "(yes|no)"}), ("guided_regex", "(yes|no)")):
                    if await self._accepts(client, {name: value}):
                        self.server.regex = name
                        break
            if self.config.extensions != "on":
                # response_format is standard (OpenAI's own): asked even with extensions off.
                for name in JSON_SCHEMA_FIELDS[:1] if self.config.extensions == "off" else JSON_SCHEMA_FIELDS:
                    if await self._holds_schema(client, name):
                        self.server.json_schema = name
                        break
            if self.server.prefill != "native" and self._chat_template() is not None:
                prompt = self._render(prefill)
                if await self._probe_post(client, {"prompt": prompt}, endpoint="completions", fatal=False) is not None:
                    self.server.prefill = "completions"
            body = await self._probe_post(client, {"n": 2, "temperature": 1.0})
            if body is not None:
                self.server.n = len(body.get("choices") or []) >= 2
            self.server.probed = True

    async def _list_models(self, client: httpx.AsyncClient, required: bool = False) -> None:
        try:
            response = await client.get("models")
        except httpx.HTTPError as err:
            if required:
                raise connection_error(self.config.base_url, err) from None
            return
        if response.status_code in (401, 403):
            raise auth_error(self.config.base_url, response.status_code, server_message(response.text),
                             self.config.api_key_env, bool(os.environ.get(self.config.api_key_env)))
        try:
            entries = response.json().get("data") or []
            self.server.models = [str(m.get("id")) for m in entries if isinstance(m, dict)]
            self.server.owned_by = next((m.get("owned_by") for m in entries
                                         if isinstance(m, dict) and m.get("id") == self.config.model), None)
        except (ValueError, AttributeError):
            pass

    async def _probe_post(self, client: httpx.AsyncClient, extra: dict, endpoint: str = "chat/completions",
                          fatal: bool = True) -> dict | None:
        payload = {"model": self.config.model, "messages": [{"role": "user", "content": PROBE_PROMPT}],
                   "max_tokens": 1, "temperature": 0.0, **extra}
        if endpoint == "completions":
            payload.pop("messages")
        try:
            self.stats.requests += 1
            return await self._post(client, payload, endpoint)
        except _RequestError as err:
            if fatal:
                await self._fatal(client, err)
            if err.status in (400, 422):
                for name in rejected_fields(str(err), list(extra)):
                    self.server.reject(name)
            return None

    async def _accepts(self, client: httpx.AsyncClient, extra: dict) -> bool:
        return await self._probe_post(client, extra) is not None

    async def _holds_schema(self, client: httpx.AsyncClient, name: str) -> bool:
        """Whether the server takes a JSON Schema in field ``name`` and holds the reply to it (a
        server that accepts the field but ignores it answers "Say OK." with "OK", not JSON)."""
        body = await self._probe_post(client, {**schema_payload(name, PROBE_SCHEMA), "max_tokens": 4})
        if body is None:
            return False
        try:
            return _text(body["choices"][0]).lstrip().startswith("{")
        except (KeyError, IndexError, TypeError, AttributeError):
            return False

    def _chat_template(self):
        """The served model's tokenizer, when it is at hand locally (None otherwise)."""
        if self._tokenizer is _UNSET:
            self._tokenizer = None
            source = self.config.tokenizer or self.config.model
            if self.config.tokenizer or os.path.isdir(os.path.expanduser(source)):
                from ..models import load_tokenizer

                try:
                    self._tokenizer = load_tokenizer(os.path.expanduser(source))
                except Exception as err:  # noqa: BLE001 - any load failure means: emulate in the prompt
                    if self.config.tokenizer:
                        raise BackendError(f"cannot load the tokenizer llm.tokenizer={self.config.tokenizer} "
                                           f"({type(err).__name__}: {err}); point it at the served model's folder "
                                           "or remove it") from None
        return self._tokenizer

    def _render(self, conv: Conversation) -> str:
        return self._chat_template().apply_chat_template(conv, tokenize=False, continue_final_message=True)

    # -- generation ---------------------------------------------------------------------------
    def generate(self, requests: list[Request], on_reply: OnReply | None = None) -> list[Completion]:
        return self._run(self._generate_all(requests, on_reply))

    async def _generate_all(self, requests: list[Request], on_reply: OnReply | None):
        client = self._http()
        if self.config.check_server and not self.server.probed:
            await self._probe()  # a backend built in another process (a Ray worker) learns on its own

        async def one(i: int, request: Request) -> Completion:
            completion = await self._complete(client, request.messages, request.params)
            if on_reply is not None:
                on_reply([(i, completion)])
            return completion

        tasks = [asyncio.ensure_future(one(i, r)) for i, r in enumerate(requests)]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # a fatal error (bad key, unknown model) or a cancel: stop the rest
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def _payload(self, conv: Conversation, params: GenerationParams, n: int, seed: int) -> dict:
        server = self.server
        prefix = split_prefill(conv)[1]
        payload = {"model": self.config.model, "messages": conv, "temperature": params.temperature,
                   "top_p": params.top_p, "max_tokens": params.max_tokens, "seed": seed}
        if n != 1:
            payload["n"] = n
        if params.stop:
            payload["stop"] = list(params.stop)
        if prefix is not None:
            if server.prefill == "native":
                payload.update(continue_final_message=True, add_generation_prompt=False)
            elif server.prefill == "completions":
                payload["prompt"] = self._render(conv)
                del payload["messages"]
            else:
                payload["messages"] = emulate_prefill(conv, prefix)
        if params.json_schema and server.json_schema:
            payload.update(schema_payload(server.json_schema, json.loads(params.json_schema)))
        elif params.regex and server.regex:
            payload[server.regex] = {"regex": params.regex} if server.regex == "structured_outputs" else params.regex
        for name in server.rejected:
            payload.pop(name, None)
        return payload

    async def _complete(self, client: httpx.AsyncClient, conv: Conversation, params: GenerationParams) -> Completion:
        prefix = split_prefill(conv)[1]
        if params.n > 1 and self.server.n is False:
            asks = [(1, params.seed + k) for k in range(params.n)]  # the server ignores `n`: one sample each
        else:
            asks = [(params.n, params.seed)]
        texts: list[str] = []
        finishes: list[str] = []
        prompt_tokens = completion_tokens = 0
        while True:
            results = await asyncio.gather(*(self._ask(client, conv, params, n, seed) for n, seed in asks))
            for result in results:
                if isinstance(result, Completion):
                    self.stats.failures += 1
                    return result
                body, want = result
                usage = body.get("usage") or {}
                prompt_tokens = int(usage.get("prompt_tokens") or prompt_tokens)
                completion_tokens += int(usage.get("completion_tokens") or 0)
                choices = body["choices"][:want]
                if want > 1 and len(choices) < want:
                    self.server.n = False  # remember: ask one sample per request from now on
                texts += [_text(choice) for choice in choices]
                finishes += [choice.get("finish_reason") or "unknown" for choice in choices]
            need = params.n - len(texts)
            if need <= 0:
                break
            # Fewer samples than asked for: ask for the rest, each with a seed of its own.
            asks = [(1, params.seed + len(texts) + k) for k in range(need)]
        texts, finishes = texts[:params.n], finishes[:params.n]
        # Read after the replies: a server that refused `continue_final_message` on this very
        # request turned prefill to `emulated`, and the resent request was emulated.
        if prefix is not None and self.server.prefill == "emulated":
            texts = [continuation(t, prefix) for t in texts]
        if params.n > 1 and params.temperature > 0 and len(set(texts)) == 1 and not self.server.identical_samples:
            self.server.identical_samples = True
            print(f"warning: the server at {self.config.base_url} returned {params.n} identical samples at "
                  f"temperature {params.temperature}; it may ignore `seed` or sampling, so repeated samples add "
                  "nothing (check the server's sampling settings)", file=sys.stderr)
        return Completion(texts, prompt_tokens, completion_tokens, finish_reasons=finishes)

    async def _ask(self, client: httpx.AsyncClient, conv: Conversation, params: GenerationParams, n: int,
                   seed: int) -> tuple[dict, int] | Completion:
        """One request's body and how many samples it asked for, or the failed Completion."""
        try:
            return await self._post_with_retries(client, lambda: self._payload(conv, params, n, seed)), n
        except _RequestError as err:
            if err.status in (400, 413) and is_too_long(str(err)):
                return Completion([], error=f"the prompt does not fit the model's context: {err}",
                                  error_reason="too_long")
            tries = f" (after {self.config.max_retries} retries)" if err.retryable else ""
            return Completion([], error=f"{err.reason}: {err}{tries}")

    async def _post_with_retries(self, client: httpx.AsyncClient, build) -> dict:
        delay = self.config.backoff
        attempt = 0
        while True:
            payload = build()
            self.stats.requests += 1
            try:
                async with self._semaphore:
                    return await self._post(client, payload, "completions" if "prompt" in payload
                                            else "chat/completions")
            except _RequestError as err:
                refused = rejected_fields(str(err), [k for k in payload if k not in ("model", "messages")]) \
                    if err.status in (400, 422) else []
                if refused:
                    # The server does not take these fields: never send them again, resend now.
                    for name in refused:
                        self.server.reject(name)
                    self.stats.count_retry("unsupported_field")
                    continue
                await self._fatal(client, err)
                if attempt >= self.config.max_retries or not err.retryable:
                    raise
                attempt += 1
                self.stats.count_retry(err.reason)
                wait = err.retry_after if err.retry_after is not None else delay * (1 + random.random() * 0.25)
                await asyncio.sleep(min(wait, self.config.max_backoff))
                delay = min(delay * 2, self.config.max_backoff)

    async def _fatal(self, client: httpx.AsyncClient, err: _RequestError) -> None:
        """Errors no request can get past (bad key, unknown model) stop the run with the fix."""
        if err.status in (401, 403):
            raise auth_error(self.config.base_url, err.status, str(err), self.config.api_key_env,
                             bool(os.environ.get(self.config.api_key_env)))
        if err.status == 404:
            await self._list_models(client)
            if self.server.models and self.config.model in self.server.models:
                raise BackendError(f"POST {self.config.base_url.rstrip('/')}/chat/completions is not found ({err}) "
                                   "although the server lists the model; llm.base_url should end in /v1")
            raise model_error(self.config.base_url, self.config.model, str(err), self.server.models)

    async def _post(self, client: httpx.AsyncClient, payload: dict, endpoint: str = "chat/completions") -> dict:
        try:
            response = await client.post(endpoint, json=payload)
        except httpx.TimeoutException as err:
            raise _RequestError("timeout", f"no answer within {self.config.timeout}s ({type(err).__name__})")
        except httpx.TransportError as err:
            raise _RequestError("connection", str(connection_error(self.config.base_url, err)))
        status = response.status_code
        if status in RETRY_STATUSES:
            raise _RequestError(f"http_{status}", f"HTTP {status}", _retry_after(response.headers.get("retry-after")),
                                status=status)
        if status >= 400:
            # Other 4xx will not get better by retrying: fail the request.
            raise _RequestError(f"http_{status}", f"HTTP {status}: {server_message(response.text)}",
                                retryable=False, status=status)
        try:
            body = response.json()
        except ValueError:
            raise _RequestError("bad_body", f"the reply is not JSON: {response.text[:80]!r}")
        if not isinstance(body, dict) or not body.get("choices"):
            raise _RequestError("empty_choices", "the reply has no choices")
        try:
            for choice in body["choices"]:
                _text(choice)
        except (KeyError, TypeError, AttributeError):
            raise _RequestError("bad_body", "a choice has no message content")
        return body


def _text(choice: dict) -> str:
    """A choice's text: ``message.content`` (chat) or ``text`` (completions)."""
    if "message" in choice:
        return choice["message"].get("content") or ""
    return choice["text"] or ""


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
