"""``evol_instruct``: harder and rarer tasks evolved from the input's tasks (WizardLM; Xu et al., 2023).

Each generation rewrites every surviving task of the previous one (generation 0 is the
input) with one operation drawn by weight: an *in-depth* rewrite that makes the task harder
(``add_constraints``, ``deepen``, ``concretize``, ``increase_reasoning``,
``complicate_input``) or an *in-breadth* one (``breadth``) that creates a new, rarer task in
the same domain. The model answers each evolved task, and the elimination step drops the
evolutions that failed, one reason per rule:

* ``no_information_gain`` -- the task asks nothing more than its parent: no word that the parent
  lacks (the same text after normalisation, or a piece of it), or the model judges the two equal
  (``{"equal": true}`` where the backend enforces JSON Schemas, else a reply started with "Answer:");
* ``template_leak`` -- the task mentions the evolving prompt ("given prompt", "#Rewritten
  Prompt#") or copies a run of its wording;
* ``apologetic_response`` -- the answer says "sorry" in under 80 words;
* ``empty_response`` -- the answer is only punctuation and stop words;
* ``parse_error`` -- the reply holds no usable task.

Survivors feed the next generation; every kept row records its parent, operation and
generation (the lineage columns ``factory inspect`` shows).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

from ..config import option, suggest
from ..errors import FactoryError, ParseError
from ..llm.base import Completion, GenerationParams, Request
from ..text import has_text
from .context import StepContext
from .drops import DROP, DROP_DETAIL, RAW_REPLY, InvalidRow, dropped, rows_to_frame
from .evol_rules import (DEFAULT_LEAK_PHRASES, EQUALITY_SCHEMA, RULES, Elimination, Rule, parse_equality, prompt_runs,
                         read_equality)
from .json_replies import json_params
from .llm_step import LLMStep, LLMStepConfig
from .truncation import continuations

# What the depth template asks for, per operation (the template's `instruction` variable).
DEPTH_OPERATIONS = {
    "add_constraints": "Add one more constraint or requirement to it.",
    "deepen": "If it asks about a particular issue, make it ask about that issue in more depth and breadth.",
    "concretize": "Replace a general concept in it with a more specific one.",
    "increase_reasoning": "If a few simple thinking steps are enough to solve it, make it explicitly ask for "
                          "several steps of reasoning.",
    "complicate_input": "Add a small piece of input data that it must work with, such as a table, a list, "
                        "a JSON object or a short code snippet.",
}
BREADTH = "breadth"
OPERATIONS = [*DEPTH_OPERATIONS, BREADTH]

# Replies start after these labels, which the default templates' examples use: a small
# model then writes one task instead of answering it or chatting about it.
DEPTH_PREFILL = "#Harder Prompt#:"
BREADTH_PREFILL = "#New Prompt#:"
EQUALITY_PREFILL = "Answer:"
EQUALITY_PARAMS = GenerationParams(temperature=0.0, max_tokens=8, stop=("\n",))  # a verdict in a word or two
# Where the backend enforces JSON Schemas: {"equal": true | false}, in at most 16 tokens, no prefill.
EQUALITY_JSON_PARAMS = json_params(EQUALITY_PARAMS, EQUALITY_SCHEMA, verdict=True)

# Each prompt renders with these before a run starts (template option -> its variables).
RENDER_EXAMPLES = {
    "depth_template": {"prompt": "Name a fruit.", "instruction": DEPTH_OPERATIONS["add_constraints"],
                       "operation": "add_constraints"},
    "breadth_template": {"prompt": "Name a fruit."},
    "equality_template": {"first": "Name a fruit.", "second": "Name two fruits."},
}
_HOLE = "\x00"  # rendered where the parent goes, to find the evolving prompt's own wording

# -- parsing --------------------------------------------------------------------------------

_LABEL = (r"[#*\s]*(?:the\s+)?(?:(?:harder|new|rewritten|created|evolved|given|original|improved|more\s+difficult)"
          r"\s+)?(?:prompt|task|instruction|question)\s*[#*]*\s*:[*\s]*")
_LEADING_LABEL = re.compile(rf"^{_LABEL}", re.I)
# Chatter before the task: "Sure!", "Certainly.", "Here's the harder prompt:".
_OPENER = re.compile(r"^(?:(?:sure|certainly|okay|ok|of course|absolutely|great)\b[^\n.!:]*[.!:]+"
                     r"|here(?:'s|\s+is)\b[^\n:]*\b(?:prompt|version|task|instruction|question|rewrite)\b[^\n:]*:)"
                     r"\s*", re.I)
# A line that ends the task (outside code fences): the next labelled item of a list the model
# keeps going, a line starting with "#" (label fragments such as "#Frozen#:"), or the model
# explaining or answering what it wrote.
_END = re.compile(rf"^(?:{_LABEL}|#"
                  r"|this\s+(?:is|rewritten|new|harder|prompt|task|version|question|instruction|adds|makes|requires)\b"
                  r"|the\s+(?:original|rewritten|new|harder|above|given|updated|revised)\s+"
                  r"(?:prompt|task|instruction|question|version)\b"
                  r"|(?:note|explanation|answer|solution|your\s+answer)\s*:"
                  r"|here(?:'s|\s+is|\s+are)\b[^\n]*\b(?:prompt|version|task|rewrite|answer|solution)\b"
                  r"|in\s+this\b|removing\b|adding\b|to\s+(?:add|make)\b"
                  r"|i\s+(?:added|made|changed|rewrote|replaced|have|hope|think)\b|i'(?:ve|m)\b)",
                  re.I)
_QUOTES = [('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("**", "**"), ("`", "`")]


def clean_evolved_instruction(reply: str) -> str:
    """The evolved task in a reply, without labels, chatter, explanations or quotes.

    Raises:
        ParseError: nothing that reads as a task is left.
    """
    text = reply.strip()
    while True:
        stripped = _OPENER.sub("", _LEADING_LABEL.sub("", text, count=1), count=1).strip()
        if stripped == text:
            break
        text = stripped
    lines = text.splitlines()
    in_code = lines[0].lstrip().startswith("```") if lines else False
    for i, line in enumerate(lines[1:], start=1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code and _END.match(line.strip()):
            lines = lines[:i]
            break
    text = "\n".join(line.rstrip() for line in lines).strip()
    text = re.sub(r"\n{3,}", "\n\n", text)
    for left, right in _QUOTES:
        inner = text[len(left):-len(right)]
        # Only a pair around the whole text: '"Hi" means hello, say "Bye"' keeps its quotes.
        if text.startswith(left) and text.endswith(right) and inner.strip() and left not in inner \
                and right not in inner:
            text = inner.strip()
    words = text.split()
    if len(words) < 3 or not any(sum(ch.isalpha() for ch in w) >= 2 for w in words):
        raise ParseError("no instruction in the reply")
    return text


# -- the step -------------------------------------------------------------------------------

@dataclass
class EvolInstructConfig(LLMStepConfig):
    generations: int = option(2, help="Rounds of evolution; each evolves the survivors of the one before "
                                      "(generation 0 is the input).", min=1, max=10)
    operations: dict[str, float] = option(
        default_factory=lambda: dict.fromkeys(OPERATIONS, 1.0),
        help="Operations and their weights (one is drawn per task and generation): in-depth "
             f"{', '.join(DEPTH_OPERATIONS)}; in-breadth `breadth`. A weight of 0 turns one off.")
    eliminate: list[Rule] = option(default_factory=lambda: list(RULES),
                                   help="Elimination rules to apply, each dropping with its own reason.")
    respond: bool = option(True, help="Answer every evolved task into `response_column` (needed by the "
                                      "apologetic_response and empty_response rules).")
    keep_parents: bool = option(False, help="Also output the input rows (generation 0, origin `seed` unless "
                                            "they have one).")
    max_rows: int | None = option(None, help="Stop once this many evolved tasks are kept; the surplus of the "
                                             "last generation is dropped as `over_quota`.", min=1)
    column: str = option("instruction", help="The task column, read and written.")
    input_column: str = option("input", help="Optional task input, folded into the task that is evolved (an "
                                             "evolved task stands alone).")
    response_column: str = option("response", help="Where the answers go.")
    depth_template: str | None = option(None, help="Jinja template of the in-depth prompt (default: "
                                                   "evol_depth.j2); variables `prompt`, `instruction`, `operation`.")
    breadth_template: str | None = option(None, help="Jinja template of the in-breadth prompt (default: "
                                                     "evol_breadth.j2); variable `prompt`.")
    equality_template: str | None = option(None, help="Jinja template of the equality check (default: "
                                                      "evol_equal.j2); variables `first`, `second`.")
    leak_phrases: list[str] = option(default_factory=lambda: list(DEFAULT_LEAK_PHRASES),
                                     help="An evolved task containing one of these (any case) is a `template_leak`.")
    temperature: float = option(0.7, help="Sampling temperature of the evolution.", min=0.0, max=5.0)
    top_p: float = option(0.95, help="Nucleus sampling mass (evolution and answers).", min=0.0, max=1.0)
    max_tokens: int = option(128, help="Most tokens per evolved task.", min=1)
    stop: list[str] = option(default_factory=lambda: ["\n#Prompt#", "\n#Harder Prompt#", "\n#New Prompt#"],
                             help="Strings that end an evolved task: the default templates' labels, which "
                                  "small models repeat to start another one.")
    response_temperature: float = option(0.7, help="Sampling temperature of the answers.", min=0.0, max=5.0)
    response_max_tokens: int = option(256, help="Most tokens per answer.", min=1)

    def validate(self):
        problems = []
        if self.template is not None:
            problems.append(("evol_instruct has three prompts", "template",
                             "set `depth_template`, `breadth_template` or `equality_template` instead"))
        for name, weight in self.operations.items():
            if name not in OPERATIONS:
                problems.append((f"unknown operation '{name}'", "operations", suggest(name, OPERATIONS, "operation")))
            elif weight < 0:
                problems.append((f"operation '{name}' has a negative weight ({weight:g})", "operations",
                                 "use a weight of 0 or more (0 turns the operation off)"))
        if not problems and not any(w > 0 for w in self.operations.values()):
            problems.append(("no operation has a weight above 0", "operations",
                             "give at least one operation a positive weight, e.g. {add_constraints: 1, breadth: 1}"))
        return problems


class EvolInstruct(LLMStep):
    """Evolves tasks into harder (in-depth) and rarer (in-breadth) ones, generation by generation.

    Every LLM call of a generation is one batch: the evolutions, then the equality checks,
    then the answers. Operations are drawn with a generator seeded by the recipe seed and
    the step's position, so a run is repeatable.

    Requires: ``instruction`` (the tasks to evolve; ``input`` is folded in when present).
    Produces: ``instruction`` (the evolved task), ``parent`` (the task it was evolved from),
    ``operation``, ``generation`` (1..N), ``origin`` (``evol_instruct``) and, with
    ``respond``, ``response``. Dropped candidates carry ``no_information_gain``,
    ``template_leak``, ``apologetic_response``, ``empty_response``, ``parse_error`` or
    ``over_quota``, with the raw reply.

    Example:
        - evol_instruct: {generations: 2, operations: {add_constraints: 2, concretize: 1, breadth: 1}}
    """

    name = "evol_instruct"
    kind = "global"
    reads_fields = True  # the equality check asks for {"equal": bool} where the backend enforces JSON
    Config = EvolInstructConfig
    templates = {"depth_template": "evol_depth", "breadth_template": "evol_breadth",
                 "equality_template": "evol_equal"}

    def requires(self):
        return [self.config.column]

    def produces(self):
        c = self.config
        return [c.column, "parent", "operation", "generation", "origin"] + ([c.response_column] if c.respond else [])

    def output_columns(self, columns):
        kept = columns if self.config.keep_parents else []
        return kept + [c for c in self.produces() if c not in kept]

    def check(self):
        problems = super().check()  # missing files, Jinja syntax
        for key in [key for key in RENDER_EXAMPLES if all(problem[1] != key for problem in problems)]:
            try:
                self.render({}, key, **RENDER_EXAMPLES[key])
            except Exception as err:  # jinja2's undefined-variable errors
                problems.append((f"the {key.removesuffix('_template')} template does not render: {err}", key,
                                 f"fix the Jinja syntax; its variables are {', '.join(RENDER_EXAMPLES[key])}"))
        return problems

    def frame(self, rows, data):
        c, out = self.config, rows_to_frame(rows, like=data)
        # Stable types even when a column happens to be all null (e.g. no candidate was answered).
        strings = [col for col in (c.column, "parent", "operation", "origin", c.response_column, DROP, RAW_REPLY,
                                   DROP_DETAIL) if col in out.columns]
        return out.with_columns(pl.col(strings).cast(pl.String), pl.col("generation").cast(pl.Int64))

    def exchange(self, rows: list[dict], ctx: StepContext):
        seeds, invalid = [], []
        for row in rows:
            try:
                seeds.append((row, self.given_prompt(row)))
            except InvalidRow as err:
                invalid.append(dropped(row, "invalid_input", str(err)))
        if not seeds:
            raise FactoryError(f"{self.label}: the input has no tasks in column '{self.config.column}'; "
                               "point `source:` at a file of tasks or set `column:`")
        run = EvolRun(self, ctx)
        kept, gone = yield from run.generations([prompt for _, prompt in seeds])
        parents = (yield from run.answer_parents(seeds)) if self.config.keep_parents else []
        return parents + kept + invalid + gone

    def given_prompt(self, row: dict) -> str:
        """The row's task as the model sees it: its text, and its input when it has one."""
        task = self.text(row, self.config.column)
        task_input = row.get(self.config.input_column)
        return f"{task}\n\n{task_input}" if has_text(task_input) else task

    def parse(self, reply, row):
        # The raw reply stays with the candidate, kept or dropped later by a rule.
        return {self.config.column: clean_evolved_instruction(reply), RAW_REPLY: reply}


