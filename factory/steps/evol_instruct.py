"""``evol_instruct``: harder and rarer tasks evolved from the input's tasks (WizardLM; Xu et al., 2023).

Each generation rewrites every surviving task of the previous one (generation 0 is the
input) with one operation drawn by weight: an *in-depth* rewrite that makes the task harder
(``add_constraints``, ``deepen``, ``concretize``, ``increase_reasoning``,
``complicate_input``) or an *in-breadth* one (``breadth``) that creates a new, rarer task in
the same domain. The model answers each evolved task, and the elimination step drops the
evolutions that failed, one reason per rule:

* ``no_information_gain`` -- the task asks nothing more than its parent: no word that the parent
  lacks (the same text after normalisation, or a piece of it), or the model judges the two equal;
* ``template_leak`` -- the task mentions the evolving prompt ("given prompt", "#Rewritten
  Prompt#") or copies a run of its wording;
* ``apologetic_response`` -- the answer says "sorry" in under 80 words;
* ``empty_response`` -- the answer is only punctuation and stop words;
* ``parse_error`` -- the reply holds no usable task.

Survivors feed the next generation; every kept row records its parent, operation and
generation (the lineage columns ``factory inspect`` shows).
"""

from __future__ import annotations

import random
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from ..config import option, suggest
from ..errors import FactoryError, ParseError
from ..llm.base import Completion, GenerationParams
from .base import (DROP, DROP_DETAIL, RAW_REPLY, TEMPLATE_DIR, GlobalStep, InvalidRow, LLMStep, LLMStepConfig,
                   compile_template)

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

Rule = Literal["no_information_gain", "apologetic_response", "empty_response", "template_leak"]
RULES = typing.get_args(Rule)

# Replies start after these labels, which the default templates' examples use: a small
# model then writes one task instead of answering it or chatting about it.
DEPTH_PREFILL = "#Harder Prompt#:"
BREADTH_PREFILL = "#New Prompt#:"
EQUALITY_PREFILL = "Answer:"

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

_SENTINEL = "\x00"


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


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


def clean_instruction(reply: str) -> str:
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


def is_empty_response(response: str) -> bool:
    """Only punctuation and stop words (or nothing at all)."""
    return all(word in STOP_WORDS for word in normalize(response).split())


def is_apologetic(response: str) -> bool:
    return "sorry" in response.lower() and len(response.split()) < APOLOGY_MAX_WORDS


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


