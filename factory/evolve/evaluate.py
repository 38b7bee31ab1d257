"""Evaluation of a model: accuracy on a verifiable eval set, the "Mind the Gap" figures of a
round's samples (J(f), J(f[w]) and the gap per verifier, pass@k, diversity), and the paired
gain between two models.

Every question goes to the model the way a recipe's steps do, through
:meth:`factory.driver.Driver.run_steps`: the batch cache (a second eval of the same model on
the same set asks it nothing), the failure stop, progress, usage and truncation counts, and
one backend lifecycle. ``factory eval`` and the evolve loop (:mod:`factory.evolve.loop`) both
come here. Accuracy asks with the prompt of a recipe's ``solve`` step (chain of thought,
final-answer extraction) and checks each answer programmatically.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import yaml

from filters.consistency import Consistency, ConsistencyConfig
from filters.select import Select, SelectConfig

from ..answers import answer_key, answers_match, read_references
from ..config import to_dict
from ..driver import Driver, RunResult
from ..errors import FactoryError, Problem, RecipeError
from ..llm import DEFAULT_LLM, build_llm_config, merge_llm
from ..sources import build_source
from ..steps.context import StepContext
from ..steps.drops import TRUNCATED
from ..steps.solve import Solve, SolveConfig
from ..store import read_version
from ..text import ngrams

ITEM = "eval_item"  # the eval order of each question, carried through the run (kept and dropped rows come apart)


@dataclass
class AccuracyResult:
    accuracy: float
    items: int
    correct: int
    no_answer: int
    results: list[dict] = field(default_factory=list)
    truncated: int = 0  # answers cut at the token limit (counted wrong, and among no_answer)
    usage: dict | None = None  # what the eval asked of the model (see :func:`usage_of`)

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "items": self.items, "correct": self.correct, "no_answer": self.no_answer,
                "truncated": self.truncated}


def read_eval(spec: str | dict, base_dir: Path | None = None, limit: int | None = None) -> pl.DataFrame:
    """An eval set's rows: ``spec`` is a file path, or a mapping in the form a recipe's
    ``source:`` takes (``{hub: openai/gsm8k, config: main, split: test}``).

    Raises:
        FactoryError: the file or dataset does not exist or has no rows.
    """
    data = dict(spec) if isinstance(spec, dict) else {"path": spec}
    if limit:
        data["limit"] = limit
    problems: list[Problem] = []
    source = build_source({k: v for k, v in data.items() if v is not None}, ("eval",), problems,
                          base_dir or Path.cwd(), what="eval set")
    if source is None:
        raise FactoryError(f"{problems[0].message}" + (f"; {problems[0].fix}" if problems[0].fix else ""))
    return source.read()


def eval_references(table: pl.DataFrame, answer_column: str, kind: str, source: str | None = None) -> list[str]:
    """The eval set's reference answers read as predictions are (``#### 18``, ``\\boxed{18}``, "The
    answer is 18." give 18; a bare value stays itself); ``kind`` is a method or answer format.

    Raises:
        FactoryError: a reference holds no value (empty, or no number for numeric answers),
            naming the eval file, the line (.jsonl) or row, and the value.
    """
    where = source or "the eval set"
    jsonl = str(source or "").endswith(".jsonl")
    return read_references(table[answer_column].cast(pl.String).to_list(), kind, answer_column,
                           lambda i: f"{where}, " + (f"line {i + 1}" if jsonl else f"row {i}"),
                           "fix it or remove the item")


def accuracy(driver: Driver, step: Solve, table: pl.DataFrame, column: str, answer_column: str,
             method: str = "auto", *, source: str | None = None, **run) -> AccuracyResult:
    """Answers every question with ``step`` (a ``solve`` step with its ``llm_config`` set)
    through ``driver`` and checks the answers against the references; ``run``: the options of
    :meth:`~factory.driver.Driver.run_steps` (see :func:`run_options`).

    References are read with the predictions' extraction (see :func:`eval_references`), all of
    them before the model is asked anything; ``source`` names the eval file in errors. A reply
    without a final answer counts as wrong (``no_answer``), never as skipped; so does one cut at
    the token limit (``truncated``), even when a number came before the cut. More failed requests
    than a recipe's ``max_failure_rate`` stop the eval (:class:`~factory.errors.BackendError`),
    rather than count as wrong answers.
    """
    missing = [c for c in (column, answer_column) if c not in table.columns]
    if missing:
        raise FactoryError(f"the eval set has no column {', '.join(missing)} (it has {', '.join(table.columns)})")
    c = step.config
    kind = method if method != "auto" else c.answer_format
    method = "math" if kind == "math" else method  # answers read as mathematics compare as mathematics
    table = numbered(table.with_columns(pl.Series(answer_column, eval_references(table, answer_column, kind, source),
                                                  dtype=pl.String)))
    if column != c.column:
        table = table.rename({column: c.column})
    answered = driver.run_steps([step], table, **run)
    results = []
    for row in in_order(answered).iter_rows(named=True):
        prediction = row.get(c.prediction_column) if row.get("drop_reason") is None else None
        reference = row[answer_column]
        results.append({"question": row[c.column], "reference": reference, "prediction": prediction,
                        "response": row.get(c.output_column) or row.get("raw_reply"),
                        "correct": answers_match(prediction, reference, method),
                        "truncated": row.get("drop_reason") == TRUNCATED})
    correct = sum(r["correct"] for r in results)
    no_answer = sum(r["prediction"] is None for r in results)
    return AccuracyResult(round(correct / len(results), 4) if results else 0.0, len(results), correct, no_answer,
                          results, sum(r["truncated"] for r in results), usage=usage_of(answered))


def run_options(recipe) -> dict:
    """What a run of steps outside a recipe takes from ``recipe`` (none without one): its seed,
    its batch size and its failure limit, as :meth:`~factory.driver.Driver.run_steps` names them."""
    if recipe is None:
        return {}
    return {"seed": recipe.seed, "batch_size": recipe.header.batch_size,
            "max_failure_rate": recipe.header.max_failure_rate}


def usage_of(run: RunResult) -> dict:
    """What a one-step run asked of its model: batches (and how many came whole from the cache),
    conversations sent (and how many of those the reply cache answered), tokens."""
    stats = run.steps[0]
    llm = stats.llm or {}
    return {"batches": stats.batches, "cached_batches": stats.cached_batches,
            **{k: llm.get(k, 0) for k in ("conversations", "cached_conversations", "prompt_tokens",
                                          "completion_tokens")}}


def numbered(table: pl.DataFrame) -> pl.DataFrame:
    """``table`` with each row's place in column :data:`ITEM`, so that :func:`in_order` can put
    the rows a run keeps and those it drops back in order."""
    return table.with_columns(pl.int_range(table.height, dtype=pl.Int64).alias(ITEM))


def in_order(run: RunResult) -> pl.DataFrame:
    """Every row of a run over a :func:`numbered` table, kept (``drop_reason`` null) or dropped,
    in the table's order."""
    return pl.concat([run.table, run.rejected], how="diagonal_relaxed").sort(ITEM)


