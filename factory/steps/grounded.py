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
                out.append({**rest, DROP: "invalid_input", DROP_DETAIL: f"column '{c.id_column}' is empty"})
                continue
            pieces = self.chunks(text) if isinstance(text, str) else []
            if not pieces:
                out.append({**rest, DROP: "empty_document", DROP_DETAIL: f"column '{c.column}' has no text"})
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


def passages_in(context: str, chunk_ids: list[str]) -> list[dict]:
    """The passages of ``chunk_ids`` in a context made by :func:`format_context`, in that
    order, as dicts of ``chunk_id``, ``heading`` and ``chunk_text``.

    Raises:
        InvalidRow: an id has no passage in the context.
    """
    # Only the row's own ids mark passages: a line of a passage may start with a bracket too.
    ids = "|".join(re.escape(chunk_id) for chunk_id in sorted(set(chunk_ids), key=len, reverse=True))
    labels = list(re.finditer(rf"^\[({ids})\][ \t]*([^\n]*)$", context, re.M))
    found = {}
    for k, label in enumerate(labels):
        end = labels[k + 1].start() if k + 1 < len(labels) else len(context)
        found.setdefault(label.group(1), {"chunk_id": label.group(1), "heading": label.group(2).strip(),
                                          "chunk_text": context[label.end():end].strip()})
    missing = [chunk_id for chunk_id in chunk_ids if chunk_id not in found]
    if missing:
        raise InvalidRow(f"chunk '{missing[0]}' has no passage in the context (expected a line starting with "
                         f"'[{missing[0]}]')")
    return [found[chunk_id] for chunk_id in chunk_ids]


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
    stop: list[str] = option(default_factory=lambda: ["\n"], help="A question ends at the end of its line.")

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
        chunks, out = [], []
        for row in table.to_dicts():
            try:
                self.text(row, "chunk_text")
                chunks.append(row)
            except InvalidRow as err:
                out.append({**row, DROP: "invalid_input", DROP_DETAIL: str(err)})
        plan = self.plan(chunks)
        self.progress.reset(total=len(plan))
        completions = self.llm.chat([self.question_messages(item) for item in plan], self.generation_params())
        seen = set()
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


# -- answers with citations ----------------------------------------------------------------

# A citation is text in square brackets, not followed by "(" (that is a Markdown link).
_CITATION = re.compile(r"\[([^\[\]\n]{1,200})\](?!\()")
_CITATION_SEPARATOR = re.compile(r"\s*(?:[,;]|\band\b)\s*")
_SENTENCE_DONE = re.compile(r"[.!?][\"')\]]*$")


def _id_key(text: str) -> str:
    """How a cited id is compared with the real ones: case, spaces, quotes and the file
    extension ("water-cycle#2" for "water-cycle.md#2") do not matter."""
    key = re.sub(r"[\s\"'`*]", "", text).lower()
    return re.sub(r"\.(?:md|markdown|txt)(?=#|$)", "", key)


def parse_citations(answer: str, allowed: list[str]) -> tuple[str, list[str]]:
    """The answer with its citations written as the exact ids, and the ids it cites
    (in order of first citation).

    ``[water-cycle.md#2]``, ``[Water-Cycle.md #2]``, ``[water-cycle#2]`` and
    ``[water-cycle.md#2, water-cycle.md#4]`` are citations; ``[text](url)`` is a link, not one.

    Raises:
        ParseError: ``no_citation`` when nothing is in square brackets, ``bad_citation``
            when a citation names an id that is not in ``allowed`` (a made-up citation is
            what grounded data must not teach, so one is enough to drop the answer).
    """
    keys = {_id_key(chunk_id): chunk_id for chunk_id in allowed}
    cited: list[str] = []
    unknown: list[str] = []

    def canonical(match: re.Match) -> str:
        ids = []
        for part in _CITATION_SEPARATOR.split(match.group(1).strip()):
            chunk_id = keys.get(_id_key(part))
            if chunk_id is None:
                unknown.append(part)
            else:
                ids.append(chunk_id)
                if chunk_id not in cited:
                    cited.append(chunk_id)
        return "[" + ", ".join(ids) + "]"

    text = _CITATION.sub(canonical, answer)
    if unknown:
        raise ParseError(f"cites {', '.join(repr(u) for u in dict.fromkeys(unknown))}, not among the passages "
                         f"({', '.join(allowed)})", reason="bad_citation")
    if not cited:
        raise ParseError(f"cites no passage (expected an id in square brackets: {', '.join(allowed)})",
                         reason="no_citation")
    return text, cited


