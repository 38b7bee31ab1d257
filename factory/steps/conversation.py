"""``conversation``: multi-turn chats between the step's model and a simulated user (UltraChat-style).

A chat starts from a first user message (a column) or, for a row with a persona and a goal, from
a first message the simulated user writes. Then the assistant (the step's ``llm``) answers and the
simulated user (``user_llm``, by default the same model, with its own prompt) writes the next
message, for ``turns`` assistant turns or until the user says it is done (``stop_phrase``). Each
turn is one round of requests over every chat of the batch still going. The simulated user's
replies are cleaned here (:func:`clean_user_reply`): labels and quotes go, a reply that is empty
or speaks as the assistant drops the row.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ..config import option
from ..errors import ParseError
from ..llm.base import Completion, GenerationParams, Request, user_turn
from ..llm.requests import ToLLM
from .drops import CUT, TRUNCATED, InvalidRow, dropped
from .llm_step import LLMStep, LLMStepConfig
from .magpie import require_user_turns, template_echo, tokenizer_problems
from .prompts import compile_template
from .truncation import truncation_detail

USER = "user"  # the simulated user's name among the step's models (LLMSession.extras, ToLLM)
# A simulated user's message is one paragraph (the prompt asks for one to three sentences; small
# models ramble on, or go on to write the assistant's answer): it ends at the first blank line.
USER_STOP = ("\n\n", "\nAssistant:")

# A label the simulated user may put before its message ("User:", "**Human:**", "User (you):").
_USER_LABEL = re.compile(r"^\s*[*_]*\s*(?:user|human|me|customer)(?:\s*\(you\))?\s*[*_]*\s*:\s*[*_]*\s*", re.I)
# The simulated user went on to write the assistant's part: everything from there goes.
_ASSISTANT_LINE = re.compile(r"\n\s*[*_]*\s*(?:assistant|ai|bot)\s*[*_]*\s*:", re.I)
# A reply that is the assistant speaking, not a user.
_AS_ASSISTANT = re.compile(
    r"^\s*[*_]*\s*(?:assistant|ai|bot)\s*[*_]*\s*:|how (?:can|may) i (?:help|assist) you|"
    r"\bi(?:'m| am) (?:an ai\b|a language model|an? (?:ai |virtual )?assistant|here to help)|"
    r"as an ai (?:language model|assistant)",
    re.I)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u00ab": "\u00bb"}


def clean_user_reply(reply: str, stop_phrase: str) -> str | None:
    """The simulated user's message in ``reply``, or None when the user says it is done (the
    reply holds ``stop_phrase``, any case). A "User:" label, quotes around the whole message and
    an assistant's part the model went on to write are taken away.

    Raises:
        ParseError: ``user_reply_as_assistant`` when the reply speaks as the assistant,
            ``user_reply_empty`` when nothing is left.
    """
    if stop_phrase.lower() in reply.lower():
        return None
    text = reply.strip()
    if not _AS_ASSISTANT.match(text):  # a reply that starts as the assistant is dropped below, whole
        text = _ASSISTANT_LINE.split(text, maxsplit=1)[0].strip()
    if _AS_ASSISTANT.search(text):
        raise ParseError("the simulated user's reply speaks as the assistant", reason="user_reply_as_assistant")
    while _USER_LABEL.match(text):
        text = _USER_LABEL.sub("", text, count=1).strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    if not text:
        raise ParseError("the simulated user's reply is empty", reason="user_reply_empty")
    return text


@dataclass
class ConversationConfig(LLMStepConfig):
    column: str = option("instruction", help="The first user message; a row without it starts from its persona "
                                             "and goal, with a first message the simulated user writes.")
    persona_column: str = option("persona", help="Who the simulated user is (shown to it).")
    goal_column: str = option("goal", help="What the simulated user wants from the chat (shown to it).")
    goal: str | None = option(None, help="The goal of rows without a `goal_column` value: text, or a Jinja template "
                                         "over the row's columns (e.g. 'understand {{ topic }} well enough to "
                                         "explain it').")
    turns: int = option(3, help="Assistant turns per chat (fewer when the user says it is done).", min=1, max=50)
    stop_phrase: str = option("[DONE]", help="What the simulated user writes when its goal is met: the chat ends "
                                             "there, without that message.")
    user_llm: dict | None = option(None, help="The simulated user's backend, merged over the recipe's `llm` "
                                              "(default: the recipe's model).")
    user_template: str | None = option(None, help="The simulated user's prompt, a Jinja template (inline or a .j2 "
                                                  "file); variables: persona, goal, transcript (the messages so far, "
                                                  "role and content), stop_phrase and the row's columns.")
    user_mode: Literal["prompt", "magpie"] = option(
        "prompt", help="How the simulated user writes: `prompt` asks the user model, with `user_template`, for the "
                       "next message; `magpie` has it write the user's turn itself from its chat template after the "
                       "chat so far (Magpie), with `user_system` (the persona and goal) as the system prompt: more "
                       "natural follow-ups from small aligned models; needs a backend that applies the template here "
                       "(transformers, vllm, or a server with llm.tokenizer); the chat runs all `turns`.")
    user_system: str | None = option(None, help="With user_mode: magpie, the system prompt the user model sees, a "
                                                "Jinja template (variables: persona, goal and the row's columns).")
    user_temperature: float = option(0.8, help="The simulated user's sampling temperature.", min=0.0, max=5.0)
    user_max_tokens: int = option(128, help="Most tokens per simulated user message (a longer one drops the "
                                            "row as `truncated`).", min=1)
    temperature: float = option(0.7, help="The assistant's sampling temperature; 0 is greedy.", min=0.0, max=5.0)
    top_p: float = option(0.95, help="Nucleus sampling mass.", min=0.0, max=1.0)
    max_tokens: int = option(512, help="Most tokens per assistant reply.", min=1)
    output_column: str = option("messages", help="Where the chat goes (system first if any, then user and "
                                                 "assistant messages in turn).")
    turns_column: str = option("turns", help="Where the number of assistant turns goes.")
    template: str | None = option(None, help="Not used: the assistant sees the chat itself (the first message "
                                             "comes from `column`, the user's prompt from `user_template`).")

    def validate(self):
        problems = []
        if self.template is not None:
            problems.append(("the conversation step has no `template`: the assistant sees the chat itself",
                             "template", "set the first message with `column:`, or the user's prompt with "
                                         "`user_template:`"))
        if not self.stop_phrase.strip():
            problems.append(("stop_phrase is empty", "stop_phrase", "use a phrase no message holds, e.g. [DONE]"))
        return problems


@dataclass
class Chat:
    """One row's chat while it runs: its messages so far, and how it ended."""

    row: dict
    persona: str = ""
    goal: str = ""
    messages: list[dict] = field(default_factory=list)
    needs_opening: bool = False  # the simulated user writes the first message
    failed: dict | None = None  # the row, dropped
    stopped: bool = False  # the user said it is done
    cut: bool = False  # an assistant reply kept though cut (on_truncation: keep)

    @property
    def going(self) -> bool:
        return self.failed is None and not self.stopped

    @property
    def assistant_turns(self) -> int:
        return sum(m["role"] == "assistant" for m in self.messages)

    def transcript(self) -> list[dict]:
        return [m for m in self.messages if m["role"] != "system"]

    def fail(self, step, reason: str, turn: int, detail: str, reply: str | None = None) -> None:
        so_far = {step.config.output_column: self.messages, step.config.turns_column: self.assistant_turns} \
            if self.transcript() else {}
        self.failed = dropped({**self.row, **so_far}, reason, f"turn {turn}: {detail}", reply)