class EvolInstruct(GlobalStep, LLMStep):
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
    Config = EvolInstructConfig

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self._templates: dict = {}  # compiled lazily, per kind
        self._leak_runs: dict = {}  # word runs of each operation's evolving prompt

    def __getstate__(self):
        # Compiled templates do not pickle; they are rebuilt where the step runs.
        return {**super().__getstate__(), "_templates": {}, "_leak_runs": {}}

    # -- column flow ---------------------------------------------------------------------
    def requires(self):
        return [self.config.column]

    def produces(self):
        c = self.config
        return [c.column, "parent", "operation", "generation", "origin"] + ([c.response_column] if c.respond else [])

    def output_columns(self, columns):
        kept = columns if self.config.keep_parents else []
        return kept + [c for c in self.produces() if c not in kept]

    # -- prompts -------------------------------------------------------------------------
    def prompt_source(self, kind: str) -> str:
        """The template text of ``kind`` (depth, breadth or equality): the option's, or the default file."""
        value = getattr(self.config, f"{kind}_template")
        if value is None:
            return (TEMPLATE_DIR / f"evol_{'equal' if kind == 'equality' else kind}.j2").read_text(encoding="utf-8")
        if _is_path(value):
            return self._path(value).read_text(encoding="utf-8")
        return value

    def template_source(self) -> str:
        return "\n".join(self.prompt_source(kind) for kind in ("depth", "breadth", "equality"))

    def check(self):
        problems = []
        examples = {"depth": {"prompt": "Name a fruit.", "instruction": DEPTH_OPERATIONS["add_constraints"],
                              "operation": "add_constraints"},
                    "breadth": {"prompt": "Name a fruit."},
                    "equality": {"first": "Name a fruit.", "second": "Name two fruits."}}
        for kind, variables in examples.items():
            key = f"{kind}_template"
            value = getattr(self.config, key)
            if value is not None and _is_path(value) and not self._path(value).is_file():
                problems.append((f"template file '{value}' does not exist", key,
                                 "give a path relative to the recipe file, or inline the template text"))
                continue
            try:
                compile_template(self.prompt_source(kind)).render(**variables, config=self.config)
            except Exception as err:  # jinja2's syntax and undefined-variable errors
                problems.append((f"the {kind} template does not render: {err}", key,
                                 f"fix the Jinja syntax; its variables are {', '.join(variables)}"))
        return problems

    def _path(self, value: str) -> Path:
        return Path(value) if Path(value).is_absolute() else self.base_dir / value

    def _render(self, kind: str, **variables) -> str:
        if kind not in self._templates:
            self._templates[kind] = compile_template(self.prompt_source(kind))
        return self._templates[kind].render(**variables, config=self.config).strip()

    def evolution_prompt(self, parent: str, operation: str) -> str:
        if operation == BREADTH:
            return self._render("breadth", prompt=parent)
        return self._render("depth", prompt=parent, instruction=DEPTH_OPERATIONS[operation], operation=operation)

    def evolution_messages(self, parent: str, operation: str):
        return self.messages(self.evolution_prompt(parent, operation),
                             prefill=BREADTH_PREFILL if operation == BREADTH else DEPTH_PREFILL)

    def given_prompt(self, row: dict) -> str:
        """The row's task as the model sees it: its text, and its input when it has one."""
        task = self.text(row, self.config.column)
        task_input = row.get(self.config.input_column)
        return f"{task}\n\n{task_input}" if isinstance(task_input, str) and task_input.strip() else task

    def parse(self, reply, row):
        return {self.config.column: clean_instruction(reply)}

    # -- elimination ---------------------------------------------------------------------
    def leak(self, candidate: dict) -> str | None:
        """Why an evolved task leaks its evolving prompt, or None."""
        text = candidate[self.config.column]
        lowered = text.lower()
        for phrase in self.config.leak_phrases:
            if phrase.lower() in lowered:
                return f"mentions '{phrase}'"
        # The template's own wording, without the parent's, so that a task that keeps its
        # parent's words is not mistaken for a leak.
        runs = self._template_runs(candidate["operation"]) - _runs(normalize(candidate["parent"]).split())
        words = normalize(text).split()
        for i in range(len(words) - LEAK_RUN_WORDS + 1):
            run = tuple(words[i:i + LEAK_RUN_WORDS])
            if run in runs:
                return f"copies '{' '.join(run)}' from the evolving prompt"
        return None

    def _template_runs(self, operation: str) -> set[tuple[str, ...]]:
        if operation not in self._leak_runs:
            runs: set = set()
            for part in self.evolution_prompt(_SENTINEL, operation).split(_SENTINEL):
                runs |= _runs(normalize(part).split())
            self._leak_runs[operation] = runs
        return self._leak_runs[operation]

    def eliminate(self, candidates: list[dict], generation: int) -> None:
        """Applies the rules to a generation's candidates (in place): cheap checks first, then
        the equality check, then answers for the tasks still standing."""
        c = self.config
        rules = set(c.eliminate)
        for cand in _live(candidates):
            if "template_leak" in rules and (why := self.leak(cand)):
                _drop(cand, "template_leak", why)
                continue
            evolved, parent = normalize(cand[c.column]), normalize(cand["parent"])
            # Not one word the parent lacks: the same task, a piece of it, or its words reshuffled.
            if "no_information_gain" in rules and set(evolved.split()) <= set(parent.split()):
                _drop(cand, "no_information_gain",
                      "identical to its parent" if evolved == parent else "no word that its parent lacks")
        if "no_information_gain" in rules:
            self.progress.set_postfix_str(f"generation {generation}/{c.generations}: equality checks")
            self.check_equality(_live(candidates))
        if c.respond:
            self.progress.set_postfix_str(f"generation {generation}/{c.generations}: answering")
            live = _live(candidates)
            for cand, completion in zip(live, self.answer([cand[c.column] for cand in live])):
                self.check_response(cand, completion, rules)

    def check_equality(self, candidates: list[dict]) -> None:
        c = self.config
        conversations = [self.messages(self._render("equality", first=cand["parent"], second=cand[c.column]),
                                       prefill=EQUALITY_PREFILL) for cand in candidates]
        params = GenerationParams(temperature=0.0, max_tokens=8, stop=("\n",))
        for cand, completion in zip(candidates, self.llm.chat(conversations, params)):
            if completion.error is not None:
                _drop(cand, completion.error_reason, completion.error)
                continue
            reply = completion.texts[0]
            try:
                equal = parse_equality(reply)
            except ParseError:
                # No verdict is no evidence against the evolution: keep it, and count how often.
                self.report["equality_unclear"] = self.report.get("equality_unclear", 0) + 1
                continue
            if equal:
                _drop(cand, "no_information_gain", f"judged equal to its parent: {reply.strip()!r}")

    def answer(self, tasks: list[str]) -> list[Completion]:
        c = self.config
        params = GenerationParams(temperature=c.response_temperature, top_p=c.top_p, max_tokens=c.response_max_tokens)
        return self.llm.chat([self.messages(task) for task in tasks], params)

    def check_response(self, row: dict, completion: Completion, rules: set) -> None:
        """Stores the answer in ``row``, or drops the row: response rules apply when in ``rules``."""
        if completion.error is not None:
            _drop(row, completion.error_reason, completion.error)
            return
        response = completion.texts[0].strip()
        row[self.config.response_column] = response
        if "empty_response" in rules and is_empty_response(response):
            _drop(row, "empty_response", "only punctuation and stop words")
        elif not response:
            _drop(row, "parse_error", "empty response")
        elif "apologetic_response" in rules and is_apologetic(response):
            _drop(row, "apologetic_response", f"says sorry in {len(response.split())} words")

    # -- the generations -----------------------------------------------------------------
    def evolve(self, parents: list[str], generation: int, rng: random.Random) -> list[dict]:
        """One candidate per parent, its operation drawn by weight."""
        c = self.config
        names = [name for name, weight in c.operations.items() if weight > 0]
        operations = rng.choices(names, weights=[c.operations[n] for n in names], k=len(parents))
        self.progress.set_postfix_str(f"generation {generation}/{c.generations}: evolving")
        completions = self.llm.chat([self.evolution_messages(p, op) for p, op in zip(parents, operations)],
                                    self.generation_params())
        candidates = []
        for parent, operation, completion in zip(parents, operations, completions):
            cand = {c.column: None, "parent": parent, "operation": operation, "generation": generation,
                    "origin": self.name, DROP: None, RAW_REPLY: None, DROP_DETAIL: None}
            if c.respond:
                cand[c.response_column] = None
            candidates.append(cand)
            if completion.error is not None:
                _drop(cand, completion.error_reason, completion.error)
                continue
            cand[RAW_REPLY] = completion.texts[0]
            try:
                cand.update(self.parse(completion.texts[0], {}))
            except ParseError as err:
                _drop(cand, err.reason, str(err))
        return candidates

    def process(self, table: pl.DataFrame) -> pl.DataFrame:
        c = self.config
        seeds, dropped = [], []
        for row in table.to_dicts():
            try:
                seeds.append((row, self.given_prompt(row)))
            except InvalidRow as err:
                dropped.append({**row, DROP: "invalid_input", DROP_DETAIL: str(err)})
        if not seeds:
            raise FactoryError(f"steps[{self.index}].evol_instruct: the input has no tasks in column '{c.column}'; "
                               "point `source:` at a file of tasks or set `column:`")
        rng = random.Random(f"{self.seed}:{self.index}")
        parents = [prompt for _, prompt in seeds]
        kept: list[dict] = []
        self.report = {"kept_per_generation": {}}
        for generation in range(1, c.generations + 1):
            if not parents or (c.max_rows is not None and len(kept) >= c.max_rows):
                break
            self.progress.reset(total=len(parents))
            candidates = self.evolve(parents, generation, rng)
            self.eliminate(candidates, generation)
            survivors = []
            for cand in candidates:
                if cand[DROP] is None and c.max_rows is not None and len(kept) + len(survivors) >= c.max_rows:
                    _drop(cand, "over_quota", f"max_rows={c.max_rows} reached")
                (survivors if cand[DROP] is None else dropped).append(cand)
            self.progress.update(len(candidates))
            self.report["kept_per_generation"][str(generation)] = len(survivors)
            kept += survivors
            parents = [s[c.column] for s in survivors]
        if c.keep_parents:
            kept = self.parent_rows(seeds) + kept
        out = pl.from_dicts(kept + dropped, infer_schema_length=None, strict=False)
        # Stable types even when a column happens to be all null (e.g. no candidate was answered).
        strings = [col for col in (c.column, "parent", "operation", "origin", c.response_column, DROP, RAW_REPLY,
                                   DROP_DETAIL) if col in out.columns]
        return out.with_columns(pl.col(strings).cast(pl.String), pl.col("generation").cast(pl.Int64))

    def parent_rows(self, seeds: list[tuple[dict, str]]) -> list[dict]:
        """The input rows as generation 0; with ``respond``, those without an answer are answered
        (one batch), and dropped as the evolved tasks would be when that fails."""
        c = self.config
        rows = [{**row, "parent": None, "operation": None, "generation": 0, "origin": row.get("origin") or "seed",
                 DROP: None} for row, _ in seeds]
        if c.respond:
            todo = [(row, prompt) for row, (_, prompt) in zip(rows, seeds)
                    if not (isinstance(row.get(c.response_column), str) and row[c.response_column].strip())]
            for (row, _), completion in zip(todo, self.answer([prompt for _, prompt in todo])):
                # The rules judge evolutions, not the input: only a failed or empty answer drops a parent.
                self.check_response(row, completion, rules=set())
        return rows


def _is_path(value: str) -> bool:
    return value.endswith(".j2") and "\n" not in value


def _runs(words: list[str]) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + LEAK_RUN_WORDS]) for i in range(len(words) - LEAK_RUN_WORDS + 1)}


def _live(candidates: list[dict]) -> list[dict]:
    return [cand for cand in candidates if cand[DROP] is None]


def _drop(row: dict, reason: str, detail: str) -> None:
    row[DROP] = reason
    row[DROP_DETAIL] = detail