def clean_answer(text: str) -> str:
    """An answer without what the model wrote after it ("Question: ..." as if the prompt
    went on) and without a last sentence cut off by ``max_tokens``."""
    text = re.split(r"\n\s*(?:Question|Q)\s*:", text.strip(), maxsplit=1)[0].strip()
    if not _SENTENCE_DONE.search(text):
        done = [m.end() for m in re.finditer(r"[.!?][\"')\]]*(?=\s)", text)]
        if done:
            text = text[:done[-1]]
    return text.strip()


@dataclass
class GroundedAnswerConfig(LLMStepConfig):
    column: str = option("instruction", help="The question.")
    context_column: str = option("context", help="The passages, each under its id in square brackets "
                                                 "(as `grounded_questions` writes them).")
    chunk_ids_column: str = option("chunk_ids", help="The ids of the passages in the context; only these may "
                                                     "be cited.")
    output_column: str = option("response", help="Where the answer goes, its citations inline.")
    citations_column: str = option("citations", help="Where the cited chunk ids go (a list).")
    prefill: str | None = option("According to [", help="The start of the answer, written for the model: ending "
                                                        "in '[' makes it begin with a citation, which a small "
                                                        "model seldom writes unprompted. null: no prefill.")
    min_words: int = option(3, help="Answers with fewer words (citations aside) are dropped as `parse_error`.",
                            min=1)
    max_tokens: int = option(160, help="Most tokens per answer.", min=1)


class GroundedAnswer(LLMStep):
    """Answers each question from its passages, citing their ids in square brackets.

    The model sees the question and the passages of ``context``, each under its id, and is
    asked to cite the ones it uses ("... [water-cycle.md#2]"); by default its answer is
    started for it with "According to [" so that it opens with a citation (SmolLM2-135M
    cited in 52 of 59 answers so, and in none of 16 without). Citations stay inline in
    ``response`` (a grounded answer that names its sources is what the data teaches),
    rewritten to the exact ids; an unfinished last sentence and anything after a
    "Question:" line are cut off.

    Requires: ``instruction``, ``context`` and ``chunk_ids`` (from ``grounded_questions``).
    Produces: ``response`` and ``citations`` (the cited chunk ids). An answer that cites
    nothing is dropped as ``no_citation``; one that cites an id not in its context as
    ``bad_citation``; an empty one as ``parse_error`` (raw replies kept).

    Example:
        - grounded_answer: {max_tokens: 160}
        - grounded_answer: {prefill: null, llm: {backend: openai, model: big}}
    """

    name = "grounded_answer"
    Config = GroundedAnswerConfig

    def requires(self):
        c = self.config
        return [c.column, c.context_column, c.chunk_ids_column]

    def produces(self):
        return [self.config.output_column, self.config.citations_column]

    def build_messages(self, row):
        c = self.config
        passages = passages_in(self.text(row, c.context_column), _passage_list(row, c.chunk_ids_column))
        prompt = self.render(row, question=self.text(row, c.column), passages=passages)
        return self.messages(prompt, prefill=c.prefill)

    def parse(self, reply, row):
        c = self.config
        answer = clean_answer((c.prefill or "") + reply)
        answer, citations = parse_citations(answer, list(row[c.chunk_ids_column]))
        words = _CITATION.sub(" ", answer).split()
        opening = (c.prefill or "").rstrip("[").split()  # the prefill's words are not the model's answer
        if words[:len(opening)] == opening:
            words = words[len(opening):]
        if len(words) < c.min_words:
            raise ParseError(f"the answer has {len(words)} words besides its citations and the prefill, "
                             f"fewer than {c.min_words}")
        return {c.output_column: answer, c.citations_column: citations}


# -- groundedness ----------------------------------------------------------------------------

_SUPPORTED = re.compile(r"supported\s*(?:\?|:|=|-)?\s*[*_\"']*\s*(yes|no|true|false|partly|partially)\b", re.I)
_NOT_SUPPORTED = re.compile(r"\b(?:not (?:fully |entirely )?supported|unsupported|not grounded|ungrounded)\b", re.I)
_IS_SUPPORTED = re.compile(r"\b(?:is|are|fully|well) supported\b", re.I)
_LEADING_YES_NO = re.compile(r"^\s*[*_\"']*(yes|no)\b", re.I)


