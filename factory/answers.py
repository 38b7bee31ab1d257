"""Final-answer extraction from model replies, and answer checking against references.

Used by ``solve`` (the ``prediction`` column), ``verify`` (the ``correct`` column), the
``consistency`` filter (majority vote) and evaluation.
"""

from __future__ import annotations

import math
import re
import string
from fractions import Fraction

_NUMBER = r"[-−]?\$?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|[-−]?\$?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_BOXED = re.compile(r"\\boxed\s*\{")
_HASHES = re.compile(rf"####\s*({_NUMBER})")
_ANSWER_IS = re.compile(rf"(?:final answer|answer)\s*(?:is|:|=)?\s*[:=]?\s*\**\s*({_NUMBER})", re.I)
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")

ANSWER_FORMATS = ("none", "number", "choice", "text")


def _boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}``, with nested braces balanced."""
    found = []
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            if text[pos] == "{":
                depth += 1
            elif text[pos] == "}":
                depth -= 1
                if depth == 0:
                    found.append(text[start:pos])
                    break
    return found


def canonical_number(text: str) -> str | None:
    """``"1,234"`` -> ``"1234"``, ``"$5.50"`` -> ``"5.5"``, ``"3/4"`` -> ``"0.75"``; None if not a number."""
    cleaned = text.strip().replace("−", "-").replace("$", "").replace(",", "").rstrip(".")
    cleaned = _FRAC.sub(r"\1/\2", cleaned).replace(" ", "")
    try:
        value = float(Fraction(cleaned)) if "/" in cleaned else float(cleaned)
    except (ValueError, ZeroDivisionError):
        return None
    if math.isnan(value) or math.isinf(value):
        return None
    if value.is_integer():
        return str(int(value))
    return f"{value:.10g}"


def extract_number(text: str) -> str | None:
    """The final numeric answer: ``\\boxed{}``, then ``#### n``, then "the answer is n", then the last number."""
    for inner in reversed(_boxed_contents(text)):
        inner = _FRAC.sub(r"\1/\2", inner)
        numbers = _NUMBER_RE.findall(inner)
        if numbers:
            value = canonical_number(numbers[-1])
            if value is not None:
                return value
    for pattern in (_HASHES, _ANSWER_IS):
        matches = pattern.findall(text)
        if matches:
            value = canonical_number(matches[-1])
            if value is not None:
                return value
    numbers = _NUMBER_RE.findall(text)
    return canonical_number(numbers[-1]) if numbers else None


_CHOICE_PATTERNS = [
    re.compile(r"(?:answer|choice|option)\s*(?:is|:)?\s*\(?([A-J])\b\)?", re.I),
    re.compile(r"\(([A-J])\)", re.I),
    re.compile(r"^\s*([A-J])[).:]", re.M),
    re.compile(r"\b([A-J])\s*$"),
]


def extract_choice(text: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """The chosen option letter ("the answer is (B)", "Answer: B", "(B)", "B)" at a line start)."""
    for pattern in _CHOICE_PATTERNS:
        matches = [m.upper() for m in pattern.findall(text) if m.upper() in letters]
        if matches:
            return matches[-1]
    return None


def extract_text(text: str) -> str | None:
    """A free-text answer: what follows the last "Answer:", else the last non-empty line."""
    matches = re.findall(r"(?:final answer|answer)\s*:\s*(.+)", text, re.I)
    if matches:
        return matches[-1].strip().strip("*").strip() or None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def extract_answer(text: str, answer_format: str) -> str | None:
    if answer_format == "number":
        return extract_number(text)
    if answer_format == "choice":
        return extract_choice(text)
    if answer_format == "text":
        return extract_text(text)
    return text.strip() or None


def normalize_text(text: str) -> str:
    """Lowercase, no punctuation, no articles, single spaces (SQuAD-style)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


VERIFY_METHODS = ("auto", "exact", "numeric", "normalized", "choice")


def answers_match(prediction: str | None, reference: str | None, method: str = "auto",
                  tolerance: float = 1e-6) -> bool:
    """Whether a prediction matches a reference answer.

    Methods: ``exact`` (after stripping spaces), ``numeric`` (as numbers, within
    ``tolerance`` absolute or relative), ``normalized`` (SQuAD normalisation), ``choice``
    (option letters), ``auto`` (numeric when both are numbers, else normalized).
    """
    if prediction is None or reference is None:
        return False
    prediction, reference = str(prediction), str(reference)
    if method == "exact":
        return prediction.strip() == reference.strip()
    if method == "choice":
        return (extract_choice(prediction) or prediction.strip("() .").upper()) == \
            (extract_choice(reference) or reference.strip("() .").upper())
    if method in ("numeric", "auto"):
        p, r = canonical_number(prediction), canonical_number(reference)
        if p is not None and r is not None:
            return math.isclose(float(p), float(r), rel_tol=tolerance, abs_tol=tolerance)
        if method == "numeric":
            return False
    return normalize_text(prediction) == normalize_text(reference)


def answer_key(answer: str | None, method: str = "auto") -> str | None:
    """A canonical form for voting: equal keys mean matching answers (numbers numerically)."""
    if answer is None:
        return None
    if method in ("numeric", "auto"):
        number = canonical_number(str(answer))
        if number is not None:
            return number
        if method == "numeric":
            return None
    if method == "choice":
        return extract_choice(str(answer)) or str(answer).strip().upper()
    if method == "exact":
        return str(answer).strip()
    return normalize_text(str(answer))
