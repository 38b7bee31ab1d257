"""Text helpers every step shares: normalisation, words and n-grams, sentences, paragraphs.

One place, so that two steps that say "the same text" or "a paragraph" mean the same
thing. Parsing rules that belong to one step's replies stay beside that step.
"""

from __future__ import annotations

import re

FENCE = re.compile(r"^\s*(```|~~~)")  # a line that opens or closes a fenced code block
# A sentence ends at . ! or ? followed by space and a capital, digit, quote or bracket, so
# "e.g. the" and "3.5 percent" stay whole.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


def has_text(value) -> bool:
    """A string that is not blank."""
    return isinstance(value, str) and bool(value.strip())


def normalize(text: str) -> str:
    """Lowercase words without punctuation, one space apart: how steps compare texts."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def count_words(text: str) -> int:
    """Whitespace-separated words."""
    return len(text.split())


def ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    """The word n-grams of ``words``, in order (none when there are fewer than ``n``)."""
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def word_windows(text: str, size: int) -> list[str]:
    """``text`` cut into runs of at most ``size`` words."""
    words = text.split()
    return [" ".join(words[i:i + size]) for i in range(0, len(words), size)]


def split_sentences(text: str) -> list[str]:
    """Sentences, cut at . ! ? before a capital, digit, quote or bracket."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def pieces(text: str, max_words: int) -> list[str]:
    """``text`` as pieces of at most ``max_words`` words: whole if it fits, else its
    sentences, and a sentence that is still longer cut into word windows."""
    if count_words(text) <= max_words:
        return [text]
    out: list[str] = []
    for sentence in split_sentences(text):
        out += [sentence] if count_words(sentence) <= max_words else word_windows(sentence, max_words)
    return out


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, right-stripped line by line; a fenced code block
    stays whole even when it holds blank lines."""
    blocks, lines, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
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