class EvolPrompts:
    """The step's requests, from its templates: evolutions, equality checks and answers."""

    def __init__(self, step: EvolInstruct):
        self.step = step
        self._leak_runs: dict[str, set] = {}

    def evolution(self, parent: str, operation: str) -> Request:
        prefill = BREADTH_PREFILL if operation == BREADTH else DEPTH_PREFILL
        return Request(self.step.messages(self.evolution_prompt(parent, operation), prefill),
                       self.step.generation_params())

    def evolution_prompt(self, parent: str, operation: str) -> str:
        if operation == BREADTH:
            return self.step.render({}, "breadth_template", prompt=parent)
        return self.step.render({}, "depth_template", prompt=parent, instruction=DEPTH_OPERATIONS[operation],
                                operation=operation)

    def equality(self, cand: dict) -> Request:
        prompt = self.step.render({}, "equality_template", first=cand["parent"], second=cand[self.step.config.column])
        return Request(self.step.conversation(prompt, EQUALITY_SCHEMA, EQUALITY_PREFILL),
                       EQUALITY_JSON_PARAMS if self.step.asks_json else EQUALITY_PARAMS)

    def answer(self, task: str) -> Request:
        c = self.step.config
        return Request(self.step.messages(task), GenerationParams(temperature=c.response_temperature, top_p=c.top_p,
                                                                  max_tokens=c.response_max_tokens,
                                                                  continuations=continuations(c),
                                                                  max_tokens_option="response_max_tokens"))

    def leak_runs(self, operation: str) -> set[tuple[str, ...]]:
        """The word runs of ``operation``'s evolving prompt, worked out once per operation."""
        if operation not in self._leak_runs:
            self._leak_runs[operation] = prompt_runs(self.evolution_prompt(_HOLE, operation), _HOLE)
        return self._leak_runs[operation]


