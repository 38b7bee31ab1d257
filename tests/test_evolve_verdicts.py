"""People's verdicts on an evolve round's samples measure the round's gap verifiers: the report
(and the viewer's evolve page) hold each verifier's agreement with them."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from factory.annotations import add_verdict, confusion
from factory.cli import main
from factory.evolve.loop import Evolution

from .test_evolve import evolve_recipe


def test_verdicts_on_a_round_measure_each_gap_verifier(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    state = Evolution(str(evolve_recipe(tmp_path, tiny_model_dir)), out, [], progress=False).run()
    version = Path(state["rounds"][1]["version"])
    assert state["rounds"][1]["gap"]["options"]["solve_index"] == 0
    kept = pl.concat([pl.read_parquet(f) for f in sorted((version / "data").glob("*.parquet"))])
    rejected = pl.concat([pl.read_parquet(f) for f in sorted((version / "rejected").glob("*.parquet"))])
    # every sample the solve step made is kept or dropped by a later step: label some of each,
    # calling right answers good, except one (a person may disagree with the reference check)
    labels = [("data", i, bool(kept["correct"][i])) for i in range(min(3, kept.height))]
    later = [i for i, step in enumerate(rejected["drop_step"].to_list()) if step != "source"]
    labels += [("rejected", i, bool(rejected["correct"][i])) for i in later[:5]]
    labels[0] = (labels[0][0], labels[0][1], not labels[0][2])
    for part, index, good in labels:
        add_verdict(version, part, index, "good" if good else "bad")
    correct = {("data", i): bool(v) for i, v in enumerate(kept["correct"].to_list())}
    correct |= {("rejected", i): bool(v) for i, v in enumerate(rejected["correct"].to_list())}
    expected = confusion([correct[(p, i)] for p, i, _ in labels], [g for _, _, g in labels])
    assert expected["n"] == len(labels) == 8 and (expected["fp"] + expected["fn"]) == 1

    assert main(["report", str(out)]) == 0
    row = json.loads((out / "report.json").read_text())["table"][1]
    programmatic = row["verifier_agreement"]["programmatic"]
    assert {k: programmatic[k] for k in expected} == expected
    assert [(d["part"], d["index"]) for d in programmatic["disagree"]] == [labels[0][:2]]
    assert set(row["verifier_agreement"]) >= {"majority_vote", "judge_score", "programmatic"}
    assert all(v["n"] == 8 for v in row["verifier_agreement"].values())
    report = (out / "report.md").read_text()
    assert "## Verifiers against people's verdicts" in report
    assert "| programmatic | 8 | " in report and "| verifier (gap) |" in report
