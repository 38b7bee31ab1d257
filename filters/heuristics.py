"""``heuristics``: cheap quality checks -- length, refusals, language, repetition."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from factory.config import option

from .base import Filter

DEFAULT_REFUSALS = [
    r"\bI'?m sorry\b", r"\bI am sorry\b", r"\bI apologi[sz]e\b", r"\bas an AI\b", r"\bas a language model\b",
    r"\bI (?:cannot|can't|can not|won't|am unable to|am not able to|'m unable to|'m not able to) "
    r"(?:help|assist|provide|answer|comply|do that|fulfil|fulfill)",
]

CHECKS = ("length", "refusal", "language", "repetition")


@lru_cache(maxsize=1)
def _language_identifier():
    from py3langid import langid

    return langid.LanguageIdentifier.from_modelpath(langid.MODEL_DIR / langid.MODEL_FILE, norm_probs=True)


def repeated_ngram_fraction(words: list[str], n: int) -> float:
    """Share of a text's word n-grams that repeat an earlier one (0 = none repeat)."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def repeated_line_fraction(text: str) -> float:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return 1 - len(set(lines)) / len(lines) if lines else 0.0


@dataclass
class HeuristicsConfig:
    columns: list[str] = option(default_factory=lambda: ["response"],
                                help="The text columns to check (`column: x` for one).")
    checks: list[Literal["length", "refusal", "language", "repetition"]] = option(
        default_factory=lambda: list(CHECKS), help="Which checks to run: length, refusal, language, repetition.")
    min_words: int = option(1, help="Fewer words: `too_short`.", min=0)
    max_words: int = option(4000, help="More words: `too_long`.", min=1)
    refusal_patterns: list[str] = option(default_factory=lambda: list(DEFAULT_REFUSALS),
                                         help="Regular expressions (case-insensitive) that mark a refusal when "
                                              "found in the first `refusal_window` characters.")
    refusal_window: int = option(300, help="Characters at the start of the text searched for refusals.", min=1)
    language: str = option("en", help="Expected language (ISO 639-1, e.g. en, fr, de).")
    min_language_confidence: float = option(
        0.6, help="Drop as `wrong_language` only when another language is detected with at least this "
                  "confidence (py3langid), so that short or numeric texts are not dropped.", min=0.0, max=1.0)
    ngram: int = option(3, help="Word n-gram size for the repetition check.", min=1)
    max_repeated_ngrams: float = option(0.3, help="Largest share of repeated word n-grams before `repetitive`.",
                                        min=0.0, max=1.0)
    max_repeated_lines: float = option(0.3, help="Largest share of repeated lines before `repetitive`.",
                                       min=0.0, max=1.0)

    def validate(self):
        problems = []
        for i, pattern in enumerate(self.refusal_patterns):
            try:
                re.compile(pattern)
            except re.error as err:
                problems.append((f"refusal pattern {i} is not a valid regular expression: {err}",
                                 "refusal_patterns", "fix or quote the pattern"))
        if self.min_words > self.max_words:
            problems.append((f"min_words {self.min_words} is above max_words {self.max_words}", "min_words",
                             "lower it"))
        return problems


class Heuristics(Filter):
    """Drops rows whose text is too short or long, a refusal, in another language, or repetitive.

    Reasons: ``too_short``, ``too_long``, ``refusal``, ``wrong_language``, ``repetitive``
    (the detail names the column and the measured value).

    Requires: the ``columns`` (default ``response``).

    Example:
        - heuristics: {columns: [response], checks: [length, refusal, repetition], min_words: 3}
    """

    name = "heuristics"
    Config = HeuristicsConfig

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self._refusal = re.compile("|".join(f"(?:{p})" for p in config.refusal_patterns), re.I) \
            if config.refusal_patterns else None

    def requires(self):
        return list(self.config.columns)

    def keep(self, row):
        c = self.config
        for column in c.columns:
            text = row.get(column)
            if not isinstance(text, str):
                return False, "too_short", f"{column} is not text"
            words = text.split()
            if "length" in c.checks:
                if len(words) < c.min_words:
                    return False, "too_short", f"{column} has {len(words)} words (min_words {c.min_words})"
                if len(words) > c.max_words:
                    return False, "too_long", f"{column} has {len(words)} words (max_words {c.max_words})"
            if "refusal" in c.checks and self._refusal is not None:
                found = self._refusal.search(text[:c.refusal_window])
                if found:
                    return False, "refusal", f"{column} says {found.group(0)!r}"
            if "repetition" in c.checks:
                grams = repeated_ngram_fraction([w.lower() for w in words], c.ngram)
                if grams > c.max_repeated_ngrams:
                    return False, "repetitive", f"{column}: {grams:.0%} of word {c.ngram}-grams repeat"
                lines = repeated_line_fraction(text)
                if lines > c.max_repeated_lines:
                    return False, "repetitive", f"{column}: {lines:.0%} of lines repeat"
            if "language" in c.checks and text.strip():
                language, confidence = _language_identifier().classify(text)
                if language != c.language and confidence >= c.min_language_confidence:
                    return False, "wrong_language", f"{column} looks like '{language}' ({confidence:.2f})"
        return True
