"""What an OpenAI-compatible server accepts, learned once per server, and how to read its errors.

Servers differ beyond the standard chat-completions fields: vLLM and SGLang continue a
prefilled assistant turn (``continue_final_message``) and constrain replies to a regex
(``structured_outputs``, ``guided_regex`` before); ``transformers serve`` and OpenAI's own API
reject any field they do not know (HTTP 400/422); some servers ignore ``n``; vLLM refuses
OpenAI's ``tools`` unless it was started with a tool-call parser. The backend
sends extensions only when it knows the server takes them (:class:`ServerInfo`), learns
the rest from the server's answers, and emulates what is missing, so a recipe runs
unchanged on any of them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..errors import BackendError
from .base import Conversation

PREFILL_FIELDS = ("continue_final_message", "add_generation_prompt")
REGEX_FIELDS = ("structured_outputs", "guided_regex")
# Fields that carry a JSON Schema: the standard one first, then vLLM's (newer, older).
JSON_SCHEMA_FIELDS = ("response_format", "structured_outputs", "guided_json")
# Fields a request may carry besides the model and the messages (the standard ones first).
OPTIONAL_FIELDS = ("n", "temperature", "top_p", "max_tokens", "stop", "seed", "response_format") + PREFILL_FIELDS + \
    REGEX_FIELDS + ("guided_json",)
# The JSON Schema of the probe that learns whether a server holds replies to a schema.
PROBE_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                "additionalProperties": False}

PROBE_PROMPT = "Say OK."  # the one-token requests that learn what a server accepts
# The one small tool of the probe that learns whether a server takes OpenAI's `tools` field.
PROBE_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The current time.",
                                                "parameters": {"type": "object", "properties": {}}}}
TOOL_FIELDS = ("tools", "tool_choice")
# What a server says when it refuses tools: vLLM without --enable-auto-tool-choice ('"auto" tool choice
# requires --enable-auto-tool-choice and --tool-call-parser to be set'), llama.cpp without --jinja ("tools
# param requires --jinja flag"), strict servers naming the fields.
TOOLS_REFUSED = re.compile(r"\btools?\b|tool[_ ]choice|tool[-_ ]call|function[-_ ]call", re.IGNORECASE)

TOO_LONG = re.compile(r"context length|context_length|maximum context|context window|too long|too many tokens|"
                      r"exceeds? the (?:model|max)|prompt is too|input length", re.IGNORECASE)


class RequestError(Exception):
    """A request to the server that did not succeed: why (``reason``, ``status``), whether to try
    again, and when the server said to; ``cause`` when no answer came at all (what to tell the user)."""

    def __init__(self, reason: str, message: str, retry_after: float | None = None, retryable: bool = True,
                 status: int | None = None, cause: BackendError | None = None):
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after
        self.retryable = retryable
        self.status = status
        self.cause = cause


@dataclass
class ServerInfo:
    """What the backend knows about its server; recorded in the manifest.

    Attributes:
        models: the model ids the server lists (None: it has no ``/models``).
        owned_by: the ``owned_by`` of the served model (``vllm``, ``sglang``...), when listed.
        prefill: ``native`` when the server continues a prefilled assistant turn;
            ``completions`` when the model's tokenizer is at hand and the server has
            ``/v1/completions`` (the chat template is applied here, the turn continued there);
            else ``emulated`` (the prefix is asked for in the prompt and cut from the reply).
        regex: the field that carries a regex constraint, or None (replies are parsed anyway).
        json_schema: the field that carries a JSON Schema the server enforces (``response_format``,
            ``structured_outputs``, ``guided_json``), or None (replies are checked and re-asked).
        n: whether the server returns ``n`` samples per request (None: not known yet).
        completions: whether the server answers ``/v1/completions`` (asked only when the model's
            tokenizer is at hand; None: not asked): a user's turn is written there (Magpie).
        rejected: fields the server refused by name; never sent again.
        identical_samples: the server returned identical samples at temperature > 0.
        tools: whether requests with tools go to the server natively (OpenAI's ``tools`` field, its
            ``tool_calls`` read back): learned by a one-token probe at the first such request (False too
            when the prompt counts no more tokens with a tool than without: the chat template drops them), or set
            by ``native_tools``; turned False when the server refuses tools on a request (None: not
            asked, no request had tools).
        probed: the server was asked what it accepts before the run.
    """

    models: list[str] | None = None
    owned_by: str | None = None
    prefill: str = "emulated"
    regex: str | None = None
    json_schema: str | None = None
    n: bool | None = None
    completions: bool | None = None
    rejected: list[str] = field(default_factory=list)
    identical_samples: bool = False
    tools: bool | None = None
    probed: bool = False

    def to_json(self) -> dict:
        return {"models": self.models[:20] if self.models else self.models, "owned_by": self.owned_by,
                "prefill": self.prefill, "regex": self.regex, "json_schema": self.json_schema, "n": self.n,
                "completions": self.completions, "rejected_fields": sorted(self.rejected),
                "identical_samples": self.identical_samples, "tools": self.tools, "probed": self.probed}

    def reject(self, name: str) -> None:
        """The server refused ``name``: stop sending it (and what depends on it)."""
        if name not in self.rejected:
            self.rejected.append(name)
        if name in PREFILL_FIELDS:
            self.prefill = "emulated"
        if name == self.regex:
            self.regex = None
        if name == self.json_schema:
            self.json_schema = None


def schema_payload(field: str, schema: dict) -> dict:
    """The request field that asks a server to hold the reply to ``schema``."""
    if field == "response_format":
        return {field: {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema,
                                                                "strict": is_strict(schema)}}}
    if field == "structured_outputs":
        return {field: {"json": schema}}
    return {field: schema}


def is_strict(schema: dict) -> bool:
    """Whether a schema meets OpenAI's strict mode (every object closed, every property
    required), so that the server may enforce it."""
    if not isinstance(schema, dict):
        return True
    if schema.get("type") == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        if schema.get("additionalProperties", True) is not False or set(schema.get("required") or ()) != set(props):
            return False
        return all(is_strict(p) for p in props.values())
    if schema.get("type") == "array":
        return is_strict(schema.get("items") or {})
    return True


def server_message(body: str) -> str:
    """The human part of an error body (OpenAI's ``error.message``, FastAPI's ``detail``...)."""
    try:
        data = json.loads(body)
    except ValueError:
        return " ".join(body.split())[:300]
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
        for key in ("detail", "message", "error"):
            if data.get(key):
                value = data[key]
                return (value if isinstance(value, str) else json.dumps(value))[:300]
    return " ".join(body.split())[:300]


def rejected_fields(message: str, sent: list[str]) -> list[str]:
    """The optional fields among ``sent`` that a 400/422 message names as not accepted."""
    lowered = message.lower()
    if not any(word in lowered for word in ("unexpected", "unrecognized", "unknown", "extra", "not permitted",
                                              "not allowed", "not supported", "unsupported", "invalid")):
        return []
    return [name for name in sent if name in OPTIONAL_FIELDS and re.search(rf"\b{re.escape(name)}\b", message)]


def refuses_tools(status: int | None, message: str) -> bool:
    """Whether an error answer to a request that carried ``tools`` says the server does not take
    them (a 400/422 that speaks of tools and not of the prompt's length)."""
    return status in (400, 422) and bool(TOOLS_REFUSED.search(message)) and not is_too_long(message)


def is_too_long(message: str) -> bool:
    """Whether an error message says the prompt (or prompt + max_tokens) exceeds the context."""
    return bool(TOO_LONG.search(message))


def emulate_prefill(conversation: Conversation, prefix: str) -> Conversation:
    """The conversation without its trailing assistant message, the prefix asked for in the
    last user message instead (for servers that cannot continue an assistant turn)."""
    head = [dict(m) for m in conversation[:-1]]
    ask = f"Your reply must begin with exactly the following text, which you then continue:\n{prefix}"
    if head and head[-1].get("role") == "user":
        head[-1]["content"] = f"{head[-1].get('content', '')}\n\n{ask}"
    else:
        head.append({"role": "user", "content": ask})
    return head


def continuation(reply: str, prefix: str) -> str:
    """What follows ``prefix`` in a reply asked to begin with it, in the shape a server that
    continues the assistant turn returns (the prefix itself is not repeated)."""
    text = reply.lstrip()
    candidates = [prefix.strip()]
    lines = [line.strip() for line in prefix.strip().splitlines() if line.strip()]
    if len(lines) > 1:
        candidates.append(lines[-1])  # a long prefix: the model often repeats only its last line
    for candidate in candidates:
        if candidate and text.startswith(candidate):
            return text[len(candidate):]
    if prefix and not prefix[-1].isspace() and text:
        return " " + text
    return text


def connection_error(base_url: str, err: Exception) -> BackendError:
    """A clear error for a server that cannot be reached: refused, unknown host, TLS, timeout."""
    causes, seen = [], err
    while seen is not None and len(causes) < 8:  # the client wraps the socket's error: read the chain
        causes.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    text = causes[0]
    # aiohttp names the TLS context in every connection error ("ssl:default"): not a TLS failure
    lowered = " | ".join(causes).lower().replace("ssl:default", "").replace("ssl:none", "")
    if "refused" in lowered or "errno 111" in lowered or "connect call failed" in lowered:
        return BackendError(f"nothing answers at {base_url} (connection refused); start the server or fix "
                            "llm.base_url")
    if "gaierror" in lowered or "dnserror" in lowered or any(s in lowered for s in (
            "name or service not known", "nodename nor servname", "name resolution", "getaddrinfo failed",
            "no address associated", "temporary failure in name")):
        return BackendError(f"cannot resolve the host of llm.base_url {base_url} ({text}); check the host name")
    if any(s in lowered for s in ("ssl", "certificate", "tls")):
        return BackendError(f"the TLS handshake with {base_url} failed ({text}); use http:// for a server without "
                            "TLS, or point SSL_CERT_FILE at the server's CA certificate")
    if "timeout" in lowered:
        return BackendError(f"the server at {base_url} did not answer in time ({text}); check that it is up, or "
                            "raise llm.timeout")
    return BackendError(f"cannot reach the OpenAI-compatible server at {base_url} ({text}); start the server or "
                        "fix llm.base_url")


def auth_error(base_url: str, status: int, message: str, env: str, key_set: bool) -> BackendError:
    key = f"${env} is set but the server refused it" if key_set else f"${env} is not set"
    return BackendError(f"the server at {base_url} answered HTTP {status} ({message}): {key}; put a valid API key "
                        f"in ${env} (or name another variable with llm.api_key_env)")


QUOTA = re.compile(r"insufficient_quota|exceeded your current quota|quota exceeded|billing|credit balance|"
                   r"out of credits|insufficient (?:credits|balance|funds)", re.IGNORECASE)


def is_quota(message: str) -> bool:
    """Whether a 429's message says the account is out of quota or credit (no wait will help),
    rather than that it asked too fast."""
    return bool(QUOTA.search(message))


def quota_error(base_url: str, message: str, env: str) -> BackendError:
    return BackendError(f"the server at {base_url} refused the request for the account's quota or credit, not its "
                        f"rate ({message}); add credit or raise the quota of the key in ${env}, then run the same "
                        "command again: the replies so far are cached")


def model_error(base_url: str, model: str, message: str, models: list[str] | None) -> BackendError:
    served = f"; it serves: {', '.join(models[:20])}" if models else ""
    return BackendError(f"the server at {base_url} has no model '{model}' (HTTP 404: {message}){served}; set "
                        "llm.model to a served name")
