"""``evolve.compare``: the same loop once per verifier, and the gain each produced against its gap.

Each verifier gets the validated recipe with its ``select`` step set to it (a ``--set``
override, so its run folder records it), the same rounds, samples and training budget, and
runs in ``OUT/<verifier>/``. The runs share one LLM cache, so round 0's evaluation and
round 1's samples (the same base model on the same tasks) are computed once and differ only
in which samples each verifier keeps.

``OUT/compare.json`` lists the runs; ``OUT/report.{json,md,png}`` put them side by side:
accuracy per round per verifier with its paired interval against round 0, and each round's
gain against the gap of the verifier that chose its data ("Mind the Gap" predicts that no
gap means no gain). ``factory report OUT`` redraws it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from filters.select import Select

from ..errors import FactoryError
from ..recipe import load_recipe
from .loop import SELECT_TO_GAP, Evolution, _top_pass

MANIFEST = "compare.json"


class Comparison:
    """The loops of ``evolve.compare`` (or ``verifiers``) in ``out``, run one after another."""

    def __init__(self, recipe_file: str, out: str | Path, overrides: list[str], rounds: int | None = None,
                 progress: bool = True, verifiers: list[str] | None = None, make_driver=None):
        recipe = load_recipe(recipe_file, overrides)
        self.verifiers = list(verifiers or (recipe.evolve.compare if recipe.evolve else None) or [])
        index = next((i for i, step in enumerate(recipe.steps) if isinstance(step, Select)), None)
        if not self.verifiers or index is None:
            raise FactoryError(f"{recipe_file}: a comparison needs `evolve.compare: [...]` and a `select` step")
        self.out = Path(out)
        self.recipe_file = recipe_file
        cache = self.out / ".cache"
        self.runs = {v: Evolution(recipe_file, self.out / v, list(overrides) + [f"steps[{index}].select.verifier={v}"],
                                  rounds=rounds, progress=progress, cache_dir=cache,
                                  driver=make_driver(cache) if make_driver else None)
                     for v in self.verifiers}

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / MANIFEST).write_text(json.dumps({"recipe_file": self.recipe_file,
                                                     "verifiers": self.verifiers}, indent=2) + "\n",
                                         encoding="utf-8")
        states = {}
        for verifier, evolution in self.runs.items():
            print(f"== selecting by {verifier}: {evolution.out}", file=sys.stderr, flush=True)
            states[verifier] = evolution.run()
            write_comparison(self.out, states)
        return states


def load_states(out: str | Path) -> dict:
    out = Path(out)
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    states = {}
    for verifier in manifest["verifiers"]:
        path = out / verifier / "evolve.json"
        if path.is_file():
            states[verifier] = json.loads(path.read_text(encoding="utf-8"))
    return states


def comparison_rows(states: dict) -> list[dict]:
    """One row per verifier and round: accuracy, gain over the round before and over round 0
    (paired interval), and the gap of the verifier that chose the round's data."""
    from ..report import kept_text, rows

    table = []
    for verifier, state in states.items():
        previous, accuracies = None, {}
        for rs, row in zip(state["rounds"], rows(state)):
            # The gap of the verifier that picked the round's data (runs before it was recorded: by name).
            measured = (rs.get("gap") or {}).get("selected_by") or SELECT_TO_GAP.get(verifier, verifier)
            entry = {"verifier": verifier, "round": row["round"], "accuracy": row["accuracy"],
                     "gain": row.get("gain"), "J_f": row["J_f"], "gap": row.get(f"gap_{measured}"),
                     "relative_gap": row.get(f"relative_gap_{measured}"), "J_f_w": row.get(f"J_w_{measured}"),
                     "gaps": {k[4:]: v for k, v in row.items() if k.startswith("gap_")},
                     "pass@1": row.get("pass@1"),
                     "pass@k": _top_pass(rs.get("gap") or {}),
                     "distinct_2": row.get("distinct_2"),
                     "distinct_answers": row.get("distinct_answers_per_sample"), "seconds": row["seconds"],
                     "round_gain": (round(row["accuracy"] - previous, 4)
                                    if row["accuracy"] is not None and previous is not None else None),
                     "rolled_back": row["rolled_back"], "kept": kept_text(row)}
            accuracies[row["round"]] = row["accuracy"]
            # The next round starts from this round's model, or from the one it was rolled back to.
            back = row["rolled_back"]
            previous = accuracies.get(back) if back is not None else (
                row["accuracy"] if row["accuracy"] is not None else previous)
            table.append(entry)
    return table


