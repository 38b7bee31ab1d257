"""Final-answer extraction from model replies, and answer checking against references.

Used by ``solve`` (the ``prediction`` column), ``verify`` (the ``correct`` column), the
``consistency`` filter (majority vote) and evaluation. Answers compared as mathematics (the
``math`` method and answer format) are read and compared in :mod:`factory.math_answers`.
"""

from __future__ import annotations

import ast
import math
import re
import string
from fractions import Fraction
from typing import Callable

from .answer_patterns import BOXED as _BOXED
from .answer_patterns import NUMBER_PATTERN as _NUMBER
from .answer_patterns import boxed_contents, boxed_spans
from .errors import FactoryError
from .math_answers import math_answer_found, math_equal, math_keys

_NUMBER_RE = re.compile(_NUMBER)
_HASHES = re.compile(rf"####\s*({_NUMBER})")
_ANSWER_IS = re.compile(rf"(?:final answer|answer)\s*(?:is|:|=)?\s*[:=]?\s*\**\s*({_NUMBER})", re.I)
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")

ANSWER_FORMATS = ("none", "number", "choice", "text", "math")


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


# A reader gives a reply's final answer and where the mark that points at it ends (``\\boxed{}``,
# ``####``, "the answer is", "Answer:"), or None there when nothing marks it (the last number).
Found = tuple[str, int | None]


def _number_found(text: str) -> Found | None:
    for _, start, close in reversed(boxed_spans(text)):
        numbers = _NUMBER_RE.findall(_FRAC.sub(r"\1/\2", text[start:close]))
        if numbers:
            value = canonical_number(numbers[-1])
            if value is not None:
                return value, close + 1
    for pattern in (_HASHES, _ANSWER_IS):
        matches = list(pattern.finditer(text))
        if matches:
            value = canonical_number(matches[-1].group(1))
            if value is not None:
                return value, matches[-1].end()
    numbers = _NUMBER_RE.findall(text)
    value = canonical_number(numbers[-1]) if numbers else None
    return (value, None) if value is not None else None


def extract_number(text: str) -> str | None:
    """The final numeric answer: ``\\boxed{}``, then ``#### n``, then "the answer is n", then the last number."""
    found = _number_found(text)
    return found[0] if found else None


_CHOICE_PATTERNS = [
    re.compile(r"(?:answer|choice|option)\s*(?:is|:)?\s*\(?([A-J])\b\)?", re.I),  # the one that marks it
    re.compile(r"\(([A-J])\)", re.I),
    re.compile(r"^\s*([A-J])[).:]", re.M),
    re.compile(r"\b([A-J])\s*$"),
]


def _choice_found(text: str, letters: str = "ABCDEFGHIJ") -> Found | None:
    for marks, pattern in enumerate(_CHOICE_PATTERNS):
        matches = [m for m in pattern.finditer(text) if m.group(1).upper() in letters]
        if matches:
            return matches[-1].group(1).upper(), matches[-1].end() if marks == 0 else None
    return None


def extract_choice(text: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """The chosen option letter ("the answer is (B)", "Answer: B", "(B)", "B)" at a line start)."""
    found = _choice_found(text, letters)
    return found[0] if found else None


def _text_found(text: str) -> Found | None:
    matches = list(re.finditer(r"(?:final answer|answer)\s*:\s*(.+)", text, re.I))
    if matches:
        answer = matches[-1].group(1).strip().strip("*").strip()
        return (answer, matches[-1].end()) if answer else None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1], None) if lines else None


def extract_text(text: str) -> str | None:
    """A free-text answer: what follows the last "Answer:", else the last non-empty line."""
    found = _text_found(text)
    return found[0] if found else None


_READERS = {"number": _number_found, "choice": _choice_found, "text": _text_found, "math": math_answer_found}


def extract_answer(text: str, answer_format: str) -> str | None:
    if answer_format in _READERS:
        found = _READERS[answer_format](text)
        return found[0] if found else None
    return text.strip() or None