def eval_step(llm_config, cot: bool = True, answer_format: str = "number", max_tokens: int | None = None,
              template_from: Solve | None = None, label: str = "eval") -> Solve:
    """A greedy ``solve`` step that asks the model of ``llm_config``, with a training recipe's
    prompt when given (and that step's token limit when ``max_tokens`` is None); ``label`` names
    it in errors and in its rows' ``drop_step``."""
    if template_from is not None:
        c = template_from.config
        config = SolveConfig(template=c.template, system=c.system, column=c.column, input_column=c.input_column,
                             cot=c.cot, answer_format=c.answer_format, max_tokens=max_tokens or c.max_tokens,
                             temperature=0.0, top_p=1.0, samples=1)
        step = Solve(config, base_dir=template_from.base_dir)
    else:
        step = Solve(SolveConfig(cot=cot, answer_format=answer_format, temperature=0.0, top_p=1.0, samples=1,
                                 **({"max_tokens": max_tokens} if max_tokens else {})))
    step.label = label
    return step.with_llm_config(llm_config)


@dataclass
class EvalRequest:
    """What ``factory eval`` is asked (its command-line options): the eval set, the model, the prompt."""

    spec: str  # a file, or a Hub dataset ORG/NAME
    config: str | None = None
    split: str | None = None
    llm: str | None = None  # an ``llm:`` mapping as YAML text
    model: str | None = None
    adapter: str | None = None
    column: str = "instruction"
    answer_column: str = "answer"
    limit: int | None = None
    cot: bool = True
    answer_format: str = "number"
    method: str = "auto"
    max_tokens: int | None = None
    batch_size: int = 64

    def source(self) -> dict:
        """The eval set in the form ``source:`` takes: an existing path, or a Hub dataset id."""
        hub = not Path(self.spec).exists() and HUB_ID.fullmatch(self.spec) and not Path(self.spec).suffix
        data = {"hub": self.spec, "config": self.config} if hub else {"path": self.spec}
        return {**data, **({"split": self.split} if self.split else {})}

    def llm_config(self, base: dict):
        """The validated llm config: ``base`` (a recipe's ``llm``) with ``--llm`` merged over it, then
        ``--model`` and ``--adapter``."""
        extra = None
        if self.llm:
            try:
                extra = yaml.safe_load(self.llm)
            except yaml.YAMLError as err:
                raise FactoryError(f"--llm: not YAML ({err}); write a mapping such as '{{backend: openai, "
                                   "model: m}'") from None
        data = merge_llm(base, extra)
        data.update({k: v for k, v in (("model", self.model), ("adapter", self.adapter)) if v})
        problems: list[Problem] = []
        config = build_llm_config(data, ("llm",), problems)
        for problem in problems:
            problem.file = "the eval's model (--llm, --model, --adapter)"
        if problems:
            raise RecipeError(problems)
        return config


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def evaluate_model(driver: Driver, request: EvalRequest, recipe=None) -> AccuracyResult:
    """Accuracy of the model ``request`` names (over ``recipe``'s llm and with the prompt of its
    first ``solve`` step, when given) on its eval set: what ``factory eval`` prints.

    Raises:
        FactoryError: the eval set, the model or the recipe cannot be used (says which and why).
    """
    template_from = None
    if recipe is not None:
        template_from = recipe.first_step(Solve)
        if template_from is None:
            raise FactoryError(f"{recipe.file}: --recipe gives the eval its `solve` prompt, and the recipe has no "
                               "`solve` step; add one, or leave --recipe out")
    llm = request.llm_config(to_dict(recipe.llm) if recipe is not None else dict(DEFAULT_LLM))
    table = read_eval(request.source(), recipe.base_dir if recipe is not None else None, request.limit)
    step = eval_step(llm, request.cot, request.answer_format, request.max_tokens, template_from)
    return accuracy(driver, step, table, request.column, request.answer_column, request.method, source=request.spec,
                    **{**run_options(recipe), "batch_size": request.batch_size})


