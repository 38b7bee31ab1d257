"""The ``evolve:`` section of a recipe: rounds, training, evaluation, stopping.

Validated with the recipe (before any model loads); the loop that runs it is
:mod:`factory.evolve.loop`, which this module does not import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from filters.select import VERIFIERS

from ..config import build, option
from ..errors import Problem
from ..training import TRAINERS


@dataclass
class EvalData:
    """Where an eval set's rows come from: a file, or a Hub dataset as in ``source:``."""

    path: str | None = option(None, help="The eval set's file (.jsonl/.parquet/.csv or a saved dataset folder).")
    hub: str | None = option(None, help="Or a Hugging Face Hub dataset (ORG/NAME), e.g. openai/gsm8k.")
    config: str | None = option(None, help="The Hub dataset's config, e.g. main.")
    split: str = option("train", help="The split to read (a Hub dataset's, or a saved DatasetDict's), e.g. test.")
    revision: str | None = option(None, help="The Hub dataset's tag, branch or commit (default: main).")
    streaming: bool = option(False, help="Stream the Hub dataset: with `limit`, only those rows are fetched.")

    def validate(self):
        if (self.path is None) == (self.hub is None):
            return [("give the eval set as `path:` (a file) or `hub:` (ORG/NAME), one of them", None,
                     "e.g. `path: data/eval/arithmetic.jsonl` or `hub: openai/gsm8k` with `config:` and `split:`")]
        return []

    def data(self) -> dict:
        """The eval set in the form ``source:`` takes (see :func:`factory.sources.build_source`);
        options left unset are left out."""
        if self.hub is None:
            data = {"path": self.path, "split": self.split, "limit": getattr(self, "limit", None)}
        else:
            data = {"hub": self.hub, "config": self.config, "split": self.split, "revision": self.revision,
                    "streaming": self.streaming, "limit": getattr(self, "limit", None)}
        return {k: v for k, v in data.items() if v is not None}

    def name(self) -> str:
        return self.path or f"{self.hub} ({self.split})"


@dataclass
class EvalSection(EvalData):
    column: str = option("instruction", help="The question column.")
    answer_column: str = option("answer", help="The reference answer column: a bare value or a worked solution "
                                               "ending in `#### n`, `\\boxed{n}` or 'The answer is n'.")
    limit: int | None = option(None, help="Evaluate on the first N items.", min=1)
    method: Literal["auto", "exact", "numeric", "normalized", "choice", "math"] = option(
        "auto", help="How answers are compared (see `verify`); `math` compares as mathematics: give the "
                     "recipe's `solve` step `answer_format: math`.")
    max_tokens: int | None = option(None, help="Most tokens per answer (default: the recipe's solve step's); "
                                               "an answer cut there counts as wrong, so leave room for a base "
                                               "model that talks before it answers.", min=1)


@dataclass
class WinRateSection(EvalData):
    """Open-ended tasks (a file or Hub dataset with an instruction column) to compare rounds on."""

    column: str = option("instruction", help="The task column.")
    limit: int = option(16, help="Tasks compared per round.", min=1)
    max_tokens: int = option(192, help="Most tokens per answer.", min=1)
    judge: dict | None = option(None, help="The judge's llm (default: the recipe's model without adapter, so the "
                                           "judge stays the same across rounds).")


