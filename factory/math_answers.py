"""Answers compared as mathematics: extraction of a reply's final answer, comparison through
math-verify and sympy, and canonical keys for voting -- each under a time limit.

``14/3``, ``\\frac{14}{3}`` and ``4\\frac{2}{3}`` are the same answer; so are ``3\\sqrt{13}`` and
``\\sqrt{117}``, ``\\left( 3, \\frac{\\pi}{2} \\right)`` and ``(3, \\pi/2)``, ``50\\%`` and ``50``,
``10\\text{ cm}`` and ``10``. An answer is read as LaTeX inside ``\\boxed{}`` (math-verify's
normalisation: units, ``\\text{}``, ``\\left``/``\\right``, ``\\dfrac``, thousands separators), after
a few rewrites of plain-text forms math-verify reads otherwise (``4 2/3``, ``0.\\overline{3}``,
``pi``, ``72 dollars``). sympy can run for ever on a pathological expression (``(x+1)^{100000}``
against a number), so every comparison runs under :func:`factory.time_limit.map_limited`: one
over the limit counts as not equal, and callers count it.

math-verify and sympy are imported on first use, not with this module (which
:mod:`factory.answers` imports).
"""

from __future__ import annotations

import importlib.util
import logging
import re
from fractions import Fraction
from functools import lru_cache

from .answer_patterns import NUMBER_PATTERN, boxed_spans
from .errors import FactoryError
from .time_limit import TIMED_OUT, map_limited

MATH_TIMEOUT_S = 5.0  # per comparison (parsing both answers included), as math-verify's default

_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is\s*:?|:|=)\s*([^\n]+)", re.I)
# Math spans: $$..$$, \[..\], \(..\), and $..$ whose content neither starts nor ends with a space
# (so that "$5 and $7" is money, not math).
_SPANS = re.compile(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\((.+?)\\\)|(?<![\\\d])\$(?!\s)([^$\n]+?)(?<![\s\\])\$", re.S)
_NUMBER_RE = re.compile(NUMBER_PATTERN)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")


def _clean(answer: str) -> str | None:
    answer = answer.strip().strip("*").strip()
    while len(answer) > 1 and answer[0] == "$" and answer[-1] == "$":
        answer = answer[1:-1].strip()
    answer = answer.rstrip(".").strip()
    return answer or None


def _after_marker(rest: str) -> str | None:
    """What follows "the answer is": its first math span, else the text up to the sentence's end."""
    span = _SPANS.search(rest)
    if span:
        return _clean(next(g for g in span.groups() if g is not None))
    return _clean(_SENTENCE_END.split(rest, maxsplit=1)[0])


def math_answer_found(text: str) -> tuple[str, int | None] | None:
    """A reply's final answer as text and where the mark that points at it ends (None when nothing
    marks it): the last ``\\boxed{}``, else what follows the last ``####``, else the last "the answer
    is ...", else (unmarked) the last math span (``$...$``, ``\\(...\\)``, ``\\[...\\]``), else the
    last number; None when the reply has none of these."""
    boxed = [(text[start:close].strip(), close) for _, start, close in boxed_spans(text) if text[start:close].strip()]
    if boxed:
        answer = _clean(boxed[-1][0])
        return (answer, boxed[-1][1] + 1) if answer else None
    for pattern in (_HASHES, _ANSWER_IS):
        matches = list(pattern.finditer(text))
        if matches:
            rest = matches[-1].group(1)
            answer = _after_marker(rest)
            if answer:
                span = _SPANS.search(rest)
                return answer, matches[-1].start(1) + (span.end() if span else 0)
    spans = [next(g for g in m.groups() if g is not None) for m in _SPANS.finditer(text)]
    spans = [s for s in (_clean(s) for s in spans) if s]
    if spans:
        return spans[-1], None
    numbers = _NUMBER_RE.findall(text)
    answer = _clean(numbers[-1]) if numbers else None
    return (answer, None) if answer else None


def extract_math_answer(text: str) -> str | None:
    """A reply's final answer as text (see :func:`math_answer_found`)."""
    found = math_answer_found(text)
    return found[0] if found else None


_DELIMITERS = re.compile(r"^\s*(?:\$\$?|\\\(|\\\[)(.*?)(?:\$\$?|\\\)|\\\])\s*$", re.S)
_THIN_THOUSANDS = re.compile(r"(?<=\d)\\[,;! ](?=\d{3}(?!\d))")
_MIXED = re.compile(r"^(-?)(\d+)\s+(\d+)\s*/\s*(\d+)$")
_REPEATING = re.compile(r"^(-?)(\d*)\.(\d*)\\overline\{(\d+)\}$")
_BARE_PI = re.compile(r"(?<![\\A-Za-z])pi(?![A-Za-z])")
_NUMBER_WORDS = re.compile(r"^(-?\$?\d[\d,]*(?:\.\d+)?)\s+((?:[A-Za-z]{2,}\.?\s*)+)$")
_MATH_WORDS = {"pi", "sqrt", "sin", "cos", "tan", "log", "ln", "exp", "and", "or"}
_SCIENTIFIC = re.compile(r"^(-?\d+(?:\.\d+)?)[eE]([-+]?\d+)$")


def _repeating_fraction(sign: str, whole: str, fixed: str, cycle: str) -> str:
    value = Fraction(int(whole or 0)) + Fraction(int(fixed + cycle) - int(fixed or 0),
                                                 10 ** len(fixed) * (10 ** len(cycle) - 1))
    return f"{sign}\\frac{{{value.numerator}}}{{{value.denominator}}}"


def prepare(answer: str) -> str:
    """``answer`` rewritten where math-verify would misread a plain form: ``$..$`` delimiters off,
    ``−`` as ``-``, ``1\\,234`` as ``1234``, ``4 2/3`` as ``4\\frac{2}{3}``, ``0.1\\overline{6}`` as
    ``\\frac{1}{6}``, a bare ``pi`` as ``\\pi``, ``72 dollars`` as ``72``, ``1e3`` as ``1\\times10^{3}``."""
    text = answer.strip().replace("−", "-").replace("\\varnothing", "\\emptyset")
    delimited = _DELIMITERS.match(text)
    if delimited:
        text = delimited.group(1).strip()
    text = _THIN_THOUSANDS.sub("", text)
    if m := _MIXED.match(text):
        text = f"{m[1]}{m[2]}\\frac{{{m[3]}}}{{{m[4]}}}"
    elif m := _REPEATING.match(text):
        text = _repeating_fraction(m[1], m[2], m[3], m[4])
    elif m := _SCIENTIFIC.match(text):
        text = f"{m[1]}\\times10^{{{m[2]}}}"
    elif (m := _NUMBER_WORDS.match(text)) and not _MATH_WORDS & set(m[2].lower().replace(".", " ").split()):
        text = m[1]
    return _BARE_PI.sub(r"\\pi", text)


class _NoTimeoutWarning(logging.Filter):
    """math-verify warns that its own (signal) timeouts are off: ours replace them."""

    def filter(self, record):
        return "Timeout is disabled" not in record.getMessage()


@lru_cache(maxsize=1)
def _require() -> None:
    """A missing math-verify is one line with the fix, before any worker starts."""
    if importlib.util.find_spec("math_verify") is None:
        raise FactoryError("answers compared as mathematics (`method: math`) need the math-verify package, which "
                           "is not installed; pip install math-verify (a dependency of the factory)")


@lru_cache(maxsize=1)
def load(_=None) -> bool:
    """Imports math-verify and sympy and reads one answer, once per process: the setup of
    :func:`~factory.time_limit.map_limited`, so that no comparison pays for it within its limit."""
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_NoTimeoutWarning())
    math_verify.verify(list(parsed("\\frac{1}{2}")), list(parsed("0.5")), timeout_seconds=None)
    return True


