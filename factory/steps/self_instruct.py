"""``self_instruct``: new tasks bootstrapped from seed tasks (Wang et al., 2023).

Each prompt shows a numbered list of in-context examples -- mostly seed tasks, plus a few
tasks generated in earlier rounds once there are some -- and lets the model continue the
list with one more item. Candidates are cleaned and kept unless they are too short or
long, mention something a text model cannot do (the paper's keyword blacklist), or repeat
a task already in the pool. Rounds continue until ``num_tasks`` are kept or
``max_rounds`` have run.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import polars as pl

from ..config import option
from ..errors import FactoryError, ParseError
from .base import DROP, RAW_REPLY, GlobalStep, LLMStep, LLMStepConfig

# Self-Instruct's filter for tasks that a language model cannot perform in text.
DEFAULT_BLACKLIST = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                     "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]

_NUMBERING = re.compile(r"^\s*(?:task\s*)?(?:\d+\s*[.):]|[-*•])\s*", re.I)


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def clean_task(reply: str) -> str:
    """The first line of a continuation, without numbering, labels or quotes."""
    line = reply.strip().split("\n", 1)[0].strip()
    line = _NUMBERING.sub("", line)
    line = re.sub(r"^(?:task|instruction)\s*:\s*", "", line, flags=re.I)
    return line.strip().strip('"').strip()


@dataclass
class SelfInstructConfig(LLMStepConfig):
    num_tasks: int = option(20, help="New tasks to generate.", min=1)
    examples: int = option(6, help="In-context examples per prompt.", min=1)
    machine_examples: int = option(2, help="How many of the examples come from generated tasks, once "
                                           "there are enough.", min=0)
    prompts_per_round: int = option(32, help="Most prompts sent to the model per round (a round asks for the "
                                             "missing tasks plus half again).", min=1)
    max_rounds: int = option(10, help="Stop after this many rounds even if fewer tasks were kept.", min=1)
    column: str = option("instruction", help="The seed task column, and the column of the new tasks.")
    keep_seeds: bool = option(False, help="Also pass the seed tasks on (marked origin=seed).")
    min_words: int = option(3, help="Shorter candidates are dropped as `too_short`.", min=1)
    max_words: int = option(150, help="Longer candidates are dropped as `too_long`.", min=1)
    blacklist: list[str] = option(default_factory=lambda: list(DEFAULT_BLACKLIST),
                                  help="Candidates containing one of these words are dropped as `blacklisted`.")
    temperature: float = option(0.7, help="Sampling temperature.", min=0.0, max=5.0)
    top_p: float = option(0.95, help="Nucleus sampling mass.", min=0.0, max=1.0)
    max_tokens: int = option(64, help="Most tokens per generated task.", min=1)
    stop: list[str] = option(default_factory=lambda: ["\n"], help="A task ends at the end of its line.")


class SelfInstruct(GlobalStep, LLMStep):
    """Generates new tasks from the seed tasks in the input table.

    Requires: ``instruction`` (the seed tasks).
    Produces: ``instruction`` (new tasks), ``origin`` (``self_instruct``, or ``seed``),
    ``round``. Dropped candidates carry ``too_short``, ``too_long``, ``blacklisted``,
    ``duplicate`` or ``parse_error``.

    Example:
        - self_instruct: {num_tasks: 50, examples: 6}
    """

    name = "self_instruct"
    kind = "global"
    Config = SelfInstructConfig

    def requires(self):
        return [self.config.column]

    def produces(self):
        return [self.config.column, "origin", "round"]

    def output_columns(self, columns):
        kept = columns if self.config.keep_seeds else []
        return kept + [c for c in self.produces() if c not in kept]

    def prompt(self, examples: list[str]):
        listing = "".join(f"{i + 1}. {e}\n" for i, e in enumerate(examples))
        return self.messages(self.render({}), prefill=f"{listing}{len(examples) + 1}.")

    def parse(self, reply, row):
        task = clean_task(reply)
        if not task or not re.search(r"[A-Za-z]", task):
            raise ParseError("no task in the reply")
        return {self.config.column: task}

    def verdict(self, task: str, seen: set[str]) -> str | None:
        c = self.config
        words = task.split()
        if len(words) < c.min_words:
            return "too_short"
        if len(words) > c.max_words:
            return "too_long"
        lowered = f" {normalize(task)} "
        if any(f" {normalize(w)} " in lowered for w in c.blacklist):
            return "blacklisted"
        if normalize(task) in seen:
            return "duplicate"
        return None

    def process(self, table: pl.DataFrame) -> pl.DataFrame:
        c = self.config
        seeds = [t for t in table[c.column].to_list() if isinstance(t, str) and t.strip()]
        if not seeds:
            raise FactoryError(f"steps[{self.index}].self_instruct: the input has no seed tasks in column '{c.column}'; "
                               "point `source:` at a file of tasks or set `column:`")
        rng = random.Random(f"{self.seed}:{self.index}")
        seen = {normalize(t) for t in seeds}
        kept: list[dict] = []
        dropped: list[dict] = []
        self.progress.reset(total=c.num_tasks)
        for round_ in range(c.max_rounds):
            if len(kept) >= c.num_tasks:
                break
            # Ask for what is missing plus a margin for candidates the filters will drop.
            need = c.num_tasks - len(kept)
            conversations = []
            for _ in range(min(c.prompts_per_round, need + need // 2 + 1)):
                n_machine = min(c.machine_examples, len(kept), c.examples)
                n_seed = min(c.examples - n_machine, len(seeds))
                examples = rng.sample(seeds, n_seed) + rng.sample([k[c.column] for k in kept], n_machine)
                rng.shuffle(examples)
                conversations.append(self.prompt(examples))
            for completion in self.llm.chat(conversations, self.generation_params()):
                for reply in completion.texts or [""]:
                    if completion.error is not None:
                        dropped.append({DROP: completion.error_reason, RAW_REPLY: completion.error})
                        continue
                    try:
                        task = self.parse(reply, {})[c.column]
                    except ParseError:
                        dropped.append({DROP: "parse_error", RAW_REPLY: reply})
                        continue
                    reason = self.verdict(task, seen)
                    if reason is None and len(kept) >= c.num_tasks:
                        reason = "over_quota"
                    if reason:
                        dropped.append({c.column: task, DROP: reason, RAW_REPLY: reply, "round": round_})
                        continue
                    seen.add(normalize(task))
                    kept.append({c.column: task, "origin": "self_instruct", "round": round_})
                    self.progress.update(1)
        parts = []
        if c.keep_seeds:
            parts.append(table.with_columns(origin=pl.lit("seed"), round=pl.lit(None, dtype=pl.Int64)))
        if kept:
            parts.append(pl.from_dicts(kept, infer_schema_length=None))
        if dropped:
            parts.append(pl.from_dicts(dropped, infer_schema_length=None))
        if not parts:
            return pl.DataFrame(schema={c.column: pl.String, "origin": pl.String, "round": pl.Int64, DROP: pl.String})
        out = pl.concat(parts, how="diagonal_relaxed")
        return out if DROP in out.columns else out.with_columns(pl.lit(None, dtype=pl.String).alias(DROP))
