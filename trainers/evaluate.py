"""Evaluation of a model (base + optional adapter): accuracy on a verifiable eval set, the
"Mind the Gap" generation-verification figures of a round's samples, and win rates.

    python -m trainers.evaluate --eval data/eval/arithmetic.jsonl --adapter adapters/round-1 --limit 100

Accuracy asks the model with the same prompt as a recipe's ``solve`` step (chain of thought,
final-answer extraction) and checks each answer programmatically.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl

from factory.answers import answer_key, answers_match, read_references
from factory.config import option
from factory.errors import FactoryError
from factory.steps.context import StepContext
from factory.steps.drops import DROP, RAW_REPLY, TRUNCATED
from factory.text import ngrams
from filters.consistency import Consistency, ConsistencyConfig
from trainers.common import parse_config, run_main


@dataclass
class AccuracyConfig:
    eval: str = option(help="An eval set (.jsonl/.parquet/...) with a question column and a reference answer.")
    model: str = option("embedded", help="Base model: `embedded` or a local HF folder.")
    adapter: str | None = option(None, help="A LoRA adapter on top of the base model.")
    column: str = option("instruction", help="The question column.")
    answer_column: str = option("answer", help="The reference answer column: a bare value or a worked solution "
                                               "ending in `#### n`, `\\boxed{n}` or 'The answer is n'.")
    limit: int | None = option(None, help="Evaluate the first N items only.", min=1)
    cot: bool = option(True, help="Ask for step-by-step reasoning before the final answer.")
    answer_format: Literal["number", "choice", "text"] = option("number", help="How final answers are extracted.")
    method: Literal["auto", "exact", "numeric", "normalized", "choice"] = option("auto", help="How answers are "
                                                                                           "compared.")
    max_tokens: int = option(256, help="Most tokens per answer.", min=1)
    batch_size: int = option(32, help="Sequences per forward pass.", min=1)
    out: str | None = option(None, help="Write the per-item results here (JSON).")


@dataclass
class AccuracyResult:
    accuracy: float
    items: int
    correct: int
    no_answer: int
    results: list[dict] = field(default_factory=list)
    truncated: int = 0  # answers cut at the token limit (counted wrong, and among no_answer)

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "items": self.items, "correct": self.correct, "no_answer": self.no_answer,
                "truncated": self.truncated}


def read_eval(spec: str | dict, base_dir: Path | None = None, limit: int | None = None) -> pl.DataFrame:
    """An eval set's rows: ``spec`` is a file path, or a mapping in the form a recipe's
    ``source:`` takes (``{hub: openai/gsm8k, config: main, split: test}``).

    Raises:
        FactoryError: the file or dataset does not exist or has no rows.
    """
    from factory.errors import Problem
    from factory.sources import build_source

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


def accuracy(solve_step, client, table: pl.DataFrame, column: str, answer_column: str, method: str = "auto",
             batch_size: int = 64, progress: bool = False, source: str | None = None) -> AccuracyResult:
    """Answers every question with ``solve_step``'s prompt through ``client`` and checks them.

    References are read with the predictions' extraction (see :func:`eval_references`), all of
    them before the model is asked anything; ``source`` names the eval file in errors.
    A reply without a final answer counts as wrong (``no_answer``), never as skipped; so does
    one cut at the token limit (``truncated``), even when a number came before the cut.
    """
    import sys

    from tqdm.auto import tqdm

    missing = [c for c in (column, answer_column) if c not in table.columns]
    if missing:
        raise FactoryError(f"the eval set has no column {', '.join(missing)} (it has {', '.join(table.columns)})")
    kind = method if method != "auto" else solve_step.config.answer_format
    table = table.with_columns(pl.Series(answer_column, eval_references(table, answer_column, kind, source),
                                         dtype=pl.String))
    ctx = StepContext(llm=client)
    results = []
    bar = tqdm(total=table.height, desc="eval", unit="item", file=sys.stderr, disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    for offset in range(0, table.height, batch_size):
        batch = table.slice(offset, batch_size).rename({column: solve_step.config.column}) \
            if column != solve_step.config.column else table.slice(offset, batch_size)
        out = solve_step.process(batch, ctx)
        for row in out.to_dicts():
            prediction = row.get(solve_step.config.prediction_column) if row.get(DROP) is None else None
            reference = row[answer_column]
            results.append({"question": row[solve_step.config.column], "reference": reference,
                            "prediction": prediction, "response": row.get(solve_step.config.output_column)
                            or row.get(RAW_REPLY), "correct": answers_match(prediction, reference, method),
                            "truncated": row.get(DROP) == TRUNCATED})
        bar.update(batch.height)
        bar.set_postfix_str(f"accuracy {sum(r['correct'] for r in results) / len(results):.3f}", refresh=False)
    bar.close()
    correct = sum(r["correct"] for r in results)
    no_answer = sum(r["prediction"] is None for r in results)
    return AccuracyResult(round(correct / len(results), 4) if results else 0.0, len(results), correct, no_answer,
                          results, sum(r["truncated"] for r in results))


def solve_step_for(cot: bool, answer_format: str, max_tokens: int | None, template_from=None):
    """A greedy ``solve`` step for evaluation, with a training recipe's prompt when given
    (and that step's token limit when ``max_tokens`` is None)."""
    from factory.steps.solve import Solve, SolveConfig

    if template_from is not None:
        c = template_from.config
        config = SolveConfig(template=c.template, system=c.system, column=c.column, input_column=c.input_column,
                             cot=c.cot, answer_format=c.answer_format, max_tokens=max_tokens or c.max_tokens,
                             temperature=0.0, top_p=1.0, samples=1)
        return Solve(config, base_dir=template_from.base_dir)
    return Solve(SolveConfig(cot=cot, answer_format=answer_format, max_tokens=max_tokens, temperature=0.0,
                             top_p=1.0, samples=1))


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


def round_samples(version_dir: str | Path, solve_index: int) -> pl.DataFrame:
    """Every sample the round's ``solve`` step (``steps[solve_index]``) produced, kept or
    dropped later. Samples dropped by ``solve`` itself (no final answer) count as wrong answers.
    """
    from factory.store import read_version

    kept = read_version(version_dir)
    rejected = read_version(version_dir, "rejected")
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
                min_agreement: float = 0.5, judge_column: str | None = "score", judge_threshold: float | None = None,
                judge_correct_column: str | None = "judge_correct", method: str = "auto") -> dict:
    """J(f), and per verifier J(f[w]), the gap and the relative gap, plus pass@k and diversity.

    J(f) is the accuracy of all the model's samples. A verifier w accepts some samples;
    J(f[w]) is the accuracy of those it accepts; gap = J(f[w]) - J(f); relative gap =
    gap / (1 - J(f)). Verifiers: ``majority_vote`` (samples giving their task's most
    common answer, when it reaches ``min_agreement`` of the task), ``judge_score``
    (score >= ``judge_threshold``, default the scale's upper half), ``judge_binary``
    (judged correct), ``programmatic`` (the reference check itself: the upper bound).
    """
    rows = samples.to_dicts()
    n = len(rows)
    if not n:
        return {"samples": 0}
    j_f = sum(r["correct"] for r in rows) / n
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
    verifiers["programmatic"] = [bool(r["correct"]) for r in rows]
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


def _indices_by(rows: list[dict], column: str) -> dict:
    groups: dict = defaultdict(list)
    for i, r in enumerate(rows):
        groups[r[column]].append(i)
    return groups


def main(argv: list[str] | None = None) -> dict:
    from factory.llm import TransformersBackend, TransformersConfig
    from factory.llm.requests import LLMClient

    config = parse_config(AccuracyConfig, argv, "Accuracy of a model (+ adapter) on a verifiable eval set.",
                          prog="python -m trainers.evaluate")
    table = read_eval(config.eval, limit=config.limit)
    backend = TransformersBackend(TransformersConfig(model=config.model, adapter=config.adapter,
                                                     batch_size=config.batch_size))
    result = accuracy(solve_step_for(config.cot, config.answer_format, config.max_tokens), LLMClient(backend),
                      table, config.column, config.answer_column, config.method, progress=True, source=config.eval)
    print(json.dumps(result.summary()))
    if config.out:
        Path(config.out).write_text(json.dumps({**result.summary(), "results": result.results}, indent=1) + "\n")
    return result.summary()


if __name__ == "__main__":
    raise SystemExit(run_main(main))
