"""``magpie``: instructions drawn from an aligned model's own chat template, with no seed (Xu et al., 2024).

The model gets its chat template rendered up to the start of a user turn (after a system prompt,
when there is one) and writes what comes next: a user's message, drawn from what it was aligned
on. Then, as an option, it answers as the assistant, and the two go on for ``turns`` exchanges
(Magpie-MT). The backend applies the template itself (:mod:`factory.llm.chat_template`):
``transformers`` and ``vllm`` here, an OpenAI-compatible server through ``/v1/completions`` with
the served model's tokenizer at hand. Magpie's known failures are dropped with a reason: a
message cut at ``max_tokens`` (``truncated``), an empty or very short one (``empty_instruction``,
``too_short``), and one that repeats the template's text instead of asking something
(``template_echo``: role labels, special tokens, the system prompt, "You are a helpful
assistant"). Refusals and repeats are left to the ``heuristics``, ``exact`` and ``minhash``
filters after it (see ``recipes/magpie.yaml``).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from dataclasses import dataclass

import polars as pl

from ..config import option
from ..errors import FactoryError, ParseError
from ..llm.base import Completion, Conversation, GenerationParams, Request, user_turn
from ..text import count_words, normalize
from .context import StepContext
from .drops import DROP, TRUNCATED, dropped, rows_to_frame
from .generate import template_variables
from .llm_step import LLMStep, LLMStepConfig
from .prompts import compile_template, is_template_path
from .truncation import continuations

MESSAGES_TYPE = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))

# Text of the template, not a question: special tokens, turn markers, a role label to start with.
_MARKUP = re.compile(r"<\|[A-Za-z_]+\|>|</?s>|\[/?INST\]|<(?:start|end)_of_turn>|<<\s*/?SYS\s*>>")
_ROLE_LABEL = re.compile(r"^\s*(?:#+\s*)?(?:user|assistant|system|human|gpt|instruction|response)\s*(?::|\n)", re.I)
_SELF_DESCRIPTION = re.compile(r"^\s*(?:you are|you're|i am|i'm)\s+(?:a|an)\s+(?:\w+\s+){0,2}?"
                               r"(?:ai|assistant|chatbot|language model)\b", re.I)
_ECHO_WORDS = 8  # a run of this many words of the system prompt in a message is an echo of it


@dataclass
class MagpieConfig(LLMStepConfig):
    num_rows: int = option(20, help="Conversations to write when the step has no input rows.", min=1)
    per_row: int = option(1, help="With input rows (personas, topics): conversations per row, each row's "
                                  "columns carried into its conversations.", min=1)
    system: str | None = option(None, help="The system prompt before the user's turn: a Jinja template over the "
                                           "input row's columns (e.g. 'You help {{ persona }}.') or a .j2 file. "
                                           "Unset: the chat template's own default, if it has one.")
    systems: list[str] = option(default_factory=list, help="System prompts, one drawn per conversation (seeded), "
                                                           "instead of `system`.")
    keep_system: bool = option(False, help="Put the system prompt into `messages` too (it is always in column "
                                           "`system`); training sets usually go without it.")
    temperature: float = option(1.0, help="Sampling temperature of the user's messages (Magpie uses 1.0; 0 would "
                                          "write the same message every time).", min=0.0, max=5.0)
    top_p: float = option(1.0, help="Nucleus sampling mass of the user's messages.", min=0.0, max=1.0)
    max_tokens: int = option(128, help="Most tokens per user message; a longer one is dropped as `truncated` "
                                       "(the message ends at the template's end-of-turn token, always a stop).",
                             min=1)
    min_words: int = option(3, help="Shorter user messages are dropped as `too_short`.", min=1)
    response: bool = option(True, help="Also write the assistant's answer to each user message.")
    turns: int = option(1, help="User/assistant exchanges per conversation (more than 1 needs `response`).",
                        min=1, max=16)
    response_temperature: float = option(0.0, help="Sampling temperature of the answers.", min=0.0, max=5.0)
    response_top_p: float = option(1.0, help="Nucleus sampling mass of the answers.", min=0.0, max=1.0)
    response_max_tokens: int = option(512, help="Most tokens per answer (see `on_truncation`).", min=1)
    column: str = option("instruction", help="Where the first user message goes.")
    response_column: str = option("response", help="Where the first answer goes.")

    def validate(self):
        problems = []
        if self.turns > 1 and not self.response:
            problems.append(("turns > 1 needs the answers", "turns", "set `response: true` or `turns: 1`"))
        if self.system is not None and self.systems:
            problems.append(("both `system` and `systems` are given", "systems", "keep one"))
        if self.template is not None:
            problems.append(("magpie has no prompt: the model writes the user's turn itself", "template",
                             "remove `template:`; shape the messages with `system:` or `systems:`"))
        if self.temperature == 0 and not self.systems and self.system is None:
            problems.append(("at temperature 0 every user message would be the same", "temperature",
                             "use a temperature such as 1.0, or vary `systems:`"))
        return problems


class Magpie(LLMStep):
    """Writes conversations from nothing but the model's chat template (Magpie).

    Requires: the columns the ``system`` template names (none by default).
    Produces: ``instruction`` (the first user message), with ``response``: ``response`` (the first
    answer), ``messages`` (every turn) and ``turns``; ``system`` when one was used. Input columns
    (a persona...) are carried into the conversations they shaped. Drops: ``truncated``,
    ``empty_instruction``, ``too_short``, ``template_echo``, ``empty_response`` (turn in the detail).

    Example:
        - magpie: {num_rows: 100, turns: 2, systems: ["You are a patient maths tutor.", "You are a chef."]}
    """

    name = "magpie"
    kind = "global"
    Config = MagpieConfig

    def template_options(self):
        return {}  # no prompt: `system` is rendered here (a template over the row)

    def check(self):
        return system_problems(self)

    def check_llm(self, llm):
        return tokenizer_problems(llm)

    def check_backend(self, backend, llm=None):
        if llm is None:
            require_user_turns(self, backend)

    def requires(self):
        source = self.config.system
        if source is None or is_template_path(source):
            return []
        return template_variables(source)

    def produces(self):
        c = self.config
        system = ["system"] if c.system is not None or c.systems else []
        return [c.column] + system + ([c.response_column, "messages", "turns"] if c.response else [])

    def frame(self, rows, data):
        c = self.config
        schema = {c.column: pl.String, "system": pl.String, DROP: pl.String}
        if c.response:
            schema.update({c.response_column: pl.String, "messages": MESSAGES_TYPE, "turns": pl.Int64})
        return rows_to_frame(rows, schema={**data.schema, **schema})

    def exchange(self, rows: list[dict], ctx: StepContext):
        c = self.config
        chats = [Chat(base, system) for base, system in starts(self, rows)]
        ctx.progress.reset(total=len(chats))
        asking, gone = user_params(c), []
        answering = dataclasses.replace(GenerationParams(), temperature=c.response_temperature,
                                        top_p=c.response_top_p, max_tokens=c.response_max_tokens,
                                        continuations=continuations(c), max_tokens_option="response_max_tokens")
        for turn in range(1, c.turns + 1):
            completions = yield [Request(chat.messages + [user_turn()], asking) for chat in chats]
            chats, lost = advance(chats, completions, lambda chat, reply: read_user(reply, chat.system, c), turn,
                                  c, user=True)
            gone += lost
            ctx.progress.update(len(lost))  # the bar counts conversations done: dropped ones now
            if c.response:
                completions = yield [Request(chat.messages, answering) for chat in chats]
                chats, lost = advance(chats, completions, lambda chat, reply: read_answer(reply), turn, c,
                                      user=False)
                gone += lost
                ctx.progress.update(len(lost))
        ctx.progress.update(len(chats))
        return [chat.row(c) for chat in chats] + gone


@dataclass
class Chat:
    """One conversation under way: the input row it came from, its system prompt and its turns."""

    base: dict
    system: str | None
    turns: list[dict] = dataclasses.field(default_factory=list)
    cut: bool = False  # an answer was kept though cut at the token limit (on_truncation: keep)

    @property
    def messages(self) -> Conversation:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def row(self, c: MagpieConfig) -> dict:
        out = {**self.base, c.column: self.turns[0]["content"]}
        if self.system is not None:
            out["system"] = self.system
        if c.response:
            head = [{"role": "system", "content": self.system}] if c.keep_system and self.system else []
            out.update({c.response_column: self.turns[1]["content"], "messages": head + self.turns,
                        "turns": len(self.turns) // 2})
            if c.on_truncation == "keep":
                out[TRUNCATED] = self.cut
        return out


def starts(step: Magpie, rows: list[dict]) -> list[tuple[dict, str | None]]:
    """Each conversation's input row and system prompt: ``per_row`` for each input row, or
    ``num_rows`` from nothing; a system prompt drawn from ``systems`` (seeded) or rendered."""
    c = step.config
    bases = [row for row in rows for _ in range(c.per_row)] if rows else [{} for _ in range(c.num_rows)]
    rng = random.Random(f"{step.seed}:{step.index}:magpie")
    template = system_template(step)
    out = []
    for base in bases:
        system = rng.choice(c.systems) if c.systems else template.render(**base).strip() if template else None
        out.append((base, system or None))
    return out


def system_template(step: Magpie):
    """The compiled ``system`` template (inline text or a .j2 file beside the recipe), or None."""
    source = step.config.system
    if source is None:
        return None
    return compile_template(step.path(source).read_text(encoding="utf-8") if is_template_path(source) else source)


def system_problems(step: Magpie) -> list[tuple[str, str, str]]:
    """What is wrong with the ``system`` template, as ``check`` reports it."""
    source = step.config.system
    if source is not None and is_template_path(source) and not step.path(source).is_file():
        return [(f"template file '{source}' does not exist", "system", "give a path relative to the recipe")]
    try:
        system_template(step)
    except Exception as err:  # noqa: BLE001 - jinja2.TemplateSyntaxError and friends
        return [(f"the system template does not compile: {err}", "system", "fix the Jinja syntax")]
    return []


def tokenizer_problems(llm, key: tuple = ("llm", "tokenizer")) -> list[tuple[str, tuple, str]]:
    """A server whose model's chat template is not at hand here cannot be asked for a user's turn."""
    if llm is not None and llm.backend == "openai" and not (
            llm.tokenizer or os.path.isdir(os.path.expanduser(llm.model))):
        return [("the model writes the user's turn from its chat template (Magpie), applied here, and the "
                 "served model's tokenizer is not at hand", key, f"set {'.'.join(key)} to a local folder with it "
                 "(`factory model export-embedded DIR` writes the embedded model's)")]
    return []


def require_user_turns(step, backend) -> None:
    """Raises :class:`FactoryError` (with the fix) when ``backend`` cannot have its model write a user's turn."""
    if not backend.writes_user_turns:
        why = backend.user_turn_problem() if hasattr(backend, "user_turn_problem") else \
            f"the {backend.name} backend cannot have the model write a user's turn"
        raise FactoryError(f"{step.label}: {why}")