@dataclass
class EvolveConfig:
    rounds: int = option(2, help="Rounds to run (`factory evolve --rounds` overrides it).", min=1)
    method: Literal["sft", "dpo"] = option("sft", help="How each version is trained on (trainers.sft or "
                                                       "trainers.dpo).")
    train: dict[str, Any] = option(default_factory=dict, help="Trainer options (see `python -m trainers.sft "
                                                              "--help`), e.g. {max_steps: 20, learning_rate: 2e-4}.")
    init: Literal["previous", "base"] = option("previous", help="Start each round's adapter from the previous "
                                                                "round's (`previous`) or from scratch (`base`).")
    model: str | None = option(None, help="The base model to train (default: the recipe's `llm.model`).")
    eval: EvalSection | None = option(None, help="Accuracy on a verifiable held-out set, before round 1 and "
                                                 "after each round.")
    win_rate: WinRateSection | None = option(None, help="Judge win rate of each round's model against the "
                                                        "previous round's on open-ended tasks.")
    accept: Literal["not_worse", "always"] = option(
        "not_worse", help="Which trained rounds the loop builds on. `not_worse`: a round whose eval accuracy is "
                          "significantly below the best round's so far (the paired bootstrap 95 % interval of the "
                          "difference lies below zero) is rolled back: the next round starts from the best round's "
                          "adapter and data, and the report says why. `always`: every round is kept. Needs `eval`.")
    patience: int | None = option(None, help="Stop when eval accuracy has not improved by `min_delta` for this "
                                             "many rounds (default: run every round).", min=1)
    min_delta: float = option(0.0, help="Smallest accuracy gain that counts as improvement.", min=0.0)
    min_gap: float | None = option(0.02, help="Stop before training a round when the gap (J(f[w]) - J(f)) of the "
                                              "verifier that picks its data is at or below this: that data is no "
                                              "better than the model's own samples (\"Mind the Gap\"; the default "
                                              "allows for the noise of ~1000 samples). The verifier is the `select` "
                                              "step's; without one, the best self-verifier measured. null: never.")
    collapse: float | None = option(0.5, help="Stop before training a round when its pass@k or its distinct answers "
                                              "per sample fell by more than this share from round 1's (diversity "
                                              "collapse). null: never.", min=0.0, max=1.0)
    compare: list[str] | None = option(None, help="Run the loop once per verifier, each picking the training data "
                                                  "through the recipe's `select` step, from the same start and "
                                                  "budget, into OUT/<verifier>/, and draw them side by side in "
                                                  "OUT/report.png, e.g. [programmatic, majority, judge].")
    fresh_source: bool = option(True, help="A generator source gets seed + round, so each round sees new tasks.")
    judge_threshold: float | None = option(None, help="Judge score from which the `judge_score` verifier accepts "
                                                      "a sample (default: the upper half of the scale).")


def build_evolve(data, path: tuple, problems: list[Problem], llm) -> EvolveConfig | None:
    """Validates a recipe's ``evolve:`` section (trainer options against the trainer's config)."""
    config = build(EvolveConfig, data, path, problems)
    if config is None:
        return None
    trainer = TRAINERS[config.method]
    reserved = {"dataset", "out", "model", "init_adapter"}
    for key in config.train:
        if key in reserved:
            problems.append(Problem(f"'{key}' is set by the loop", path=path + ("train", key),
                                    fix="remove it (use evolve.model for the base model)"))
    before = len(problems)
    build(trainer, {**{k: v for k, v in config.train.items() if k not in reserved}, "dataset": "-", "out": "-"},
          path + ("train",), problems)
    if llm is not None and not hasattr(llm, "adapter"):
        problems.append(Problem(f"the `{llm.backend}` backend cannot load the adapters the loop trains",
                                path=("llm", "backend"), fix="use `backend: transformers` (or vllm on a GPU)"))
    if llm is not None and config.model is None and llm.backend == "scripted":
        problems.append(Problem("a scripted llm has no weights to train", path=path + ("model",),
                                fix="set evolve.model to a local model folder"))
    for i, verifier in enumerate(config.compare or []):
        if verifier not in VERIFIERS:
            problems.append(Problem(f"unknown verifier '{verifier}'", path=path + ("compare", i),
                                    fix=f"use {', '.join(VERIFIERS)}"))
    if config.compare is not None and len(set(config.compare)) != len(config.compare):
        problems.append(Problem("a verifier is named twice", path=path + ("compare",), fix="name each once"))
    return config if len(problems) == before else None
