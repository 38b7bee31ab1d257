"""``chunk``: documents cut into passages with stable ids, at Markdown headings, then by length."""

from __future__ import annotations

import re
from dataclasses import dataclass

import polars as pl

from ...config import option
from ...text import FENCE, count_words, pieces
from ..base import RowStep
from ..context import StepContext
from ..drops import dropped, rows_to_frame

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
_OWN_LINE = re.compile(r"^\s*(?:[-*+>|]|\d+[.)])\s")  # list items, quotes and table rows keep their line


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
        fence = bool(FENCE.match(line))
        heading = None if in_fence or fence else _HEADING.match(line)
        if heading:
            end_section()
            level = len(heading.group(1))
            path = [(lvl, title) for lvl, title in path if lvl < level] + [(level, heading.group(2).strip())]
        elif not line.strip() and not in_fence:
            end_paragraph()
        elif lines and not in_fence and not fence and not FENCE.match(lines[-1]) and not _OWN_LINE.match(line):
            lines[-1] = lines[-1].rstrip() + " " + line.strip()  # a wrapped line of prose
        else:
            lines.append(line)
        if fence:
            in_fence = not in_fence
    end_section()
    return sections


def _overlap(units: list[tuple[str, bool]], overlap_words: int) -> list[tuple[str, bool]]:
    """The end of a chunk carried into the next: whole trailing sentences of at most
    ``overlap_words`` words, else the last ``overlap_words`` words."""
    if overlap_words == 0:
        return []
    carried: list[tuple[str, bool]] = []
    total = 0
    for text, new_paragraph in reversed(units):
        total += count_words(text)
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
    units = [(piece, k == 0) for paragraph in paragraphs for k, piece in enumerate(pieces(paragraph, limit))]
    chunks: list[list[tuple[str, bool]]] = []
    current: list[tuple[str, bool]] = []
    carried = 0  # how many units at the start of `current` repeat the previous chunk
    for unit in units:
        words = sum(count_words(text) for text, _ in current)
        if len(current) > carried and words + count_words(unit[0]) > max_words:
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

    def process(self, batch: pl.DataFrame, ctx: StepContext | None = None) -> pl.DataFrame:
        c = self.config
        out = []
        for row in batch.to_dicts():
            text, doc_id = row.get(c.column), row.get(c.id_column)
            rest = {k: v for k, v in row.items() if k != c.column}
            if doc_id is None or str(doc_id).strip() == "":
                out.append(dropped(rest, "invalid_input", f"column '{c.id_column}' is empty"))
                continue
            chunks = self.chunks(text) if isinstance(text, str) else []
            if not chunks:
                out.append(dropped(rest, "empty_document", f"column '{c.column}' has no text"))
                continue
            out += [{**rest, "chunk_id": f"{doc_id}#{position}", "heading": heading, "chunk_text": chunk,
                     "position": position} for position, (heading, chunk) in enumerate(chunks)]
        return rows_to_frame(out, like=batch)