def correct_bits(result: AccuracyResult) -> str:
    """Per-item correctness as a string of 0/1, in eval order (what :func:`paired_gain` compares)."""
    return "".join("1" if r["correct"] else "0" for r in result.results)


def paired_gain(before: str, after: str, resamples: int = 20000, seed: int = 0) -> dict | None:
    """The accuracy gain from ``before`` to ``after`` (per-item 0/1 strings over the same eval
    items) with a paired bootstrap 95 % interval: items are resampled together, so an item
    both models get right (or wrong) adds no noise. None when the two cover different items.
    """
    import numpy as np

    if not before or len(before) != len(after):
        return None
    a = np.frombuffer(before.encode(), dtype=np.uint8).astype(np.int64) - 48
    b = np.frombuffer(after.encode(), dtype=np.uint8).astype(np.int64) - 48
    n, up, down = len(a), int(((b - a) > 0).sum()), int(((b - a) < 0).sum())
    # Each item's difference is -1, 0 or +1, so a bootstrap resample is a multinomial draw of the three counts.
    draws = np.random.default_rng(seed).multinomial(n, [up / n, down / n, 1 - (up + down) / n], size=resamples)
    means = (draws[:, 0] - draws[:, 1]) / n
    low, high = np.percentile(means, [2.5, 97.5])
    return {"gain": round((up - down) / n, 4), "ci95": [round(float(low), 4), round(float(high), 4)],
            "improved": up, "worsened": down, "items": n, "significant": bool(low > 0 or high < 0)}