class EvolRun:
    """One run of the step: generation after generation of candidates, each a few rounds of
    requests (the evolutions, the equality checks, the answers), repeatable from the recipe
    seed and the step's position."""

    def __init__(self, step: EvolInstruct, ctx: StepContext):
        c = self.config = step.config
        self.step, self.ctx, self.prompts = step, ctx, EvolPrompts(step)
        self.rng = random.Random(f"{step.seed}:{step.index}")
        self.rules = Elimination(set(c.eliminate), c.column, c.response_column, c.leak_phrases,
                                 functools.partial(step.cut_dropped, option="response_max_tokens"),
                                 read_equality if step.asks_json else parse_equality)

    def generations(self, parents: list[str]):
        """The kept and the dropped candidates of every generation."""
        c, kept, gone = self.config, [], []
        self.ctx.report["kept_per_generation"] = {}
        for generation in range(1, c.generations + 1):
            if not parents or (c.max_rows is not None and len(kept) >= c.max_rows):
                break
            self.ctx.progress.reset(total=len(parents))
            stage = f"generation {generation}/{c.generations}"
            candidates = yield from self.evolve(parents, generation, stage)
            candidates = yield from self.eliminate(candidates, stage)
            survivors, over = within_quota(candidates, c.max_rows, len(kept))
            self.ctx.progress.update(len(candidates))
            self.ctx.report["kept_per_generation"][str(generation)] = len(survivors)
            kept, gone, parents = kept + survivors, gone + over, [s[c.column] for s in survivors]
        return kept, gone

    def evolve(self, parents: list[str], generation: int, stage: str):
        """One candidate per parent, its operation drawn by weight."""
        c = self.config
        names = [name for name, weight in c.operations.items() if weight > 0]
        operations = self.rng.choices(names, weights=[c.operations[n] for n in names], k=len(parents))
        self.ctx.progress.set_postfix_str(f"{stage}: evolving")
        completions = yield [self.prompts.evolution(p, op) for p, op in zip(parents, operations)]
        return [self.step.rows_from_completion(candidate(c, parent, operation, generation, self.step.name), done)[0]
                for parent, operation, done in zip(parents, operations, completions)]

    def eliminate(self, candidates: list[dict], stage: str):
        """The candidates after the rules: cheap checks first, then the equality check, then
        answers for the tasks still standing."""
        candidates = [self.rules.look(cand, self.prompts.leak_runs) for cand in candidates]
        if "no_information_gain" in self.rules.rules:
            self.ctx.progress.set_postfix_str(f"{stage}: equality checks")
            live = _live(candidates)
            candidates = yield from ask(candidates, live, [self.prompts.equality(candidates[i]) for i in live],
                                        functools.partial(self.rules.judged, report=self.ctx.report))
        if self.config.respond:
            self.ctx.progress.set_postfix_str(f"{stage}: answering")
            live = _live(candidates)
            candidates = yield from ask(candidates, live, [self.prompts.answer(candidates[i][self.config.column])
                                                           for i in live], self.rules.answered)
        return candidates

    def answer_parents(self, seeds: list[tuple[dict, str]]):
        """The input rows as generation 0; with ``respond``, those without an answer are answered,
        and dropped as the evolved tasks would be when that fails."""
        c = self.config
        rows = [{**row, "parent": None, "operation": None, "generation": 0, "origin": row.get("origin") or "seed",
                 DROP: None} for row, _ in seeds]
        todo = [i for i, row in enumerate(rows) if c.respond and not has_text(row.get(c.response_column))]
        # The rules judge evolutions, not the input: only a failed or empty answer drops a parent.
        return (yield from ask(rows, todo, [self.prompts.answer(seeds[i][1]) for i in todo],
                               dataclasses.replace(self.rules, rules=set()).answered))