# The end of a sentence: . ! or ? before a space, a closing mark or the end (not the point of 3.5),
# or a line's end; then what closes around it (**bold**, $math$, a quote, a bracket).
_SENTENCE_END = re.compile(r"[^\n]*?(?:[.!?](?=[\s*_)\]}\"'$]|$)|(?=\n)|$)[*_)\]}\"'$]*")
_CLOSING_LINE = re.compile(r"\s*(?:\\\]|\$\$|\\end\{[^}\n]*\})")  # \] or $$ or \end{align} closing a display


def split_after_answer(text: str, answer_format: str) -> tuple[str, str]:
    """``text`` cut after the sentence of its final answer, and what followed it ("" when nothing did).

    Only a marked answer ends a reply (``\\boxed{}``, ``####``, "the answer is", "Answer:"; for
    ``text``, its whole line); a reply whose answer is only its last number is never cut. The cut
    keeps the sentence's end (``The answer is 3.``, ``$\\boxed{18}$.``) and a display it closes
    (``\\]``, ``$$``), and never changes the answer ``extract_answer`` reads. Text before the final
    answer stays, even an earlier answer: the cut only ends the reply where its answer did.
    """
    found = _READERS[answer_format](text) if answer_format in _READERS else None
    end = found[1] if found else None
    if end is None:
        return text, ""
    if answer_format != "text":
        end = _SENTENCE_END.match(text, end).end()
    while closing := _CLOSING_LINE.match(text, end):
        end = closing.end()
    kept, after = text[:end].rstrip(), text[end:].strip()
    if not after or extract_answer(kept, answer_format) != found[0]:
        return text, ""
    return kept, after


def normalize_text(text: str) -> str:
    """Lowercase, no punctuation, no articles, single spaces (SQuAD-style)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


VERIFY_METHODS = ("auto", "exact", "numeric", "normalized", "choice", "math")

_MARKED = [re.compile(r"####\s*(.+)"),
           re.compile(r"(?:final answer|answer)\s*(?:is\s*:?|:)\s*(.+)", re.I)]
_REFERENCE_KINDS = {"number": "numeric", "text": "normalized", "none": "exact"}


def marked_answer(text: str) -> str | None:
    """What an answer marker points at: the last ``\\boxed{}``, else what follows the last
    ``####``, else the last "the answer is" / "Answer:"; None when the text has no marker."""
    boxed = [inner.strip() for inner in boxed_contents(text) if inner.strip()]
    if boxed:
        return boxed[-1]
    for pattern in _MARKED:
        matches = [m.strip().strip("*").strip() for m in pattern.findall(text)]
        if matches and matches[-1]:
            return matches[-1]
    return None


def reference_answer(text: str | None, method: str = "auto") -> str | None:
    """A reference answer read with the same extraction as predictions; None when it holds no value.

    ``method`` is a verify method (``VERIFY_METHODS``) or an answer format (``number``, ``choice``,
    ``text``). A bare value stays itself (``"330"``, ``"$5.50"``, ``"B"``, ``"Paris"``); a worked
    solution gives its final value (``... #### 18``, ``\\boxed{18}``, "The answer is 18."). Numbers
    are read as ``extract_number`` reads them, letters as ``extract_choice``; text is taken whole
    unless a marker (``####``, ``\\boxed{}``, "the answer is", "Answer:") points at the answer.
    """
    if text is None:
        return None
    text = str(text).strip()
    if not text:
        return None
    kind = _REFERENCE_KINDS.get(method, method)
    if kind == "numeric":
        return text if canonical_number(text) is not None else extract_number(text)
    if kind == "choice":
        bare = text.strip("() .").upper()
        return extract_choice(text) or (bare if len(bare) == 1 and bare in "ABCDEFGHIJ" else None)
    if kind == "math" and _BOXED.search(text) and not any(inner.strip() for inner in boxed_contents(text)):
        return None  # a MATH solution whose \boxed{} is empty or never closed
    return marked_answer(text) or text


def reference_problem(method: str) -> str:
    """Why a reference gave no value under ``method``, and what a usable one looks like."""
    kind = _REFERENCE_KINDS.get(method, method)
    if kind == "numeric":
        return "holds no number; write the number (330, 1,234, 3/4), or end a worked solution with `#### 330`"
    if kind == "choice":
        return "holds no option letter; write the letter (B), or end a worked solution with 'The answer is (B)'"
    if kind == "math":
        return ("holds no answer (empty, or an empty or unclosed \\boxed{}); write the answer (14/3, "
                "\\frac{14}{3}), or end a worked solution with `\\boxed{14/3}` or `#### 72`")
    return "is empty; write the reference answer"


