"""What every answer reader looks for: numbers as people write them, and ``\\boxed{...}``.

Shared by :mod:`factory.answers` (numbers, letters, text) and :mod:`factory.math_answers`
(answers compared as mathematics), so that both read a reply the same way.
"""

from __future__ import annotations

import re

# 1,234  -5.5  $18  3/4  .5  (a minus sign may be the Unicode one)
NUMBER_PATTERN = r"[-−]?\$?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|[-−]?\$?\.\d+"
BOXED = re.compile(r"\\boxed\s*\{")


def boxed_spans(text: str) -> list[tuple[int, int, int]]:
    """Each closed ``\\boxed{...}``: (where it starts, where its contents start, where its closing
    brace is), nested braces balanced."""
    found = []
    for match in BOXED.finditer(text):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            if text[pos] == "{":
                depth += 1
            elif text[pos] == "}":
                depth -= 1
                if depth == 0:
                    found.append((match.start(), start, pos))
                    break
    return found


def boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}``, with nested braces balanced; an unclosed one gives nothing."""
    return [text[start:end] for _, start, end in boxed_spans(text)]
