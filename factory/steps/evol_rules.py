"""The elimination rules of ``evol_instruct``: which evolutions failed, and why.

Each rule drops a candidate with its own reason (listed in :mod:`factory.steps.evol_instruct`).
The cheap rules read the evolved task and its parent; the equality check and the answer
rules read the model's replies to the step's later requests.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ..errors import ParseError
from ..llm.base import Completion
from ..llm.schema import read_reply
from ..text import count_words, ngrams, normalize
from .drops import DROP, dropped
from .json_replies import json_object

Rule = Literal["no_information_gain", "apologetic_response", "empty_response", "template_leak"]
RULES = typing.get_args(Rule)

DEFAULT_LEAK_PHRASES = ["given prompt", "rewritten prompt", "created prompt", "original prompt", "harder prompt",
                        "new prompt", "#prompt#"]
LEAK_RUN_WORDS = 5  # this many words in a row copied from the evolving prompt's own wording is a leak
APOLOGY_MAX_WORDS = 80

STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her here
hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of
off on once only or other our ours ourselves out over own same she should so some such than that the their
theirs them themselves then there these they this those through to too under until up very was we were what
when where which while who whom why will with would you your yours yourself yourselves ok okay yes oh um
""".split())

_EQUALITY = re.compile(r"\b(not\s+equal|unequal|not\s+equivalent|not\s+the\s+same|differ\w*"
                       r"|equal|equivalent|the\s+same|identical)\b", re.I)
_YES_NO = re.compile(r"^\W*(yes|no|true|false)\b", re.I)


def parse_equality(reply: str) -> bool:
    """True when the reply says the two instructions are equal ("Equal", "Yes, they are the same").

    The first verdict wins: small models give it first and then ramble.

    Raises:
        ParseError: the reply says neither.
    """
    found = _EQUALITY.search(reply)
    if found:
        return " ".join(found.group(1).lower().split()) in ("equal", "equivalent", "the same", "identical")
    yes_no = _YES_NO.search(reply)
    if yes_no:
        return yes_no.group(1).lower() in ("yes", "true")
    raise ParseError("no verdict found (expected 'Equal' or 'Not Equal')")


# The equality check's JSON reply, where the backend enforces it.
EQUALITY_SCHEMA = json_object({"equal": {"type": "boolean", "description": "whether the two instructions are equal"}})


def read_equality(reply: str) -> bool:
    """The verdict of a JSON equality check (:data:`EQUALITY_SCHEMA`).

    Raises:
        ParseError: (``schema_error``) the reply does not match.
    """
    return read_reply(reply, EQUALITY_SCHEMA)["equal"]


def is_empty_response(response: str) -> bool:
    """Only punctuation and stop words (or nothing at all)."""
    return all(word in STOP_WORDS for word in normalize(response).split())


def is_apologetic(response: str) -> bool:
    return "sorry" in response.lower() and count_words(response) < APOLOGY_MAX_WORDS


def word_runs(text: str) -> set[tuple[str, ...]]:
    """The runs of :data:`LEAK_RUN_WORDS` words of ``text``, normalised."""
    return set(ngrams(normalize(text).split(), LEAK_RUN_WORDS))


def prompt_runs(prompt: str, hole: str) -> set[tuple[str, ...]]:
    """The word runs of an evolving prompt's own wording: ``prompt`` was rendered with ``hole``
    where the parent goes, so no run spans the parent."""
    return set().union(*(word_runs(part) for part in prompt.split(hole)))


def leak(task: str, parent: str, phrases: list[str], runs: set[tuple[str, ...]]) -> str | None:
    """Why an evolved task leaks its evolving prompt (a phrase of ``phrases``, or a run of
    ``runs`` that its parent lacks), or None."""
    lowered = task.lower()
    for phrase in phrases:
        if phrase.lower() in lowered:
            return f"mentions '{phrase}'"
    # The prompt's own wording, without the parent's, so that a task that keeps its parent's
    # words is not mistaken for a leak.
    runs = runs - word_runs(parent)
    for run in ngrams(normalize(task).split(), LEAK_RUN_WORDS):
        if run in runs:
            return f"copies '{' '.join(run)}' from the evolving prompt"
    return None


def no_gain(task: str, parent: str) -> str | None:
    """Why an evolved task asks nothing more than its parent, or None."""
    evolved, parent = normalize(task), normalize(parent)
    # Not one word the parent lacks: the same task, a piece of it, or its words reshuffled.
    if set(evolved.split()) <= set(parent.split()):
        return "identical to its parent" if evolved == parent else "no word that its parent lacks"
    return None


@dataclass
class Elimination:
    """The rules one run applies (its ``eliminate`` option), to one candidate at a time.

    Each method returns the candidate, dropped with its reason when a rule says so.
    """

    rules: set[str]
    column: str
    response_column: str
    leak_phrases: list[str]
    # The row dropped as `truncated` when its reply was cut and the step drops cut replies, else None.
    cut: Callable[[dict, Completion], dict | None] = lambda row, completion: None
    # How the equality check's reply is read: its text, or its JSON (:func:`read_equality`).
    equality: Callable[[str], bool] = parse_equality

    def look(self, cand: dict, runs: Callable[[str], set[tuple[str, ...]]]) -> dict:
        """The cheap checks on a live candidate's text: a template leak (``runs(operation)``: the
        word runs of the prompt that evolved it), then no information gain."""
        if cand[DROP] is not None:
            return cand
        task, parent = cand[self.column], cand["parent"]
        if "template_leak" in self.rules and (why := leak(task, parent, self.leak_phrases, runs(cand["operation"]))):
            return dropped(cand, "template_leak", why)
        if "no_information_gain" in self.rules and (why := no_gain(task, parent)):
            return dropped(cand, "no_information_gain", why)
        return cand

    def judged(self, cand: dict, completion: Completion, report: dict) -> dict:
        """The candidate after the model compared it with its parent (equal: no information gain)."""
        if completion.error is not None:
            return dropped(cand, completion.error_reason, completion.error)
        reply = completion.texts[0]
        try:
            equal = self.equality(reply)
        except ParseError:
            # No verdict is no evidence against the evolution: keep it, and count how often.
            report["equality_unclear"] = report.get("equality_unclear", 0) + 1
            return cand
        return dropped(cand, "no_information_gain", f"judged equal to its parent: {reply.strip()!r}") if equal else cand

    def answered(self, row: dict, completion: Completion) -> dict:
        """The row with its answer, or dropped: a failed or empty answer always, the response
        rules when they are on."""
        if completion.error is not None:
            return dropped(row, completion.error_reason, completion.error)
        response = completion.texts[0].strip()
        row = {**row, self.response_column: response}
        if (cut := self.cut(row, completion)) is not None:
            return cut
        if "empty_response" in self.rules and is_empty_response(response):
            return dropped(row, "empty_response", "only punctuation and stop words")
        if not response:
            return dropped(row, "parse_error", "empty response")
        if "apologetic_response" in self.rules and is_apologetic(response):
            return dropped(row, "apologetic_response", f"says sorry in {count_words(response)} words")
        return row