# -- generation-verification gap ("Mind the Gap", Song et al.) ----------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def distinct_n(texts: list[str], n: int) -> float:
    """Unique word n-grams over all n-grams of the texts (1.0: no repetition at all)."""
    total, unique = 0, set()
    for text in texts:
        grams = ngrams(text.split(), n)
        total += len(grams)
        unique.update(grams)
    return round(len(unique) / total, 4) if total else 0.0


def round_samples(version_dir: str | Path, solve_index: int, positions: bool = False) -> pl.DataFrame:
    """Every sample the round's ``solve`` step (``steps[solve_index]``) produced, kept or
    dropped later. Samples dropped by ``solve`` itself (no final answer) count as wrong answers.

    Args:
        positions: add ``_part`` and ``_index``, where each sample sits in the version (what
            people's verdicts name).
    """
    kept = read_version(version_dir)
    rejected = read_version(version_dir, "rejected")
    if positions:
        kept = kept.with_row_index("_index").with_columns(pl.lit("data").alias("_part"))
        rejected = rejected.with_row_index("_index").with_columns(pl.lit("rejected").alias("_part")) \
            if rejected.height else rejected
    steps_after = rejected.filter(pl.col("drop_step") != "source") if rejected.height else rejected
    frames = [kept.with_columns(pl.lit(None, dtype=pl.String).alias("drop_step"))]
    if steps_after.height:
        order = steps_after["drop_step"].str.extract(r"steps\[(\d+)\]").cast(pl.Int64)
        frames.append(steps_after.filter(order >= solve_index))
    samples = pl.concat(frames, how="diagonal_relaxed")
    if "correct" not in samples.columns:
        raise FactoryError(f"{version_dir}: no `correct` column; put a `verify` step after `solve` so that "
                           "samples can be checked")
    return samples.with_columns(pl.col("correct").fill_null(False))


def gap_metrics(samples: pl.DataFrame, *, task_column: str = "instruction", prediction_column: str = "prediction",
                method: str = "auto", **options) -> dict:
    """J(f), and per verifier J(f[w]), the gap and the relative gap, plus pass@k and diversity.

    J(f) is the accuracy of all the model's samples. A verifier w accepts some samples;
    J(f[w]) is the accuracy of those it accepts; gap = J(f[w]) - J(f); relative gap =
    gap / (1 - J(f)). Verifiers: ``majority_vote`` (samples giving their task's most
    common answer, when it reaches ``min_agreement`` of the task), ``judge_score``
    (score >= ``judge_threshold``, default the scale's upper half), ``judge_binary``
    (judged correct), ``reward_model`` (what ``select: {verifier: reward_model}`` keeps: per task
    the ``reward_per_task`` (default 1) distinct samples a reward model scored highest, at or
    above ``min_reward``: best-of-n), and the reference check itself (the
    upper bound), named ``reference_check`` (``programmatic``, or ``math`` / ``code`` after the
    ``verify`` method that labelled ``correct``).
    """
    rows = samples.to_dicts()
    n = len(rows)
    if not n:
        return {"samples": 0}
    j_f = sum(r["correct"] for r in rows) / n
    verifiers = verifier_decisions(samples, task_column=task_column, prediction_column=prediction_column,
                                   method=method, **options)
    report = {"samples": n, "tasks": len({r[task_column] for r in rows}), "J_f": round(j_f, 4), "verifiers": {}}
    for name, accepted in verifiers.items():
        kept = [r for r, ok in zip(rows, accepted) if ok]
        j_w = sum(r["correct"] for r in kept) / len(kept) if kept else 0.0
        gap = j_w - j_f
        report["verifiers"][name] = {
            "accepted": len(kept), "J_f_w": round(j_w, 4), "gap": round(gap, 4),
            "relative_gap": round(gap / (1 - j_f), 4) if j_f < 1 else None}
    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        per_task[r[task_column]].append(bool(r["correct"]))
    sizes = sorted({len(v) for v in per_task.values()})
    report["pass_at_k"] = {f"pass@{k}": round(sum(pass_at_k(len(v), sum(v), k) for v in per_task.values()
                                                  if len(v) >= k) / sum(len(v) >= k for v in per_task.values()), 4)
                           for k in sorted({1, sizes[-1]})}
    responses = [r.get("response") or "" for r in rows]
    answers_per_task = [len({answer_key(rows[i].get(prediction_column), method) for i in idx}) / len(idx)
                        for idx in _indices_by(rows, task_column).values()] if prediction_column in samples.columns \
        else []
    report["diversity"] = {"distinct_1": distinct_n(responses, 1), "distinct_2": distinct_n(responses, 2),
                           "distinct_answers_per_sample": round(sum(answers_per_task) / len(answers_per_task), 4)
                           if answers_per_task else None}
    return report