def comparison_markdown(states: dict, table: list[dict]) -> str:
    from ..report import _fmt, gain_text, seconds_text

    any_state = next(iter(states.values()))
    total = sum(state.get("seconds") or 0 for state in states.values())
    lines = [f"# Verifier comparison: {any_state['name']}", "",
             f"Base model `{any_state['base_model']}`, recipe `{any_state['recipe_file']}`; the same loop and budget "
             f"with the training data picked by {', '.join(f'`{v}`' for v in states)}. Wall time of all runs: "
             f"{total / 60:.1f} min (round 0 and round 1's samples are shared through the cache).", "",
             "Gap: J(f[w]) - J(f) of the verifier that chose the round's training data, on the round's samples "
             "(generated by the previous round's model). Round gain: accuracy after the round minus before it. "
             "Gain over round 0: paired bootstrap 95 % interval (* when it excludes zero).", "",
             "| verifier | round | accuracy | gain over round 0 [95 % CI] | J(f) | J(f[w]) | gap | rel. gap | "
             "round gain | pass@1 | pass@k | distinct-2 | distinct answers | kept |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        lines.append(f"| {e['verifier']} | {e['round']} | {_fmt(e['accuracy'])} | {gain_text(e['gain'])} | "
                     f"{_fmt(e['J_f'])} | {_fmt(e['J_f_w'])} | {_fmt(e['gap'])} | {_fmt(e['relative_gap'])} | "
                     f"{_fmt(e['round_gain'])} | {_fmt(e['pass@1'])} | {_fmt(e['pass@k'])} | "
                     f"{_fmt(e['distinct_2'])} | {_fmt(e['distinct_answers'])} | {e['kept']} |")
    lines += ["", "## How each run ended", ""]
    for v, state in states.items():
        best = state.get("best")
        lines.append(f"- {v}: {state.get('stopped')}; {(state.get('seconds') or 0) / 60:.1f} min" +
                     (f"; best round {best['round']} ({_fmt(best['accuracy'])})" if best else ""))
        lines += [f"  - {rs['rollback']['why']}" for rs in state["rounds"] if rs.get("rollback")]
    lines += ["", "## Seconds per phase", "", "| verifier | round | generate | train | eval |", "|---|---|---|---|---|"]
    for e in table:
        if e["seconds"]:
            lines.append(f"| {e['verifier']} | {e['round']} | " +
                         " | ".join(seconds_text(e["seconds"].get(p)) for p in ("generate", "train", "eval")) + " |")
    return "\n".join(lines) + "\n"


def comparison_plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    verifiers = list(dict.fromkeys(e["verifier"] for e in table))
    colors = dict(zip(verifiers, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    labelled = False
    for v in verifiers:
        mine = [e for e in table if e["verifier"] == v and e["accuracy"] is not None]
        base = mine[0]["accuracy"] if mine else 0.0
        low = [e["accuracy"] - (base + e["gain"]["ci95"][0]) if e["gain"] else 0 for e in mine]
        high = [(base + e["gain"]["ci95"][1]) - e["accuracy"] if e["gain"] else 0 for e in mine]
        ax.errorbar([e["round"] for e in mine], [e["accuracy"] for e in mine], yerr=[low, high], marker="o",
                    capsize=4, color=colors[v], label=f"picked by {v}")
        back = [e for e in mine if e["rolled_back"] is not None]
        ax.scatter([e["round"] for e in back], [e["accuracy"] for e in back], marker="x", s=120, color="red",
                   zorder=3, label=None if labelled or not back else "rolled back")
        labelled = labelled or bool(back)
    rounds = sorted({e["round"] for e in table})
    ax.set(title="Held-out accuracy (bars: paired 95 % CI of the gain over round 0)", xlabel="round",
           ylabel="accuracy", xticks=rounds)
    ax.legend(fontsize=8)
    ax = axes[1]
    for v in verifiers:
        mine = [e for e in table if e["verifier"] == v and e["gap"] is not None and e["round_gain"] is not None]
        ax.scatter([e["gap"] for e in mine], [e["round_gain"] for e in mine], color=colors[v], s=50, label=v)
        for e in mine:
            ax.annotate(f"r{e['round']}", (e["gap"], e["round_gain"]), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set(title="Gain against gap (\"Mind the Gap\")", xlabel="gap of the verifier that picked the data",
           ylabel="accuracy gain of the round")
    ax.legend(fontsize=8)
    ax = axes[2]
    for v in verifiers:
        mine = [e for e in table if e["verifier"] == v and e["pass@k"] is not None]
        xs = [e["round"] for e in mine]
        ax.plot(xs, [e["pass@k"] for e in mine], marker="o", color=colors[v], label=f"{v}: pass@k")
        ax.plot(xs, [e["distinct_answers"] for e in mine], marker="s", ls="--", color=colors[v],
                label=f"{v}: distinct answers / sample")
    ax.set(title="Samples of each round: pass@k and diversity", xlabel="round", ylim=(0, 1), xticks=rounds[1:])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_comparison(out: str | Path, states: dict | None = None) -> Path:
    out = Path(out)
    states = states if states is not None else load_states(out)
    if not states:
        raise FactoryError(f"{out}: no finished run of the comparison yet")
    table = comparison_rows(states)
    (out / "report.json").write_text(json.dumps({"table": table}, indent=2, default=str) + "\n", encoding="utf-8")
    (out / "report.md").write_text(comparison_markdown(states, table), encoding="utf-8")
    comparison_plot(table, out / "report.png")
    return out / "report.md"
