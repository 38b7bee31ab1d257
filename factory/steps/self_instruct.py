"""``self_instruct``: new tasks bootstrapped from seed tasks (Wang et al., 2023).

Each prompt shows a numbered list of in-context examples -- mostly seed tasks, plus a few
tasks generated in earlier rounds once there are some -- and lets the model continue the
list with one more item. A candidate is kept unless it is too short or long, mentions
something a text-only model cannot do (the paper's keyword blacklist), or is too similar
to a task already in the pool: ROUGE-L against every seed and kept task, as in the paper
(computed with rapidfuzz's LCS over word tokens, so a pool of thousands stays fast).
Rounds continue until ``num_tasks`` are kept or ``max_rounds`` have run. With
``instances``, the model then writes input/output instances for each kept task, shown a
few seed tasks with their instances as demonstrations.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import polars as pl
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

from ..config import option
from ..errors import FactoryError, ParseError
from .base import DROP, DROP_DETAIL, RAW_REPLY, TEMPLATE_DIR, GlobalStep, LLMStep, LLMStepConfig, compile_template

# Self-Instruct's filter for tasks that a language model cannot perform in text.
DEFAULT_BLACKLIST = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                     "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]

_NUMBERING = re.compile(r"^\s*(?:task\s*)?(?:\d+\s*[.):]|[-*•])\s*", re.I)
_NO_INPUT = {"", "<noinput>", "noinput", "none", "n/a", "-", "no input"}


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


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


class SelfInstruct(GlobalStep, LLMStep):
    """Generates new tasks (and optionally their instances) from the seed tasks in the input.

    Requires: ``instruction`` (the seed tasks; ``input``/``output`` when present are used as
    instance demonstrations).
    Produces: ``instruction`` (new tasks) with lineage ``origin`` (``self_instruct``, or
    ``seed``), ``operation`` (``bootstrap``) and ``generation`` (the round, from 1); with
    ``instances``, ``input`` and ``output`` (or ``output_column``). Dropped candidates carry ``too_short``,
    ``too_long``, ``blacklisted``, ``too_similar`` (with the closest pool task and its
    ROUGE-L), ``over_quota`` or ``parse_error``.

    Example:
        - self_instruct: {num_tasks: 50, examples: 6, novelty_threshold: 0.7, instances: 1}
    """

    name = "self_instruct"
    kind = "global"
    Config = SelfInstructConfig

    def requires(self):
        return [self.config.column]

    def produces(self):
        return [self.config.column, "origin", "operation", "generation"] + (
            ["input", self.config.output_column] if self.config.instances else [])

    def output_columns(self, columns):
        kept = columns if self.config.keep_seeds else []
        return kept + [c for c in self.produces() if c not in kept]

    def instance_template_source(self) -> str:
        t = self.config.instance_template
        if t is None:
            return (TEMPLATE_DIR / "self_instruct_instance.j2").read_text(encoding="utf-8")
        return (self.base_dir / t).read_text(encoding="utf-8") if t.endswith(".j2") and "\n" not in t else t

    def check(self):
        problems = super().check()
        try:
            compile_template(self.instance_template_source())
        except Exception as err:  # a missing file or bad Jinja
            problems.append((f"the instance template does not load: {err}", "instance_template",
                             "fix the path or the Jinja syntax"))
        return problems

    def fingerprint(self) -> str:
        from ..llm.base import fingerprint

        return fingerprint([super().fingerprint(), self.instance_template_source()])

    def prompt(self, examples: list[str]):
        listing = "".join(f"{i + 1}. {e}\n" for i, e in enumerate(examples))
        return self.messages(self.render({}), prefill=f"{listing}{len(examples) + 1}.")

    def parse(self, reply, row):
        task = clean_task(reply)
        if not task or not re.search(r"[A-Za-z]", task):
            raise ParseError("no task in the reply")
        return {self.config.column: task}

    def verdict(self, task: str, words: list[str], pool: list[list[str]], pool_texts: list[str]) -> tuple:
        """``(reason, detail)`` for a candidate that must go, else ``(None, None)``."""
        c = self.config
        if len(task.split()) < c.min_words:
            return "too_short", None
        if len(task.split()) > c.max_words:
            return "too_long", None
        lowered = f" {normalize(task)} "
        hit = next((w for w in c.blacklist if f" {normalize(w)} " in lowered), None)
        if hit:
            return "blacklisted", f"mentions '{hit}'"
        scores = rouge_l(words, pool)
        if scores:
            best = max(range(len(scores)), key=scores.__getitem__)
            if scores[best] >= c.novelty_threshold:
                return "too_similar", f"ROUGE-L {scores[best]:.2f} with: {pool_texts[best]}"
        return None, None

    def process(self, table: pl.DataFrame) -> pl.DataFrame:
        c = self.config
        seed_rows = [r for r in table.to_dicts() if isinstance(r.get(c.column), str) and r[c.column].strip()]
        seeds = [r[c.column] for r in seed_rows]
        if not seeds:
            raise FactoryError(f"steps[{self.index}].self_instruct: the input has no seed tasks in column '{c.column}'; "
                               "point `source:` at a file of tasks or set `column:`")
        rng = random.Random(f"{self.seed}:{self.index}")
        pool_texts = list(seeds)
        pool = [tokens(t) for t in seeds]
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
                if completion.error is not None:
                    dropped.append({DROP: completion.error_reason, DROP_DETAIL: completion.error})
                    continue
                reply = completion.texts[0]
                try:
                    task = self.parse(reply, {})[c.column]
                except ParseError:
                    dropped.append({DROP: "parse_error", RAW_REPLY: reply})
                    continue
                words = tokens(task)
                reason, detail = self.verdict(task, words, pool, pool_texts)
                if reason is None and len(kept) >= c.num_tasks:
                    reason = "over_quota"
                if reason:
                    dropped.append({c.column: task, DROP: reason, DROP_DETAIL: detail, RAW_REPLY: reply,
                                    "generation": round_ + 1})
                    continue
                pool.append(words)
                pool_texts.append(task)
                kept.append({c.column: task, "origin": "self_instruct", "operation": "bootstrap",
                             "generation": round_ + 1})
                self.progress.update(1)
        if c.instances and kept:
            kept, more_dropped = self._instances(kept, seed_rows, rng)
            dropped += more_dropped
        parts = []
        if c.keep_seeds:
            parts.append(table.with_columns(origin=pl.lit("seed"), operation=pl.lit(None, dtype=pl.String),
                                            generation=pl.lit(0, dtype=pl.Int64)))
        if kept:
            parts.append(pl.from_dicts(kept, infer_schema_length=None))
        if dropped:
            parts.append(pl.from_dicts(dropped, infer_schema_length=None))
        if not parts:
            return pl.DataFrame(schema={c.column: pl.String, "origin": pl.String, "operation": pl.String,
                                        "generation": pl.Int64, DROP: pl.String})
        out = pl.concat(parts, how="diagonal_relaxed")
        return out if DROP in out.columns else out.with_columns(pl.lit(None, dtype=pl.String).alias(DROP))

    def _instances(self, kept: list[dict], seed_rows: list[dict], rng: random.Random) -> tuple[list[dict], list]:
        """One row per parsed instance of each kept task; tasks without one are dropped."""
        c = self.config
        template = compile_template(self.instance_template_source())
        demos = [r for r in seed_rows if isinstance(r.get("output"), str) and r["output"].strip()]
        conversations = []
        for task in kept:
            shown = rng.sample(demos, min(c.instance_examples, len(demos)))
            prompt = template.render(task=task[c.column], examples=[
                {"task": d[c.column], "input": d.get("input") or "", "output": d["output"]} for d in shown]).strip()
            conversations.append(self.messages(prompt, prefill="Input:"))
        params = self.generation_params().__class__(
            n=c.instances, temperature=c.temperature, top_p=c.top_p, max_tokens=c.instance_max_tokens,
            stop=("\nTask:", "\nInput:", "\n\n\n"))
        rows, dropped = [], []
        for task, completion in zip(kept, self.llm.chat(conversations, params)):
            if completion.error is not None:
                dropped.append({**task, DROP: completion.error_reason, DROP_DETAIL: completion.error})
                continue
            for reply in completion.texts:
                try:
                    task_input, output = parse_instance(reply)
                except ParseError as err:
                    dropped.append({**task, DROP: "no_instance", RAW_REPLY: reply, DROP_DETAIL: str(err)})
                    continue
                rows.append({**task, "input": task_input, c.output_column: output})
        return rows, dropped