def parse_supported(reply: str) -> bool:
    """True for "Supported: yes", False for "Supported: no" (and "partly", "not supported").

    The last explicit "Supported: ..." wins; failing that, "not supported" /
    "unsupported" before "is supported"; failing that, a leading yes or no.

    Raises:
        ParseError: no verdict in the reply.
    """
    explicit = _SUPPORTED.findall(reply)
    if explicit:
        return explicit[-1].lower() in ("yes", "true")
    if _NOT_SUPPORTED.search(reply):
        return False
    if _IS_SUPPORTED.search(reply):
        return True
    leading = _LEADING_YES_NO.match(reply)
    if leading:
        return leading.group(1).lower() == "yes"
    raise ParseError("no verdict found (expected 'Supported: yes' or 'Supported: no')")


@dataclass
class GroundednessConfig(LLMStepConfig):
    column: str = option("instruction", help="The question.")
    response_column: str = option("response", help="The answer to check.")
    context_column: str = option("context", help="The passages, each under its id in square brackets.")
    chunk_ids_column: str = option("chunk_ids", help="The ids of all passages in the context.")
    citations_column: str = option("citations", help="The ids the answer cites; only their passages are shown "
                                                     "to the judge.")
    output_column: str = option("grounded", help="Where the verdict goes (true on every kept row).")
    judgement_column: str = option("groundedness_judgement", help="Where the judge's reply goes.")
    reasoning: bool = option(False, help="Ask for a short check before the verdict; false asks for the verdict "
                                         "alone (at most 8 tokens), which parses better with small models.")
    max_tokens: int = option(128, help="Most tokens per judgement.", min=1)


class Groundedness(LLMStep):
    """LLM judge: is the answer supported by the passages it cites?

    The judge sees the question, the answer and only the passages the answer cites, so
    an answer is not credited with facts from a passage it did not cite.

    Requires: ``instruction``, ``response``, ``context``, ``chunk_ids`` and ``citations``
    (from ``grounded_answer``).
    Produces: ``grounded`` (true on kept rows) and ``groundedness_judgement``. An answer
    judged unsupported is dropped as ``ungrounded`` (with its judgement); a reply without
    a verdict as ``parse_error``.

    Example:
        - groundedness: {llm: {backend: openai, model: judge, base_url: http://127.0.0.1:8000/v1}}
    """

    name = "groundedness"
    Config = GroundednessConfig

    @property
    def prefill(self) -> str | None:
        return None if self.config.reasoning else "Supported:"

    def requires(self):
        c = self.config
        return [c.column, c.response_column, c.context_column, c.chunk_ids_column, c.citations_column]

    def produces(self):
        return [self.config.output_column, self.config.judgement_column]

    def build_messages(self, row):
        c = self.config
        cited = _passage_list(row, c.citations_column)
        passages = passages_in(self.text(row, c.context_column), _passage_list(row, c.chunk_ids_column))
        shown = [p for p in passages if p["chunk_id"] in cited]
        if len(shown) < len(set(cited)):
            raise InvalidRow(f"column '{c.citations_column}' names chunks that are not in "
                             f"'{c.chunk_ids_column}': {sorted(set(cited) - {p['chunk_id'] for p in shown})}")
        prompt = self.render(row, question=self.text(row, c.column), response=self.text(row, c.response_column),
                             passages=shown)
        return self.messages(prompt, prefill=self.prefill)

    def generation_params(self):
        params = super().generation_params()
        if self.config.reasoning:
            return params
        # The verdict alone: it ends at the line's end, and a few tokens hold it.
        return dataclasses.replace(params, stop=params.stop + ("\n",), max_tokens=min(params.max_tokens, 8))

    def parse(self, reply, row):
        c = self.config
        text = ((self.prefill or "") + reply).strip()
        if parse_supported(text):
            return {c.output_column: True, c.judgement_column: text}
        return {c.output_column: False, c.judgement_column: text, DROP: "ungrounded",
                DROP_DETAIL: "the judge found the answer unsupported by the passages it cites"}
