"""Documents cut into segments a small model can read: paragraphs, headings kept with their text."""

from __future__ import annotations

import re

from ...text import count_words, paragraphs, split_sentences, word_windows

_HEADING = re.compile(r"^#{1,6}\s")
# Lines that carry Markdown structure: joining them to their neighbours would break it.
_STRUCTURE = re.compile(r"^(?:\s{4}|\t|\s*(?:[-*+]\s|\d+[.)]\s|#{1,6}\s|>|\||```|~~~))")


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
    blocks = [_unwrap(b) if join_lines else b for b in paragraphs(text)]
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
        pieces.extend(_split_long(unit, max_words) if count_words(unit) > max_words else [unit])
    return _pack(pieces, max_words, "\n\n")


def _unwrap(block: str) -> str:
    """A hard-wrapped paragraph as one line (as Markdown renders it); structured blocks as they are."""
    lines = block.splitlines()
    if len(lines) == 1 or any(_STRUCTURE.match(line) for line in lines):
        return block
    return " ".join(line.strip() for line in lines)


def _split_long(block: str, max_words: int) -> list[str]:
    """A block over ``max_words`` cut at sentence ends (at word boundaries for a longer sentence)."""
    # Not text.pieces, which keeps a sentence that fits as it is, line breaks included: these
    # pieces are joined with spaces into running text, so every sentence goes through word_windows.
    pieces = [window for sentence in split_sentences(block) for window in word_windows(sentence, max_words)]
    return _pack(pieces, max_words, " ")


def _pack(units: list[str], max_words: int, joiner: str) -> list[str]:
    """Greedily joins consecutive units into chunks of at most ``max_words`` words."""
    chunks: list[str] = []
    current: list[str] = []
    count = 0
    for unit in units:
        n = count_words(unit)
        if current and count + n > max_words:
            chunks.append(joiner.join(current))
            current, count = [], 0
        current.append(unit)
        count += n
    if current:
        chunks.append(joiner.join(current))
    return chunks