def candidate(config: EvolInstructConfig, parent: str, operation: str, generation: int, origin: str) -> dict:
    """A new candidate before its reply is read: its lineage, and every column a drop fills."""
    row = {config.column: None, "parent": parent, "operation": operation, "generation": generation,
           "origin": origin, DROP: None, RAW_REPLY: None, DROP_DETAIL: None}
    return {**row, config.response_column: None} if config.respond else row


def ask(rows: list[dict], todo: list[int], requests: list[Request], read: Callable[[dict, Completion], dict]):
    """``rows``, each of those at the positions ``todo`` replaced by ``read(row, completion)``
    with the completion of its request (one round)."""
    completions = yield requests
    rows = list(rows)
    for i, completion in zip(todo, completions):
        rows[i] = read(rows[i], completion)
    return rows


def within_quota(candidates: list[dict], max_rows: int | None, kept: int) -> tuple[list[dict], list[dict]]:
    """The live candidates that fit in ``max_rows`` after the ``kept`` rows of earlier
    generations, and the others, the surplus dropped as ``over_quota``."""
    survivors, gone = [], []
    for cand in candidates:
        if cand[DROP] is None and max_rows is not None and kept + len(survivors) >= max_rows:
            cand = dropped(cand, "over_quota", f"max_rows={max_rows} reached")
        (survivors if cand[DROP] is None else gone).append(cand)
    return survivors, gone


def _live(candidates: list[dict]) -> list[int]:
    return [i for i, cand in enumerate(candidates) if cand[DROP] is None]
