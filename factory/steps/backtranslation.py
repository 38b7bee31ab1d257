"""Instruction backtranslation (Humpback; Li et al., 2023): instructions for unlabeled text.

``backtranslate`` (self-augmentation): each document -- or each segment of one, so that a
small model is not handed thousands of tokens -- is taken as the answer an assistant gave,
and the model writes the instruction it answers. The text becomes ``response``, the
generated instruction ``instruction``.

``self_curate`` (self-curation): the model rates each (instruction, response) pair on a
5-point rubric, reasoning first, and only pairs at or above ``min_score`` are kept.

Humpback iterates by fine-tuning on the curated pairs and augmenting again. Here a later
``backtranslate`` pass can also show curated pairs from an earlier version as few-shot
demonstrations (``examples_from``), which is what turns a weak zero-shot prompt into a
usable one for a small model.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ..config import option
from ..errors import FactoryError, ParseError
from ..llm.base import Completion, fingerprint
from ..sources import detect_format, read_table, resolve_path
from .base import DROP, DROP_DETAIL, InvalidRow, LLMStep, LLMStepConfig, rows_to_frame
from .judge import parse_score

ORIGIN = "backtranslation"

# -- segments --------------------------------------------------------------------------

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^#{1,6}\s")
# Lines that carry Markdown structure: joining them to their neighbours would break it.
_STRUCTURE = re.compile(r"^(?:\s{4}|\t|\s*(?:[-*+]\s|\d+[.)]\s|#{1,6}\s|>|\||```|~~~))")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _blocks(text: str) -> list[str]:
    """Paragraphs (blank-line separated), keeping fenced code blocks whole."""
    blocks, lines, fenced = [], [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        if not line.strip() and not fenced:
            if lines:
                blocks.append("\n".join(lines))
                lines = []
            continue
        lines.append(line.rstrip())
    if lines:
        blocks.append("\n".join(lines))
    return blocks


def _unwrap(block: str) -> str:
    """A hard-wrapped paragraph as one line (as Markdown renders it); structured blocks as they are."""
    lines = block.splitlines()
    if len(lines) == 1 or any(_STRUCTURE.match(line) for line in lines):
        return block
    return " ".join(line.strip() for line in lines)


def _words(text: str) -> int:
    return len(text.split())


def _split_long(block: str, max_words: int) -> list[str]:
    """A block over ``max_words`` cut at sentence ends (at word boundaries for a longer sentence)."""
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(block):
        words = sentence.split()
        pieces.extend(" ".join(words[i:i + max_words]) for i in range(0, len(words), max_words))
    return _pack(pieces, max_words, " ")


def _pack(units: list[str], max_words: int, joiner: str) -> list[str]:
    """Greedily joins consecutive units into chunks of at most ``max_words`` words."""
    chunks: list[str] = []
    current: list[str] = []
    count = 0
    for unit in units:
        n = _words(unit)
        if current and count + n > max_words:
            chunks.append(joiner.join(current))
            current, count = [], 0
        current.append(unit)
        count += n
    if current:
        chunks.append(joiner.join(current))
    return chunks


def split_segments(text: str, max_words: int | None = None, join_lines: bool = True) -> list[str]:
    """Cuts a document into segments of at most ``max_words`` words on paragraph boundaries.

    A heading stays with the paragraph after it; a paragraph longer than ``max_words`` is
    cut at sentence ends. ``max_words=None`` keeps the document whole. ``join_lines``
    turns hard-wrapped paragraphs into single lines (lists, tables, quotes and code are
    left as they are).

    Example:
        >>> split_segments("# T\\n\\nOne two.\\n\\nThree four five.", max_words=4)
        ['# T\\n\\nOne two.', 'Three four five.']
    """
    blocks = [_unwrap(b) if join_lines else b for b in _blocks(text)]
    units: list[str] = []
    pending_heading: list[str] = []
    for block in blocks:
        if _HEADING.match(block) and "\n" not in block:
            pending_heading.append(block)
            continue
        units.append("\n\n".join(pending_heading + [block]))
        pending_heading = []
    if pending_heading:  # headings at the very end belong to what precedes them
        if units:
            units[-1] = "\n\n".join([units[-1]] + pending_heading)
        else:
            units = ["\n\n".join(pending_heading)]
    if max_words is None:
        return ["\n\n".join(units)] if units else []
    pieces: list[str] = []
    for unit in units:
        pieces.extend(_split_long(unit, max_words) if _words(unit) > max_words else [unit])
    return _pack(pieces, max_words, "\n\n")


# -- cleaning generated instructions ------------------------------------------------------

_DOUBLE_QUOTES = "\"“”«»"
_SINGLE_QUOTES = "'‘’`"
_CHATTER = re.compile(r"^(?:sure|certainly|of course|okay|ok|absolutely|great|yes)\b[!.,:]*\s*", re.I)
_HERE_IS = re.compile(r"^here(?:'s| is| are)\b[^:]*:\s*", re.I)
_NUMBERING = re.compile(r"^(?:\d+\s*[.):]|[-*•])\s+")
_LABEL = re.compile(r"^[*_]*(?:the\s+)?(?:user(?:'s)?\s+)?(?:generated\s+|possible\s+|original\s+)?"
                    r"(?:instruction|question|request|prompt|task|query|user|q)(?:\s*\d+)?[*_]*(?:\s*:|\s+-)\s*[*_]*",
                    re.I)
_ASKED = re.compile(r"^(?:the\s+)?user\s+(?:asked|asks|wrote|said|wants to know)\s*:\s*", re.I)
_ANSWER_TO = re.compile(r"^(?:what is|what's)\s+the\s+answer\s+to\s+(?:the|this)\s+question\s*[:,]?\s*", re.I)
# The model describing its prompt instead of writing a task: "What question does this text
# answer?", "What is the user's request?", "What does the article say about ...?", "How to
# write a question about Git?", "What question is this?".
_META = re.compile(r"\b(?:(?:this|above|following|given)\s+(?:text|article|passage|document|excerpt|paragraph)s?"
                   r"|the\s+(?:text|article|passage|document|excerpt|paragraph)s?\s+(?:above|below)"
                   r"|the\s+(?:article|passage|excerpt)s?"
                   r"|(?:this|that|above|following|given)\s+(?:answer|response|reply)"
                   r"|the\s+user|user's|ai's|ai\s+assistant|the\s+assistant"
                   r"|(?:write|ask)\s+(?:a|the|that|this)\s+question|(?:this|what)\s+question)\b", re.I)
_QUESTION_WORDS = frozenset(
    "what how why when where who whom whose which is are was were do does did can could should would will may "
    "might has have had am".split())
_IMPERATIVES = frozenset(
    "explain describe write give list tell summarize summarise compare define outline provide create suggest show "
    "name calculate compute find discuss help teach recommend draft generate make identify classify translate "
    "rewrite walk share imagine design plan estimate convert solve please".split())
_REQUEST = re.compile(r"^(?:i(?:'m|\s+am)\s+(?:looking|trying|curious|interested|wondering)|i(?:'d|\s+would)\s+like"
                      r"|i\s+(?:want|need)|how\s+to)\b", re.I)


def _strip_quotes(text: str) -> str:
    text = text.strip().strip("*_").strip()
    opening = text[:1]
    if opening in _DOUBLE_QUOTES:
        # The text ends at the closing quote: '"What is X?" asked the user' -> 'What is X?'.
        closing = max(text.rfind(q, 1) for q in _DOUBLE_QUOTES)
        text = text[1:closing] if closing > 0 else text[1:]
    elif opening in _SINGLE_QUOTES:
        # An apostrophe inside ("Gutenberg's") is no closing quote: strip one only at the end.
        text = text[1:-1] if len(text) > 1 and text[-1] in _SINGLE_QUOTES else text[1:]
    return text.strip().strip("*_").strip()


def _normalized(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _has_loop(words: list[str], n: int = 3, times: int = 3) -> bool:
    """True when some word n-gram occurs ``times`` times or more (a degenerate repetition)."""
    counts: dict[tuple, int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(w.lower() for w in words[i:i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= times:
            return True
    return False


def clean_instruction(reply: str) -> str:
    """The instruction in a backward-model reply, without labels, quotes or chatter.

    Takes the first line with content once chatter ("Sure! Here is the instruction:") is
    removed, strips labels ("Instruction:", "Question:", "The user asked:"), numbering,
    wrapping quotes and Markdown emphasis, unwraps "What is the answer to the question:",
    and drops whatever follows the last question mark ("...? The answer is 12.").

    Raises:
        ParseError: the reply holds no usable instruction -- it is empty, repeats itself,
            talks about the text or the user instead of asking something ("What question
            does this text answer?"), is a statement ("A branch in Git is a label."), or is
            a question cut off before its question mark.
    """
    line = ""
    for candidate in reply.strip().splitlines():
        candidate = _HERE_IS.sub("", _CHATTER.sub("", candidate.strip()))
        if re.search(r"\w", candidate):
            line = candidate
            break
    if _has_loop(line.split()):
        raise ParseError(f"the reply repeats itself: {line[:80]!r}")
    previous = None
    while line != previous:  # labels, quotes and wrappers nest in any order
        previous = line
        line = _strip_quotes(line)
        for pattern in (_NUMBERING, _LABEL, _ASKED, _ANSWER_TO):
            line = pattern.sub("", line).strip()
    text = " ".join(line.split())
    if "?" in text and not text.endswith("?"):
        text = text[:text.rindex("?") + 1]
    if not re.search(r"[A-Za-z]", text):
        raise ParseError("no instruction in the reply")
    words = text.split()
    meta = _META.search(text)
    if meta:
        raise ParseError(f"the reply talks about {meta.group(0)!r} instead of asking for something: {text[:80]!r}")
    first = words[0].lower().strip(_DOUBLE_QUOTES + _SINGLE_QUOTES + ",")
    if not text.endswith("?"):
        if first in _QUESTION_WORDS and not _REQUEST.match(text):
            raise ParseError(f"a question without its question mark (cut off?): {text[:80]!r}")
        if first not in _IMPERATIVES and not _REQUEST.match(text):
            raise ParseError(f"not a question or an instruction: {text[:80]!r}")
    return text


# -- few-shot demonstrations ----------------------------------------------------------------

def load_examples(path: str, base_dir: Path, instruction_column: str, response_column: str,
                  id_column: str = "doc_id") -> list[dict]:
    """The (instruction, response) pairs of a version folder, .jsonl, .parquet or .csv file.

    Returns one dict per usable pair with ``instruction``, ``response``, and ``doc_id``,
    ``parent`` and ``generation`` when the file has them (so that a segment is not shown
    pairs from its own document, and the next generation can be numbered).

    Raises:
        FactoryError: the path does not exist, cannot be read, lacks a column, or holds no
            pair with text in both columns.
    """
    resolved = resolve_path(path, base_dir)
    if resolved is None:
        raise FactoryError(f"examples_from '{path}' does not exist (looked in {Path.cwd()}, {base_dir} and the project)")
    try:
        table = read_table(resolved, detect_format(resolved))
    except (FactoryError, OSError, pl.exceptions.PolarsError) as err:
        raise FactoryError(f"examples_from '{path}' cannot be read: {err}") from None
    missing = [c for c in (instruction_column, response_column) if c not in table.columns]
    if missing:
        raise FactoryError(f"examples_from '{path}' has no column {', '.join(repr(c) for c in missing)} "
                           f"(it has {', '.join(table.columns) or 'none'})")
    keep = [instruction_column, response_column] + [c for c in (id_column, "parent", "generation")
                                                     if c in table.columns]
    pairs = []
    for row in table.select(keep).iter_rows(named=True):
        instruction, response = row[instruction_column], row[response_column]
        if isinstance(instruction, str) and instruction.strip() and isinstance(response, str) and response.strip():
            pairs.append({"instruction": instruction.strip(), "response": response.strip(),
                          "doc_id": row.get(id_column), "parent": row.get("parent"),
                          "generation": row.get("generation")})
    if not pairs:
        raise FactoryError(f"examples_from '{path}' has no row with text in both '{instruction_column}' and "
                           f"'{response_column}'")
    return pairs


# -- backtranslate ------------------------------------------------------------------------

@dataclass
class BacktranslateConfig(LLMStepConfig):
    column: str = option("text", help="The unlabeled text; each document (or segment) becomes a `response`. "
                                      "The column itself is not passed on (the segment is in `response`).")
    id_column: str = option("doc_id", help="The document's id, kept for lineage; rows without one get an id "
                                           "made from their text.")
    title_column: str = option("title", help="A title shown in the prompt when the row has one, so that a "
                                             "segment's topic is known.")
    max_words: int | None = option(None, help="Split each document into segments of at most this many words, "
                                              "on paragraph boundaries (a heading stays with its paragraph); "
                                              "null: the whole document is one response.", min=1)
    join_lines: bool = option(True, help="Join the hard-wrapped lines of a paragraph into one line, as Markdown "
                                         "renders them (lists, tables, quotes and code are kept as they are).")
    examples_from: str | None = option(None, help="Curated pairs shown as few-shot demonstrations (response -> "
                                                  "instruction): a version folder such as out/backtranslation/v1, "
                                                  "or a .jsonl/.parquet file with instruction and response columns.")
    examples: int = option(2, help="Demonstrations per prompt when `examples_from` is set.", min=1, max=16)
    output_column: str = option("instruction", help="Where the generated instruction goes.")
    response_column: str = option("response", help="Where the document or segment goes.")
    prefill: str | None = option("Question:", help="Text the model's reply starts with (it continues it); "
                                                   "null lets the model start freely.")
    max_tokens: int = option(48, help="Most tokens per generated instruction.", min=1)
    stop: list[str] = option(default_factory=lambda: ["\n"],
                             help="The instruction ends at the end of its line (with few-shot prompts the model "
                                  "goes on with another 'Text:'). Set [] for a model that chats before it "
                                  "answers when there is no prefill: the first line with content is used.")

    def validate(self):
        if self.output_column == self.response_column:
            return [(f"output_column and response_column are both '{self.output_column}'", "output_column",
                     "give the instruction and the response different columns")]
        return []


class Backtranslate(LLMStep):
    """Self-augmentation: the model writes the instruction that a document (segment) answers.

    Each row is a document; with ``max_words`` it is cut into segments first, one output
    row each. The text becomes ``response`` and the model's instruction, cleaned of labels,
    quotes and chatter, ``instruction``. With ``examples_from``, each prompt first shows
    ``examples`` curated pairs of an earlier version, chosen per row with a seeded random
    generator (never from the row's own document).

    Requires: ``text`` (the ``column``); ``doc_id`` and ``title`` are used when present.
    Produces: ``instruction``, ``response``, ``doc_id``, ``segment`` (0, 1, ... within the
    document), and lineage: ``origin`` (``backtranslation``), ``parent`` (``doc_id``, or
    ``doc_id#segment`` when the document was split), ``operation`` (``backtranslate``, or
    ``backtranslate_fewshot`` with demonstrations) and ``generation`` (1; with demonstrations,
    one more than the highest ``generation`` among them, or 2 when they carry none). A reply without a usable instruction drops
    its row as ``parse_error``, one that repeats a demonstration it was shown as
    ``copied_example``; the raw reply is kept.

    Example:
        - backtranslate: {max_words: 80}
        - backtranslate: {max_words: 80, examples_from: out/backtranslation/v1, examples: 2}
    """

    name = "backtranslate"
    Config = BacktranslateConfig

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self._pool: list[dict] | None = None

    def requires(self):
        return [self.config.column]

    def produces(self):
        c = self.config
        return [c.output_column, c.response_column, c.id_column, "segment", "origin", "parent", "operation",
                "generation"]

    def output_columns(self, columns):
        c = self.config
        kept = [col for col in columns if col != c.column or c.column == c.response_column]
        return kept + [col for col in self.produces() if col not in kept]

    def check(self):
        problems = super().check()
        c = self.config
        if c.examples_from is not None:
            try:
                self.example_pool()
            except FactoryError as err:
                problems.append((str(err), "examples_from",
                                 "point it at a version written by a first pass (e.g. out/backtranslation/v1) or at "
                                 f"a .jsonl/.parquet file with '{c.output_column}' and '{c.response_column}' columns"))
        return problems

    def example_pool(self) -> list[dict]:
        """The demonstrations to sample from (read once); empty without ``examples_from``."""
        if self._pool is None:
            c = self.config
            self._pool = [] if c.examples_from is None else load_examples(
                c.examples_from, self.base_dir, c.output_column, c.response_column, c.id_column)
        return self._pool

    def fingerprint(self) -> str:
        # The demonstrations are part of what the step computes: a rewritten examples file
        # must not reuse batches cached with the old one.
        return fingerprint([super().fingerprint(), self.example_pool()])

    @property
    def generation(self) -> int:
        pool = self.example_pool()
        if not pool:
            return 1
        return max((p["generation"] for p in pool if isinstance(p["generation"], int)), default=1) + 1

    def segments(self, row: dict) -> list[dict]:
        """The rows for one document: one per segment, with lineage, before the model is asked."""
        c = self.config
        text = self.text(row, c.column)
        doc_id = row.get(c.id_column)
        doc_id = str(doc_id) if doc_id not in (None, "") else fingerprint(text)[:12]
        pieces = split_segments(text, c.max_words, c.join_lines)
        base = {k: v for k, v in row.items() if k != c.column}
        lineage = {"origin": ORIGIN, "operation": "backtranslate_fewshot" if c.examples_from else "backtranslate",
                   "generation": self.generation}
        return [{**base, c.id_column: doc_id, "segment": k, c.response_column: piece,
                 "parent": doc_id if len(pieces) == 1 else f"{doc_id}#{k}", **lineage}
                for k, piece in enumerate(pieces)]

    def demonstrations(self, row: dict) -> list[dict]:
        """``examples`` pairs for this row's prompt, the same for the same seed, step and row."""
        pool = self.example_pool()
        if not pool:
            return []
        c = self.config
        response = " ".join(row[c.response_column].split())
        # A second pass over the same documents would otherwise show a segment its own pair, or
        # a neighbouring section's question, which a small model copies instead of reading.
        candidates = [p for p in pool if p["parent"] != row["parent"] and " ".join(p["response"].split()) != response
                      and (p["doc_id"] is None or str(p["doc_id"]) != row[c.id_column])]
        rng = random.Random(fingerprint([self.seed, self.index, row["parent"], response]))
        return rng.sample(candidates, min(self.config.examples, len(candidates)))

    def build_messages(self, row):
        title = row.get(self.config.title_column)
        prompt = self.render(row, text=row[self.config.response_column], title=title if isinstance(title, str) else "",
                             examples=self.demonstrations(row))
        return self.messages(prompt, prefill=self.config.prefill)

    def parse(self, reply, row):
        instruction = clean_instruction(reply)
        # Few-shot prompts tempt a small model to repeat a demonstration instead of reading the text.
        shown = {_normalized(d["instruction"]) for d in self.demonstrations(row)}
        if _normalized(instruction) in shown:
            raise ParseError(f"the instruction copies a demonstration: {instruction!r}", reason="copied_example")
        return {self.config.output_column: instruction}

    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        out: list[dict] = []
        todo = []
        for row in batch.iter_rows(named=True):
            try:
                segments = self.segments(row)
            except InvalidRow as err:
                out.append({**row, DROP: "invalid_input", DROP_DETAIL: str(err)})
                continue
            todo.extend((segment, self.build_messages(segment)) for segment in segments)
        completions = self.llm.chat([conv for _, conv in todo], self.generation_params()) if todo else []
        for (segment, _), completion in zip(todo, completions):
            out.extend(self.rows_from_completion(segment, completion))
        return rows_to_frame(out, like=batch)


# -- self_curate ------------------------------------------------------------------------------

_SCORE_LABEL = re.compile(r"[*_#\s]*\b(?:final\s+)?(?:score|rating)\s*(?:is|of|[:=])", re.I)
_REASONING_LABEL = re.compile(r"^[*_]*(?:reasoning|explanation|rationale)[*_]*\s*:[*_]*\s*", re.I)
SCORE_CUE = "\nScore:"


def split_rating(reply: str) -> tuple[float, str]:
    """The 1-5 score in a curation reply and the reasoning written before it.

    Raises:
        ParseError: no score in 1..5 (see :func:`factory.steps.judge.parse_score`).
    """
    text = reply.strip()
    score = parse_score(text, 5)
    labels = list(_SCORE_LABEL.finditer(text))
    reasoning = text[:labels[-1].start()] if labels else text
    return score, _REASONING_LABEL.sub("", reasoning.strip()).strip()


# Only an explicit "Score: N" counts as the model having given its score: a reply that echoes
# the rubric ("1. It does not address ...") starts with a number that parse_score would take.
_EXPLICIT_SCORE = re.compile(r"\b(?:score|rating)\s*(?:is|of|[:=])?\s*[*_\"']*\s*\d", re.I)


@dataclass
class SelfCurateConfig(LLMStepConfig):
    min_score: float = option(4.0, help="Keep pairs rated at least this; lower ones are dropped as "
                                        "`below_min_score`.", min=1.0, max=5.0)
    force_score: bool = option(True, help="When the reasoning has no \"Score: N\", ask once more with the "
                                          "reasoning followed by \"Score:\" so that the model writes the number "
                                          "(a few tokens; small models rarely end with a score on their own).")
    column: str = option("instruction", help="The instruction.")
    response_column: str = option("response", help="The response rated against it.")
    score_column: str = option("curation_score", help="Where the 1-5 score goes.")
    reasoning_column: str = option("curation_reasoning", help="Where the reasoning before the score goes.")
    max_tokens: int = option(96, help="Most tokens of reasoning (and score).", min=1)


class SelfCurate(LLMStep):
    """Self-curation: the model rates each pair on a 5-point rubric and keeps the good ones.

    The rubric asks how well the response answers the instruction as an AI assistant would:
    1 is irrelevant or incomplete, 3 answers but reads like an excerpt from elsewhere, 5 is a
    perfect, helpful, well-written answer. The model reasons first, then ends with "Score: N";
    with ``force_score``, a reasoning without an explicit "Score: N" is continued from
    "Score:" in a second, short call.

    Requires: ``instruction`` and ``response``.
    Produces: ``curation_score`` (1-5) and ``curation_reasoning``. Pairs below ``min_score``
    are dropped as ``below_min_score`` (with their score and reasoning); a reply without a
    score in 1..5 as ``parse_error``, its raw reply kept.

    Example:
        - self_curate: {min_score: 4}
    """

    name = "self_curate"
    Config = SelfCurateConfig

    def requires(self):
        return [self.config.column, self.config.response_column]

    def produces(self):
        return [self.config.score_column, self.config.reasoning_column]

    def build_messages(self, row):
        c = self.config
        prompt = self.render(row, instruction=self.text(row, c.column), response=self.text(row, c.response_column))
        return self.messages(prompt)

    def parse(self, reply, row):
        c = self.config
        score, reasoning = split_rating(reply)
        columns = {c.score_column: score, c.reasoning_column: reasoning}
        if score < c.min_score:
            columns[DROP] = "below_min_score"
            columns[DROP_DETAIL] = f"score {score:g} is below min_score {c.min_score:g}"
        return columns

    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        out: list[dict] = []
        todo = []
        for row in batch.iter_rows(named=True):
            try:
                todo.append((row, self.build_messages(row)))
            except InvalidRow as err:
                out.append({**row, DROP: "invalid_input", DROP_DETAIL: str(err)})
        completions = self.llm.chat([conv for _, conv in todo], self.generation_params()) if todo else []
        if self.config.force_score:
            completions = self.complete_scores([conv for _, conv in todo], completions)
        for (row, _), completion in zip(todo, completions):
            out.extend(self.rows_from_completion(row, completion))
        return rows_to_frame(out, like=batch)

    def complete_scores(self, conversations: list, completions: list[Completion]) -> list[Completion]:
        """Completions whose reasoning has no score, continued from "Score:" (the rest unchanged)."""
        missing = [i for i, c in enumerate(completions) if c.error is None and not _EXPLICIT_SCORE.search(c.texts[0])]
        if not missing:
            return completions
        reasonings = [completions[i].texts[0].rstrip() + SCORE_CUE for i in missing]
        followups = [conversations[i] + [{"role": "assistant", "content": r}] for i, r in zip(missing, reasonings)]
        params = dataclasses.replace(self.generation_params(), n=1, max_tokens=4, stop=("\n",))
        completed = list(completions)
        for i, reasoning, score in zip(missing, reasonings, self.llm.chat(followups, params)):
            first = completions[i]
            if score.error is None:
                completed[i] = dataclasses.replace(first, texts=[reasoning + score.texts[0]],
                                                   completion_tokens=first.completion_tokens + score.completion_tokens)
        return completed