@lru_cache(maxsize=8192)
def parsed(answer: str) -> tuple:
    """math-verify's reading of ``answer`` (sympy objects, then the text as a fallback); cached,
    so that a reference shared by a task's samples is parsed once per process."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = prepare(answer)
    found = parse(f"\\boxed{{{text}}}", [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)
    return tuple(found) if found else tuple(parse(text, parsing_timeout=None))


_PERCENT = re.compile(r"\s*(?:\\?%|\\text\{\s*\\?%\s*\})\s*$")


def _equal(pair: tuple[str, str]) -> bool:
    """Whether ``(prediction, reference)`` are equal as mathematics; runs under a time limit.

    A percentage equals its number with or without the sign: math-verify takes ``50\\%`` for
    both 50 and 0.5, but ``12.5\\%`` only for 0.125, so the sign is also tried dropped.
    """
    from math_verify import verify

    prediction, reference = pair
    gold, target = parsed(reference), parsed(prediction)
    if gold and target and verify(list(gold), list(target), timeout_seconds=None):
        return True
    if bool(_PERCENT.search(prediction)) != bool(_PERCENT.search(reference)):
        gold, target = parsed(_PERCENT.sub("", reference)), parsed(_PERCENT.sub("", prediction))
        return bool(gold and target and verify(list(gold), list(target), timeout_seconds=None))
    return False


_PLAIN_NUMBER = re.compile(r"^-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?$|^-?\.\d+$")
_PLAIN_FRAC = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(\d+)\}$")


def plain_number(answer: str) -> Fraction | None:
    """The exact value of an answer that is only a number (``1,234``, ``-2.50``, ``14/3``,
    ``\\frac{14}{3}``); None for anything else, which sympy reads."""
    text = prepare(answer).replace(" ", "")
    try:
        if _PLAIN_NUMBER.match(text):
            return Fraction(text.replace(",", ""))
        if m := _PLAIN_FRAC.match(text):
            return Fraction(int(m[2]), int(m[3])) * (-1 if m[1] else 1)
    except ZeroDivisionError:
        return None
    return None


def _plain_verdict(prediction: str, reference: str) -> bool | None:
    """The verdict on two plain numbers without sympy: equal when their exact values are; not
    equal when they differ and neither is a decimal (math-verify rounds decimals: 0.333333 is
    1/3); None when sympy must decide."""
    p, r = plain_number(prediction), plain_number(reference)
    if p is None or r is None:
        return None
    if p == r:
        return True
    return False if "." not in prediction + reference else None


def math_verdicts(pairs: list[tuple[str | None, str | None]], seconds: float = MATH_TIMEOUT_S,
                  where: str = "auto") -> list[bool | None]:
    """For each ``(prediction, reference)``: True (equal as mathematics), False, or None when the
    comparison ran past ``seconds`` (count it as not equal). Plain numbers are compared exactly
    without sympy; the other distinct pairs once each, ``where`` as in
    :func:`~factory.time_limit.map_limited`."""
    found: dict = {}
    for p, r in pairs:
        if p is not None and r is not None and str(p).strip() and str(r).strip():
            key = (str(p), str(r))
            if key not in found:
                found[key] = _plain_verdict(*key)
    todo = sorted(key for key, verdict in found.items() if verdict is None)
    if todo:
        _require()
    found.update(zip(todo, map_limited(_equal, todo, seconds, where, setup=load)))
    out = []
    for p, r in pairs:
        verdict = found.get((str(p), str(r)), False)
        out.append(None if verdict is TIMED_OUT else verdict)
    return out


def math_equal(prediction: str | None, reference: str | None, seconds: float = MATH_TIMEOUT_S) -> bool:
    """Whether the prediction equals the reference as mathematics (False past ``seconds``)."""
    return bool(math_verdicts([(prediction, reference)], seconds)[0])


def _number_key(value) -> str:
    """An exact rational as ``p`` or ``p/q``; any other real number to 12 significant digits."""
    import sympy

    value = sympy.nsimplify(value, rational=True) if isinstance(value, sympy.Float) else value
    if isinstance(value, sympy.Rational):
        return _fraction_key(Fraction(int(value.p), int(value.q)))
    number = sympy.N(value, 15)
    if number.is_real:
        return f"~{float(number):.12g}"
    return f"~{sympy.re(number):.12g}{sympy.im(number):+.12g}i"


def _canonical(expr) -> str:
    """A form of a sympy object equal for equal values: numbers exactly (or to 12 digits),
    tuples, sets and intervals element by element, expressions expanded."""
    import sympy
    from math_verify.grader import get_pct_val

    expr = get_pct_val(expr, expr)
    if isinstance(expr, sympy.Eq) and isinstance(expr.lhs, sympy.Symbol):
        expr = expr.rhs  # x = 5 is the answer 5
    if isinstance(expr, sympy.Tuple):
        return "(" + ",".join(_canonical(e) for e in expr.args) + ")"
    if isinstance(expr, sympy.FiniteSet):
        return "{" + ",".join(sorted(_canonical(e) for e in expr.args)) + "}"
    if isinstance(expr, sympy.Interval):
        return ("(" if expr.left_open else "[") + _canonical(expr.start) + "," + _canonical(expr.end) + \
            (")" if expr.right_open else "]")
    if isinstance(expr, sympy.Expr):
        expr = expr.doit()
        if expr in (sympy.oo, -sympy.oo):  # the open end of a ray
            return str(expr)
        if expr.is_number:
            if not expr.is_finite:  # 1/0, 12:00 (read as a division): no value to vote on
                raise ValueError("not a finite number")
            return _number_key(expr)
        return str(sympy.expand(expr))
    return str(expr)


def _fraction_key(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _key(answer: str) -> str:
    """The voting key of an answer that is not a plain number; runs under a time limit."""
    import sympy

    for item in parsed(answer):
        if isinstance(item, (sympy.Basic, sympy.MatrixBase)):
            try:
                return _canonical(item)
            except Exception:  # no finite value, or sympy refusing an operation: the text still votes
                break
    return "text:" + prepare(answer).replace(" ", "")


def math_keys(answers: list[str | None], seconds: float = MATH_TIMEOUT_S, where: str = "auto") -> list[str | None]:
    """A canonical key per answer, equal for answers equal as mathematics in their usual forms
    (``14/3``, ``\\frac{14}{3}``, ``4\\frac{2}{3}``; ``3\\sqrt{13}``, ``\\sqrt{117}``; sets in any
    order). Each distinct answer is parsed once; one that runs past ``seconds`` keys as its text."""
    found: dict = {}
    for answer in answers:
        if answer is not None and str(answer).strip() and str(answer) not in found:
            value = plain_number(str(answer))
            found[str(answer)] = None if value is None else _fraction_key(value)
    todo = sorted(a for a, key in found.items() if key is None)
    if todo:
        _require()
    found.update(zip(todo, map_limited(_key, todo, seconds, where, setup=load)))
    out = []
    for answer in answers:
        key = found.get(str(answer)) if answer is not None else None
        out.append("text:" + str(answer).strip() if key is TIMED_OUT else key)
    return out
