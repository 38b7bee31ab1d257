"""People's verdicts on a version's rows: how they are kept (last line wins, ``clear`` withdraws,
junk is skipped), the sample offered for labelling, how each step agrees with them, and where they
travel: ``factory inspect``, ``factory export``, ``factory push`` and the evolve report.

The version is a real one (the scripted recipe: self_instruct -> solve -> judge -> score{min: 5}); the
rows to label are picked by reading its parquet here, so the expected confusion counts are known."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from factory.annotations import add_verdict, agreement, annotations_path, read_verdicts, stratified_sample
from factory.cli import main
from factory.exports import FORMATS, export
from factory.hub import plan_push
from factory.report import write_report

JUDGE = "steps[2].judge"
SCORE = "steps[3].score"
QUOTA = "steps[0].self_instruct"


def read_part(version: Path, part: str) -> pl.DataFrame:
    """A part's rows in the order verdicts number them: the shards in name order, concatenated."""
    files = sorted((version / part).glob("*.parquet"))
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")


def run_version(recipe: Path, out: Path, capsys) -> Path:
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    return Path(capsys.readouterr().out.strip().splitlines()[-1])  # the version path is the last line


@pytest.fixture
def version(scripted_recipe, tmp_path, capsys) -> Path:
    return run_version(scripted_recipe(), tmp_path / "out", capsys)


def picks(version: Path) -> dict[str, list[int]]:
    """Row indices per stratum: kept (data), dropped by the score filter, dropped by self_instruct's quota."""
    rejected = read_part(version, "rejected")["drop_step"].to_list()
    found = {"kept": list(range(read_part(version, "data").height)),
             "score": [i for i, step in enumerate(rejected) if step == SCORE],
             "quota": [i for i, step in enumerate(rejected) if step == QUOTA]}
    assert len(found["kept"]) >= 5 and len(found["score"]) >= 3 and len(found["quota"]) >= 1, found
    return found


def label(version: Path) -> dict[tuple[str, int], str]:
    """Kept rows: 3 good, 1 bad; rows the score filter dropped: 1 good, 2 bad; a row over the quota: bad."""
    p = picks(version)
    chosen = {("data", p["kept"][0]): "good", ("data", p["kept"][1]): "good", ("data", p["kept"][2]): "good",
              ("data", p["kept"][3]): "bad",
              ("rejected", p["score"][0]): "good", ("rejected", p["score"][1]): "bad",
              ("rejected", p["score"][2]): "bad",
              ("rejected", p["quota"][0]): "bad"}
    for (part, index), verdict in chosen.items():
        add_verdict(version, part, index, verdict)
    return chosen


def by_hand(tp: int, fp: int, fn: int, tn: int) -> dict:
    """Precision tp/(tp+fp), recall tp/(tp+fn), Cohen's kappa (po - pe) / (1 - pe) where po is the share
    of rows both call the same and pe the share expected by chance from each side's own rates."""
    n = tp + fp + fn + tn
    po = (tp + tn) / n
    pe = (tp + fp) / n * (tp + fn) / n + (fn + tn) / n * (fp + tn) / n
    return {"n": n, "tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": round(tp / (tp + fp), 4),
            "recall": round(tp / (tp + fn), 4), "kappa": round((po - pe) / (1 - pe), 4)}


def step(info: dict, label: str) -> dict:
    return next(s for s in info["steps"] if s["label"] == label)


