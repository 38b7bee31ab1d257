"""The evolve report: ``report.json``, ``report.md`` and ``report.png`` in the run folder.

``factory report OUT`` redraws them from ``OUT/evolve.json``. Where people have labelled
rows of a round's dataset version (``factory view``), the report measures that round's
judges, verifiers and filters against their verdicts.
"""

from __future__ import annotations

import json
from pathlib import Path

from .annotations import agreement, read_verdicts, view_folder
from .errors import FactoryError
from .evolve.evaluate import paired_gain

DISAGREE_SHOWN = 5  # disagreeing rows named per step in the report; report.json has them all


def rows(state: dict) -> list[dict]:
    """One flat row per round: eval accuracy (and its gain over round 0 with a paired 95 %
    interval), win rate, J(f), gaps per verifier, pass@k, diversity, seconds per phase."""
    table = []
    base_items = ((state["rounds"][0] if state["rounds"] else {}).get("eval") or {}).get("correct_items")
    for rs in state["rounds"]:
        gap = rs.get("gap") or {}
        evaluated = rs.get("eval") or {}
        row = {"round": rs["round"], "accuracy": evaluated.get("accuracy"),
               "eval_cut": (f"{evaluated['truncated']}/{evaluated['items']}" if "truncated" in evaluated else None),
               "win_rate": (rs.get("win_rate") or {}).get("win_rate"), "J_f": gap.get("J_f"),
               "samples": gap.get("samples"), "train_loss": (rs.get("train") or {}).get("train_loss")}
        if rs["round"] and base_items and evaluated.get("correct_items"):
            row["gain"] = paired_gain(base_items, evaluated["correct_items"])
        row["seconds"] = rs.get("seconds") or {}
        row["rolled_back"] = (rs.get("rollback") or {}).get("to_round")
        wins = rs.get("win_rate") or {}
        # Wins, losses and ties behind the rate: 0.5 from all ties is no evidence either way.
        row["win_loss_tie"] = (f"{wins['wins']}/{wins['losses']}/{wins['ties']}"
                               if all(k in wins for k in ("wins", "losses", "ties")) else None)
        for name, v in (gap.get("verifiers") or {}).items():
            row[f"gap_{name}"] = v["gap"]
            row[f"J_w_{name}"] = v["J_f_w"]
            row[f"relative_gap_{name}"] = v["relative_gap"]
        row.update(gap.get("pass_at_k") or {})
        row.update({k: v for k, v in (gap.get("diversity") or {}).items()})
        verdicts = round_verdicts(rs)
        row["agreement"] = agreement(rs["version"], None, verdicts) if verdicts else None
        row["verifier_agreement"] = round_verifier_agreement(rs, verdicts)
        table.append(row)
    return table


def round_verdicts(rs: dict) -> dict:
    """People's verdicts on the round's dataset version (none when the version folder is not where
    the state says, as after moving the run)."""
    version = rs.get("version")
    return read_verdicts(version) if version and Path(version).is_dir() else {}


def round_verifier_agreement(rs: dict, verdicts: dict) -> dict | None:
    """Each verifier of the round's gap (majority vote, judge score, reward model, the reference
    check) against people's verdicts on the round's samples; None without verdicts."""
    from .evolve.evaluate import verifier_agreement
    from .store import read_manifest

    if not verdicts:
        return None
    version = rs["version"]
    options = (rs.get("gap") or {}).get("options")
    if options is None:  # a run recorded before the gap kept its options: the defaults, after the first solve
        steps = [next(iter(step)) for step in (read_manifest(version).get("recipe") or {}).get("steps") or []]
        if "solve" not in steps:
            return None
        options = {"solve_index": steps.index("solve")}
    try:
        return verifier_agreement(version, options, verdicts)
    except FactoryError:  # samples without a `correct` column: the round measured no gap
        return None


