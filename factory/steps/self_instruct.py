"""``self_instruct``: new tasks bootstrapped from seed tasks (Wang et al., 2023).

Each prompt shows a numbered list of in-context examples -- mostly seed tasks, plus a few
tasks generated in earlier rounds once there are some -- and lets the model continue the
list with one more item. A candidate is kept unless it is too short or long, mentions
something a text-only model cannot do (the paper's keyword blacklist), or is too similar
to a task already in the pool: ROUGE-L against every seed and kept task, as in the paper
(computed with rapidfuzz's LCS over word tokens, so a pool of thousands stays fast).
Rounds continue until ``num_tasks`` are kept or ``max_rounds`` have run. With
``instances``, the model then writes input/output instances for each kept task, shown a
few seed tasks with their instances as demonstrations. With ``personas`` (persona-driven
generation, as in Persona Hub), each prompt asks for tasks a person drawn from a persona set
might ask, and each task carries that person in column ``persona``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import polars as pl
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

from .. import personas as persona_sets
from ..config import option
from ..errors import FactoryError, ParseError
from ..hashing import fingerprint
from ..llm.base import Completion, GenerationParams, Request
from ..text import count_words, has_text, normalize
from .context import StepContext
from .drops import DROP, dropped, rows_to_frame
from .llm_step import LLMStep, LLMStepConfig
from .truncation import continuations

# Self-Instruct's filter for tasks that a language model cannot perform in text.
DEFAULT_BLACKLIST = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                     "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]
INSTANCE_STOP = ("\nTask:", "\nInput:", "\n\n\n")  # an instance ends where the model starts another

_NUMBERING = re.compile(r"^\s*(?:task\s*)?(?:\d+\s*[.):]|[-*•])\s*", re.I)
_NO_INPUT = {"", "<noinput>", "noinput", "none", "n/a", "-", "no input"}
PERSONA = persona_sets.COLUMN


def tokens(text: str) -> list[str]:
    """Lowercased alphanumeric words: the tokens ROUGE-L compares."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(candidate: list[str], references: list[list[str]]) -> list[float]:
    """ROUGE-L F1 of ``candidate`` against each reference: 2·LCS / (|c| + |r|)."""
    if not references or not candidate:
        return [0.0] * len(references)
    lcs = process.cdist([candidate], references, scorer=LCSseq.similarity, workers=1)[0]
    return [2 * int(n) / (len(candidate) + len(r)) if len(r) else 0.0 for n, r in zip(lcs, references)]


def clean_task(reply: str) -> str:
    """The first line of a continuation, without numbering, labels or quotes."""
    line = reply.strip().split("\n", 1)[0].strip()
    line = _NUMBERING.sub("", line)
    line = re.sub(r"^(?:task|instruction)\s*:\s*", "", line, flags=re.I)
    return line.strip().strip('"').strip()


def parse_task(reply: str) -> str:
    """The task a reply continues the list with.

    Raises:
        ParseError: the reply's first line holds no task.
    """
    task = clean_task(reply)
    if not task or not re.search(r"[A-Za-z]", task):
        raise ParseError("no task in the reply")
    return task


