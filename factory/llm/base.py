"""The one interface every LLM backend implements.

A backend takes a list of requests -- a chat conversation and its generation parameters,
the sampling seed included -- and returns, per request, ``n`` texts and token counts,
reporting each reply as soon as it is ready. Batching, padding, retries and concurrency are
the backend's business; steps only say what to ask and how to read the answer, and the
one LLM path (:mod:`factory.llm.requests`) sits between the two.

A conversation whose last message has role ``assistant`` is a *prefill*: the backend
continues that message instead of starting a new one, and returns only the continuation.
A conversation whose last message is an *open user turn* (:func:`user_turn`, Magpie) asks the
model to write the user's message: the backend renders the chat template up to the start of
that turn, lets the model go on, and stops at the end of the turn
(:mod:`factory.llm.chat_template`); a backend that cannot says so (:attr:`Backend.writes_user_turns`).

Every reply comes with why it ended (its *finish reason*): ``stop`` (the model ended it, or a
stop string did), ``length`` (it hit ``max_tokens``: the reply is cut), or a server's own
value (``abort``, ``content_filter``...). Steps drop cut replies unless told otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

LENGTH = "length"  # the finish reason of a reply cut at max_tokens

Message = dict[str, Any]  # role and content; an open user turn also has "open": True
Conversation = list[Message]


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters shared by every backend."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int = 0
    regex: str | None = None  # structured decoding: replies must match (vLLM, vLLM servers); others ignore it
    # Structured output: the canonical JSON text of a JSON Schema replies must match. Backends that
    # can enforce it while decoding do (:attr:`Backend.enforces_schema`); the LLM path checks every
    # reply either way and asks again about the ones that do not match.
    json_schema: str | None = None
    # Tool use: the canonical JSON text of the OpenAI tool definitions the model may call, and
    # ``tool_choice`` (``auto``, or ``none`` for an answer in text). A backend that takes tools natively
    # (:meth:`Backend.takes_tools`: a server's ``tools`` field) gets them so; every other gets the chat
    # rewritten with the tools in its system prompt (:func:`factory.llm.tool_format.prompt_messages`) and holds
    # the reply to ``json_schema``. Replies are JSON either way (:func:`factory.llm.tool_format.read_reply`).
    tools: str | None = None
    tool_choice: str = "auto"
    # How many times the LLM path asks the model to go on with a reply cut at max_tokens (it
    # is not sent to backends, and not part of the sampling key: the first reply is the same).
    continuations: int = 0
    # The step's config option that set max_tokens (``feedback_max_tokens``...): the LLM path counts
    # cut replies by it, for the hint that names the option to raise. Never sent, hashed or compared
    # (not in the sampling key either): cache keys do not depend on it.
    max_tokens_option: str = field(default="max_tokens", compare=False)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def with_seed(self, seed: int) -> "GenerationParams":
        # A copy of the fields rather than dataclasses.replace or the frozen __init__ (one
        # object.__setattr__ per field): this runs for every request.
        params = object.__new__(GenerationParams)
        fields = params.__dict__
        fields.update(self.__dict__)
        fields["seed"] = seed
        return params

    def sampling_key(self) -> tuple:
        """Everything but the seed: requests with equal keys can share a batch."""
        return (self.n, self.temperature, self.top_p, self.max_tokens, self.stop, self.regex) + \
            ((self.json_schema,) if self.json_schema else ()) + \
            ((self.tools, self.tool_choice) if self.tools else ())  # cache keys of plain requests stay as they were


@dataclass(frozen=True)
class Request:
    """One conversation to answer, with the parameters to sample it with (seed included)."""

    messages: Conversation
    params: GenerationParams


def by_sampling(requests: list[Request]) -> list[tuple[GenerationParams, list[int]]]:
    """The requests' positions grouped by sampling parameters (all but the seed), in order of
    first appearance; each group comes with its first request's parameters."""
    groups: dict[tuple, tuple[GenerationParams, list[int]]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(request.params.sampling_key(), (request.params, []))[1].append(i)
    return list(groups.values())


@dataclass
class Completion:
    """The replies to one conversation.

    Attributes:
        texts: ``n`` replies (empty when ``error`` is set).
        prompt_tokens: tokens in the rendered prompt.
        completion_tokens: generated tokens over all ``n`` replies.
        error: why the request failed permanently, or None.
        error_reason: the drop reason recorded for rows whose request failed.
        finish_reasons: why each reply ended, one per text: ``stop``, ``length`` (cut at
            ``max_tokens``) or the server's own value; missing entries read as ``stop``.
    """

    texts: list[str]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_reason: str = "backend_error"
    finish_reasons: list[str] = field(default_factory=list)

    def finish(self, k: int = 0) -> str:
        """Why reply ``k`` ended."""
        return self.finish_reasons[k] if k < len(self.finish_reasons) else "stop"

    def cut(self, k: int = 0) -> bool:
        """Reply ``k`` ended at the token limit, mid-text."""
        return self.finish(k) == LENGTH

    def to_json(self) -> dict:
        # Explicit rather than dataclasses.asdict, which deep-copies and is slow per reply.
        return {"texts": list(self.texts), "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "error": self.error, "error_reason": self.error_reason,
                "finish_reasons": list(self.finish_reasons)}

    @classmethod
    def from_json(cls, data: dict) -> "Completion":
        return cls(**data)


@dataclass
class BackendStats:
    """Counters a backend keeps while it runs (reported in the manifest).

    Retries and throttled requests are also counted for the call under way (:func:`counting_call`),
    so that calls running side by side each report their own.
    """

    requests: int = 0
    retries: int = 0
    failures: int = 0
    retry_reasons: dict[str, int] = field(default_factory=dict)
    throttled: int = 0  # requests the server refused for its rate limits (429) and that went again
    completion_tokens: int = 0  # of the replies that came back (what a progress bar shows live)

    def count_retry(self, reason: str, count: int = 1) -> None:
        for stats in (self, _CALL.get()):
            if stats is not None:
                stats.retries += count
                stats.retry_reasons[reason] = stats.retry_reasons.get(reason, 0) + count

    def count_throttled(self) -> None:
        for stats in (self, _CALL.get()):
            if stats is not None:
                stats.throttled += 1


# The counters of the call under way, in this thread and in the tasks it starts (an event loop's
# tasks take the context of whoever scheduled them).
_CALL: contextvars.ContextVar[BackendStats | None] = contextvars.ContextVar("factory_call_stats", default=None)


@contextlib.contextmanager
def counting_call():
    """Counts the retries and throttled requests of the backend calls made inside (see BackendStats)."""
    stats = BackendStats()
    token = _CALL.set(stats)
    try:
        yield stats
    finally:
        _CALL.reset(token)


# Called with the seconds a model took to load, by :func:`announcing_load` (a progress bar that
# was open meanwhile leaves them out of its rate: see :func:`watching_loads`).
_LOAD_WATCHERS: list[Callable[[float], None]] = []


@contextlib.contextmanager
def watching_loads(callback: Callable[[float], None]):
    """Calls ``callback(seconds)`` each time a model loads inside (in this process)."""
    _LOAD_WATCHERS.append(callback)
    try:
        yield
    finally:
        _LOAD_WATCHERS.remove(callback)


@contextlib.contextmanager
def announcing_load(what: str):
    """A model loading, on a line of its own ("loading X ...") and its time on the next ("loaded in
    4.2s"), above any progress bar; whoever :func:`watching_loads` hears how long it took. The
    body may add to the second line by yielding it a list (``done.append("float32")``)."""
    import sys
    import time

    from tqdm.auto import tqdm

    tqdm.write(f"loading {what} ...", file=sys.stderr)
    began = time.perf_counter()
    done: list[str] = []
    yield done
    seconds = time.perf_counter() - began
    tqdm.write(f"loaded in {seconds:.1f}s" + (f" ({', '.join(done)})" if done else ""), file=sys.stderr)
    for callback in list(_LOAD_WATCHERS):
        callback(seconds)


# Called with ``(position, completion)`` pairs of the replies that are ready, as they become
# ready (a batch at a time, or one by one), so that they are cached before the others arrive.
OnReply = Callable[[list[tuple[int, Completion]]], None]


class Backend:
    """Base class of LLM backends.

    Subclasses set ``name`` and ``Config`` (a dataclass with a ``backend`` field) and
    implement :meth:`generate`. Loading is lazy: constructing a backend and computing its
    :attr:`model_id` must not load a model, so that a fully cached run loads none.
    """

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any):
        self.config = config
        self.stats = BackendStats()

    @property
    def model_id(self) -> str:
        """A string that identifies the weights that answer (part of cache keys)."""
        return str(getattr(self.config, "model", self.name))

    @property
    def enforces_schema(self) -> bool:
        """Whether replies are held to ``params.json_schema`` while they are decoded (else the LLM
        path only checks them, and asks again)."""
        return False

    @property
    def continues_replies(self) -> bool:
        """Whether a prefilled assistant turn is truly continued (so a cut reply can be asked
        to go on); known after the first request for servers that are probed."""
        return True

    @property
    def writes_user_turns(self) -> bool:
        """Whether the backend can have the model write a user's turn (:func:`user_turn`): it applies
        the chat template itself, so the model can go on from the start of a user turn."""
        return False

    def takes_tools(self) -> bool:
        """Whether requests with ``params.tools`` go to the model natively (a server's ``tools``
        field, its ``tool_calls`` read back as the reply JSON); False: the LLM path writes the tools
        into the chat (:func:`factory.llm.tool_format.prompt_messages`) before the backend sees it."""
        return False

    @property
    def batched(self) -> bool:
        """Whether a call answers a whole step's requests at once, late (a Batch API): the driver then
        gives it the step's rows as one batch."""
        return False

    def parallel_calls(self, requests_per_call: int) -> int:
        """How many :meth:`generate` calls of about ``requests_per_call`` requests are worth running
        at once, from as many threads (1: the backend answers one call at a time)."""
        return 1

    def attach(self, cache) -> None:
        """The run's cache, for a backend that keeps state of its own there (batch ids)."""

    def set_share(self, share: float) -> None:
        """This process's share of a server's rate limits (1 / the replicas that send to it)."""

    def live(self) -> dict:
        """What the progress bar shows while the backend works (throttling, limits learned)."""
        return {}

    def describe(self) -> dict:
        """What the manifest records about this backend."""
        return {"backend": self.name, "model": getattr(self.config, "model", None),
                "adapter": getattr(self.config, "adapter", None), "model_id": self.model_id,
                "enforces_schema": self.enforces_schema}

    def check(self) -> None:
        """Cheap checks before a run starts (files exist, server reachable).

        Raises:
            FactoryError: with the fix, when the backend cannot work.
        """

    def generate(self, requests: list[Request], on_reply: OnReply | None = None) -> list[Completion]:
        """Answers every request, in order.

        Args:
            requests: what to ask; each request's ``params.seed`` seeds its sampling.
            on_reply: called with the ``(position, completion)`` pairs that are ready, as soon
                as they are (see :data:`OnReply`).
        """
        raise NotImplementedError

    def chat(self, conversations: list[Conversation], params: GenerationParams) -> list[Completion]:
        """The same parameters for every conversation (seeds ``params.seed + i``)."""
        return self.generate([Request(c, params.with_seed(params.seed + i)) for i, c in enumerate(conversations)])

    def close(self) -> None:
        """Frees the model or connections."""