def markdown(state: dict, table: list[dict]) -> str:
    lines = [f"# Self-evolution report: {state['name']}", "",
             f"Base model: `{state['base_model']}`; training: {state['method']}; "
             f"recipe: `{state['recipe_file']}` (hash `{state['recipe_hash'][:12]}`); {state.get('stopped') or ''}.",
             "", "## Evaluation", "",
             "An answer cut at the token limit counts as wrong (column *cut*).", "",
             "Gain: accuracy minus round 0's on the same items, with a paired bootstrap 95 % interval and the "
             "items that turned right / wrong.", "",
             "| round | eval accuracy | gain over round 0 [95 % CI] | cut | win rate vs previous | "
             "wins / losses / ties | train loss | kept |",
             "|---|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['round']} | {_fmt(row['accuracy'])} | {gain_text(row.get('gain'))} | "
                     f"{row.get('eval_cut') or '-'} | {_fmt(row['win_rate'])} | {row['win_loss_tie'] or '-'} | "
                     f"{_fmt(row['train_loss'])} | {kept_text(row)} |")
    if state.get("best"):
        best = state["best"]
        lines += ["", f"Best round: {best['round']} (accuracy {_fmt(best['accuracy'])}; "
                      f"{'adapter `' + best['adapter'] + '`' if best['adapter'] else 'the base model'})."]
    verifiers = sorted({k[len('gap_'):] for row in table for k in row if k.startswith("gap_")})
    if verifiers:
        lines += ["", "## Generation-verification gap", "",
                  "J(f): accuracy of the round's own samples; J(f[w]): accuracy of the samples verifier w accepts; "
                  "gap = J(f[w]) - J(f); relative gap = gap / (1 - J(f)).", "",
                  "| round | samples | J(f) | " + " | ".join(f"{v}: J(f[w]) / gap / rel." for v in verifiers) + " |",
                  "|---|---|---|" + "---|" * len(verifiers)]
        for row in table[1:]:
            cells = [f"{_fmt(row.get('J_w_' + v))} / {_fmt(row.get('gap_' + v))} / "
                     f"{_fmt(row.get('relative_gap_' + v))}" for v in verifiers]
            lines.append(f"| {row['round']} | {row.get('samples')} | {_fmt(row['J_f'])} | " + " | ".join(cells) + " |")
        ks = sorted({k for row in table for k in row if k.startswith("pass@")}, key=lambda k: int(k[5:]))
        lines += ["", "## Samples: pass@k and diversity", "",
                  "| round | " + " | ".join(ks) + " | distinct-1 | distinct-2 | distinct answers / sample |",
                  "|---|" + "---|" * (len(ks) + 3)]
        for row in table[1:]:
            lines.append(f"| {row['round']} | " + " | ".join(_fmt(row.get(k)) for k in ks) +
                         f" | {_fmt(row.get('distinct_1'))} | {_fmt(row.get('distinct_2'))} | "
                         f"{_fmt(row.get('distinct_answers_per_sample'))} |")
    lines += agreement_markdown(state, table)
    phases = [p for p in ("generate", "train", "eval", "win_rate") if any(p in row["seconds"] for row in table)]
    if phases:
        lines += ["", "## Seconds per phase", "", "| round | " + " | ".join(phases) + " | total |",
                  "|---|" + "---|" * (len(phases) + 1)]
        for row in table:
            if row["seconds"]:
                lines.append(f"| {row['round']} | " + " | ".join(seconds_text(row["seconds"].get(p)) for p in phases)
                             + f" | {seconds_text(sum(row['seconds'].values()))} |")
    lines += ["", "## Rounds", ""]
    for rs in state["rounds"][1:]:
        lines.append(f"- round {rs['round']}: data `{rs.get('version')}` (parent `{rs.get('parent')}`), trained "
                     f"`{rs.get('adapter')}` from `{rs.get('adapter_in')}`; seconds {rs.get('seconds')}" +
                     (f". {rs['rollback']['why']}" if rs.get("rollback") else ""))
    return "\n".join(lines) + "\n"