def test_each_step_agrees_with_people_as_counted_by_hand(version):
    chosen = label(version)
    p = picks(version)
    info = agreement(version)
    assert (info["labelled"], info["good"], info["bad"]) == (8, 4, 4)
    keys = ("n", "tp", "fp", "fn", "tn", "precision", "recall", "kappa")
    # The version keeps the 4 data rows (3 good, 1 bad) and not the other 4 (1 good, 3 bad).
    assert {k: step(info, "version")[k] for k in keys} == by_hand(tp=3, fp=1, fn=1, tn=3)
    assert by_hand(3, 1, 1, 3)["kappa"] == 0.5  # po = 6/8, pe = (4*4 + 4*4)/64
    # The judge and the score filter decide on the 7 rows that reached them (not the quota row): the judge
    # keeps a score of at least 5 (the score filter's min), which is exactly what the filter kept.
    for label_ in (JUDGE, SCORE):
        assert {k: step(info, label_)[k] for k in keys} == by_hand(tp=3, fp=1, fn=1, tn=2)
    assert by_hand(3, 1, 1, 2)["kappa"] == round(10 / 24, 4)  # po = 5/7, pe = (4*4 + 3*3)/49
    assert step(info, JUDGE)["kind"] == "judge" and step(info, SCORE)["kind"] == "filter"
    # self_instruct dropped the quota row, so it is measured too: it kept the other 7 (4 good, 3 bad).
    assert {k: step(info, QUOTA)[k] for k in keys} == by_hand(tp=4, fp=3, fn=0, tn=1)
    assert [s["label"] for s in info["steps"]] == ["version", QUOTA, JUDGE, SCORE]  # solve dropped nothing
    disagree = {(d["part"], d["index"]) for d in step(info, JUDGE)["disagree"]}
    assert disagree == {("data", p["kept"][3]), ("rejected", p["score"][0])}
    # AUC of the judge's score: the share of (good, bad) pairs where the good row scores higher, ties half.
    scores = {("data", i): s for i, s in enumerate(read_part(version, "data")["score"].to_list())}
    scores |= {("rejected", i): s for i, s in enumerate(read_part(version, "rejected")["score"].to_list())}
    goods = [scores[k] for k, v in chosen.items() if v == "good" and k != ("rejected", p["quota"][0])]
    bads = [scores[k] for k, v in chosen.items() if v == "bad" and k != ("rejected", p["quota"][0])]
    pairs = [(g > b) + 0.5 * (g == b) for g in goods for b in bads]
    assert step(info, JUDGE)["auc"] == round(sum(pairs) / len(pairs), 4)


def test_the_last_line_wins_clear_withdraws_and_junk_lines_are_skipped(version):
    p = picks(version)
    add_verdict(version, "data", p["kept"][0], "bad")
    add_verdict(version, "data", p["kept"][0], "good", note="on second thought")
    add_verdict(version, "data", p["kept"][4], "good")
    add_verdict(version, "data", p["kept"][4], "clear")
    with open(annotations_path(version), "a", encoding="utf-8") as f:
        f.write('{"part": "data", "index": 2, "verd\n')  # a line cut by a crash
        f.write("not json at all\n")
        f.write(json.dumps({"part": "data", "index": 1, "verdict": "maybe"}) + "\n")
    add_verdict(version, "rejected", p["score"][0], "bad")
    verdicts = read_verdicts(version)
    assert sorted(verdicts) == [("data", p["kept"][0]), ("rejected", p["score"][0])]
    assert verdicts[("data", p["kept"][0])]["verdict"] == "good"
    assert verdicts[("data", p["kept"][0])]["note"] == "on second thought"
    assert verdicts[("rejected", p["score"][0])]["verdict"] == "bad"
    assert annotations_path(version) == version.parent / "annotations" / "v1.jsonl"


def test_the_sample_to_label_covers_every_stratum_and_is_the_same_again(version):
    p = picks(version)
    rejected = read_part(version, "rejected")
    strata = {"kept": ("data", p["kept"]), f"{SCORE}: below_min": ("rejected", p["score"]),
              f"{QUOTA}: over_quota": ("rejected", p["quota"])}
    assert len(p["quota"]) == 3 and set(rejected["drop_step"].unique()) == {SCORE, QUOTA}
    sample = stratified_sample(version, 6)
    assert {s: sum(item["stratum"] == s for item in sample) for s in strata} == {s: 2 for s in strata}
    for item in sample:
        part, indices = strata[item["stratum"]]
        assert item["part"] == part and item["index"] in indices
    assert len({(item["part"], item["index"]) for item in sample}) == 6
    assert stratified_sample(version, 6) == sample
    # 12 rows: the quota stratum has only 3, the other 9 are shared out kept first: 5 kept, 4 below_min.
    counts = {s: sum(item["stratum"] == s for item in stratified_sample(version, 12)) for s in strata}
    assert counts == {"kept": 5, f"{SCORE}: below_min": 4, f"{QUOTA}: over_quota": 3}