def user_turn(prefix: str = "") -> dict:
    """The last message of a conversation that asks the model to write the user's turn (Magpie),
    beginning with ``prefix``."""
    return {"role": "user", "content": prefix, "open": True}


def writes_user(conversation: Conversation) -> bool:
    """Whether ``conversation`` ends with an open user turn (see :func:`user_turn`)."""
    return bool(conversation) and conversation[-1].get("role") == "user" and conversation[-1].get("open") is True


def split_prefill(conversation: Conversation) -> tuple[Conversation, str | None]:
    """Splits a trailing assistant message (a prefill) from a conversation."""
    if conversation and conversation[-1].get("role") == "assistant":
        return conversation[:-1], conversation[-1].get("content", "")
    return conversation, None


def continued(conversation: Conversation, reply: str) -> Conversation:
    """The conversation that asks the model to go on with ``reply`` (the continuation of the
    conversation's prefill, if it has one): its assistant turn holds all that came so far."""
    messages, prefill = split_prefill(conversation)
    return messages + [{"role": "assistant", "content": (prefill or "") + reply}]


def trim_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """Cuts ``text`` at the first stop string (OpenAI semantics: the stop is not included)."""
    cut = len(text)
    for s in stop:
        if s:
            pos = text.find(s)
            if pos != -1:
                cut = min(cut, pos)
    return text[:cut]