def parse_instance(reply: str) -> tuple[str, str]:
    """``(input, output)`` from a reply that continues "Input:" with "... Output: ...".

    Raises:
        ParseError: no output, or an empty one.
    """
    parts = re.split(r"\n\s*output\s*:\s*|\s+output\s*:\s*", reply, maxsplit=1, flags=re.I)
    if len(parts) != 2:
        raise ParseError("no 'Output:' in the instance")
    task_input = parts[0].strip()
    task_input = "" if task_input.lower().strip("<>. ") in _NO_INPUT or task_input.lower() in _NO_INPUT else task_input
    # Small models keep going ("Output: 1\n\nOutput: 2 ..."): the output ends at the next label.
    output = re.split(r"\n\s*(?:task|input|output)\s*:", parts[1], maxsplit=1, flags=re.I)[0].strip()
    if not output:
        raise ParseError("empty output in the instance")
    return task_input, output


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
    novelty_threshold: float = option(0.7, help="Candidates whose ROUGE-L F1 with any task in the pool reaches "
                                                "this are dropped as `too_similar` (the paper uses 0.7).",
                                      min=0.0, max=1.0)
    blacklist: list[str] = option(default_factory=lambda: list(DEFAULT_BLACKLIST),
                                  help="Candidates containing one of these words are dropped as `blacklisted`.")
    instances: int = option(0, help="Input/output instances to write per kept task (one row each, columns "
                                    "`input` and `output`); 0 writes none.", min=0, max=16)
    instance_examples: int = option(2, help="Seed tasks with an output shown as demonstrations when writing "
                                            "instances.", min=0)
    instance_template: str | None = option(None, help="Jinja template of the instance prompt (default: "
                                                      "self_instruct_instance.j2).")
    instance_max_tokens: int = option(160, help="Most tokens per instance.", min=1)
    output_column: str = option("output", help="Where an instance's output goes (`response` makes rows ready for "
                                               "`output: {format: messages}`).")
    temperature: float = option(0.7, help="Sampling temperature.", min=0.0, max=5.0)
    top_p: float = option(0.95, help="Nucleus sampling mass.", min=0.0, max=1.0)
    max_tokens: int = option(64, help="Most tokens per generated task.", min=1)
    stop: list[str] = option(default_factory=lambda: ["\n"], help="A task ends at the end of its line.")
    personas: str | dict | None = option(None, hashed_when_set=True,
                                         help="A persona set, as the `personas` step's `from:` (`bundled`, a file, "
                                              "{hub: proj-persona/PersonaHub, config: persona}): each prompt asks "
                                              "for the tasks of a person drawn with the recipe's seed, and each "
                                              "task carries that person in column `persona`.")


class SelfInstruct(LLMStep):
    """Generates new tasks (and optionally their instances) from the seed tasks in the input.

    Requires: ``instruction`` (the seed tasks; ``input``/``output`` when present are used as
    instance demonstrations).
    Produces: ``instruction`` (new tasks) with lineage ``origin`` (``self_instruct``, or
    ``seed``), ``operation`` (``bootstrap``) and ``generation`` (the round, from 1); with
    ``instances``, ``input`` and ``output`` (or ``output_column``); with ``personas``, ``persona``.
    Dropped candidates carry ``too_short``,
    ``too_long``, ``blacklisted``, ``too_similar`` (with the closest pool task and its
    ROUGE-L), ``over_quota`` or ``parse_error``.

    Example:
        - self_instruct: {num_tasks: 50, examples: 6, novelty_threshold: 0.7, instances: 1}
        - self_instruct: {num_tasks: 50, personas: bundled}
    """

    name = "self_instruct"
    kind = "global"
    Config = SelfInstructConfig
    templates = {"template": "self_instruct", "instance_template": "self_instruct_instance"}

    def requires(self):
        return [self.config.column]

    def produces(self):
        return [self.config.column, "origin", "operation", "generation"] + (
            ["input", self.config.output_column] if self.config.instances else []) + (
            [PERSONA] if self.config.personas is not None else [])

    def check(self):
        return super().check() + (persona_sets.problems_of(self.config.personas, "personas", self.base_dir)
                                  if self.config.personas is not None else [])

    def fingerprint(self) -> str:  # with personas, what the set holds (an edited file is another set)
        base = super().fingerprint()
        return base if self.config.personas is None else fingerprint([base, persona_sets.digest(personas_of(self))])

    def output_columns(self, columns):
        kept = columns if self.config.keep_seeds else []
        return kept + [c for c in self.produces() if c not in kept]

    def frame(self, rows, data):
        return output_frame(self.config, rows, data)

    def exchange(self, rows: list[dict], ctx: StepContext):
        c = self.config
        seed_rows = [row for row in rows if has_text(row.get(c.column))]
        if not seed_rows:
            raise FactoryError(f"{self.label}: the input has no seed tasks in column '{c.column}'; "
                               "point `source:` at a file of tasks or set `column:`")
        rng = random.Random(f"{self.seed}:{self.index}")
        pool = TaskPool(c, [row[c.column] for row in seed_rows])
        ctx.progress.reset(total=c.num_tasks)
        gone = yield from bootstrap(self, pool, rng, ctx)
        kept = pool.kept
        if c.instances and kept:
            kept, failed = yield from write_instances(self, kept, seed_rows, rng)
            gone += failed
        return kept + gone

    def task_request(self, examples: list[str], persona: str | None = None) -> Request:
        """The model continues the numbered list of ``examples`` with one more task (one ``persona``
        might ask, when there is one)."""
        listing = "".join(f"{i + 1}. {e}\n" for i, e in enumerate(examples))
        prompt = self.render({} if persona is None else {PERSONA: persona})
        return Request(self.messages(prompt, prefill=f"{listing}{len(examples) + 1}."), self.generation_params())

    def instance_request(self, task: str, shown: list[dict]) -> Request:
        """The model writes an instance of ``task`` after those of the seed rows ``shown``."""
        c = self.config
        examples = [{"task": row[c.column], "input": row.get("input") or "", "output": row["output"]} for row in shown]
        params = GenerationParams(n=c.instances, temperature=c.temperature, top_p=c.top_p,
                                  max_tokens=c.instance_max_tokens, stop=INSTANCE_STOP,
                                  continuations=continuations(c), max_tokens_option="instance_max_tokens")
        return Request(self.messages(self.render({}, "instance_template", task=task, examples=examples),
                                     prefill="Input:"), params)


