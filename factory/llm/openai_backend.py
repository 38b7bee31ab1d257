"""Any OpenAI-compatible chat server: vLLM, SGLang, llama.cpp server, TGI, ``transformers serve``,
OpenAI itself and the hosted APIs that speak its protocol.

Requests run concurrently over one connection pool per server for the whole run
(:mod:`factory.llm.http`: aiohttp, on an event loop in a thread of its own), paced by the
server's rate limits (:mod:`factory.llm.ratelimit`): learned from its headers or set with
``requests_per_minute`` / ``tokens_per_minute``, shared by every step that asks the same model
there. A 429 is throttling, never a failure: the run waits (up to ``max_wait``) and the request
goes again. Server errors (5xx), timeouts, dropped connections and malformed bodies are retried
with exponential backoff; a request that still fails comes back as a :class:`Completion` with
``error`` set, so that only its row is dropped. A prompt longer than the model's context drops
its row as ``too_long``. A wrong API key, an exhausted quota or an unknown model stops the run at
once with the fix.

Only standard chat-completions fields are sent unless the server is known to take an
extension (:mod:`factory.llm.server`): before the run the backend asks the server what it
accepts, and a field a server still rejects by name is dropped, remembered and the
request resent. A prefilled assistant turn is emulated where the server cannot continue
one, and samples a server will not return through ``n`` are asked for one by one.

Requests with tools (``params.tools``) go natively where the server takes OpenAI's ``tools`` field
(asked once, by one-token requests at the first such request, which also tell whether the served
chat template shows the tools to the model; or ``native_tools``): the chat in
OpenAI's tool layout, ``tools`` and ``tool_choice``, and no JSON Schema (the server's tool parser
answers); each reply's ``tool_calls`` come back as the reply JSON the steps read
(:func:`factory.llm.tool_format.native_reply_text`). A server that still refuses tools on a request is
remembered and the request resent with the tools in the prompt, like every later one.

With ``batch: true`` a step's requests go through the server's Batch API instead
(:mod:`factory.llm.batch_api`): half the price on hosted APIs, hours of latency.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from ..config import option
from ..errors import BackendError
from .base import Backend, Completion, Conversation, GenerationParams, OnReply, Request, split_prefill, writes_user
from .chat_template import end_of_user_turn, render_user_turn
from .http import Endpoint
from .ratelimit import RateLimiter, Ticket
from .server import (JSON_SCHEMA_FIELDS, PROBE_PROMPT, PROBE_SCHEMA, PROBE_TOOL, ServerInfo, schema_payload,
                     auth_error, connection_error, continuation, emulate_prefill, is_quota, is_too_long, model_error,
                     quota_error, refuses_tools, rejected_fields, server_message, RequestError)
from .tool_format import native_messages, native_reply_text, prompt_messages, tools_prompt

RETRY_STATUSES = {408, 409, 425, 500, 502, 503, 504, 520, 522, 524, 529}  # 429 is throttling, not a retry
_UNSET = object()
PROBE_TRIES = 3  # a probe that meets a 5xx or a timeout asks again, so a busy moment does not decide the run
MAX_PARALLEL_CALLS = 32  # batches of a step asking at once (threads waiting on the event loop)
_JSON_HEADERS = {"Content-Type": "application/json"}
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass
class OpenAIConfig:
    model: str = option(help="The model name the server knows (e.g. the name vLLM serves).")
    backend: Literal["openai"] = option("openai", help="Any OpenAI-compatible /v1/chat/completions server.")
    base_url: str = option("http://127.0.0.1:8000/v1", help="The server's base URL, ending in /v1.")
    api_key_env: str = option("OPENAI_API_KEY", help="Environment variable holding the API key (unset: no key sent).")
    max_concurrency: int = option(16, help="The most requests in flight at once; fewer while the server refuses "
                                           "requests with 429 that no stated limit explains.", min=1)
    requests_per_minute: float | None = option(
        None, help="The account's request limit, when known. Default: learned from the server's rate-limit headers "
                   "(OpenAI's x-ratelimit-*, Anthropic's anthropic-ratelimit-*) and its 429s; headers can only lower it.",
        min=0.001)
    tokens_per_minute: float | None = option(
        None, help="The account's token limit (prompt + max_tokens per request, as OpenAI counts), when known. "
                   "Default: learned from the server's headers.", min=1)
    max_wait: float = option(600.0, help="Seconds a request may be held back by the server's limits (429s, or a limit "
                                         "that resets later) before the run stops with the replies so far cached.",
                             min=0.001)
    timeout: float = option(120.0, help="Seconds before a request times out (and is retried).", min=0.001)
    max_retries: int = option(5, help="Retries per request on 5xx, timeouts, dropped connections and bad bodies "
                                      "(429s are waited out, not counted).", min=0)
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
    native_tools: Literal["auto", "on", "off"] = option(
        "auto", hashed_when_set=True,
        help="Requests with tools (tool-use steps): `auto` asks the server once, at the first such request, whether "
             "it takes OpenAI's `tools` field (vLLM needs --enable-auto-tool-choice and --tool-call-parser, "
             "llama.cpp --jinja) and shows them to the model (a chat template without tools, such as SmolLM2's, "
             "drops them), and sends them so where it does, with the tools in the prompt where it does not; "
             "`on` sends them natively without asking; `off` always writes them into the prompt (the reply then "
             "held to a JSON Schema where the server takes one). A server that refuses tools on a request gets "
             "it again with the tools in the prompt. Replies are cached alike either way.")
    batch: bool = option(False, help="Send each step's requests through the server's Batch API (/v1/files, "
                                     "/v1/batches; OpenAI's, and servers with the same shape): half the price on "
                                     "hosted APIs, results within `batch_window`. Batch ids are kept in the cache the "
                                     "moment they exist, so the same command after a crash or Ctrl-C goes on polling "
                                     "them and pays nothing twice.")
    batch_window: str = option("24h", help="The batch's completion_window (what the server accepts; OpenAI: 24h).")
    batch_poll: float = option(30.0, help="Seconds between two looks at a batch's status.", min=0.01)
    batch_max_requests: int = option(50_000, help="Most requests per batch file (OpenAI: 50,000).", min=1)
    batch_max_bytes: int = option(200_000_000, help="Largest batch file in bytes (OpenAI: 200 MB).", min=1024)
    batch_retry: Literal["batch", "online"] = option(
        "batch", help="Requests that failed or expired inside a batch go again: in a new batch (`batch`, batch "
                      "price) or as plain requests (`online`, at once).")


class OpenAIBackend(Backend):
    """Concurrent chat completions against an OpenAI-compatible server, paced by its rate limits."""

    name = "openai"
    Config = OpenAIConfig

    def __init__(self, config: OpenAIConfig):
        super().__init__(config)
        self.server = ServerInfo()
        if config.extensions == "on":
            self.server.prefill, self.server.regex = "native", "structured_outputs"
            self.server.json_schema = "structured_outputs"
        if config.native_tools != "auto":
            self.server.tools = config.native_tools == "on"
        self.share = 1.0  # this process's share of the server's limits (1 / replicas on Ray)
        self.cache = None  # where batch ids are kept (see attach)
        self._endpoint: Endpoint | None = None
        self._limiter: RateLimiter | None = None
        self._probe_lock: asyncio.Lock | None = None
        self._timeout = None
        self._tokenizer = _UNSET
        self._user_turn_end = _UNSET

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

    @property
    def batched(self) -> bool:
        return self.config.batch

    @property
    def writes_user_turns(self) -> bool:
        # The chat template is applied here and the prompt goes to /v1/completions.
        if self.config.check_server and not self.server.probed:
            self._run(self._probe())
        return self._chat_template() is not None and self.server.completions is not False

    def takes_tools(self) -> bool:
        # `tools` is a standard field (OpenAI's own): asked even with extensions off, and only by a
        # run that has requests with tools.
        if self.server.tools is None:
            self._run(self._probe_tools())
        return bool(self.server.tools)

    def user_turn_problem(self) -> str:
        """Why the server cannot be asked to write a user's turn, with the fix."""
        if self._chat_template() is None:
            return (f"the chat template of '{self.config.model}' is not at hand here; set llm.tokenizer to a local "
                    "folder with the served model's tokenizer (the template is applied here and the prompt sent to "
                    "/v1/completions)")
        return (f"the server at {self.config.base_url} does not answer /v1/completions, where the prompt that has "
                "the model write a user's turn goes; serve the model with a server that has it (vLLM, SGLang, "
                "llama.cpp) or run the step on a local backend (transformers, vllm)")

    def describe(self) -> dict:
        facts = {**super().describe(), "base_url": self.config.base_url, "server": self.server.to_json()}
        if self._limiter is not None:
            facts["rate_limits"] = self._limiter.describe()
        if self.config.batch:
            facts["batch"] = True
        return facts

    def live(self) -> dict:
        """What the progress bar shows while requests go: throttling and the limits learned."""
        limiter = self._limiter
        if limiter is None:
            return {}
        return {"throttled": limiter.throttled, "limits": limiter.limits_text(),
                "concurrency": int(limiter.concurrency) if limiter.concurrency < limiter.max_concurrency else None}

    def parallel_calls(self, requests_per_call: int) -> int:
        # Enough calls under way that max_concurrency requests are always in flight, and one more
        # so that a call's slowest replies never leave the server idle. A batch job is one call.
        if self.config.batch:
            return 1
        return min(MAX_PARALLEL_CALLS, -(-self.config.max_concurrency // max(1, requests_per_call)) + 1)

    def attach(self, cache) -> None:
        self.cache = cache

    def set_share(self, share: float) -> None:
        self.share = share
        if self._limiter is not None:
            self._limiter.share = share

    # -- the connection pool, shared per server ---------------------------------------------------
    def _open(self) -> Endpoint:
        if self._endpoint is None:
            import aiohttp

            self._endpoint = Endpoint.hold(self.config.base_url, self._headers())
            self._timeout = aiohttp.ClientTimeout(total=self.config.timeout)
        return self._endpoint

    def _run(self, coro):
        """Runs ``coro`` on the server's event loop (so the connection pool outlives a batch, and a
        caller inside a running loop, such as a notebook, is not in the way)."""
        return self._open().run(coro)

    def _limits(self) -> RateLimiter:
        if self._limiter is None:
            c = self.config
            self._limiter = self._endpoint.limiter(c.model, lambda: RateLimiter(
                c.max_concurrency, c.requests_per_minute, c.tokens_per_minute, c.max_wait, self.share,
                server=f"the server at {c.base_url}", backoff=c.backoff, max_backoff=c.max_backoff),
                c.requests_per_minute, c.tokens_per_minute)
        return self._limiter

    @property
    def _base(self) -> str:
        return self.config.base_url.rstrip("/") + "/"

    def close(self) -> None:
        if self._endpoint is not None:
            endpoint, self._endpoint, self._limiter = self._endpoint, None, None
            endpoint.let_go()

    def _headers(self) -> dict:
        key = os.environ.get(self.config.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    # -- learning what the server accepts ---------------------------------------------------
    def check(self) -> None:
        if self.config.check_server:
            self._run(self._probe())

    async def _probe(self) -> None:
        """Asks the server once what it serves and accepts (a few one-token requests)."""
        self._open()
        if self._probe_lock is None:
            self._probe_lock = asyncio.Lock()
        async with self._probe_lock:
            if self.server.probed:
                return
            await self._list_models(required=True)
            prefill = [{"role": "user", "content": PROBE_PROMPT}, {"role": "assistant", "content": "O"}]
            if self.config.extensions == "auto":
                self.server.prefill = "native" if await self._accepts(
                    {"messages": prefill, "continue_final_message": True, "add_generation_prompt": False}) \
                    else "emulated"
                for name, value in (("structured_outputs", {"regex": "(yes|no)"}), ("guided_regex", "(yes|no)")):
                    if await self._accepts({name: value}):
                        self.server.regex = name
                        break
            if self.config.extensions != "on":
                # response_format is standard (OpenAI's own): asked even with extensions off.
                for name in JSON_SCHEMA_FIELDS[:1] if self.config.extensions == "off" else JSON_SCHEMA_FIELDS:
                    if await self._holds_schema(name):
                        self.server.json_schema = name
                        break
            if self.server.prefill != "native" and self._chat_template() is not None:
                # A server that continues an assistant turn (vLLM, SGLang) has /v1/completions too: not asked.
                prompt = self._render(prefill)
                self.server.completions = await self._probe_post({"prompt": prompt}, endpoint="completions",
                                                                 fatal=False) is not None
                if self.server.completions:
                    self.server.prefill = "completions"
            body = await self._probe_post({"n": 2, "temperature": 1.0})
            if body is not None:
                self.server.n = len(body.get("choices") or []) >= 2
            if self.config.batch:
                await self._check_batch_api()
            self.server.probed = True

    async def _probe_tools(self) -> None:
        """Asks the server once whether it takes OpenAI's ``tools`` field (a one-token request with one
        small tool): accepted, refused (400/422), or an error that says nothing (a warning; not taken)."""
        self._open()
        if self._probe_lock is None:
            self._probe_lock = asyncio.Lock()
        async with self._probe_lock:
            if self.server.tools is None:
                self.server.tools = await self._accepts_tools()

    async def _accepts_tools(self) -> bool:
        plain = {"model": self.config.model, "messages": [{"role": "user", "content": PROBE_PROMPT}],
                 "max_tokens": 1, "temperature": 0.0}
        delay = self.config.backoff
        for attempt in range(PROBE_TRIES):
            try:
                body = await self._post({**plain, "tools": [PROBE_TOOL], "tool_choice": "auto"})
                return await self._prompt_has_tools(body, plain)
            except RequestError as err:
                await self._fatal(err)
                if err.status in (400, 422):
                    return False
                if not err.retryable or attempt == PROBE_TRIES - 1:
                    print(f"warning: the server at {self.config.base_url} did not answer whether it takes `tools` "
                          f"({err}); requests with tools go with the tools in the prompt (set llm.native_tools: on "
                          "to send them natively)", file=sys.stderr)
                    return False
                await asyncio.sleep(min(delay, self.config.max_backoff))
                delay *= 2
        return False

    async def _prompt_has_tools(self, body: dict, plain: dict) -> bool:
        """Whether a server that accepted ``tools`` shows them to the model: a chat template without a
        place for tools (``transformers serve`` with SmolLM2's) drops them, and the prompt counts the
        same tokens as without them. A server that reports no usage is taken at its word."""
        with_tools = (body.get("usage") or {}).get("prompt_tokens")
        if not with_tools:
            return True
        try:
            without = ((await self._post(plain)).get("usage") or {}).get("prompt_tokens")
        except RequestError:
            return True
        if without and int(without) >= int(with_tools):
            print(f"warning: the server at {self.config.base_url} accepts `tools` but does not show them to the "
                  f"model (its prompt has {with_tools} tokens with a tool, {without} without: the chat template "
                  "has no place for tools); requests with tools go with the tools in the prompt (set "
                  "llm.native_tools: on to send them natively anyway)", file=sys.stderr)
            return False
        return True

    def _tools_refused(self, message: str) -> None:
        """The server refused ``tools`` on a request: from now on they go in the prompt."""
        if self.server.tools:
            self.server.tools = False
            print(f"warning: the server at {self.config.base_url} refused `tools` ({message}); requests with tools "
                  "go with the tools in the prompt from now on (serve the model with a tool-call parser, e.g. "
                  "vLLM's --enable-auto-tool-choice --tool-call-parser, to have them natively)", file=sys.stderr)

    def _native(self, conv: Conversation, params: GenerationParams) -> bool:
        """Whether this request goes with OpenAI's ``tools`` field: it has tools, the server takes them,
        and it neither continues a prefill nor writes a user's turn (those need the chat as text)."""
        return bool(params.tools) and self.server.tools is True and split_prefill(conv)[1] is None \
            and not writes_user(conv)

    async def _check_batch_api(self) -> None:
        """With ``batch: true``: the server has a Batch API (a 404 here, not hours later)."""
        try:
            status, _, raw = await self._send("GET", "batches?limit=1")
        except RequestError:
            return  # the calls themselves will say what is wrong
        if status in (404, 405, 501):
            raise BackendError(f"the server at {self.config.base_url} has no Batch API (GET /batches: HTTP {status}); "
                               "set llm.batch: false to send the requests one by one")

    async def _list_models(self, required: bool = False) -> None:
        try:
            status, _, raw = await self._send("GET", "models")
        except RequestError as err:
            if required:
                raise (err.cause or BackendError(str(err))) from None
            return
        text = raw.decode("utf-8", errors="replace")
        if status in (401, 403):
            raise auth_error(self.config.base_url, status, server_message(text), self.config.api_key_env,
                             bool(os.environ.get(self.config.api_key_env)))
        try:
            entries = json.loads(text).get("data") or []
            self.server.models = [str(m.get("id")) for m in entries if isinstance(m, dict)]
            self.server.owned_by = next((m.get("owned_by") for m in entries
                                         if isinstance(m, dict) and m.get("id") == self.config.model), None)
        except (ValueError, AttributeError):
            pass

    async def _probe_post(self, extra: dict, endpoint: str = "chat/completions", fatal: bool = True) -> dict | None:
        payload = {"model": self.config.model, "messages": [{"role": "user", "content": PROBE_PROMPT}],
                   "max_tokens": 1, "temperature": 0.0, **extra}
        if endpoint == "completions":
            payload.pop("messages")
        delay = self.config.backoff
        for attempt in range(PROBE_TRIES):
            try:
                return await self._post(payload, endpoint)
            except RequestError as err:
                if fatal:
                    await self._fatal(err)
                if err.status in (400, 422):
                    for name in rejected_fields(str(err), list(extra)):
                        self.server.reject(name)
                if not err.retryable or attempt == PROBE_TRIES - 1:
                    return None
                # A busy server's 5xx or timeout says nothing of what it accepts: ask again.
                await asyncio.sleep(min(delay, self.config.max_backoff))
                delay *= 2
        return None

    async def _accepts(self, extra: dict) -> bool:
        return await self._probe_post(extra) is not None

    async def _holds_schema(self, name: str) -> bool:
        """Whether the server takes a JSON Schema in field ``name`` and holds the reply to it (a
        server that accepts the field but ignores it answers "Say OK." with "OK", not JSON)."""
        body = await self._probe_post({**schema_payload(name, PROBE_SCHEMA), "max_tokens": 4})
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
                    print(f"warning: cannot load a tokenizer from the model folder {source} ({type(err).__name__}: "
                          f"{err}); a prefilled reply is asked for in the prompt instead (set llm.tokenizer to "
                          "the served model's folder)", file=sys.stderr)
        return self._tokenizer

    def _turn_end(self) -> str | None:
        """The text that ends a user's turn in the served model's template (read once: a stop of every
        request that has the model write a user's turn)."""
        if self._user_turn_end is _UNSET:
            self._user_turn_end = end_of_user_turn(self._chat_template())
        return self._user_turn_end

    def _render(self, conv: Conversation) -> str:
        return self._chat_template().apply_chat_template(conv, tokenize=False, continue_final_message=True)

    # -- generation ---------------------------------------------------------------------------
    def generate(self, requests: list[Request], on_reply: OnReply | None = None) -> list[Completion]:
        if self.config.batch:
            from .batch_api import BatchRunner

            return self._run(BatchRunner(self).generate(requests, on_reply))
        return self._run(self._generate_all(requests, on_reply))

    async def _ready(self) -> None:
        self._open()
        if self.config.check_server and not self.server.probed:
            await self._probe()  # a backend built in another process (a Ray worker) learns on its own

    async def _generate_all(self, requests: list[Request], on_reply: OnReply | None):
        await self._ready()
        deliver = _Delivery(on_reply)

        async def one(i: int, request: Request) -> Completion:
            completion = await self._complete(request.messages, request.params)
            deliver.add(i, completion)
            return completion

        tasks = [asyncio.ensure_future(one(i, r)) for i, r in enumerate(requests)]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # a fatal error (bad key, unknown model) or a cancel: stop the rest
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            deliver.flush()  # what did arrive is kept
            raise
        deliver.flush()
        return results

    def _payload(self, conv: Conversation, params: GenerationParams, n: int, seed: int) -> dict:
        server = self.server
        native = False
        if params.tools:
            native = self._native(conv, params)
            if not native and not _in_prompt(conv, params.tools):
                # Sent natively by the LLM path, but the server refused tools (or a prefill continues
                # a reply): the tools go in the prompt, the reply held to the schema.
                conv = prompt_messages(conv, _tool_list(params.tools))
        prefix = split_prefill(conv)[1]
        payload = {"model": self.config.model, "messages": conv, "temperature": params.temperature,
                   "top_p": params.top_p, "max_tokens": params.max_tokens, "seed": seed}
        if n != 1:
            payload["n"] = n
        if params.stop:
            payload["stop"] = list(params.stop)
        if writes_user(conv):
            payload["prompt"] = render_user_turn(self._chat_template(), conv)
            del payload["messages"]
            end = self._turn_end()
            if end and end not in params.stop:
                payload["stop"] = list(params.stop) + [end]
        elif prefix is not None:
            if server.prefill == "native":
                payload.update(continue_final_message=True, add_generation_prompt=False)
            elif server.prefill == "completions":
                payload["prompt"] = self._render(conv)
                del payload["messages"]
            else:
                payload["messages"] = emulate_prefill(conv, prefix)
        if native:
            # No JSON Schema: the server's own tool parser turns the model's calls into tool_calls.
            payload.update(messages=native_messages(conv), tools=_tool_list(params.tools),
                           tool_choice=params.tool_choice)
        elif params.json_schema and server.json_schema:
            payload.update(schema_payload(server.json_schema, json.loads(params.json_schema)))
        elif params.regex and server.regex:
            payload[server.regex] = {"regex": params.regex} if server.regex == "structured_outputs" else params.regex
        for name in server.rejected:
            payload.pop(name, None)
        return payload

    def sample_asks(self, params: GenerationParams) -> list[tuple[int, int]]:
        """``(n, seed)`` of the requests that get a conversation's ``params.n`` samples."""
        if params.n > 1 and self.server.n is False:
            return [(1, params.seed + k) for k in range(params.n)]  # the server ignores `n`: one sample each
        return [(params.n, params.seed)]

    def completion(self, conv: Conversation, params: GenerationParams, bodies: list[tuple[dict, int]]) -> Completion:
        """The completion of one conversation from its replies' bodies (each with the samples it asked for)."""
        texts: list[str] = []
        finishes: list[str] = []
        prompt_tokens = completion_tokens = 0
        # Read after the replies, like the prefill below: a server that refused tools on this request
        # answered the resent one, with the tools in the prompt, in text.
        native = self._native(conv, params) if params.tools else None
        for body, want in bodies:
            usage = body.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or prompt_tokens)
            completion_tokens += int(usage.get("completion_tokens") or 0)
            choices = body["choices"][:want]
            texts += [_text(choice) if native is None else _tool_reply(choice, native) for choice in choices]
            finishes += [choice.get("finish_reason") or "unknown" for choice in choices]
        texts, finishes = texts[:params.n], finishes[:params.n]
        prefix = split_prefill(conv)[1]
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

    async def _complete(self, conv: Conversation, params: GenerationParams,
                        bodies: list[tuple[dict, int]] | None = None) -> Completion:
        """One conversation's ``params.n`` samples (``bodies``: replies already in hand, with the
        samples each asked for)."""
        bodies = list(bodies or [])
        have = sum(min(len(body["choices"]), want) for body, want in bodies)
        asks = self.sample_asks(params) if not bodies else []
        while True:
            if len(asks) == 1:  # the usual case: no gather, no frame more (they cost what the request does)
                n, seed = asks[0]
                try:
                    results = [(await self._post_with_retries(lambda: self._payload(conv, params, n, seed)), n)]
                except RequestError as err:
                    results = [self.failed(err)]
            else:
                results = await asyncio.gather(*(self._ask(conv, params, n, seed) for n, seed in asks))
            for result in results:
                if isinstance(result, Completion):
                    self.stats.failures += 1
                    return result
                body, want = result
                if want > 1 and len(body["choices"]) < want:
                    self.server.n = False  # remember: ask one sample per request from now on
                bodies.append(result)
                have += min(len(body["choices"]), want)
            if have >= params.n:
                return self.completion(conv, params, bodies)
            # Fewer samples than asked for: ask for the rest, each with a seed of its own.
            asks = [(1, params.seed + have + k) for k in range(params.n - have)]

    async def _ask(self, conv: Conversation, params: GenerationParams, n: int,
                   seed: int) -> tuple[dict, int] | Completion:
        """One request's body and how many samples it asked for, or the failed Completion."""
        try:
            return await self._post_with_retries(lambda: self._payload(conv, params, n, seed)), n
        except RequestError as err:
            return self.failed(err)

    def failed(self, err: "RequestError") -> Completion:
        """The completion of a request that failed for good."""
        if err.status in (400, 413) and is_too_long(str(err)):
            return Completion([], error=f"the prompt does not fit the model's context: {err}", error_reason="too_long")
        tries = f" (after {self.config.max_retries} retries)" if err.retryable else ""
        return Completion([], error=f"{err.reason}: {err}{tries}")

    async def _post_with_retries(self, build) -> dict:
        delay = self.config.backoff
        attempt = 0
        while True:
            payload = build()
            try:
                return await self._post(payload, "completions" if "prompt" in payload else "chat/completions")
            except RequestError as err:
                if "tools" in payload and refuses_tools(err.status, str(err)):
                    self._tools_refused(str(err))  # the next build puts the tools in the prompt
                    self.stats.count_retry("unsupported_field")
                    continue
                refused = rejected_fields(str(err), [k for k in payload if k not in ("model", "messages")]) \
                    if err.status in (400, 422) else []
                if refused:
                    # The server does not take these fields: never send them again, resend now.
                    for name in refused:
                        self.server.reject(name)
                    self.stats.count_retry("unsupported_field")
                    continue
                await self._fatal(err)
                if attempt >= self.config.max_retries or not err.retryable:
                    raise
                attempt += 1
                self.stats.count_retry(err.reason)
                wait = err.retry_after if err.retry_after is not None else delay * (1 + random.random() * 0.25)
                await asyncio.sleep(min(wait, self.config.max_backoff))
                delay = min(delay * 2, self.config.max_backoff)

    async def _fatal(self, err: "RequestError") -> None:
        """Errors no request can get past (bad key, unknown model) stop the run with the fix."""
        if err.status in (401, 403):
            raise auth_error(self.config.base_url, err.status, str(err), self.config.api_key_env,
                             bool(os.environ.get(self.config.api_key_env)))
        if err.status == 404:
            await self._list_models()
            if self.server.models and self.config.model in self.server.models:
                raise BackendError(f"POST {self.config.base_url.rstrip('/')}/chat/completions is not found ({err}) "
                                   "although the server lists the model; llm.base_url should end in /v1")
            raise model_error(self.config.base_url, self.config.model, str(err), self.server.models)

    # -- the wire ---------------------------------------------------------------------------------
    async def _post(self, payload: dict, endpoint: str = "chat/completions") -> dict:
        """One chat (or completions) request: its body, or :class:`RequestError`. It goes when the
        rate limiter lets it, and again after each 429 (throttling: counted and waited out, never a
        retry)."""
        limiter = self._limits()
        data = _encode(payload).encode()
        tokens = limiter.estimate(len(data), payload.get("max_tokens") or 0, payload.get("n") or 1)
        retry: Ticket | None = None
        while True:
            ticket = await limiter.acquire(tokens, retry=retry)
            try:
                status, headers, raw = await self._send("POST", endpoint, data)
                seen = limiter.observe(ticket, headers, status)
                if status == 429:
                    message = server_message(_decode(raw))
                    if is_quota(message):
                        raise quota_error(self.config.base_url, message, self.config.api_key_env)
                    self.stats.count_throttled()
                    retry = limiter.refused(ticket, seen)
                    continue
                if status in RETRY_STATUSES:
                    raise RequestError(f"http_{status}", f"HTTP {status}", _retry_after(headers.get("retry-after")),
                                       status=status)
                if status >= 400:
                    # Other 4xx will not get better by retrying: fail the request.
                    raise RequestError(f"http_{status}", f"HTTP {status}: {server_message(_decode(raw))}",
                                       retryable=False, status=status)
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise RequestError("bad_body", f"the reply is not JSON: {raw[:80]!r}") from None
                if not isinstance(body, dict) or not body.get("choices"):
                    raise RequestError("empty_choices", "the reply has no choices")
                try:
                    for choice in body["choices"]:
                        _text(choice)
                except (KeyError, TypeError, AttributeError):
                    raise RequestError("bad_body", "a choice has no message content") from None
                usage = body.get("usage")
                usage = usage if isinstance(usage, dict) else {}
                limiter.succeeded(ticket, int(usage.get("prompt_tokens") or 0),
                                  int(usage.get("completion_tokens") or 0), len(data))
                return body
            finally:
                limiter.release(ticket)

    async def _send(self, method: str, path: str, data=None):
        """One HTTP exchange (``data``: JSON bytes, or a form): ``(status, headers, body bytes)``, or
        :class:`RequestError` when no answer came (timeout, refused or dropped connection), its
        ``cause`` the error that says why."""
        import aiohttp

        self.stats.requests += 1
        try:
            async with self._endpoint.session().request(method, self._base + path, data=data,
                                                        headers=_JSON_HEADERS if isinstance(data, bytes) else None,
                                                        timeout=self._timeout) as response:
                return response.status, response.headers, await response.read()
        except asyncio.TimeoutError as err:
            raise RequestError("timeout", f"no answer within {self.config.timeout}s ({type(err).__name__})",
                                cause=connection_error(self.config.base_url, err)) from None
        except aiohttp.ClientError as err:
            cause = connection_error(self.config.base_url, err)
            raise RequestError("connection", str(cause), cause=cause) from None


class _Delivery:
    """Hands replies to ``on_reply`` once per turn of the event loop, all that became ready in it
    together: one journal write for many replies, with no reply kept waiting for another."""

    def __init__(self, on_reply: OnReply | None):
        self.on_reply = on_reply
        self.ready: list = []
        self.scheduled = False

    def add(self, i: int, completion: Completion) -> None:
        if self.on_reply is None:
            return
        self.ready.append((i, completion))
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        if self.ready:
            ready, self.ready = self.ready, []
            self.on_reply(ready)


def _text(choice: dict) -> str:
    """A choice's text: ``message.content`` (chat) or ``text`` (completions)."""
    if "message" in choice:
        return choice["message"].get("content") or ""
    return choice["text"] or ""


def _tool_reply(choice: dict, native: bool) -> str:
    """A choice's text for a request with tools: the reply JSON of its ``tool_calls`` (arguments as
    objects where they parse, as the reply schema has them), an answer for a native reply's content,
    or the text the model wrote with the tools in its prompt."""
    message = choice.get("message")
    if not isinstance(message, dict) or not (native or message.get("tool_calls")):
        return _text(choice)
    return native_reply_text(message)


@lru_cache(maxsize=64)
def _tools_of(text: str) -> tuple:
    tools = json.loads(text)
    return tools, tools_prompt(tools)


def _tool_list(text: str) -> list[dict]:
    """The tool definitions of a request (``params.tools``, JSON text), read once per text."""
    return _tools_of(text)[0]


def _in_prompt(conv: Conversation, tools_text: str) -> bool:
    """Whether the tools are already written into the chat's system prompt (the LLM path does it for
    a server that does not take them; :func:`factory.llm.tool_format.prompt_messages` ends the system prompt so)."""
    first = conv[0] if conv else {}
    return first.get("role") == "system" and str(first.get("content") or "").endswith(_tools_of(tools_text)[1])


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
