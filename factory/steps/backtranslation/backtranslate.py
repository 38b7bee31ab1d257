"""``backtranslate``: the model writes the instruction that a document (segment) answers."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ...config import option
from ...errors import FactoryError, ParseError
from ...hashing import fingerprint
from ...text import normalize
from ..llm_step import LLMStep, LLMStepConfig
from .examples import choose_examples, load_examples, next_generation
from .instructions import clean_backtranslated_instruction
from .segments import split_segments

ORIGIN = "backtranslation"


@dataclass
class BacktranslateConfig(LLMStepConfig):
    column: str = option("text", help="The unlabeled text; each document (or segment) becomes a `response`. "
                                      "The column itself is not passed on (the segment is in `response`).")
    id_column: str = option("doc_id", help="The document's id, kept for lineage; rows without one get an id "
                                           "made from their text.")
    title_column: str = option("title", help="A title shown in the prompt when the row has one, so that a "
                                             "segment's topic is known.")
    max_words: int | None = option(None, help="Split each document into segments of at most this many words, "
                                              "on paragraph boundaries (a heading stays with its paragraph); "
                                              "null: the whole document is one response.", min=1)
    join_lines: bool = option(True, help="Join the hard-wrapped lines of a paragraph into one line, as Markdown "
                                         "renders them (lists, tables, quotes and code are kept as they are).")
    examples_from: str | None = option(None, help="Curated pairs shown as few-shot demonstrations (response -> "
                                                  "instruction): a version folder such as out/backtranslation/v1, "
                                                  "or a .jsonl/.parquet file with instruction and response columns.")
    examples: int = option(2, help="Demonstrations per prompt when `examples_from` is set.", min=1, max=16)
    output_column: str = option("instruction", help="Where the generated instruction goes.")
    response_column: str = option("response", help="Where the document or segment goes.")
    prefill: str | None = option("Question:", help="Text the model's reply starts with (it continues it); "
                                                   "null lets the model start freely.")
    max_tokens: int = option(48, help="Most tokens per generated instruction.", min=1)
    stop: list[str] = option(default_factory=lambda: ["\n"],
                             help="The instruction ends at the end of its line (with few-shot prompts the model "
                                  "goes on with another 'Text:'). Set [] for a model that chats before it "
                                  "answers when there is no prefill: the first line with content is used.")

    def validate(self):
        if self.output_column == self.response_column:
            return [(f"output_column and response_column are both '{self.output_column}'", "output_column",
                     "give the instruction and the response different columns")]
        return []


class Backtranslate(LLMStep):
    """Self-augmentation: the model writes the instruction that a document (segment) answers.

    Each row is a document; with ``max_words`` it is cut into segments first, one output
    row each. The text becomes ``response`` and the model's instruction, cleaned of labels,
    quotes and chatter, ``instruction``. With ``examples_from``, each prompt first shows
    ``examples`` curated pairs of an earlier version, chosen per row with a seeded random
    generator (never from the row's own document).

    Requires: ``text`` (the ``column``); ``doc_id`` and ``title`` are used when present.
    Produces: ``instruction``, ``response``, ``doc_id``, ``segment`` (0, 1, ... within the
    document), and lineage: ``origin`` (``backtranslation``), ``parent`` (``doc_id``, or
    ``doc_id#segment`` when the document was split), ``operation`` (``backtranslate``, or
    ``backtranslate_fewshot`` with demonstrations) and ``generation`` (1; with demonstrations,
    one more than the highest ``generation`` among them, or 2 when they carry none). A reply
    without a usable instruction drops its row as ``parse_error``, one that repeats a
    demonstration it was shown as ``copied_example``; the raw reply is kept.

    Example:
        - backtranslate: {max_words: 80}
        - backtranslate: {max_words: 80, examples_from: out/backtranslation/v1, examples: 2}
    """

    name = "backtranslate"
    Config = BacktranslateConfig

    def requires(self):
        return [self.config.column]

    def produces(self):
        c = self.config
        return [c.output_column, c.response_column, c.id_column, "segment", "origin", "parent", "operation",
                "generation"]

    def output_columns(self, columns):
        c = self.config
        kept = [col for col in columns if col != c.column or c.column == c.response_column]
        return kept + [col for col in self.produces() if col not in kept]

    def check(self):
        problems = super().check()
        try:
            self.example_pool  # read now, so that a bad file is a recipe error, not a failed run
        except FactoryError as err:
            problems.append((str(err), "examples_from", examples_fix(self.config)))
        return problems

    @functools.cached_property
    def example_pool(self) -> list[dict]:
        """The demonstrations to sample from; empty without ``examples_from``."""
        c = self.config
        return [] if c.examples_from is None else load_examples(c.examples_from, self.base_dir, c.output_column,
                                                                c.response_column, c.id_column)

    def fingerprint(self) -> str:
        # The demonstrations are part of what the step computes: a rewritten examples file
        # must not reuse batches cached with the old one.
        return fingerprint([super().fingerprint(), self.example_pool])

    def expand(self, row):
        return segment_rows(row, self.text(row, self.config.column), self.config, next_generation(self.example_pool))

    def demonstrations(self, row: dict) -> list[dict]:
        """``examples`` pairs for this segment's prompt, the same for the same seed, step and segment."""
        c = self.config
        return choose_examples(self.example_pool, row, c.examples, [self.seed, self.index], id_column=c.id_column,
                               response_column=c.response_column)

    def build_messages(self, row):
        title = row.get(self.config.title_column)
        prompt = self.render(row, text=row[self.config.response_column], title=title if isinstance(title, str) else "",
                             examples=self.demonstrations(row))
        return self.messages(prompt, prefill=self.config.prefill)

    def parse(self, reply, row):
        instruction = clean_backtranslated_instruction(reply)
        # Few-shot prompts tempt a small model to repeat a demonstration instead of reading the text.
        if normalize(instruction) in {normalize(d["instruction"]) for d in self.demonstrations(row)}:
            raise ParseError(f"the instruction copies a demonstration: {instruction!r}", reason="copied_example")
        return {self.config.output_column: instruction}


def segment_rows(row: dict, text: str, c: BacktranslateConfig, generation: int) -> list[dict]:
    """The rows for one document: one per segment, with lineage, before the model is asked."""
    doc_id = row.get(c.id_column)
    doc_id = str(doc_id) if doc_id not in (None, "") else fingerprint(text)[:12]
    pieces = split_segments(text, c.max_words, c.join_lines)
    base = {k: v for k, v in row.items() if k != c.column}
    lineage = {"origin": ORIGIN, "operation": "backtranslate_fewshot" if c.examples_from else "backtranslate",
               "generation": generation}
    return [{**base, c.id_column: doc_id, "segment": k, c.response_column: piece,
             "parent": doc_id if len(pieces) == 1 else f"{doc_id}#{k}", **lineage}
            for k, piece in enumerate(pieces)]


def examples_fix(c: BacktranslateConfig) -> str:
    return ("point it at a version written by a first pass (e.g. out/backtranslation/v1) or at a .jsonl/.parquet "
            f"file with '{c.output_column}' and '{c.response_column}' columns")