def agreement_markdown(state: dict, table: list[dict]) -> list[str]:
    """Per round with verdicts: each verifier of the gap, then each judge, verifier and filter of the
    recipe, against people (no verdicts: no section)."""
    labelled = [(rs, row) for rs, row in zip(state["rounds"], table) if row.get("agreement")]
    if not labelled:
        return []
    lines = ["", "## Verifiers against people's verdicts", "",
             "Precision and recall of what a verifier accepted (a step kept) against what people called good, "
             "Cohen's kappa (agreement beyond chance) and, for a score, its AUC, over the labelled rows it decided "
             "on. Disagreeing rows are `part#index` of the round's version (`factory view` on the folder that holds "
             "it shows them)."]
    for rs, row in labelled:
        info = row["agreement"]
        lines += ["", f"Round {row['round']} (`{rs['version']}`, `factory view {view_folder(rs['version'])}`): "
                      f"{info['labelled']} rows labelled ({info['good']} good, {info['bad']} bad)."]
        if row.get("verifier_agreement"):
            lines += ["", "| verifier (gap) | n | precision | recall | kappa | disagreeing rows |",
                      "|---|---|---|---|---|---|"]
            for name, v in row["verifier_agreement"].items():
                lines.append(f"| {name} | {v['n']} | {_fmt(v['precision'])} | {_fmt(v['recall'])} | "
                             f"{_fmt(v['kappa'])} | {_disagree_cell(v['disagree'])} |")
        lines += ["", "| step | kind | decision | n | precision | recall | kappa | AUC | disagreeing rows |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in info["steps"]:
            lines.append(f"| {s['label']} | {s['kind']} | {s['decision']} | {s['n']} | {_fmt(s['precision'])} | "
                         f"{_fmt(s['recall'])} | {_fmt(s['kappa'])} | {_fmt(s['auc'])} | "
                         f"{_disagree_cell(s['disagree'])} |")
    return lines


def _disagree_cell(disagree: list[dict]) -> str:
    """``3: data#1, rejected#4, ...`` (at most DISAGREE_SHOWN named)."""
    refs = ", ".join(f"{d['part']}#{d['index']}" for d in disagree[:DISAGREE_SHOWN])
    more = len(disagree) - DISAGREE_SHOWN
    return f"{len(disagree)}" + (f": {refs}" if refs else "") + (f" and {more} more" if more > 0 else "")


def gain_text(gain: dict | None) -> str:
    """``+0.073 [+0.040, +0.107] (31 up / 9 down)``, or ``-``."""
    if not gain:
        return "-"
    low, high = gain["ci95"]
    return (f"{gain['gain']:+.3f} [{low:+.3f}, {high:+.3f}] ({gain['improved']} up / {gain['worsened']} down)" +
            (" *" if gain["significant"] else ""))


def kept_text(row: dict) -> str:
    """Whether the loop built on a round: ``yes``, ``rolled back to round N`` (``-`` for round 0)."""
    if not row["round"]:
        return "-"
    return "yes" if row.get("rolled_back") is None else f"rolled back to round {row['rolled_back']}"


def seconds_text(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in table]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(rounds, [r["accuracy"] for r in table], marker="o", label="eval accuracy")
    back = [r for r in table if r.get("rolled_back") is not None and r["accuracy"] is not None]
    if back:
        ax.scatter([r["round"] for r in back], [r["accuracy"] for r in back], marker="x", s=90, color="red",
                   zorder=3, label="rolled back")
    if any(r["win_rate"] is not None for r in table):
        ax.plot(rounds, [r["win_rate"] for r in table], marker="s", label="win rate vs previous")
    ax.set(title="Evaluation", xlabel="round", ylim=(0, 1), xticks=rounds)
    ax.legend()
    ax = axes[1]
    later = table[1:]
    xs = [r["round"] for r in later]
    ax.plot(xs, [r["J_f"] for r in later], marker="o", color="black", label="J(f) own samples")
    for name in sorted({k[len("J_w_"):] for r in later for k in r if k.startswith("J_w_")}):
        ax.plot(xs, [r.get("J_w_" + name) for r in later], marker="^", label=f"J(f[w]) {name}")
    ax.set(title="Generation-verification gap", xlabel="round", ylim=(0, 1), xticks=rounds)
    ax.legend(fontsize=8)
    ax = axes[2]
    for key in ("distinct_1", "distinct_2", "distinct_answers_per_sample", "pass@1"):
        ax.plot(xs, [r.get(key) for r in later], marker="o", label=key)
    ax.set(title="Diversity of samples", xlabel="round", ylim=(0, 1), xticks=rounds)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: str | Path, state: dict) -> Path:
    out = Path(out)
    table = rows(state)
    (out / "report.json").write_text(json.dumps({"state": state, "table": table}, indent=2, default=str) + "\n",
                                     encoding="utf-8")
    (out / "report.md").write_text(markdown(state, table), encoding="utf-8")
    plot(table, out / "report.png")
    return out / "report.md"


def redraw(out: str | Path) -> Path:
    path = Path(out) / "evolve.json"
    if not path.is_file():
        raise FactoryError(f"{out}: no evolve.json; give the --out folder of a `factory evolve` run")
    return write_report(out, json.loads(path.read_text(encoding="utf-8")))