def user_params(c: MagpieConfig) -> GenerationParams:
    return GenerationParams(temperature=c.temperature, top_p=c.top_p, max_tokens=c.max_tokens, stop=tuple(c.stop))


def advance(chats: list[Chat], completions: list[Completion], read, turn: int, c: MagpieConfig, user: bool):
    """The conversations that go on with the turn each completion gives (the user's, or the
    assistant's), and those dropped, with why."""
    going, gone = [], []
    for chat, completion in zip(chats, completions):
        where = f"turn {turn}, {'user' if user else 'assistant'}"
        if completion.error is not None:
            gone.append(lost(chat, c, completion.error_reason, f"{where}: {completion.error}"))
            continue
        reply = completion.texts[0]
        if completion.cut(0) and (user or c.on_truncation != "keep"):
            limit = f"max_tokens={c.max_tokens}" if user else f"response_max_tokens={c.response_max_tokens}"
            gone.append(lost(chat, c, TRUNCATED, f"{where}: cut at {limit}", reply))
            continue
        try:
            text = read(chat, reply)
        except ParseError as err:
            gone.append(lost(chat, c, err.reason or "parse_error", f"{where}: {err}", reply))
            continue
        chat.turns.append({"role": "user" if user else "assistant", "content": text})
        chat.cut = chat.cut or completion.cut(0)
        going.append(chat)
    return going, gone


