"""The instruction in a backward-model reply: labels, quotes and chatter removed, garbage refused."""

from __future__ import annotations

import re
from collections import Counter

from ...errors import ParseError
from ...text import ngrams

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


def clean_backtranslated_instruction(reply: str) -> str:
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


def _has_loop(words: list[str], n: int = 3, times: int = 3) -> bool:
    """True when some word n-gram occurs ``times`` times or more (a degenerate repetition)."""
    counts = Counter(ngrams([w.lower() for w in words], n))
    return any(count >= times for count in counts.values())
