"""``grounded_questions``: questions that one chunk, or two chunks of a document, can answer."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import polars as pl

from ...config import option, suggest
from ...errors import ParseError
from ...llm.base import Request
from ...llm.schema import read_reply
from ...text import normalize
from ..context import StepContext
from ..drops import DROP, InvalidRow, dropped, rows_to_frame
from ..json_replies import json_object, json_params, text_field
from ..llm_step import LLMStep, LLMStepConfig
from .context import format_context

QUESTION_TYPES = ("factual", "reasoning", "multi_hop")
DIFFICULTIES = ("easy", "medium", "hard")

# -- reading a question out of a reply --------------------------------------------------

_LABEL = re.compile(r"^\s*(?:\*\*|__)?\s*(?:(?:question|q)\s*\d*\s*[:.)-]|\d+\s*[.):]|[-*•])\s*(?:\*\*|__)?\s*", re.I)
_QUESTION = re.compile(r"[A-Za-z\"'(][^?\n]*?\?")
_INSTRUCTION_VERBS = ("explain", "describe", "compare", "list", "name", "identify", "summarize", "summarise",
                      "calculate", "compute", "give", "state", "define", "outline", "contrast")


def _unquote(question: str, after: str) -> str:
    """A question without the quotes around it, keeping quotes inside it balanced."""
    if question.count('"') % 2 and after.startswith('"'):
        question += '"'  # the closing quote of a quoted term that ends the question
    if len(question) > 1 and question[0] == question[-1] == '"' and question.count('"') % 2 == 0:
        return question[1:-1].strip()
    if question.startswith(('"', "'")) and question.count(question[0]) % 2:
        return question[1:].strip()
    return question


def clean_question(reply: str, min_words: int = 3, max_words: int = 60) -> str:
    """The question in a generator's reply, without labels, numbering, quotes or chatter.

    Takes the first sentence that ends with "?" (after a "Question:" or "1." label, or a
    "Here is a question:" lead-in); failing that, a first line that is an instruction
    ("Explain how ...", "Compare ...").

    Raises:
        ParseError: no question or instruction; one outside ``min_words``..``max_words``;
            or one about "the question" (small models echo the prompt: "What is the
            passage's answer to the question ...?").
    """
    for line in reply.splitlines():
        line = _LABEL.sub("", line.strip()).strip().strip("*_").strip()
        if not line:
            continue
        if "?" in line:
            # The question is the last sentence before the first "?": chatter before it ends
            # with ':' ("Here is a question: What ...?") or a sentence ("Sure! What ...?").
            head = line.split("?", 1)[0]
            starts = [head.rfind(":") + 1] + [m.end() for m in re.finditer(r"[.!]\s+(?=[A-Z\"'(])", head)]
            line = line[max(starts):].strip()
        found = _QUESTION.search(line)
        if found:
            question = _unquote(found.group(0).strip(), line[found.end():])
        elif line.split()[0].lower().strip(",:") in _INSTRUCTION_VERBS:
            question = re.split(r"(?<=[.!])\s", line, maxsplit=1)[0].strip()
        else:
            continue
        words = len(question.split())
        if words < min_words:
            raise ParseError(f"the question '{question}' has {words} words, fewer than {min_words}")
        if words > max_words:
            raise ParseError(f"the question has {words} words, more than {max_words}")
        if re.search(r"\b(?:the|this|that) question\b", question, re.I):
            raise ParseError(f"'{question}' is about a question rather than about the passage")
        return question
    raise ParseError("no question found (expected one sentence ending with '?', or an instruction such as "
                     "'Explain ...')")


def question_reply(config: "GroundedQuestionsConfig") -> dict:
    """Where the backend enforces JSON Schemas, the reply a question is asked for in (one question
    per request: each has its own type, difficulty and passages)."""
    return json_object({"question": text_field("the question, ending with a question mark", config.max_tokens, 12)})


def read_question(reply: str, config: "GroundedQuestionsConfig", asks_json: bool) -> str:
    """The question in a reply: the ``question`` of its JSON (``asks_json``: it was asked for as
    JSON), or its text; either way held to :func:`clean_question`'s rules.

    Raises:
        ParseError: no question (``schema_error``: JSON that does not match), or one that breaks a rule.
    """
    text = read_reply(reply, question_reply(config))["question"] if asks_json else reply
    return clean_question(text, config.min_words, config.max_words)


# -- the configuration ------------------------------------------------------------------

def _weights(value: dict[str, float] | list[str]) -> dict[str, float]:
    return dict(value) if isinstance(value, dict) else {name: 1.0 for name in value}


def _check_choices(value, allowed: tuple[str, ...], key: str) -> list[tuple[str, str, str]]:
    weights = _weights(value)
    problems = [(f"unknown {key[:-1] if key.endswith('s') else key} '{name}'", key, suggest(name, allowed))
                for name in weights if name not in allowed]
    if any(w < 0 for w in weights.values()):
        problems.append(("weights must not be negative", key, "use 0 to leave one out"))
    elif not problems and sum(weights.values()) <= 0:
        problems.append(("needs at least one entry with a positive weight", key,
                         f"e.g. [{', '.join(allowed)}]"))
    return problems


@dataclass
class GroundedQuestionsConfig(LLMStepConfig):
    questions_per_chunk: int = option(1, help="Questions asked per chunk (each with its own type and difficulty).",
                                      min=1, max=20)
    types: dict[str, float] | list[str] = option(
        default_factory=lambda: {"factual": 2.0, "reasoning": 1.0, "multi_hop": 1.0},
        help="Question types to draw from, as a list (equal odds) or a mapping to weights: `factual` (a fact "
             "stated in the passage), `reasoning` (follows from the passage, not stated word for word), "
             "`multi_hop` (needs this chunk and another chunk of the same document).")
    difficulties: dict[str, float] | list[str] = option(
        default_factory=lambda: list(DIFFICULTIES),
        help="Difficulties to draw from (easy, medium, hard), as a list or a mapping to weights.")
    column: str = option("instruction", help="Where the question goes.")
    context_column: str = option("context", help="Where the passages the question is built on go, each under "
                                                 "its id in square brackets.")
    min_words: int = option(3, help="Shorter questions are dropped as `parse_error`.", min=1)
    max_words: int = option(60, help="Longer questions are dropped as `parse_error`.", min=1)
    temperature: float = option(0.7, help="Sampling temperature.", min=0.0, max=5.0)
    top_p: float = option(0.95, help="Nucleus sampling mass.", min=0.0, max=1.0)
    max_tokens: int = option(64, help="Most tokens per question.", min=1)
    stop: list[str] = option(default_factory=lambda: ["\n"], help="A question ends at the end of its line (not "
                                                                  "where the backend enforces JSON: a line's end "
                                                                  "may come between its fields).")

    def validate(self):
        return _check_choices(self.types, QUESTION_TYPES, "types") + \
            _check_choices(self.difficulties, DIFFICULTIES, "difficulties")


# -- the plan: which questions to ask of which chunks ----------------------------------

def plan_questions(chunks: list[dict], config: GroundedQuestionsConfig, seed: int,
                   index: int) -> tuple[list[dict], int]:
    """One entry per question to ask: its type, difficulty and passages (dicts of chunk
    rows); and how many multi-hop draws became reasoning questions (no partner chunk).

    The draws of a chunk come from a generator seeded by ``seed``, the step's ``index``
    and the chunk id, so they do not depend on the other chunks of the table.
    """
    by_doc: dict[str, list[dict]] = {}
    for chunk in chunks:
        by_doc.setdefault(chunk["doc_id"], []).append(chunk)
    types, difficulties = _weights(config.types), _weights(config.difficulties)
    plan, fallbacks = [], 0
    for chunk in chunks:
        for k in range(config.questions_per_chunk):
            rng = random.Random(f"{seed}:{index}:{chunk['chunk_id']}:{k}")
            question_type = rng.choices(list(types), weights=list(types.values()))[0]
            difficulty = rng.choices(list(difficulties), weights=list(difficulties.values()))[0]
            passages = [chunk]
            if question_type == "multi_hop":
                partner = choose_partner(chunk, by_doc[chunk["doc_id"]], rng)
                if partner is None:
                    question_type = "reasoning"
                    fallbacks += 1
                else:
                    passages.append(partner)
            plan.append({"question_type": question_type, "difficulty": difficulty, "passages": passages})
    return plan, fallbacks


def choose_partner(chunk: dict, document: list[dict], rng: random.Random) -> dict | None:
    """Another chunk of the same document for a multi-hop question, preferably from
    another section (neighbours in one section overlap, which makes a poor second hop)."""
    others = sorted((d for d in document if d["chunk_id"] != chunk["chunk_id"]), key=lambda d: d["position"])
    elsewhere = [d for d in others if d["heading"] != chunk["heading"]]
    pool = elsewhere or others
    return rng.choice(pool) if pool else None


def question_row(item: dict, config: GroundedQuestionsConfig) -> dict:
    """The output row of one planned question, with its lineage; the question comes from the reply."""
    passages = item["passages"]
    chunk_ids = [p["chunk_id"] for p in passages]
    return {config.column: None, "question_type": item["question_type"], "difficulty": item["difficulty"],
            "chunk_ids": chunk_ids, config.context_column: format_context(passages), "doc_id": passages[0]["doc_id"],
            "origin": "grounded", "parent": " + ".join(chunk_ids), "operation": item["question_type"],
            "generation": 1}


def question_schema(config: GroundedQuestionsConfig) -> dict:
    """The types of :func:`question_row`'s columns (an output without questions keeps them)."""
    return {config.column: pl.String, "question_type": pl.String, "difficulty": pl.String,
            "chunk_ids": pl.List(pl.String), config.context_column: pl.String, "doc_id": pl.String,
            "origin": pl.String, "parent": pl.String, "operation": pl.String, "generation": pl.Int64}


class GroundedQuestions(LLMStep):
    """Asks the model for questions that a chunk (or two chunks, for multi-hop) can answer.

    Each question gets a type and a difficulty drawn with the configured weights from a
    generator seeded by the recipe seed, the step's place and the chunk id, so a chunk
    gets the same draws whatever else is in the table. A multi-hop question pairs its
    chunk with another chunk of the same document, from another section when there is
    one; in a document of one chunk it becomes a reasoning question (counted in the
    manifest as ``multi_hop_fallbacks``). All prompts go to the model in one batch.

    Requires: ``chunk_id``, ``doc_id``, ``heading``, ``chunk_text``, ``position`` (from ``chunk``).
    Produces: one row per question with ``instruction``, ``question_type``, ``difficulty``,
    ``chunk_ids`` (the chunks it is built on), ``context`` (their texts, each under its id),
    ``doc_id`` and lineage: ``origin`` (``grounded``), ``parent`` (the chunk ids joined with
    " + "), ``operation`` (the question type), ``generation`` (1). A reply without a question
    is dropped as ``parse_error``; a question asked twice of the same chunks as ``duplicate``.
    Where the backend enforces JSON it asks for :func:`question_reply` (a mismatch drops as ``schema_error``).

    Example:
        - chunk: {}
        - grounded_questions: {questions_per_chunk: 2, types: {factual: 1, multi_hop: 1}}
    """

    name = "grounded_questions"
    kind = "global"
    reads_fields = True
    Config = GroundedQuestionsConfig
    prefill = "Question:"

    def requires(self):
        return ["chunk_id", "doc_id", "heading", "chunk_text", "position"]

    def produces(self):
        c = self.config
        return [c.column, "question_type", "difficulty", "chunk_ids", c.context_column, "doc_id",
                "origin", "parent", "operation", "generation"]

    def output_columns(self, columns):
        return self.produces()

    def question_messages(self, item: dict):
        prompt = self.render({}, passages=item["passages"], question_type=item["question_type"],
                             difficulty=item["difficulty"])
        return self.conversation(prompt, question_reply(self.config), self.prefill)

    def generation_params(self):
        params = super().generation_params()
        return json_params(params, question_reply(self.config)) if self.asks_json else params

    def parse(self, reply, row):
        return {self.config.column: read_question(reply, self.config, self.asks_json)}

    def exchange(self, rows, ctx: StepContext):
        c = self.config
        chunks, out = [], []
        for row in rows:
            try:
                self.text(row, "chunk_text")
                chunks.append(row)
            except InvalidRow as err:
                out.append(dropped(row, "invalid_input", str(err)))
        plan, fallbacks = plan_questions(chunks, c, self.seed, self.index)
        if fallbacks:
            ctx.report["multi_hop_fallbacks"] = fallbacks
        ctx.progress.reset(total=len(plan))
        completions = yield [Request(self.question_messages(item), self.generation_params()) for item in plan]
        seen = set()
        for item, completion in zip(plan, completions):
            ctx.progress.update(1)
            [row] = self.rows_from_completion(question_row(item, c), completion)
            if DROP not in row:
                key = (tuple(row["chunk_ids"]), normalize(row[c.column]))
                if key in seen:
                    row = dropped(row, "duplicate", reply=completion.texts[0])
                seen.add(key)
            out.append(row)
        return out

    def frame(self, rows, data):
        return rows_to_frame(rows, schema=question_schema(self.config))
