"""Knowledge-grounded QA: documents -> chunks -> questions -> cited answers -> groundedness.

``chunk`` cuts documents into passages with stable ids (``water-cycle.md#2``).
``grounded_questions`` asks the model for questions that one passage -- or, for multi-hop
questions, two passages of the same document -- can answer. ``grounded_answer`` answers
from those passages, citing their ids in square brackets; an answer without a valid
citation is dropped. ``groundedness`` shows a judge only the passages an answer cites and
drops the answers it finds unsupported.

Passages travel between the steps in the ``context`` column, each introduced by its id in
square brackets on a line of its own::

    [water-cycle.md#2] The Water Cycle > Precipitation
    Inside a cloud, droplets collide and merge. ...

so a dataset made elsewhere (a ``context`` in this form and its ``chunk_ids``) can be
answered and judged by these steps too.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass

import polars as pl

from ..config import option, suggest
from ..errors import ParseError
from .base import (DROP, DROP_DETAIL, RAW_REPLY, GlobalStep, InvalidRow, LLMStep, LLMStepConfig, RowStep,
                   rows_to_frame)
from .self_instruct import normalize

QUESTION_TYPES = ("factual", "reasoning", "multi_hop")
DIFFICULTIES = ("easy", "medium", "hard")

# -- chunking ---------------------------------------------------------------------------

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_OWN_LINE = re.compile(r"^\s*(?:[-*+>|]|\d+[.)])\s")  # list items, quotes and table rows keep their line
# A sentence ends at . ! or ? followed by space and a capital, digit or opening quote, so
# "e.g. the" and "3.5 percent" stay whole.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


def markdown_sections(text: str) -> list[tuple[str, list[str]]]:
    """``(heading path, paragraphs)`` for each run of text between ATX headings (``#`` ... ``######``).

    The heading path joins the enclosing headings with " > " (``The Water Cycle >
    Precipitation``). Paragraphs are separated by blank lines and their wrapped lines
    joined with spaces, except list items, quotes and table rows; a fenced code block is
    kept as it is, as one paragraph, and a ``#`` line inside it is not a heading. Sections
    without text (a title directly followed by a subheading) are left out.
    """
    sections: list[tuple[str, list[str]]] = []
    path: list[tuple[int, str]] = []
    paragraphs: list[str] = []
    lines: list[str] = []
    in_fence = False

    def end_paragraph():
        if any(line.strip() for line in lines):
            paragraphs.append("\n".join(lines).strip())
        lines.clear()

    def end_section():
        end_paragraph()
        if paragraphs:
            sections.append((" > ".join(title for _, title in path), list(paragraphs)))
        paragraphs.clear()

    for line in text.splitlines():
        fence = bool(_FENCE.match(line))
        heading = None if in_fence or fence else _HEADING.match(line)
        if heading:
            end_section()
            level = len(heading.group(1))
            path = [(lvl, title) for lvl, title in path if lvl < level] + [(level, heading.group(2).strip())]
        elif not line.strip() and not in_fence:
            end_paragraph()
        elif lines and not in_fence and not fence and not _FENCE.match(lines[-1]) and not _OWN_LINE.match(line):
            lines[-1] = lines[-1].rstrip() + " " + line.strip()  # a wrapped line of prose
        else:
            lines.append(line)
        if fence:
            in_fence = not in_fence
    end_section()
    return sections


def _word_count(text: str) -> int:
    return len(text.split())


def _units(paragraph: str, limit: int) -> list[str]:
    """A paragraph as pieces of at most ``limit`` words: whole, else sentences, else word windows."""
    if _word_count(paragraph) <= limit:
        return [paragraph]
    pieces = []
    for sentence in _SENTENCE_END.split(paragraph):
        words = sentence.split()
        if len(words) <= limit:
            pieces.append(sentence.strip())
        else:
            pieces += [" ".join(words[i:i + limit]) for i in range(0, len(words), limit)]
    return [p for p in pieces if p]


def _overlap(units: list[tuple[str, bool]], overlap_words: int) -> list[tuple[str, bool]]:
    """The end of a chunk carried into the next: whole trailing sentences of at most
    ``overlap_words`` words, else the last ``overlap_words`` words."""
    if overlap_words == 0:
        return []
    carried: list[tuple[str, bool]] = []
    total = 0
    for text, new_paragraph in reversed(units):
        total += _word_count(text)
        if total > overlap_words:
            break
        carried.insert(0, (text, new_paragraph))
    if carried:
        return carried
    return [(" ".join(units[-1][0].split()[-overlap_words:]), False)]


def pack_section(paragraphs: list[str], max_words: int, overlap_words: int) -> list[str]:
    """A section's paragraphs packed into chunks of at most ``max_words`` words.

    Whole paragraphs are packed while they fit; a longer paragraph is split into sentences
    (and a sentence longer than ``max_words - overlap_words`` into word windows). Each
    chunk after the first starts with the end of the one before (see :func:`_overlap`),
    so a fact cut at a boundary is whole in one of the two.
    """
    limit = max_words - overlap_words  # any unit still fits after the carried overlap
    units = [(piece, k == 0) for paragraph in paragraphs for k, piece in enumerate(_units(paragraph, limit))]
    chunks: list[list[tuple[str, bool]]] = []
    current: list[tuple[str, bool]] = []
    carried = 0  # how many units at the start of `current` repeat the previous chunk
    for unit in units:
        words = sum(_word_count(text) for text, _ in current)
        if len(current) > carried and words + _word_count(unit[0]) > max_words:
            chunks.append(current)
            current = _overlap(current, overlap_words)
            carried = len(current)
        current.append(unit)
    if len(current) > carried:
        chunks.append(current)
    return ["".join(("\n\n" if new_paragraph else " ") + text if i else text
                    for i, (text, new_paragraph) in enumerate(chunk)) for chunk in chunks]


@dataclass
class ChunkConfig:
    column: str = option("text", help="The document text (Markdown or plain text).")
    id_column: str = option("doc_id", help="The document id; chunk ids are `<doc_id>#<position>`.")
    max_words: int = option(150, help="Most words per chunk (whitespace-separated).", min=10)
    overlap_words: int = option(20, help="Words at the end of a chunk repeated at the start of the next chunk "
                                         "of the same section (whole sentences when they fit).", min=0)

    def validate(self):
        if self.overlap_words > self.max_words // 2:
            return [(f"overlap_words ({self.overlap_words}) must be at most half of max_words ({self.max_words})",
                     "overlap_words", f"set it to {self.max_words // 2} or less")]
        return []


class Chunk(RowStep):
    """Cuts each document into passages: at Markdown headings first, then by length.

    A section (the text under a heading) that is longer than ``max_words`` is packed into
    several chunks, paragraph by paragraph (sentence by sentence for long paragraphs), each
    starting with the last ``overlap_words`` words of the one before. Chunks never span two
    sections. No LLM is involved.

    Requires: ``text`` and ``doc_id`` (what a folder of .md/.txt documents gives).
    Produces: one row per chunk with ``chunk_id`` (``water-cycle.md#2``: stable as long as
    the document and the options do not change), ``heading`` (the heading path, ``The
    Water Cycle > Precipitation``), ``chunk_text``, ``position`` (0, 1, ... within the
    document) and the document's other columns except its text. A document without text
    is dropped as ``empty_document``.

    Example:
        source: {path: data/documents}
        steps:
          - chunk: {max_words: 150, overlap_words: 20}
    """

    name = "chunk"
    Config = ChunkConfig

    def requires(self):
        return [self.config.column, self.config.id_column]

    def produces(self):
        return ["chunk_id", "heading", "chunk_text", "position"]

    def output_columns(self, columns):
        # The whole document is not repeated on each of its chunks.
        kept = [c for c in columns if c != self.config.column]
        return kept + [c for c in self.produces() if c not in kept]

    def chunks(self, text: str) -> list[tuple[str, str]]:
        """``(heading path, chunk text)`` pairs of one document, in order."""
        c = self.config
        return [(heading, chunk) for heading, paragraphs in markdown_sections(text)
                for chunk in pack_section(paragraphs, c.max_words, c.overlap_words)]

    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        c = self.config
        out = []
        for row in batch.to_dicts():
            text, doc_id = row.get(c.column), row.get(c.id_column)
            rest = {k: v for k, v in row.items() if k != c.column}
            if doc_id is None or str(doc_id).strip() == "":
                out.append({**row, DROP: "invalid_input", DROP_DETAIL: f"column '{c.id_column}' is empty"})
                continue
            pieces = self.chunks(text) if isinstance(text, str) else []
            if not pieces:
                out.append({**row, DROP: "empty_document", DROP_DETAIL: f"column '{c.column}' has no text"})
                continue
            out += [{**rest, "chunk_id": f"{doc_id}#{position}", "heading": heading, "chunk_text": chunk,
                     "position": position} for position, (heading, chunk) in enumerate(pieces)]
        return rows_to_frame(out, like=batch)


# -- passages in a context ------------------------------------------------------------

def format_context(passages: list[dict]) -> str:
    """Passages (``chunk_id``, ``heading``, ``chunk_text``) as one text, each under its id."""
    blocks = []
    for p in passages:
        label = f"[{p['chunk_id']}]" + (f" {p['heading']}" if p.get("heading") else "")
        blocks.append(f"{label}\n{p['chunk_text']}")
    return "\n\n".join(blocks)


def split_context(context: str, chunk_ids: list[str]) -> dict[str, str]:
    """The text of each of ``chunk_ids`` in a context made by :func:`format_context`.

    Raises:
        InvalidRow: an id has no passage in the context.
    """
    starts = []
    for chunk_id in chunk_ids:
        found = re.search(rf"^\[{re.escape(chunk_id)}\][^\n]*$", context, re.M)
        if found is None:
            raise InvalidRow(f"chunk '{chunk_id}' has no passage in the context (expected a line starting "
                             f"with '[{chunk_id}]')")
        starts.append((found.start(), chunk_id))
    starts.sort()
    ends = [s for s, _ in starts[1:]] + [len(context)]
    return {chunk_id: context[start:end].strip() for (start, chunk_id), end in zip(starts, ends)}


def _passage_list(row: dict, column: str) -> list[str]:
    value = row.get(column)
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise InvalidRow(f"column '{column}' must be a non-empty list of chunk ids")
    return list(value)


# -- questions ---------------------------------------------------------------------------

_LABEL = re.compile(r"^\s*(?:\*\*|__)?\s*(?:(?:question|q)\s*\d*\s*[:.)-]|\d+\s*[.):]|[-*•])\s*(?:\*\*|__)?\s*", re.I)
_QUESTION = re.compile(r"[A-Za-z\"'(][^?\n]*?\?")
_INSTRUCTION_VERBS = ("explain", "describe", "compare", "list", "name", "identify", "summarize", "summarise",
                      "calculate", "compute", "give", "state", "define", "outline", "contrast")
_LEAD_IN = re.compile(r"^(?:(?:sure|okay|ok|here(?:'s| is)|great)\b[^:?]*:\s*)", re.I)


def clean_question(reply: str, min_words: int = 3, max_words: int = 60) -> str:
    """The question in a generator's reply, without labels, numbering, quotes or chatter.

    Takes the first sentence that ends with "?" (after a "Question:" or "1." label, or a
    "Here is a question:" lead-in); failing that, a first line that is an instruction
    ("Explain how ...", "Compare ...").

    Raises:
        ParseError: no question or instruction, or one outside ``min_words``..``max_words``.
    """
    for line in reply.splitlines():
        line = _LEAD_IN.sub("", _LABEL.sub("", line.strip())).strip().strip("*_").strip()
        if not line:
            continue
        # Chatter before the question ends with ':' ("Here's a question about the passage: What ...?").
        found = _QUESTION.search(line.rsplit(":", 1)[-1] if ":" in line.split("?", 1)[0] else line)
        if found:
            question = found.group(0).strip().strip("\"'").strip()
        elif line.split()[0].lower().strip(",:") in _INSTRUCTION_VERBS:
            question = re.split(r"(?<=[.!])\s", line, maxsplit=1)[0].strip().strip("\"'")
        else:
            continue
        words = len(question.split())
        if words < min_words:
            raise ParseError(f"the question '{question}' has {words} words, fewer than {min_words}")
        if words > max_words:
            raise ParseError(f"the question has {words} words, more than {max_words}")
        return question
    raise ParseError("no question found (expected one sentence ending with '?', or an instruction such as "
                     "'Explain ...')")


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

    def validate(self):
        return _check_choices(self.types, QUESTION_TYPES, "types") + \
            _check_choices(self.difficulties, DIFFICULTIES, "difficulties")


class GroundedQuestions(GlobalStep, LLMStep):
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

    Example:
        - chunk: {}
        - grounded_questions: {questions_per_chunk: 2, types: {factual: 1, multi_hop: 1}}
    """

    name = "grounded_questions"
    kind = "global"
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

    def plan(self, chunks: list[dict]) -> list[dict]:
        """One entry per question to ask: its type, difficulty and passages (dicts of chunk rows)."""
        c = self.config
        by_doc: dict[str, list[dict]] = {}
        for chunk in chunks:
            by_doc.setdefault(chunk["doc_id"], []).append(chunk)
        types, difficulties = _weights(c.types), _weights(c.difficulties)
        plan, fallbacks = [], 0
        for chunk in chunks:
            for k in range(c.questions_per_chunk):
                rng = random.Random(f"{self.seed}:{self.index}:{chunk['chunk_id']}:{k}")
                question_type = rng.choices(list(types), weights=list(types.values()))[0]
                difficulty = rng.choices(list(difficulties), weights=list(difficulties.values()))[0]
                passages = [chunk]
                if question_type == "multi_hop":
                    partner = self.partner(chunk, by_doc[chunk["doc_id"]], rng)
                    if partner is None:
                        question_type = "reasoning"
                        fallbacks += 1
                    else:
                        passages.append(partner)
                plan.append({"question_type": question_type, "difficulty": difficulty, "passages": passages})
        if fallbacks:
            self.report["multi_hop_fallbacks"] = fallbacks
        return plan

    @staticmethod
    def partner(chunk: dict, document: list[dict], rng: random.Random) -> dict | None:
        """Another chunk of the same document for a multi-hop question, preferably from
        another section (neighbours in one section overlap, which makes a poor second hop)."""
        others = sorted((d for d in document if d["chunk_id"] != chunk["chunk_id"]), key=lambda d: d["position"])
        elsewhere = [d for d in others if d["heading"] != chunk["heading"]]
        pool = elsewhere or others
        return rng.choice(pool) if pool else None

    def question_messages(self, item: dict):
        prompt = self.render({}, passages=item["passages"], question_type=item["question_type"],
                             difficulty=item["difficulty"])
        return self.messages(prompt, prefill=self.prefill)

    def parse(self, reply, row):
        return {self.config.column: clean_question(reply, self.config.min_words, self.config.max_words)}

    def process(self, table: pl.DataFrame) -> pl.DataFrame:
        c = self.config
        chunks = []
        for row in table.to_dicts():
            if not isinstance(row.get("chunk_text"), str) or not row["chunk_text"].strip():
                continue  # an empty chunk asks nothing; `chunk` never makes one
            chunks.append(row)
        plan = self.plan(chunks)
        self.progress.reset(total=len(plan))
        completions = self.llm.chat([self.question_messages(item) for item in plan], self.generation_params())
        out, seen = [], set()
        for item, completion in zip(plan, completions):
            passages = item["passages"]
            chunk_ids = [p["chunk_id"] for p in passages]
            row = {"question_type": item["question_type"], "difficulty": item["difficulty"], "chunk_ids": chunk_ids,
                   c.context_column: format_context(passages), "doc_id": passages[0]["doc_id"],
                   "origin": "grounded", "parent": " + ".join(chunk_ids), "operation": item["question_type"],
                   "generation": 1}
            self.progress.update(1)
            if completion.error is not None:
                out.append({**row, DROP: completion.error_reason, DROP_DETAIL: completion.error})
                continue
            reply = completion.texts[0]
            try:
                question = self.parse(reply, row)[c.column]
            except ParseError as err:
                out.append({**row, DROP: err.reason, RAW_REPLY: reply, DROP_DETAIL: str(err)})
                continue
            key = (tuple(chunk_ids), normalize(question))
            if key in seen:
                out.append({c.column: question, **row, DROP: "duplicate", RAW_REPLY: reply})
                continue
            seen.add(key)
            out.append({c.column: question, **row})
        if not out:
            return pl.DataFrame(schema={c.column: pl.String, "question_type": pl.String, "difficulty": pl.String,
                                        "chunk_ids": pl.List(pl.String), c.context_column: pl.String,
                                        "doc_id": pl.String, "origin": pl.String, "parent": pl.String,
                                        "operation": pl.String, "generation": pl.Int64, DROP: pl.String})
        frame = rows_to_frame(out)
        return frame if DROP in frame.columns else frame.with_columns(pl.lit(None, dtype=pl.String).alias(DROP))