def lost(chat: Chat, c: MagpieConfig, reason: str, detail: str, reply: str | None = None) -> dict:
    """A dropped conversation's row: what it had so far, the reason and the raw reply."""
    user = [t["content"] for t in chat.turns if t["role"] == "user"]
    row = {**chat.base, c.column: user[0] if user else (reply if reply is not None else None)}
    if chat.system is not None:
        row["system"] = chat.system
    return dropped(row, reason, detail, reply)


def read_user(reply: str, system: str | None, c: MagpieConfig) -> str:
    """The user's message a reply holds, or :class:`ParseError` with Magpie's failure as its reason."""
    text = reply.strip()
    if not text:
        raise ParseError("the user's message is empty", reason="empty_instruction")
    echo = template_echo(text, system)
    if echo:
        raise ParseError(echo, reason="template_echo")
    if count_words(text) < c.min_words:
        raise ParseError(f"{count_words(text)} words, under min_words={c.min_words}", reason="too_short")
    return text


def read_answer(reply: str) -> str:
    text = reply.strip()
    if not text:
        raise ParseError("the answer is empty", reason="empty_response")
    return text


def template_echo(text: str, system: str | None) -> str | None:
    """Why ``text`` repeats the template instead of asking something, or None."""
    found = _MARKUP.search(text)
    if found:
        return f"holds the template's markup {found.group(0)!r}"
    if _ROLE_LABEL.match(text):
        return f"starts with a role label ({text.split(chr(10), 1)[0][:40]!r})"
    if _SELF_DESCRIPTION.match(text):
        return "describes the assistant, as a system prompt does"
    if system:
        words, said = normalize(system).split(), f" {normalize(text)} "
        span = min(_ECHO_WORDS, len(words))
        for start in range(len(words) - span + 1):
            if f" {' '.join(words[start:start + span])} " in said:
                return "repeats the system prompt"
    return None
