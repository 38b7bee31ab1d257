"""``factory view``'s API over a real version: pages, search, filters, verdicts, refusals, bad input.

The page itself is driven in a real browser by tests/test_view_browser.py; here the JSON the page
reads is checked against the parquet files read independently."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest

from factory.cli import main
from tests.conftest import SCRIPTED_LLM, SEEDS

starlette_testclient = pytest.importorskip("starlette.testclient")

STEPS = """\
  - self_instruct: {num_tasks: 12, prompts_per_round: 8, novelty_threshold: 1.0}
  - solve: {samples: 2}
  - judge: {}
  - score: {min: 5}
"""


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """OUT with one real version made on the scripted backend (kept rows and rows the score filter dropped)."""
    root = tmp_path_factory.mktemp("view")
    recipe = root / "recipe.yaml"
    recipe.write_text(f"name: demo\nseed: 3\n{SCRIPTED_LLM}source: {{path: {SEEDS}}}\nsteps:\n{STEPS}",
                      encoding="utf-8")
    assert main(["run", str(recipe), "--out", str(root / "out"), "--quiet", "--examples", "0"]) == 0
    return root / "out"


@pytest.fixture
def view(out, tmp_path):
    """A client over a private copy of OUT (verdicts write into it)."""
    from factory.view.server import create_app

    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(".cache"))
    client = starlette_testclient.TestClient(create_app(copy, sample=6))
    client.root = copy
    return client


def _read(root: Path, part: str) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(f) for f in sorted((root / "demo" / "v1" / part).glob("*.parquet"))])


def _get(client, path: str, status: int = 200, **params):
    response = client.get(path, params=params)
    assert response.status_code == status, response.text
    return response.json()


def test_index_lists_the_versions_from_their_manifests(view):
    index = _get(view, "/api/index")
    manifest = json.loads((view.root / "demo" / "v1" / "manifest.json").read_text())
    [dataset] = index["datasets"]
    assert dataset["id"] == "demo" and dataset["error"] is None
    [version] = dataset["versions"]
    assert version["rows"] == manifest["rows"] and version["rejected_rows"] == manifest["rejected_rows"]
    assert version["drops"] == {s["label"]: s["dropped"] for s in manifest["steps"] if s["dropped"]}
    usage = next(iter(manifest["usage"].values()))
    assert version["tokens"] == {"prompt": usage["prompt_tokens"], "completion": usage["completion_tokens"]}
    assert index["agreement"] == [] and index["problems"] == []


def test_pages_hold_the_rows_in_the_version_order_with_their_positions(view):
    kept = _read(view.root, "data")
    first = _get(view, "/api/rows", ds="demo", v=1, part="data", offset=0, limit=5)
    assert first["total"] == kept.height and first["more"] is True
    assert [r["_index"] for r in first["rows"]] == [0, 1, 2, 3, 4]
    assert [r["response"] for r in first["rows"]] == kept["response"][:5].to_list()
    last = _get(view, "/api/rows", ds="demo", v=1, part="data", offset=kept.height - 2, limit=5)
    assert [r["_index"] for r in last["rows"]] == [kept.height - 2, kept.height - 1] and last["more"] is False
    assert last["rows"][1]["messages"] == kept["messages"][-1].to_list()


def test_search_finds_text_in_any_column_and_keeps_positions(view):
    kept = _read(view.root, "data")
    word = kept["response"][7].split()[-1].upper()  # a hash in one response: case must not matter
    expected = [i for i, row in enumerate(kept.iter_rows(named=True))
                if any(word.lower() in str(v).lower() for k, v in row.items() if isinstance(v, str))]
    found = _get(view, "/api/rows", ds="demo", v=1, part="data", q=word)
    assert [r["_index"] for r in found["rows"]] == expected and 7 in expected
    assert found["total"] is None
    assert _get(view, "/api/count", ds="demo", v=1, part="data", q=word)["total"] == len(expected)
    assert _get(view, "/api/rows", ds="demo", v=1, part="data", q=word, **{"in": "instruction"})["rows"] == []
    assert _get(view, "/api/rows", ds="demo", v=1, part="data", q="no such text anywhere")["rows"] == []


def test_rejected_rows_grouped_and_filtered_by_step_and_reason(view):
    rejected = _read(view.root, "rejected")
    version = _get(view, "/api/version", ds="demo", v=1)
    counts = rejected.group_by("drop_step", "drop_reason").len()
    assert sorted((g["step"], g["reason"], g["rows"]) for g in version["groups"]) == sorted(counts.iter_rows())
    assert [g["step"] for g in version["groups"]] == sorted(g["step"] for g in version["groups"])  # in step order
    page = _get(view, "/api/rows", ds="demo", v=1, part="rejected", step="steps[3].score", reason="below_min")
    expected = [i for i, s in enumerate(rejected["drop_step"].to_list()) if s == "steps[3].score"]
    assert [r["_index"] for r in page["rows"]] == expected
    assert all(r["drop_reason"] == "below_min" and r["score"] < 5 for r in page["rows"])
    by_facet = _get(view, "/api/rows", ds="demo", v=1, part="rejected", f='drop_reason="over_quota"')
    assert {r["drop_reason"] for r in by_facet["rows"]} == {"over_quota"}
    assert [r["_index"] for r in by_facet["rows"]] == [i for i, s in enumerate(rejected["drop_reason"].to_list())
                                                        if s == "over_quota"]
    assert dict(version["facets"]["rejected"]["drop_reason"]) == dict(rejected["drop_reason"].value_counts().iter_rows())
    assert "response" not in version["facets"]["data"]  # free text is searched, not faceted


def test_a_verdict_is_appended_beside_the_version_and_moves_the_agreement(view):
    version_dir = view.root / "demo" / "v1"
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in version_dir.rglob("*") if p.is_file()}
    kept = _read(view.root, "data")
    rejected = _read(view.root, "rejected")
    below = [i for i, s in enumerate(rejected["drop_step"].to_list()) if s == "steps[3].score"]

    def post(part, index, verdict, note=""):
        response = view.post("/api/verdict", json={"ds": "demo", "v": 1, "part": part, "index": index,
                                                   "verdict": verdict, "note": note})
        assert response.status_code == 200, response.text
        return response.json()

    post("data", 0, "good")
    post("data", 1, "bad", "wrong answer")
    post("rejected", below[0], "good")
    result = post("rejected", below[1], "bad")
    # kept & good, kept & bad, dropped & good, dropped & bad: one each
    table = {s["label"]: s for s in result["agreement"]["steps"]}
    assert {k: table["steps[3].score"][k] for k in ("n", "tp", "fp", "fn", "tn")} == \
        {"n": 4, "tp": 1, "fp": 1, "fn": 1, "tn": 1}
    assert table["steps[3].score"]["kappa"] == 0.0 and table["version"]["precision"] == 0.5
    assert {(d["part"], d["index"]) for d in table["version"]["disagree"]} == {("data", 1), ("rejected", below[0])}
    assert result["verdicts"] == {"count": 4, "good": 2, "bad": 2}
    post("data", 1, "good")  # a second verdict on a row replaces the first
    table = {s["label"]: s for s in _get(view, "/api/agreement", ds="demo", v=1)["steps"]}
    assert (table["version"]["tp"], table["version"]["fp"]) == (2, 0) and table["version"]["precision"] == 1.0
    page = _get(view, "/api/rows", ds="demo", v=1, part="data", offset=0, limit=2)
    assert [r["_verdict"]["verdict"] for r in page["rows"]] == ["good", "good"]
    lines = [json.loads(line) for line in (view.root / "demo" / "annotations" / "v1.jsonl").read_text().splitlines()]
    assert [(r["part"], r["index"], r["verdict"]) for r in lines] == [
        ("data", 0, "good"), ("data", 1, "bad"), ("rejected", below[0], "good"), ("rejected", below[1], "bad"),
        ("data", 1, "good")]
    assert lines[1]["note"] == "wrong answer" and lines[0]["row_hash"] == page["rows"][0]["_hash"]
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in version_dir.rglob("*") if p.is_file()}
    assert after == before  # the version itself never changes
    assert _get(view, "/api/index")["agreement"][0]["agreement"]["labelled"] == 4
    assert kept.height  # (the rows labelled above exist)


def test_verdicts_are_refused_unless_posted_as_json_from_this_page(view):
    body = {"ds": "demo", "v": 1, "part": "data", "index": 0, "verdict": "good", "note": ""}
    as_form = view.post("/api/verdict", content=json.dumps(body), headers={"Content-Type": "text/plain"})
    assert as_form.status_code == 415 and "application/json" in as_form.json()["error"]
    other_site = view.post("/api/verdict", json=body, headers={"Origin": "http://evil.example"})
    assert other_site.status_code == 403
    for bad, status in [({"index": 10_000}, 404), ({"verdict": "great"}, 400), ({"part": "train"}, 400),
                        ({"index": "0"}, 400), ({"ds": "../.."}, 403)]:
        response = view.post("/api/verdict", json={**body, **bad})
        assert response.status_code == status, (bad, response.text)
        assert "\n" not in response.json()["error"]
    assert not (view.root / "demo" / "annotations").exists()


def test_paths_outside_the_folder_are_refused(view, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(view.root / "demo", outside / "demo")
    os.symlink(outside / "demo", view.root / "link")
    for ds in ("../elsewhere/demo", str(outside / "demo"), "link", "demo/../../elsewhere/demo"):
        response = view.get("/api/rows", params={"ds": ds, "v": 1})
        assert response.status_code == 403, ds
        assert "outside" in response.json()["error"] or "relative" in response.json()["error"]
    assert view.get("/static/../server.py").status_code == 404
    assert view.get("/api/diff", params={"a": "demo@1", "b": "../elsewhere/demo@1"}).status_code == 403


def test_the_card_is_rendered_with_data_html_shown_as_text(view):
    card = view.root / "demo" / "v1" / "README.md"
    card.write_text(card.read_text() + "\n<script>alert(1)</script>\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    rendered = _get(view, "/api/card", ds="demo", v=1)
    assert "<script>" not in rendered["html"] and "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered["html"]
    assert "<table>" in rendered["html"] and "pretty_name: demo" in rendered["metadata"]


def test_the_sample_to_label_covers_kept_rows_and_each_drop_reason(view):
    sample = _get(view, "/api/sample", ds="demo", v=1)
    strata = {item["stratum"] for item in sample["items"]}
    assert strata == {"kept", "steps[0].self_instruct: over_quota", "steps[3].score: below_min"}
    assert len(sample["items"]) == 6 and sample["n"] == 6
    assert [i["stratum"] for i in sample["items"]].count("kept") == 2
    rejected = _read(view.root, "rejected")
    for item in sample["items"]:
        if item["part"] == "rejected":
            row = rejected.row(item["index"], named=True)
            assert item["stratum"] == f"{row['drop_step']}: {row['drop_reason']}"
            assert item["row"]["instruction"] == row["instruction"]
    assert _get(view, "/api/sample", ds="demo", v=1) == sample  # the same rows each time


def test_diff_of_two_versions(view, tmp_path):
    second = view.root / "demo" / "v2"
    shutil.copytree(view.root / "demo" / "v1", second)
    kept = _read(view.root, "data")
    for f in (second / "data").glob("*.parquet"):
        f.unlink()
    kept.head(kept.height - 3).write_parquet(second / "data" / "train-00000-of-00001.parquet")
    found = _get(view, "/api/diff", a="demo@1", b="demo@2")
    assert found["rows"]["removed"] == 3 and found["rows"]["added"] == 0
    assert [v["version"] for v in _get(view, "/api/index")["datasets"][0]["versions"]] == [1, 2]


def test_damaged_versions_and_runs_cost_one_line_and_the_server_goes_on(view):
    good = view.root / "demo" / "v1"
    corrupt = view.root / "demo" / "v2"
    shutil.copytree(good, corrupt)
    shard = next((corrupt / "data").glob("*.parquet"))
    shard.write_bytes(b"not parquet at all")
    missing = view.root / "demo" / "v3"
    shutil.copytree(good, missing)
    next((missing / "rejected").glob("*.parquet")).unlink()
    (view.root / "demo" / "v4").mkdir()  # a version folder without a manifest
    run = view.root / "run"
    run.mkdir()
    (run / "evolve.json").write_text('{"name": "cut", "rounds": [{"round": 0}, {"round": 1, "ver')
    cut = view.root / "cut"
    cut.mkdir()
    (cut / "evolve.json").write_text(json.dumps({"name": "cut", "recipe_file": "r.yaml", "recipe_hash": "h",
                                                 "base_model": "m", "method": "sft", "stopped": None,
                                                 "rounds": [{"round": 0, "eval": {"accuracy": 0.5, "items": 10,
                                                                                  "correct": 5}},
                                                            {"round": 1, "version": "gone/v1"}]}))
    for params in ({"ds": "demo", "v": 2, "part": "data"}, {"ds": "demo", "v": 3, "part": "rejected"}):
        response = view.get("/api/rows", params=params)
        assert response.status_code == 500
        error = response.json()["error"]
        assert "\n" not in error and "re-run" in error and f"v{params['v']}" in error
    assert view.get("/api/version", params={"ds": "demo", "v": 4}).status_code == 404
    broken = view.get("/api/evolve", params={"run": "run"})
    assert broken.status_code == 500 and "evolve.json is not valid JSON" in broken.json()["error"]
    short = _get(view, "/api/evolve", run="cut")
    assert [r["accuracy"] for r in short["rounds"]] == [0.5, None] and short["rounds"][1]["version"] is None
    assert short["rounds"][0]["accuracy_ci95"] == pytest.approx([0.2366, 0.7634], abs=1e-4)  # Wilson, n=10
    index = _get(view, "/api/index")  # still serving, every other version still listed
    lines = {v["version"]: v["error"] for v in index["datasets"][0]["versions"]}
    assert lines[1] is None and "manifest.json" in lines[4]
    assert {r["id"]: r["error"] is not None for r in index["evolve_runs"]} == {"run": True, "cut": False}
    assert _get(view, "/api/rows", ds="demo", v=1)["rows"]


def test_an_empty_folder_says_so(tmp_path):
    from factory.view.server import create_app

    client = starlette_testclient.TestClient(create_app(tmp_path))
    index = _get(client, "/api/index")
    assert index["datasets"] == [] and len(index["problems"]) == 1 and "factory run" in index["problems"][0]
    assert "no such folder" in _get(client, "/api/version", 404, ds="nothing", v=1)["error"]
    assert client.get("/").status_code == 200 and "<html" in client.get("/").text.lower()


def test_the_command_serves_on_a_free_port_and_stops_cleanly(out, tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "factory", "view", str(out), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    try:
        line = process.stdout.readline()
        assert line.startswith("factory view: serving ") and "http://127.0.0.1:" in line
        url = line.split(" at ")[1].strip()
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "api/index", timeout=5) as response:
                    assert json.load(response)["datasets"][0]["id"] == "demo"
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0 and "factory view: stopped" in err and "Traceback" not in err


def test_a_busy_port_is_one_line(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "factory", "view", str(tmp_path), "--port", str(port)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert textwrap.dedent(result.stderr).strip().startswith(f"error: factory view: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in result.stderr


def test_verdicts_count_on_rows_that_carry_no_step_column(tmp_path):
    """Kept rows of a recipe whose steps add no column (a dedup filter) are still found and counted."""
    from factory.annotations import add_verdict, agreement
    from factory.store import write_version

    kept = pl.DataFrame({"instruction": ["a", "b", "c"]})
    dropped = pl.DataFrame({"instruction": ["a"], "drop_step": ["steps[0].exact"], "drop_reason": ["duplicate"]})
    version = write_version(tmp_path, "plain", kept, dropped, {"recipe": {"steps": [{"exact": {}}]}, "steps": []})
    add_verdict(version, "data", 2, "good")
    add_verdict(version, "data", 0, "bad")
    add_verdict(version, "rejected", 0, "good")
    found = {s["label"]: s for s in agreement(version)["steps"]}
    assert agreement(version)["labelled"] == 3
    assert {k: found["steps[0].exact"][k] for k in ("tp", "fp", "fn", "tn")} == {"tp": 1, "fp": 1, "fn": 1, "tn": 0}
