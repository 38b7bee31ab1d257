"""``grounded_answer``: answers from the passages of ``context``, citing their ids."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...config import option
from ...errors import ParseError
from ..llm_step import LLMStep, LLMStepConfig
from .context import passage_list, passages_in

# A citation is text in square brackets, not followed by "(" (that is a Markdown link).
_CITATION = re.compile(r"\[([^\[\]\n]{1,200})\](?!\()")
_CITATION_SEPARATOR = re.compile(r"\s*(?:[,;]|\band\b)\s*")
_SENTENCE_DONE = re.compile(r"[.!?][\"')\]]*$")


def _id_key(text: str) -> str:
    """How a cited id is compared with the real ones: case, spaces, quotes and the file
    extension ("water-cycle#2" for "water-cycle.md#2") do not matter."""
    key = re.sub(r"[\s\"'`*]", "", text).lower()
    return re.sub(r"\.(?:md|markdown|txt)(?=#|$)", "", key)


def parse_citations(answer: str, allowed: list[str]) -> tuple[str, list[str]]:
    """The answer with its citations written as the exact ids, and the ids it cites
    (in order of first citation).

    ``[water-cycle.md#2]``, ``[Water-Cycle.md #2]``, ``[water-cycle#2]`` and
    ``[water-cycle.md#2, water-cycle.md#4]`` are citations; ``[text](url)`` is a link, not one.

    Raises:
        ParseError: ``no_citation`` when nothing is in square brackets, ``bad_citation``
            when a citation names an id that is not in ``allowed`` (a made-up citation is
            what grounded data must not teach, so one is enough to drop the answer).
    """
    keys = {_id_key(chunk_id): chunk_id for chunk_id in allowed}
    cited: list[str] = []
    unknown: list[str] = []

    def canonical(match: re.Match) -> str:
        ids = []
        for part in _CITATION_SEPARATOR.split(match.group(1).strip()):
            chunk_id = keys.get(_id_key(part))
            if chunk_id is None:
                unknown.append(part)
            else:
                ids.append(chunk_id)
                if chunk_id not in cited:
                    cited.append(chunk_id)
        return "[" + ", ".join(ids) + "]"

    text = _CITATION.sub(canonical, answer)
    if unknown:
        raise ParseError(f"cites {', '.join(repr(u) for u in dict.fromkeys(unknown))}, not among the passages "
                         f"({', '.join(allowed)})", reason="bad_citation")
    if not cited:
        raise ParseError(f"cites no passage (expected an id in square brackets: {', '.join(allowed)})",
                         reason="no_citation")
    return text, cited


def clean_answer(text: str) -> str:
    """An answer without what the model wrote after it ("Question: ..." as if the prompt
    went on) and without a last sentence cut off by ``max_tokens``."""
    text = re.split(r"\n\s*(?:Question|Q)\s*:", text.strip(), maxsplit=1)[0].strip()
    if not _SENTENCE_DONE.search(text):
        done = [m.end() for m in re.finditer(r"[.!?][\"')\]]*(?=\s)", text)]
        if done:
            text = text[:done[-1]]
    return text.strip()


@dataclass
class GroundedAnswerConfig(LLMStepConfig):
    column: str = option("instruction", help="The question.")
    context_column: str = option("context", help="The passages, each under its id in square brackets "
                                                 "(as `grounded_questions` writes them).")
    chunk_ids_column: str = option("chunk_ids", help="The ids of the passages in the context; only these may "
                                                     "be cited.")
    output_column: str = option("response", help="Where the answer goes, its citations inline.")
    citations_column: str = option("citations", help="Where the cited chunk ids go (a list).")
    prefill: str | None = option("According to [", help="The start of the answer, written for the model: ending "
                                                        "in '[' makes it begin with a citation, which a small "
                                                        "model seldom writes unprompted. null: no prefill.")
    min_words: int = option(3, help="Answers with fewer words (citations aside) are dropped as `parse_error`.",
                            min=1)
    max_tokens: int = option(160, help="Most tokens per answer.", min=1)


class GroundedAnswer(LLMStep):
    """Answers each question from its passages, citing their ids in square brackets.

    The model sees the question and the passages of ``context``, each under its id, and is
    asked to cite the ones it uses ("... [water-cycle.md#2]"); by default its answer is
    started for it with "According to [" so that it opens with a citation (SmolLM2-135M
    cited in 52 of 59 answers so, and in none of 16 without). Citations stay inline in
    ``response`` (a grounded answer that names its sources is what the data teaches),
    rewritten to the exact ids; an unfinished last sentence and anything after a
    "Question:" line are cut off.

    Requires: ``instruction``, ``context`` and ``chunk_ids`` (from ``grounded_questions``).
    Produces: ``response`` and ``citations`` (the cited chunk ids). An answer that cites
    nothing is dropped as ``no_citation``; one that cites an id not in its context as
    ``bad_citation``; an empty one as ``parse_error`` (raw replies kept).

    Example:
        - grounded_answer: {max_tokens: 160}
        - grounded_answer: {prefill: null, llm: {backend: openai, model: big}}
    """

    name = "grounded_answer"
    Config = GroundedAnswerConfig

    def requires(self):
        return [self.config.column, self.config.context_column, self.config.chunk_ids_column]

    def produces(self):
        return [self.config.output_column, self.config.citations_column]

    def build_messages(self, row):
        c = self.config
        passages = passages_in(self.text(row, c.context_column), passage_list(row, c.chunk_ids_column))
        prompt = self.render(row, question=self.text(row, c.column), passages=passages)
        return self.messages(prompt, prefill=c.prefill)

    def parse(self, reply, row):
        c = self.config
        answer = clean_answer((c.prefill or "") + reply)
        answer, citations = parse_citations(answer, list(row[c.chunk_ids_column]))
        words = _CITATION.sub(" ", answer).split()
        opening = (c.prefill or "").rstrip("[").split()  # the prefill's words are not the model's answer
        if words[:len(opening)] == opening:
            words = words[len(opening):]
        if len(words) < c.min_words:
            raise ParseError(f"the answer has {len(words)} words besides its citations and the prefill, "
                             f"fewer than {c.min_words}")
        return {c.output_column: answer, c.citations_column: citations}