class TaskPool:
    """The seed tasks and the tasks kept so far, which a candidate must not repeat.

    A candidate joins the pool unless a filter of the paper drops it: too short or long, a
    word of the blacklist, or a ROUGE-L with a task of the pool that reaches the threshold.
    """

    def __init__(self, config: SelfInstructConfig, seeds: list[str]):
        self.config, self.seeds = config, seeds
        self.texts, self.words = list(seeds), [tokens(t) for t in seeds]
        self.kept: list[dict] = []

    @property
    def full(self) -> bool:
        return len(self.kept) >= self.config.num_tasks

    def round_size(self) -> int:
        """What is missing, plus a margin for the candidates the filters will drop."""
        need = self.config.num_tasks - len(self.kept)
        return min(self.config.prompts_per_round, need + need // 2 + 1)

    def examples(self, rng: random.Random) -> list[str]:
        """A prompt's in-context examples: seed tasks and, once there are some, kept ones."""
        c = self.config
        n_machine = min(c.machine_examples, len(self.kept), c.examples)
        n_seed = min(c.examples - n_machine, len(self.seeds))
        examples = rng.sample(self.seeds, n_seed) + rng.sample([k[c.column] for k in self.kept], n_machine)
        rng.shuffle(examples)
        return examples

    def offer(self, completion: Completion, generation: int, persona: str | None = None) -> dict | None:
        """Keeps the task of a reply (None), or returns the reply's row, dropped with why; either
        carries the ``persona`` the prompt showed, when there was one."""
        c = self.config
        shown = {} if persona is None else {PERSONA: persona}
        if completion.error is not None:
            return dropped(shown, completion.error_reason, completion.error)
        reply = completion.texts[0]
        try:
            task = parse_task(reply)
        except ParseError:
            return dropped(shown, "parse_error", reply=reply)
        words = tokens(task)
        reason, detail = self.verdict(task, words)
        if reason is None and self.full:
            reason = "over_quota"
        if reason:
            return {**dropped({c.column: task}, reason, detail, reply), "generation": generation, **shown}
        self.texts.append(task)
        self.words.append(words)
        self.kept.append({c.column: task, "origin": "self_instruct", "operation": "bootstrap",
                          "generation": generation, **shown})
        return None

    def verdict(self, task: str, words: list[str]) -> tuple[str | None, str | None]:
        """``(reason, detail)`` for a candidate that must go, else ``(None, None)``."""
        c = self.config
        if count_words(task) < c.min_words:
            return "too_short", None
        if count_words(task) > c.max_words:
            return "too_long", None
        lowered = f" {normalize(task)} "
        hit = next((w for w in c.blacklist if f" {normalize(w)} " in lowered), None)
        if hit:
            return "blacklisted", f"mentions '{hit}'"
        scores = rouge_l(words, self.words)
        if scores:
            best = max(range(len(scores)), key=scores.__getitem__)
            if scores[best] >= c.novelty_threshold:
                return "too_similar", f"ROUGE-L {scores[best]:.2f} with: {self.texts[best]}"
        return None, None


def output_frame(c: SelfInstructConfig, rows: list[dict], data: pl.DataFrame) -> pl.DataFrame:
    """The step's rows as a frame (the seed rows first with ``keep_seeds``); with no rows, its schema."""
    seeds = [data.with_columns(origin=pl.lit("seed"), operation=pl.lit(None, dtype=pl.String),
                               generation=pl.lit(0, dtype=pl.Int64))] if c.keep_seeds else []
    schema = {c.column: pl.String, "origin": pl.String, "operation": pl.String, "generation": pl.Int64,
              **({PERSONA: pl.String} if c.personas is not None else {})}
    return pl.concat(seeds + [rows_to_frame(rows, schema={**schema, DROP: pl.String})], how="diagonal_relaxed")


def personas_of(step: SelfInstruct) -> tuple[str, ...] | None:
    """The personas of the step's ``personas`` set (read once per process), or None without one."""
    c = step.config
    return None if c.personas is None else persona_sets.load(c.personas, step.base_dir, step.label)


def bootstrap(step: SelfInstruct, pool: TaskPool, rng: random.Random, ctx: StepContext):
    """Rounds of prompts until the pool holds ``num_tasks`` or ``max_rounds`` have run; returns the
    rows dropped on the way (the kept tasks are in the pool). With personas, prompt ``j`` of round
    ``g`` shows the persona drawn with ``(seed, step index, g, j)``, apart from the examples' draws."""
    c = step.config
    personas, gone = personas_of(step), []
    for generation in range(1, c.max_rounds + 1):
        if pool.full:
            break
        asked = [(pool.examples(rng), None if personas is None else
                  persona_sets.draw(personas, 1, step.seed, step.index, generation, j)[0])
                 for j in range(pool.round_size())]
        completions = yield [step.task_request(examples, persona) for examples, persona in asked]
        for (_, persona), completion in zip(asked, completions):
            cut = step.cut_dropped({}, completion)
            shown = {} if persona is None else {PERSONA: persona}
            row = pool.offer(completion, generation, persona) if cut is None else {**cut, "generation": generation,
                                                                                    **shown}
            if row is None:
                ctx.progress.update(1)
            else:
                gone.append(row)
    return gone


def write_instances(step: SelfInstruct, kept: list[dict], seed_rows: list[dict], rng: random.Random):
    """One row per parsed instance of each kept task, and the tasks without one, dropped as
    ``no_instance`` (one round; each prompt shows a few seed rows that have an output)."""
    c = step.config
    demos = [row for row in seed_rows if has_text(row.get("output"))]
    completions = yield [step.instance_request(task[c.column], rng.sample(demos, min(c.instance_examples, len(demos))))
                         for task in kept]
    rows = [row for task, completion in zip(kept, completions)
            for row in step.rows_from_completion(task, completion, parse=lambda reply, _: instance(reply, c),
                                                 option="instance_max_tokens")]
    return [row for row in rows if DROP not in row], [row for row in rows if DROP in row]


def instance(reply: str, config: SelfInstructConfig) -> dict:
    """The columns of an instance reply: ``input`` and the output."""
    try:
        task_input, output = parse_instance(reply)
    except ParseError as err:
        raise ParseError(str(err), reason="no_instance") from err
    return {"input": task_input, config.output_column: output}