class Conversation(LLMStep):
    """Multi-turn chats: the step's model answers, a simulated user (``user_llm``) follows up.

    Requires: the first user message (``instruction``), or a ``persona`` and a goal (the ``goal``
    column or option) from which the simulated user writes it.
    Produces: ``messages`` (the whole chat: system first if any, then user and assistant in turn,
    ending with the assistant) and ``turns`` (assistant turns). A failed request, an assistant reply
    cut at max_tokens (see ``on_truncation``) or empty, and a simulated user reply that is empty,
    cut or speaks as the assistant drop the row with the reason and ``turn N:`` in the detail
    (``user_reply_empty``, ``user_reply_as_assistant``, ``truncated``...), its raw reply kept.

    Example:
        - conversation: {turns: 3, user_llm: {model: user-sim}, system: "You are a helpful assistant."}
        - conversation: {turns: 4, goal: "plan a trip to Lisbon on a small budget"}
    """

    name = "conversation"
    Config = ConversationConfig
    templates: ClassVar[dict[str, str]] = {"user_template": "conversation_user", "user_system": "conversation_user_system"}
    extra_llms: ClassVar[dict[str, str]] = {USER: "user_llm"}  # the simulated user's model, from option user_llm

    def produces(self):
        return [self.config.output_column, self.config.turns_column]

    def check_llm(self, llm):
        return tokenizer_problems(self.extra_llm_configs.get(USER), ("user_llm", "tokenizer")) \
            if self.config.user_mode == "magpie" else []

    def check_backend(self, backend, llm=None):
        if llm == USER and self.config.user_mode == "magpie":
            require_user_turns(self, backend)

    def user_request(self, chat: Chat) -> Request:
        c = self.config
        if c.user_mode == "magpie":
            system = self.render(chat.row, "user_system", persona=chat.persona, goal=chat.goal)
            params = GenerationParams(temperature=c.user_temperature, top_p=c.top_p, max_tokens=c.user_max_tokens,
                                      max_tokens_option="user_max_tokens")
            return Request([{"role": "system", "content": system}, *chat.transcript(), user_turn()], params)
        prompt = self.render(chat.row, "user_template", persona=chat.persona, goal=chat.goal,
                             transcript=chat.transcript(), stop_phrase=c.stop_phrase)
        params = GenerationParams(temperature=c.user_temperature, top_p=c.top_p, max_tokens=c.user_max_tokens,
                                  stop=USER_STOP, max_tokens_option="user_max_tokens")
        return Request([{"role": "user", "content": prompt}], params)

    def exchange(self, rows, ctx):
        chats = [start_chat(self, row) for row in rows]
        opening = [chat for chat in chats if chat.needs_opening and chat.going]
        if opening:
            replies = yield ToLLM(USER, [self.user_request(chat) for chat in opening])
            for chat, completion in zip(opening, replies):
                take_user_reply(self, chat, completion, 1)
        params = self.generation_params()
        for turn in range(1, self.config.turns + 1):
            going = [chat for chat in chats if chat.going]
            if not going:
                break
            replies = yield [Request(list(chat.messages), params) for chat in going]
            for chat, completion in zip(going, replies):
                take_assistant_reply(self, chat, completion, turn)
            going = [chat for chat in chats if chat.going]
            if turn == self.config.turns or not going:
                break
            replies = yield ToLLM(USER, [self.user_request(chat) for chat in going])
            for chat, completion in zip(going, replies):
                take_user_reply(self, chat, completion, turn + 1)
        return [finished_row(self, chat) for chat in chats]


