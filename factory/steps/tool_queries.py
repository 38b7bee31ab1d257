"""``tool_queries``: user requests written for sampled subsets of the tools, each needing one call, several, parallel calls or none.

For each request the step draws (with the recipe's seed) a kind, by the ``kinds`` ratios, and a
subset of ``tools_per_query`` tools, and asks the model for a message a user of those tools
might send: one that needs exactly one call (``single``), calls in sequence where a later one
uses an earlier result (``multiple``), independent calls that can run at once (``parallel``), or
no tool at all though it is in their domain (``none``, so that the data teaches when not to
call). Rows carry the request (``instruction``), the tools offered (``tools``, JSON text) and the
``kind``; ``tool_calls`` answers them. With input rows (personas...), ``per_row`` requests per
row, written as that row's person would.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import polars as pl

from .. import tools as T
from ..config import option
from ..hashing import fingerprint
from ..llm.base import Completion, Request
from ..text import count_words
from .drops import DROP, TRUNCATED, dropped, rows_to_frame
from .llm_step import LLMStep, LLMStepConfig
from .tool_calls import files_text, step_tools, tool_option_problems
from .truncation import truncation_detail

KINDS = {
    "single": "needs exactly one call to one of these tools.",
    "multiple": "needs two or more calls one after the other, where a later call uses the result of an earlier one.",
    "parallel": "needs two or more independent calls that can run at the same time (the same tool for several "
                "inputs, or different tools).",
    "none": "is on the same subjects but needs none of these tools: general knowledge, advice or an opinion "
            "answers it.",
}
_LABEL = re.compile(r"^\s*[*_]*\s*(?:user(?:'s)? message|user|message|request|query)\s*[*_]*\s*:\s*", re.I)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d"}


@dataclass
class ToolQueriesConfig(LLMStepConfig):
    tools: str | list | None = option(None, help="The tools: a JSON or YAML file of OpenAI function definitions "
                                                 "(relative to the recipe) or the list inline.")
    num_rows: int = option(20, help="Requests to write when the step has no input rows.", min=1)
    per_row: int = option(1, help="With input rows (personas...): requests per row.", min=1)
    tools_per_query: int = option(3, help="Tools offered with each request (a sample of the set; all when it has "
                                          "fewer).", min=1)
    kinds: dict[str, float] = option(default_factory=lambda: {"single": 0.4, "multiple": 0.2, "parallel": 0.2,
                                                              "none": 0.2},
                                     help="The share of each kind of request: single, multiple, parallel, none.")
    min_words: int = option(4, help="Shorter requests are dropped as `too_short`.", min=1)
    temperature: float = option(1.0, help="Sampling temperature (high: varied requests).", min=0.0, max=5.0)
    max_tokens: int = option(160, help="Most tokens per request (a longer one is dropped as `truncated`).", min=1)
    column: str = option("instruction", help="Where the request goes.")
    tools_column: str = option("tools", help="Where the tools offered go (JSON text).")
    kind_column: str = option("kind", help="Where the kind of request goes.")

    def validate(self):
        problems = []
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown:
            problems.append((f"unknown kind(s) {', '.join(unknown)}", "kinds", f"use {', '.join(KINDS)}"))
        if any(v < 0 for v in self.kinds.values()) or not sum(self.kinds.values()) > 0:
            problems.append(("the shares must be >= 0 and not all 0", "kinds", "e.g. {single: 0.5, none: 0.5}"))
        if self.tools is None:
            problems.append(("tool_queries needs the tools", "tools", "set `tools: tools.json` (OpenAI function "
                                                                      "definitions)"))
        return problems


class ToolQueries(LLMStep):
    """Writes user requests for sampled subsets of the tools, of each kind by the ``kinds`` shares.

    Requires: nothing (with input rows, the columns its template names, e.g. ``persona``).
    Produces: ``instruction``, ``tools`` (the tools offered, JSON text), ``kind``. Drops:
    ``empty_instruction``, ``too_short``, ``truncated``, ``names_tool`` (the request names a tool).

    Example:
        - tool_queries: {tools: tools.json, num_rows: 200, kinds: {single: 0.5, parallel: 0.25, none: 0.25}}
    """

    name = "tool_queries"
    kind = "global"
    Config = ToolQueriesConfig

    def check(self):
        return super().check() + tool_option_problems(self)

    def produces(self):
        c = self.config
        return [c.column, c.tools_column, c.kind_column]

    def fingerprint(self) -> str:
        return fingerprint([super().fingerprint(), files_text(self)])

    def frame(self, rows, data):
        c = self.config
        schema = {**data.schema, c.column: pl.String, c.tools_column: pl.String, c.kind_column: pl.String,
                  DROP: pl.String}
        return rows_to_frame(rows, schema=schema)

    def exchange(self, rows, ctx):
        plan = draws(self, rows or [{}])
        ctx.progress.reset(total=len(plan))
        params = self.generation_params()
        replies = yield [Request(self.messages(self.render(row, tools=[t["function"] for t in subset], kind=kind,
                                                           kind_description=KINDS[kind])), params)
                         for row, kind, subset in plan]
        return [read_query(self, row, kind, subset, completion)
                for (row, kind, subset), completion in zip(plan, replies)]


def draws(step: ToolQueries, rows: list[dict]) -> list[tuple[dict, str, list[dict]]]:
    """Each request to write: its input row, its kind and its tools (seeded by the recipe)."""
    c = step.config
    tools = step_tools(step) or []
    count = c.num_rows if rows == [{}] else len(rows) * c.per_row
    rng = random.Random(f"{step.seed}:{step.index}:tool_queries")
    kinds = allocate(c.kinds, count)
    rng.shuffle(kinds)
    size = min(c.tools_per_query, len(tools))
    items = [row for row in rows for _ in range(count // len(rows))]
    return [(row, kind, rng.sample(tools, size)) for row, kind in zip(items, kinds)]


def allocate(shares: dict[str, float], count: int) -> list[str]:
    """``count`` kinds in the ``shares`` (largest remainders: 10 at 0.25/0.25/0.5 is 2/3/5 or 3/2/5, never 0/0/10)."""
    total = sum(shares.values())
    exact = {k: count * v / total for k, v in shares.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[:count - sum(counts.values())]:
        counts[k] += 1
    return [k for k in shares for _ in range(counts[k])]


def clean_query(text: str) -> str:
    text = text.strip()
    while _LABEL.match(text):
        text = _LABEL.sub("", text, count=1).strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def read_query(step: ToolQueries, row: dict, kind: str, subset: list[dict], completion: Completion) -> dict:
    c = step.config
    out = {**row, c.tools_column: T.tools_text(subset), c.kind_column: kind}
    if completion.error is not None:
        return dropped(out, completion.error_reason, completion.error)
    reply = completion.texts[0]
    if completion.cut(0):
        return dropped(out, TRUNCATED, truncation_detail(step), reply)
    query = clean_query(reply)
    if not query:
        return dropped(out, "empty_instruction", "the model wrote no request", reply)
    if count_words(query) < c.min_words:
        return dropped(out, "too_short", f"{count_words(query)} words (min_words: {c.min_words})", reply)
    named = [t["function"]["name"] for t in subset if "_" in t["function"]["name"] and
             t["function"]["name"] in query]
    if named:
        return dropped(out, "names_tool", f"the request names the tool {named[0]}", reply)
    return {**out, c.column: query}