def test_inspect_shows_the_agreement_table_first_and_the_disagreeing_rows(version, capsys):
    assert main(["inspect", str(version), "--json", "--tokenizer", "none"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verdicts"] == {"count": 0, "good": 0, "bad": 0} and info["agreement"] is None
    assert main(["inspect", str(version), "--tokenizer", "none"]) == 0
    assert "people's verdicts" not in capsys.readouterr().out
    label(version)
    p = picks(version)
    assert main(["inspect", str(version), "--tokenizer", "none"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines.index("people's verdicts: 8 rows (4 good, 4 bad)")
    assert lines[header - 1] == "" and lines[header - 2].startswith("columns: ")
    assert header < next(i for i, line in enumerate(lines) if line.startswith("step ") and " in " in line)
    auc = step(agreement(version), JUDGE)["auc"]
    judge = next(line for line in lines[header:] if line.strip().startswith(JUDGE))
    assert judge.split()[1:8] == ["judge", "7", "0.750", "0.750", "0.417", f"{auc:.3f}", "2"]
    assert f"see them with `factory view {version.parent.parent}`" in "\n".join(lines)  # the OUT of OUT/demo/v1
    refs = next(line for line in lines[header:] if line.strip().startswith(f"{JUDGE}: "))
    assert refs.strip() == f"{JUDGE}: data#{p['kept'][3]} (bad), rejected#{p['score'][0]} (good)"
    assert main(["inspect", str(version), "--json", "--tokenizer", "none"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verdicts"] == {"count": 8, "good": 4, "bad": 4}
    assert step(info["agreement"], SCORE)["kappa"] == round(10 / 24, 4)


def test_inspect_names_at_most_five_disagreeing_rows_per_step(version, capsys):
    p = picks(version)
    for i in p["kept"][:7]:
        add_verdict(version, "data", i, "bad")  # the version kept 7 rows people call bad
    assert main(["inspect", str(version), "--tokenizer", "none"]) == 0
    refs = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("version: "))
    assert refs.strip() == "version: " + ", ".join(f"data#{i} (bad)" for i in p["kept"][:5]) + " and 2 more"


def test_export_carries_the_standing_verdicts_beside_the_rows(version, tmp_path):
    export(version, "trl-sft", tmp_path / "plain")
    assert not (tmp_path / "plain" / "annotations.jsonl").exists()
    assert "annotations" not in json.loads((tmp_path / "plain" / "export.json").read_text())
    chosen = label(version)
    add_verdict(version, "data", picks(version)["kept"][4], "good")
    add_verdict(version, "data", picks(version)["kept"][4], "clear")  # withdrawn: not exported
    expected = sorted((part, index, verdict) for (part, index), verdict in chosen.items())
    for fmt in (f for f in FORMATS if f != "trl-dpo"):  # trl-dpo needs preference pairs
        written = export(version, fmt, tmp_path / fmt)
        assert tmp_path / fmt / "annotations.jsonl" in written
        records = [json.loads(line) for line in (tmp_path / fmt / "annotations.jsonl").read_text().splitlines()]
        assert [(r["part"], r["index"], r["verdict"]) for r in records] == expected
        assert all(r["version"] == 1 and len(r["row_hash"]) == 16 for r in records)
        record = json.loads((tmp_path / fmt / "export.json").read_text())
        assert record["annotations"] == {"file": "annotations.jsonl", "count": 8, "good": 4, "bad": 4}
    # The index of a verdict on a kept row is the record's position in the export.
    data = read_part(version, "data")
    lines = [json.loads(line) for line in (tmp_path / "trl-sft" / "train.jsonl").read_text().splitlines()]
    for part, index, _ in expected:
        if part == "data":
            assert lines[index]["messages"][0]["content"] == data["instruction"][index]
    # Verdicts all withdrawn: an export into the same folder leaves no stale file behind.
    for part, index in chosen:
        add_verdict(version, part, index, "clear")
    export(version, "trl-sft", tmp_path / "trl-sft")
    assert not (tmp_path / "trl-sft" / "annotations.jsonl").exists()
    assert "annotations" not in json.loads((tmp_path / "trl-sft" / "export.json").read_text())


def test_push_uploads_the_verdicts_as_their_own_file(version, capsys):
    before = plan_push(version, "me/demo")
    assert [path for path, _ in before.adds] == ["data/train-00000-of-00001.parquet", "manifest.json", "README.md"]
    assert "People's verdicts" not in before.adds[-1][1].decode()
    chosen = label(version)
    assert main(["push", str(version), "--repo", "me/demo", "--dry-run"]) == 0
    assert "  add     annotations/v1.jsonl  (" in capsys.readouterr().out
    plan = plan_push(version, "me/demo", existing_files=["annotations/v0.jsonl", "round2/annotations/v0.jsonl"])
    assert [path for path, _ in plan.adds] == ["data/train-00000-of-00001.parquet", "manifest.json",
                                               "annotations/v1.jsonl", "README.md"]
    records = [json.loads(line) for line in plan.adds[2][1].decode().splitlines()]
    assert [(r["part"], r["index"], r["verdict"]) for r in records] == sorted(
        (part, index, verdict) for (part, index), verdict in chosen.items())
    assert plan.deletes == ["annotations/v0.jsonl"]  # an older version's verdicts leave main with its rows
    card = plan.adds[-1][1].decode()
    assert "- People's verdicts: 8 rows labelled (4 good, 4 bad) in `annotations/v1.jsonl` (4 on rows of the " \
           "train split, by `index`; 4 on dropped rows, which are not pushed)" in card
    named = plan_push(version, "me/demo", config_name="round2")
    assert [path for path, _ in named.adds][2] == "round2/annotations/v1.jsonl"
    assert "`round2/annotations/v1.jsonl`" in named.adds[-1][1].decode()


def evolve_state(rounds: list[dict]) -> dict:
    return {"name": "demo", "base_model": "tiny", "method": "sft", "recipe_file": "evolve.yaml",
            "recipe_hash": "0123456789abcdef", "stopped": "rounds done", "rounds": rounds}


def test_the_evolve_report_measures_each_rounds_verifiers_against_people(version, scripted_recipe, tmp_path,
                                                                          capsys):
    other = run_version(scripted_recipe(), tmp_path / "out", capsys)  # v2, without verdicts
    assert other.name == "v2"
    label(version)
    p = picks(version)
    rounds = [{"round": 0, "eval": {"accuracy": 0.5}},
              {"round": 1, "version": str(version), "eval": {"accuracy": 0.6}},
              {"round": 2, "version": str(other), "eval": {"accuracy": 0.7}}]
    (tmp_path / "run").mkdir()
    write_report(tmp_path / "run", evolve_state(rounds))
    text = (tmp_path / "run" / "report.md").read_text()
    assert "## Verifiers against people's verdicts" in text
    assert f"Round 1 (`{version}`, `factory view {version.parent.parent}`): 8 rows labelled (4 good, 4 bad)." \
        in text and "Round 2 (" not in text
    auc = step(agreement(version), JUDGE)["auc"]
    assert (f"| {JUDGE} | judge | score >= 5 (the score filter's min) | 7 | 0.750 | 0.750 | 0.417 | {auc:.3f} | "
            f"2: data#{p['kept'][3]}, rejected#{p['score'][0]} |") in text
    assert f"| {SCORE} | filter | kept by the step | 7 | 0.750 | 0.750 | 0.417 | - |" in text
    table = json.loads((tmp_path / "run" / "report.json").read_text())["table"]
    assert [row["agreement"] is None for row in table] == [True, False, True]
    assert step(table[1]["agreement"], "version")["kappa"] == 0.5
    # No round with verdicts: no section.
    (tmp_path / "bare").mkdir()
    write_report(tmp_path / "bare", evolve_state([rounds[0], rounds[2]]))
    assert "people's verdicts" not in (tmp_path / "bare" / "report.md").read_text()