@functools.lru_cache(maxsize=16)
def compile_goal(source: str):
    """The ``goal`` option as a template (plain text renders as itself)."""
    return compile_template(source)


def start_chat(step: Conversation, row: dict) -> Chat:
    """A row's chat before the first round: its first message, or the persona and goal to write it from."""
    c = step.config
    persona = row.get(c.persona_column)
    goal = row.get(c.goal_column)
    failed = None
    if not (isinstance(goal, str) and goal.strip()):
        try:
            goal = compile_goal(c.goal or "").render(**row)
        except Exception as err:  # noqa: BLE001 - jinja2's UndefinedError and friends: the row lacks a column
            goal, failed = "", dropped(row, "invalid_input", f"the `goal` template cannot be filled from this row: "
                                                             f"{err}")
    chat = Chat(row, persona.strip() if isinstance(persona, str) else "", goal.strip())
    chat.messages = [{"role": "system", "content": c.system}] if c.system else []
    if failed is not None:
        chat.failed = failed
        return chat
    if row.get(c.column) is not None:
        try:
            chat.messages.append({"role": "user", "content": step.text(row, c.column)})
        except InvalidRow as err:
            chat.failed = dropped(row, "invalid_input", str(err))
    elif chat.persona and chat.goal:
        chat.needs_opening = True
    else:
        chat.failed = dropped(row, "invalid_input", f"no '{c.column}' to start the chat from, and no persona "
                                                    f"('{c.persona_column}') and goal ('{c.goal_column}' or the "
                                                    "`goal` option) for the simulated user to start it")
    return chat


def take_assistant_reply(step: Conversation, chat: Chat, completion: Completion, turn: int) -> None:
    """The assistant's reply of ``turn`` added to the chat, or the row dropped (failed, cut, empty)."""
    if completion.error is not None:
        return chat.fail(step, completion.error_reason, turn, completion.error)
    reply = completion.texts[0]
    if completion.cut(0):
        if step.config.on_truncation != "keep":
            return chat.fail(step, TRUNCATED, turn, truncation_detail(step), reply)
        chat.cut = True
    if not reply.strip():
        return chat.fail(step, "parse_error", turn, "the assistant's reply is empty", reply)
    chat.messages.append({"role": "assistant", "content": reply.strip()})


def take_user_reply(step: Conversation, chat: Chat, completion: Completion, turn: int) -> None:
    """The simulated user's message before the assistant's ``turn`` added to the chat, or the chat
    ended (the stop phrase), or the row dropped (failed, cut, empty, written as the assistant)."""
    c = step.config
    if completion.error is not None:
        return chat.fail(step, completion.error_reason, turn, f"the simulated user's request: {completion.error}")
    reply = completion.texts[0]
    try:
        message = clean_user_reply(reply, c.stop_phrase)
        echo = template_echo(message, None) if message is not None and c.user_mode == "magpie" else None
    except ParseError as err:
        return chat.fail(step, err.reason, turn, str(err), reply)
    if echo:
        return chat.fail(step, "template_echo", turn, f"the simulated user's message {echo}", reply)
    if message is None:
        if turn == 1:  # a chat needs a first message
            return chat.fail(step, "user_reply_empty", turn, "the simulated user ended the chat before its "
                                                             f"first message ({c.stop_phrase})", reply)
        chat.stopped = True
        return None
    if completion.cut(0):
        return chat.fail(step, TRUNCATED, turn, "the simulated user's message stopped at the token limit "
                                                f"(user_max_tokens: {c.user_max_tokens} on {step.label}); "
                                                "raise user_max_tokens", reply)
    chat.messages.append({"role": "user", "content": message})


def finished_row(step: Conversation, chat: Chat) -> dict:
    """The row a chat gives: dropped, or with its messages and turns (and whether a reply was cut)."""
    if chat.failed is not None:
        return chat.failed
    c = step.config
    out = {**chat.row, c.output_column: chat.messages, c.turns_column: chat.assistant_turns}
    if c.on_truncation == "keep":
        out[TRUNCATED] = chat.cut
    if chat.cut:
        out[CUT] = True
    return out
