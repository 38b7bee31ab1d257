"""``factory evolve``: generate -> curate -> train -> evaluate, round after round.

Round r generates and curates data with the current model (the base model plus the
adapter of round r-1) into dataset version v_r (parent v_(r-1), adapter recorded), trains
adapter r on it in a separate process, evaluates it on a held-out eval set, and measures
the generation-verification gap of the round's samples ("Mind the Gap", Song et al.).
Everything a round finishes is recorded in ``OUT/evolve.json`` as it finishes, and every
LLM call is cached, so a loop stopped at any point resumes at the step it stopped in.

The loop drives validated objects: each round's recipe is the validated recipe with the
round's adapter (and, for a generator source, the round's seed) put in with
``dataclasses.replace``; the trainer gets its options as a ``--config`` file.

Layout of OUT::

    evolve.json            the state: per round, its version, adapter, eval, gap figures
    datasets/<name>/v<r>   the dataset versions (v1 is round 1's)
    adapters/round-<r>     the LoRA adapters, with training.json (round-<r>.yaml: the trainer's config)
    report.json/.md/.png   the report (`factory report OUT` redraws it)
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import yaml

from filters.consistency import Consistency
from filters.select import REFERENCE_CHECKS, Select

from ..build import run_recipe
from ..cache import Cache
from ..config import to_dict
from ..driver import Driver
from ..errors import FactoryError, Problem
from ..files import write_atomic
from ..llm import build_llm_config, merge_llm
from ..printing import format_summary
from ..recipe import load_recipe
from ..recipe_model import Recipe
from ..report import write_report
from ..steps.pairwise import Pairwise, PairwiseConfig
from ..steps.solve import Solve, SolveConfig
from ..steps.verify import Verify
from ..training import is_trained
from .config import EvolveConfig
from .evaluate import (accuracy, correct_bits, eval_step, gap_metrics, in_order, numbered, paired_gain, read_eval,
                       round_samples, run_options)

STATE = "evolve.json"


def _save(out: Path, state: dict) -> None:
    write_atomic(out / STATE, json.dumps(state, indent=2, default=str) + "\n")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Evolution:
    """One evolve run in ``out``: its recipe, its state, and the phases of each round.

    Args:
        driver: runs each round's recipe (default: the local executor, cache in ``cache_dir``).
        cache_dir: the LLM cache (default OUT/.cache); runs that share one share every reply
            they have in common (the runs of a comparison share round 0 and round 1's samples).
    """

    def __init__(self, recipe_file: str, out: str | Path, overrides: list[str], rounds: int | None = None,
                 progress: bool = True, driver: Driver | None = None, cache_dir: str | Path | None = None):
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
        self.cache = Cache(Path(cache_dir) if cache_dir else self.out / ".cache")
        self.driver = driver or Driver(self.cache, progress=progress)
        self.base_model = self.config.model or self.recipe.llm.model
        self.solve = self.recipe.first_step(Solve)
        self.select = self.recipe.first_step(Select)
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
    def round_recipe(self, r: int, adapter: str | None) -> Recipe:
        """The recipe of round ``r``: the model with the previous round's adapter and, for a
        generator source with ``fresh_source``, seed + r so that each round sees new tasks."""
        recipe = self.recipe.with_llm(dataclasses.replace(self.recipe.llm, adapter=adapter))
        source = recipe.source
        if self.config.fresh_source and source and source.generator and hasattr(source.generator_config, "seed"):
            config = dataclasses.replace(source.generator_config, seed=source.generator_config.seed + r)
            recipe = dataclasses.replace(recipe, source=dataclasses.replace(source, generator_config=config))
        return recipe

    def llm(self, adapter: str | None, llm=None):
        """The recipe's model (or ``llm``) with ``adapter``."""
        llm = llm or self.recipe.llm
        return dataclasses.replace(llm, adapter=adapter) if hasattr(llm, "adapter") else llm

    def run_step(self, step, table: pl.DataFrame) -> pl.DataFrame:
        """Every row of ``step`` run over ``table`` by the driver (the recipe's seed and failure
        limit), kept or dropped, in ``table``'s order."""
        return in_order(self.driver.run_steps([step], numbered(table), **run_options(self.recipe)))

    def generate(self, r: int, adapter: str | None, parent: str | None) -> str:
        version, manifest, _ = run_recipe(self.round_recipe(r, adapter), self.out / "datasets", parent=parent,
                                          driver=self.driver,
                                          extra_manifest={"evolve": {"run": str(self.out), "round": r,
                                                                     "adapter": adapter}})
        _log(format_summary(manifest))
        return str(version)

    def train(self, r: int, version: str, adapter_in: str | None) -> str:
        out = self.out / "adapters" / f"round-{r}"
        if is_trained(out):
            return str(out)
        options = {**self.config.train, "dataset": version, "out": str(out), "model": self.base_model}
        if adapter_in and self.config.init == "previous":
            options["init_adapter"] = adapter_in
        config_file = out.parent / f"round-{r}.yaml"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(yaml.safe_dump(options, sort_keys=False), encoding="utf-8")
        command = [sys.executable, "-m", f"trainers.{self.config.method}", "--config", str(config_file)]
        _log(f"round {r}: training {out} ({self.config.method}) on {version}")
        done = subprocess.run(command, stdout=sys.stderr if self.progress else subprocess.DEVNULL,
                              stderr=sys.stderr if self.progress else subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise FactoryError(f"round {r}: training failed (exit {done.returncode}); run the same command again "
                               f"to resume from the last checkpoint. Command: {' '.join(command)}")
        return str(out)

    def evaluate(self, adapter: str | None) -> dict:
        e = self.config.eval
        table = read_eval(e.data(), self.recipe.base_dir)
        step = eval_step(self.llm(adapter), max_tokens=e.max_tokens, template_from=self.solve, label="evolve.eval")
        # Large batches: the backend sorts each batch by prompt length, so fewer batches pad less.
        result = accuracy(self.driver, step, table, e.column, e.answer_column, e.method, source=e.name(),
                          **{**run_options(self.recipe), "batch_size": 256})
        cut = (f"; {result.truncated} answers cut at {step.config.max_tokens} tokens, counted wrong (raise "
               "evolve.eval.max_tokens)" if result.truncated else "")
        _log(f"eval accuracy {result.accuracy:.3f} ({result.correct}/{result.items}){cut}")
        return {**result.summary(), "examples": result.results[:3], "correct_items": correct_bits(result),
                "usage": result.usage}

    def answers(self, tasks: pl.DataFrame, adapter: str | None) -> pl.Series:
        """Greedy answers of the model with ``adapter`` to the win-rate tasks (null where none came)."""
        step = Solve(SolveConfig(temperature=0.0, max_tokens=self.config.win_rate.max_tokens))
        step.label = "evolve.win_rate"
        return self.run_step(step.with_llm_config(self.llm(adapter)), tasks)["response"]

    def win_rate(self, adapter: str | None, previous: str | None) -> dict:
        w = self.config.win_rate
        tasks = read_eval(w.data(), self.recipe.base_dir).select(pl.col(w.column).alias("instruction"))
        table = tasks.with_columns(response=self.answers(tasks, adapter), previous=self.answers(tasks, previous))
        # The judge is the base model (or the one given), the same in every round.
        base = {**to_dict(self.recipe.llm), **({"adapter": None} if hasattr(self.recipe.llm, "adapter") else {})}
        problems: list[Problem] = []
        judge_llm = build_llm_config(merge_llm(base, w.judge), ("evolve", "win_rate", "judge"), problems)
        if problems:
            raise FactoryError(problems[0].format())
        judge = Pairwise(PairwiseConfig(a_column="response", b_column="previous", reasoning=False))
        judge.label = "evolve.win_rate.judge"
        verdicts = self.run_step(judge.with_llm_config(judge_llm), table)
        counts = {k: int((verdicts["winner"] == k).sum()) if "winner" in verdicts.columns else 0
                  for k in ("a", "b", "tie")}
        judged = sum(counts.values())
        return {"tasks": tasks.height, "judged": judged, "wins": counts["a"], "losses": counts["b"],
                "ties": counts["tie"],
                "win_rate": round((counts["a"] + 0.5 * counts["tie"]) / judged, 4) if judged else None}

    def gap(self, version: str) -> dict:
        if self.solve is None:
            return {}
        vote = self.select or self.recipe.first_step(Consistency)
        threshold = self.config.judge_threshold
        if threshold is None and self.select is not None:
            threshold = self.select.config.min_score  # the judge verifier measured is the one `select` uses
        select = self.select.config if self.select is not None else None
        reward = select is not None and select.verifier == "reward_model"
        options = {"task_column": self.solve.config.column, "prediction_column": self.solve.config.prediction_column,
                   "min_agreement": vote.config.min_agreement if vote else 0.5, "judge_threshold": threshold,
                   "reference_check": self.reference_check(),
                   "reward_column": select.reward_column if reward else "reward",
                   "reward_per_task": select.per_task if reward else None,
                   "min_reward": select.min_reward if reward else None}
        gap = gap_metrics(round_samples(version, self.solve.index), **options)
        # kept so that people's verdicts, given later, can be held against the same verifiers (factory report)
        gap["options"] = {**options, "solve_index": self.solve.index}
        if gap.get("verifiers"):
            gap["selected_by"] = self.selecting_verifier(gap["verifiers"])  # the gap the stop rule and reports read
        return gap

    def reference_check(self) -> str:
        """The name of the verifier that labels ``correct`` against the references: ``math`` or
        ``code`` after the recipe's ``verify`` method, else ``programmatic``."""
        verify = self.recipe.first_step(Verify)
        method = verify.config.method if verify is not None else None
        return method if method in REFERENCE_CHECKS else "programmatic"

    def selecting_verifier(self, verifiers: dict) -> str | None:
        """The measured verifier that picks the training data: the `select` step's; a recipe
        without one that votes picks by majority; otherwise the best self-verifier measured."""
        if self.select is not None:
            verifier = self.select.config.verifier
            return self.reference_check() if verifier in REFERENCE_CHECKS else SELECT_TO_GAP[verifier]
        if self.recipe.first_step(Consistency) is not None and "majority_vote" in verifiers:
            return "majority_vote"
        own = {name: v["gap"] for name, v in verifiers.items() if name != "programmatic"}
        return max(own, key=own.get) if own else None

    def stop_rule(self, r: int, gap: dict, rows: int | None = None) -> str | None:
        """Why the loop should stop before training round ``r`` on its samples, or None."""
        c = self.config
        if rows == 0:
            return (f"round {r}: the curation kept no row, so there is nothing to train on; stopped before training "
                    f"round {r} (see the version's rejected/ for why)")
        verifiers = gap.get("verifiers") or {}
        name = self.selecting_verifier(verifiers)
        if c.min_gap is not None and name is not None:
            value = verifiers[name]["gap"]
            if value <= c.min_gap:
                return (f"round {r}: the gap of {name}, the verifier that picks the data, is {value:+.3f} "
                        f"(J(f) {gap['J_f']:.3f}), at or below min_gap {c.min_gap}: its data is no better than "
                        f"the model's own samples; stopped before training round {r}")
        first = (self.state["rounds"][1].get("gap") or {}) if r > 1 else {}
        if c.collapse is not None and first:
            for label, now, then in (("pass@k", _top_pass(gap), _top_pass(first)),
                                     ("distinct answers per sample", (gap.get("diversity") or {}).get(
                                         "distinct_answers_per_sample"), (first.get("diversity") or {}).get(
                                         "distinct_answers_per_sample"))):
                if now is not None and then and now < (1 - c.collapse) * then:
                    return (f"round {r}: {label} fell from {then:.3f} in round 1 to {now:.3f}, more than the "
                            f"collapse share {c.collapse}; stopped before training round {r}")
        return None

    # -- the loop ------------------------------------------------------------------------------
    def phase(self, rs: dict, name: str, run: Callable[[], object], timed: str | None = None) -> None:
        """Runs a phase of a round unless the state has its result; records it (and its time)."""
        if name in rs:
            return
        began = time.time()
        rs[name] = run()
        if timed:
            rs.setdefault("seconds", {})[timed] = round(time.time() - began, 1)
        self.save()

    def run(self) -> dict:
        began = time.time()
        self.state["stopped"] = None  # a resumed or extended run decides afresh
        self.save()
        baseline = self.round_state(0)
        if self.config.eval and "eval" not in baseline:
            _log("round 0: evaluating the base model")
            self.phase(baseline, "eval", lambda: self.evaluate(None), timed="eval")
        adapter, version = None, None
        best, stale = Best.of(baseline), 0
        for r in range(1, self.rounds + 1):
            rs = self.round_state(r)
            rs.setdefault("adapter_in", adapter)
            rs.setdefault("parent", version)
            rs.setdefault("seconds", {})
            if "version" not in rs:
                _log(f"round {r}: generating with {'base + ' + adapter if adapter else 'the base model'}")
            self.phase(rs, "version", lambda: self.generate(r, adapter, version), timed="generate")
            self.phase(rs, "gap", lambda: self.gap(rs["version"]))
            if "adapter" not in rs:
                rows = json.loads((Path(rs["version"]) / "manifest.json").read_text(encoding="utf-8"))["rows"]
                self.state["stopped"] = self.stop_rule(r, rs["gap"], rows)
                if self.state["stopped"]:
                    _log(self.state["stopped"])
                    break
            self.phase(rs, "adapter", lambda: self.train(r, rs["version"], adapter), timed="train")
            self.phase(rs, "train", lambda: _training_summary(rs["adapter"]))
            if self.config.eval:
                if "eval" not in rs:
                    _log(f"round {r}: evaluating {rs['adapter']}")
                self.phase(rs, "eval", lambda: self.evaluate(rs["adapter"]), timed="eval")
            if self.config.win_rate:
                if "win_rate" not in rs:
                    _log(f"round {r}: win rate against {'round ' + str(r - 1) if adapter else 'the base model'}")
                self.phase(rs, "win_rate", lambda: self.win_rate(rs["adapter"], adapter), timed="win_rate")
            if self.config.eval and self.config.accept == "not_worse":
                self.phase(rs, "rollback", lambda: best.verdict(rs))
                if rs["rollback"]:
                    _log(rs["rollback"]["why"])
            write_report(self.out, self.state)
            accuracy = rs.get("eval", {}).get("accuracy")
            if rs.get("rollback"):
                adapter, version = best.adapter, best.version
            else:
                adapter, version = rs["adapter"], rs["version"]
            if accuracy is not None and not rs.get("rollback") and (
                    best.accuracy is None or accuracy > best.accuracy + self.config.min_delta):
                best, stale = Best.of(rs), 0
            elif accuracy is not None:
                stale += 1
            if self.config.patience and stale >= self.config.patience:
                self.state["stopped"] = (f"eval accuracy did not improve by more than {self.config.min_delta} "
                                         f"for {stale} round(s); stopped after round {r}")
                break
        del self.state["rounds"][r + 1:]  # rounds beyond a stop, from an earlier longer run, are not this run's
        if best.accuracy is not None:
            self.state["best"] = {"round": best.round, "adapter": best.adapter, "version": best.version,
                                  "accuracy": best.accuracy}
        self.state["stopped"] = self.state["stopped"] or f"completed {r} round(s)"
        self.state["seconds"] = round(self.state.get("seconds", 0) + time.time() - began, 1)
        self.save()
        write_report(self.out, self.state)
        return self.state


@dataclasses.dataclass
class Best:
    """The best evaluated round so far, which a significantly worse round rolls back to
    (``evolve.accept: not_worse``)."""

    round: int
    accuracy: float | None
    items: str | None  # per-item correctness, for the paired comparison
    adapter: str | None
    version: str | None

    @classmethod
    def of(cls, rs: dict) -> "Best":
        evaluated = rs.get("eval") or {}
        return cls(rs["round"], evaluated.get("accuracy"), evaluated.get("correct_items"), rs.get("adapter"),
                   rs.get("version"))

    def verdict(self, rs: dict) -> dict | None:
        """Why round ``rs`` is rolled back (its accuracy is significantly below this round's:
        the paired 95 % interval of the difference lies below zero), or None to keep it."""
        items = (rs.get("eval") or {}).get("correct_items")
        gain = paired_gain(self.items, items) if self.items and items else None
        if gain is None or gain["ci95"][1] >= 0:
            return None
        start = f"round {self.round}'s adapter" if self.adapter else "the base model"
        return {"to_round": self.round, "gain": gain,
                "why": (f"round {rs['round']}: eval accuracy {rs['eval']['accuracy']:.3f} is significantly below "
                        f"round {self.round}'s {self.accuracy:.3f} (paired difference {gain['gain']:+.3f}, 95 % CI "
                        f"[{gain['ci95'][0]:+.3f}, {gain['ci95'][1]:+.3f}]); rolled back: the next round starts "
                        f"from {start}")}


# The gap figure of each `select` verifier; the reference checks' is named after the verify method.
SELECT_TO_GAP = {"majority": "majority_vote", "judge": "judge_score", "reward_model": "reward_model"}


def _top_pass(gap: dict) -> float | None:
    """pass@k at the largest k measured."""
    passes = gap.get("pass_at_k") or {}
    return passes[max(passes, key=lambda k: int(k[5:]))] if passes else None


def _training_summary(adapter: str) -> dict:
    record = json.loads((Path(adapter) / "training.json").read_text(encoding="utf-8"))
    metrics = record.get("metrics", {})
    return {"steps": metrics.get("steps"), "train_loss": metrics.get("train_loss"),
            "examples": record.get("data", {}).get("examples") or record.get("data", {}).get("pairs"),
            "dataset_sha256": record["dataset"]["manifest_sha256"], "wall_seconds": metrics.get("wall_seconds")}