def read_references(values: list, method: str, column: str, where: Callable[[int], str], fix: str) -> list[str]:
    """Every reference in ``values`` read by :func:`reference_answer`; the first without a value is a
    :class:`FactoryError` that names it (``where(i)``), the column, the value and ``fix``."""
    out = []
    for i, value in enumerate(values):
        reference = reference_answer(value, method)
        if reference is None:
            shown = "null" if value is None else repr(value)
            raise FactoryError(f"{where(i)}: the reference {shown} in column '{column}' {reference_problem(method)}; "
                               f"{fix}")
        out.append(reference)
    return out


def answers_match(prediction: str | None, reference: str | None, method: str = "auto",
                  tolerance: float = 1e-6) -> bool:
    """Whether a prediction matches a reference answer.

    Methods: ``exact`` (after stripping spaces), ``numeric`` (as numbers, within
    ``tolerance`` absolute or relative), ``normalized`` (SQuAD normalisation), ``choice``
    (option letters), ``math`` (as mathematics, see :func:`factory.math_answers.math_verdicts`;
    a comparison over its time limit is not a match), ``auto`` (numeric when both are numbers,
    else normalized).
    """
    if prediction is None or reference is None:
        return False
    prediction, reference = str(prediction), str(reference)
    if method == "math":
        return math_equal(prediction, reference)
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
    """A canonical form for voting: equal keys mean matching answers (numbers numerically;
    for ``math``, see :func:`answer_keys`)."""
    if answer is None:
        return None
    if method == "math":
        return answer_keys([answer], method)[0]
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


def answer_keys(answers: list, method: str = "auto") -> list[str | None]:
    """:func:`answer_key` of each answer; for ``math``, each distinct answer is parsed once
    (:func:`factory.math_answers.math_keys`), so that math-equal answers share a key."""
    if method == "math":
        return math_keys(answers)
    return [answer_key(a, method) for a in answers]


_OPERAND = r"\d[\d,]*(?:\.\d+)?"
_CALCULATION = re.compile(rf"(?<![\w.])((?:\(?\s*{_OPERAND}\s*\)?\s*[-+*/×x÷−]\s*)+\(?\s*{_OPERAND}\s*\)?)\s*=\s*"
                          rf"\$?\s*([-−]?{_OPERAND})(?![\d])")
_CALC_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div,
               ast.USub)


def _evaluate(expression: str) -> float | None:
    """An arithmetic expression of numbers, + - * / and parentheses; None if it is anything else."""
    # stripped: after ": " or ", " the match starts at the space, which ast.parse reads as an indent
    text = expression.strip().replace(",", "").replace("×", "*").replace("x", "*").replace("÷", "/")
    text = text.replace("−", "-")
    try:
        tree = ast.parse(text, mode="eval")
        if not all(isinstance(node, _CALC_NODES) for node in ast.walk(tree)):
            return None
        return float(eval(compile(tree, "<calculation>", "eval"), {"__builtins__": {}}))
    except (SyntaxError, ZeroDivisionError, TypeError, ValueError, OverflowError):
        return None


def false_calculations(text: str, tolerance: float = 1e-6) -> list[str]:
    """The calculations written in ``text`` (``12 + 5 = 17``, ``4 × 6 = 24``) whose result is wrong.

    A reply whose final answer matches the reference by luck usually shows it here:
    ``10 / 6 = 1`` or ``8 * 24 = 16``. Only number-operator-number chains are read.
    """
    wrong = []
    for match in _CALCULATION.finditer(text):
        left, right = match.group(1), canonical_number(match.group(2))
        value = _evaluate(left)
        if value is None or right is None:
            continue
        if not math.isclose(value, float(right), rel_tol=tolerance, abs_tol=max(tolerance, 0.005)):
            wrong.append(f"{left.strip()} = {match.group(2)}")
    return wrong
