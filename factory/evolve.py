"""``factory evolve``: generate -> curate -> train -> evaluate, round after round.

Round r generates and curates data with the current model (the base model plus the
adapter of round r-1) into dataset version v_r (parent v_(r-1), adapter recorded), trains
adapter r on it in a separate process, evaluates it on a held-out eval set, and measures
the generation-verification gap of the round's samples ("Mind the Gap", Song et al.).
Everything a round finishes is recorded in ``OUT/evolve.json`` as it finishes, and every
LLM call is cached, so a loop stopped at any point resumes at the step it stopped in.

Layout of OUT::

    evolve.json            the state: per round, its version, adapter, eval, gap figures
    datasets/<name>/v<r>   the dataset versions (v1 is round 1's)
    adapters/round-<r>     the LoRA adapters, with training.json
    report.json/.md/.png   the report (`factory report OUT` redraws it)
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import build, option, to_dict
from .errors import FactoryError, Problem

STATE = "evolve.json"


@dataclass
class EvalSection:
    path: str = option(help="The held-out eval set (.jsonl/.parquet...) with questions and reference answers.")
    column: str = option("instruction", help="The question column.")
    answer_column: str = option("answer", help="The reference answer column.")
    limit: int | None = option(None, help="Evaluate on the first N items.", min=1)
    method: Literal["auto", "exact", "numeric", "normalized", "choice"] = option("auto",
                                                                                 help="How answers are compared.")


@dataclass
class WinRateSection:
    path: str = option(help="Open-ended tasks (a file with an instruction column) to compare rounds on.")
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
    patience: int | None = option(None, help="Stop when eval accuracy has not improved by `min_delta` for this "
                                             "many rounds (default: run every round).", min=1)
    min_delta: float = option(0.0, help="Smallest accuracy gain that counts as improvement.", min=0.0)
    fresh_source: bool = option(True, help="A generator source gets seed + round, so each round sees new tasks.")
    judge_threshold: float | None = option(None, help="Judge score from which the `judge_score` verifier accepts "
                                                      "a sample (default: the upper half of the scale).")


def build_evolve(data, path: tuple, problems: list[Problem], llm) -> EvolveConfig | None:
    """Validates a recipe's ``evolve:`` section (trainer options against the trainer's config)."""
    config = build(EvolveConfig, data, path, problems)
    if config is None:
        return None
    from trainers.dpo import DPOTrainConfig
    from trainers.sft import SFTConfig

    trainer = SFTConfig if config.method == "sft" else DPOTrainConfig
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
    return config if len(problems) == before else None


def _save(out: Path, state: dict) -> None:
    tmp = out / f".{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out / STATE)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Evolution:
    """One evolve run in ``out``: its recipe, its state, and the phases of each round."""

    def __init__(self, recipe_file: str, out: str | Path, overrides: list[str], rounds: int | None = None,
                 progress: bool = True, runner=None):
        from .recipe import load_recipe

        self.recipe_file = recipe_file
        self.overrides = list(overrides)
        self.recipe = load_recipe(recipe_file, self.overrides)
        if self.recipe.evolve is None:
            raise FactoryError(f"{recipe_file}: the recipe has no `evolve:` section; add one with the rounds, the "
                               "trainer options and the eval set (see recipes/self_evolve_arith.yaml)")
        self.config: EvolveConfig = self.recipe.evolve
        self.rounds = rounds or self.config.rounds
        self.out = Path(out)
        self.progress = progress
        self.runner = runner  # None: the local runner (generation only: training and eval run here)
        self.base_model = self.config.model or self.recipe.llm.model
        solves = [s for s in self.recipe.steps if s.name == "solve"]
        self.solve = solves[0] if solves else None
        if self.config.eval and (self.solve is None or self.solve.config.answer_format == "none"):
            raise FactoryError(f"{recipe_file}: evolve.eval checks final answers, so the recipe needs a `solve` step "
                               "with `answer_format` (e.g. number); its prompt is the one evaluated")
        self.state = self._load_state()

    def _load_state(self) -> dict:
        path = self.out / STATE
        if path.is_file():
            state = json.loads(path.read_text(encoding="utf-8"))
            if state["recipe_hash"] != self.recipe.hash:
                raise FactoryError(f"{self.out} holds an evolve run of another recipe (or other --set values); "
                                   "resume it with the same command, or use a new --out")
            return state
        return {"recipe_file": self.recipe_file, "recipe_hash": self.recipe.hash, "overrides": self.overrides,
                "name": self.recipe.name, "base_model": self.base_model, "method": self.config.method,
                "evolve": to_dict(self.config), "rounds": [{"round": 0}], "stopped": None}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        _save(self.out, self.state)

    def round_state(self, r: int) -> dict:
        while len(self.state["rounds"]) <= r:
            self.state["rounds"].append({"round": len(self.state["rounds"])})
        return self.state["rounds"][r]

    # -- the phases ----------------------------------------------------------------------------
    def backend(self, adapter: str | None, llm=None):
        from .llm import create_backend

        llm = llm or self.recipe.llm
        return create_backend(dataclasses.replace(llm, adapter=adapter) if hasattr(llm, "adapter") else llm)

    def client(self, backend):
        from .cache import Cache
        from .llm.client import LLMClient

        return LLMClient(backend, Cache(self.out / ".cache"), seed=self.recipe.seed)

    def generate(self, r: int, adapter: str | None, parent: str | None) -> str:
        from .build import format_summary, run_recipe
        from .recipe import load_recipe

        overrides = list(self.overrides)
        if adapter:
            overrides.append(f"llm.adapter={adapter}")
        if self.config.fresh_source and self.recipe.source and self.recipe.source.config.generator and \
                hasattr(self.recipe.source.generator_config, "seed"):
            overrides.append(f"source.seed={self.recipe.source.generator_config.seed + r}")
        recipe = load_recipe(self.recipe_file, overrides)
        version, manifest, _ = run_recipe(recipe, self.out / "datasets", cache_dir=self.out / ".cache",
                                          progress=self.progress, parent=parent, runner=self.runner,
                                          extra_manifest={"evolve": {"run": str(self.out), "round": r,
                                                                     "adapter": adapter}})
        _log(format_summary(manifest))
        return str(version)

    def train(self, r: int, version: str, adapter_in: str | None) -> str:
        from trainers.common import is_trained

        out = self.out / "adapters" / f"round-{r}"
        if is_trained(out):
            return str(out)
        command = [sys.executable, "-m", f"trainers.{self.config.method}", "--dataset", version, "--out", str(out),
                   "--model", self.base_model]
        if adapter_in and self.config.init == "previous":
            command += ["--init-adapter", adapter_in]
        for key, value in self.config.train.items():
            command += ["--" + key.replace("_", "-"), yaml.safe_dump(value, default_flow_style=True).strip()
                        .removesuffix("\n...")]
        _log(f"round {r}: training {out} ({self.config.method}) on {version}")
        done = subprocess.run(command, stdout=sys.stderr if self.progress else subprocess.DEVNULL,
                              stderr=sys.stderr if self.progress else subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise FactoryError(f"round {r}: training failed (exit {done.returncode}); run the same command again "
                               f"to resume from the last checkpoint. Command: {' '.join(command)}")
        return str(out)

    def evaluate(self, adapter: str | None) -> dict:
        from trainers.evaluate import accuracy, read_eval, solve_step_for

        e = self.config.eval
        table = read_eval(e.path, self.recipe.base_dir, e.limit)
        step = solve_step_for(True, "number", 256, template_from=self.solve)
        backend = self.backend(adapter)
        try:
            result = accuracy(step, self.client(backend), table, e.column, e.answer_column, e.method,
                              progress=self.progress)
        finally:
            backend.close()
        return {**result.summary(), "examples": result.results[:3]}

    def win_rate(self, adapter: str | None, previous: str | None) -> dict:
        import polars as pl

        from .steps.pairwise import Pairwise, PairwiseConfig
        from .steps.solve import Solve, SolveConfig
        from trainers.evaluate import read_eval

        w = self.config.win_rate
        tasks = read_eval(w.path, self.recipe.base_dir, w.limit).select(pl.col(w.column).alias("instruction"))
        answers = []
        for which in (adapter, previous):
            step = Solve(SolveConfig(temperature=0.0, max_tokens=w.max_tokens))
            backend = self.backend(which)
            try:
                step.llm = self.client(backend)
                answers.append(step.process(tasks)["response"])
            finally:
                backend.close()
        from .llm import build_llm_config, merge_llm

        # The judge is the base model (or the one given), the same in every round.
        base = to_dict(self.recipe.llm)
        if "adapter" in base:
            base["adapter"] = None
        problems: list[Problem] = []
        judge_llm = build_llm_config(merge_llm(base, w.judge), ("evolve", "win_rate", "judge"), problems)
        if problems:
            raise FactoryError(problems[0].format())
        judge = Pairwise(PairwiseConfig(a_column="response", b_column="previous", reasoning=False))
        backend = self.backend(None, judge_llm)
        try:
            judge.llm = self.client(backend)
            table = tasks.with_columns(response=answers[0], previous=answers[1])
            verdicts = judge.process(table)
        finally:
            backend.close()
        counts = {k: int((verdicts["winner"] == k).sum()) if "winner" in verdicts.columns else 0
                  for k in ("a", "b", "tie")}
        judged = sum(counts.values())
        return {"tasks": tasks.height, "judged": judged, "wins": counts["a"], "losses": counts["b"],
                "ties": counts["tie"],
                "win_rate": round((counts["a"] + 0.5 * counts["tie"]) / judged, 4) if judged else None}

    def gap(self, version: str) -> dict:
        from trainers.evaluate import gap_metrics, round_samples

        if self.solve is None:
            return {}
        samples = round_samples(version, f"steps[{self.solve.index}].solve")
        consistency = next((s for s in self.recipe.steps if s.name == "consistency"), None)
        return gap_metrics(samples, task_column=self.solve.config.column,
                           prediction_column=self.solve.config.prediction_column,
                           min_agreement=consistency.config.min_agreement if consistency else 0.5,
                           judge_threshold=self.config.judge_threshold)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        from .report import write_report

        began = time.time()
        self.state["stopped"] = None  # a resumed or extended run decides afresh
        self.save()
        baseline = self.round_state(0)
        if self.config.eval and "eval" not in baseline:
            _log("round 0: evaluating the base model")
            baseline["eval"] = self.evaluate(None)
            self.save()
        adapter, version = None, None
        best, stale = baseline.get("eval", {}).get("accuracy"), 0
        for r in range(1, self.rounds + 1):
            rs = self.round_state(r)
            rs.setdefault("adapter_in", adapter)
            rs.setdefault("parent", version)
            phases = rs.setdefault("seconds", {})
            if "version" not in rs:
                _log(f"round {r}: generating with {'base + ' + adapter if adapter else 'the base model'}")
                t = time.time()
                rs["version"] = self.generate(r, adapter, version)
                phases["generate"] = round(time.time() - t, 1)
                self.save()
            if "gap" not in rs:
                rs["gap"] = self.gap(rs["version"])
                self.save()
            if "adapter" not in rs:
                t = time.time()
                rs["adapter"] = self.train(r, rs["version"], adapter)
                phases["train"] = round(time.time() - t, 1)
                rs["train"] = _training_summary(rs["adapter"])
                self.save()
            if self.config.eval and "eval" not in rs:
                _log(f"round {r}: evaluating {rs['adapter']}")
                t = time.time()
                rs["eval"] = self.evaluate(rs["adapter"])
                phases["eval"] = round(time.time() - t, 1)
                self.save()
            if self.config.win_rate and "win_rate" not in rs:
                _log(f"round {r}: win rate against {'round ' + str(r - 1) if adapter else 'the base model'}")
                t = time.time()
                rs["win_rate"] = self.win_rate(rs["adapter"], adapter)
                phases["win_rate"] = round(time.time() - t, 1)
                self.save()
            write_report(self.out, self.state)
            adapter, version = rs["adapter"], rs["version"]
            accuracy = rs.get("eval", {}).get("accuracy")
            if self.config.patience and accuracy is not None:
                if best is None or accuracy > best + self.config.min_delta:
                    best, stale = accuracy, 0
                else:
                    stale += 1
                if stale >= self.config.patience:
                    self.state["stopped"] = (f"eval accuracy did not improve by more than {self.config.min_delta} "
                                             f"for {stale} round(s); stopped after round {r}")
                    break
        del self.state["rounds"][r + 1:]  # rounds beyond a stop, from an earlier longer run, are not this run's
        self.state["stopped"] = self.state["stopped"] or f"completed {r} round(s)"
        self.state["seconds"] = round(self.state.get("seconds", 0) + time.time() - began, 1)
        self.save()
        write_report(self.out, self.state)
        return self.state


def _training_summary(adapter: str) -> dict:
    record = json.loads((Path(adapter) / "training.json").read_text(encoding="utf-8"))
    metrics = record.get("metrics", {})
    return {"steps": metrics.get("steps"), "train_loss": metrics.get("train_loss"),
            "examples": record.get("data", {}).get("examples") or record.get("data", {}).get("pairs"),
            "dataset_sha256": record["dataset"]["manifest_sha256"], "wall_seconds": metrics.get("wall_seconds")}