def verifier_decisions(samples: pl.DataFrame, *, task_column: str = "instruction",
                       prediction_column: str = "prediction", min_agreement: float = 0.5,
                       judge_column: str | None = "score", judge_threshold: float | None = None,
                       judge_correct_column: str | None = "judge_correct", method: str = "auto",
                       reference_check: str = "programmatic", reward_column: str | None = "reward",
                       reward_per_task: int | None = None, min_reward: float | None = None) -> dict[str, list[bool]]:
    """Which samples each verifier of :func:`gap_metrics` accepts, in the samples' order."""
    rows = samples.to_dicts()
    verifiers: dict[str, list[bool]] = {}
    if prediction_column in samples.columns:
        # The verifier is the curation filter itself: samples the `consistency` step would keep.
        vote = Consistency(ConsistencyConfig(column=task_column, answer_column=prediction_column,
                                             min_agreement=min_agreement, method=method))
        verifiers["majority_vote"] = vote.keep(samples, StepContext())["reason"].is_null().to_list()
    if judge_column and judge_column in samples.columns and samples[judge_column].drop_nulls().len():
        scores = [r.get(judge_column) for r in rows]
        top_score = max(s for s in scores if s is not None)
        threshold = judge_threshold if judge_threshold is not None else math.ceil(top_score / 2 + 0.5)
        verifiers["judge_score"] = [s is not None and s >= threshold for s in scores]
    if judge_correct_column and judge_correct_column in samples.columns:
        verifiers["judge_binary"] = [bool(r.get(judge_correct_column)) for r in rows]
    if reward_column and reward_column in samples.columns and samples[reward_column].drop_nulls().len():
        # The verifier is the `select` step itself: the samples it would keep by reward.
        best = Select(SelectConfig(verifier="reward_model", column=task_column, reward_column=reward_column,
                                   per_task=reward_per_task, min_reward=min_reward))
        verifiers["reward_model"] = best.keep(samples, StepContext())["reason"].is_null().to_list()
    verifiers[reference_check] = [bool(r["correct"]) for r in rows]
    return verifiers


def verifier_agreement(version_dir: str | Path, options: dict, verdicts: dict) -> dict:
    """Each verifier of the round's gap against people's verdicts on the round's samples: precision
    and recall of "accepted" against "good", Cohen's kappa, and the samples where they disagree
    (``options``: the gap's, as the loop recorded them, with ``solve_index``)."""
    from ..annotations import confusion

    options = dict(options)
    samples = round_samples(version_dir, options.pop("solve_index"), positions=True)
    decisions = verifier_decisions(samples, **options) if samples.height else {}
    where = list(zip(samples["_part"].to_list(), samples["_index"].to_list())) if samples.height else []
    labelled = [i for i, key in enumerate(where) if key in verdicts]
    good = [verdicts[where[i]]["verdict"] == "good" for i in labelled]
    out = {}
    for name, accepted in decisions.items():
        kept = [accepted[i] for i in labelled]
        out[name] = {**confusion(kept, good),
                     "disagree": [{"part": where[i][0], "index": where[i][1], "verdict": verdicts[where[i]]["verdict"],
                                   "kept": k} for i, k, g in zip(labelled, kept, good) if k != g]}
    return out


def _indices_by(rows: list[dict], column: str) -> dict:
    groups: dict = defaultdict(list)
    for i, r in enumerate(rows):
        groups[r[column]].append(i)
    return groups
