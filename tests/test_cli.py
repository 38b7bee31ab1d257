"""The command line: exit codes, one-line errors, the version path as the last line."""

from __future__ import annotations

import json
import subprocess
import sys

from factory.cli import main

from .conftest import ROOT, SEEDS


def factory(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "factory", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


def test_run_prints_summary_and_the_version_path_last(scripted_recipe, tmp_path):
    out = tmp_path / "out"
    proc = factory("run", scripted_recipe(), "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == str(out / "demo" / "v1")
    assert lines[0].startswith("demo v1: ")
    assert any("[1] solve" in l and "24" in l for l in lines)
    assert any("[3] score" in l and "below_min=" in l for l in lines)
    manifest = json.loads((out / "demo" / "v1" / "manifest.json").read_text())
    assert manifest["recipe"]["steps"][1]["solve"]["samples"] == 2


def test_bad_recipe_exits_2_with_one_line_per_problem_and_writes_nothing(write_recipe, tmp_path):
    path = write_recipe(f"name: t\nsource: {{path: {SEEDS}}}\nsteps:\n  - slove: {{}}\n  - judge: {{scale: x}}\n")
    out = tmp_path / "out"
    proc = factory("run", path, "--out", out)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and all(l.startswith(f"error: {path}:") for l in lines)
    assert not out.exists()


def test_unreachable_server_exits_1_and_writes_nothing(write_recipe, tmp_path):
    path = write_recipe(f"""\
        name: t
        llm: {{backend: openai, model: m, base_url: "http://127.0.0.1:9/v1", timeout: 2}}
        source: {{path: {SEEDS}}}
        steps: [solve]
        """)
    out = tmp_path / "out"
    proc = factory("run", path, "--out", out)
    assert proc.returncode == 1, proc.stderr  # the recipe is fine (2 is for bad input); the server is not
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: nothing answers at http://127.0.0.1:9/v1 (connection refused)")
    assert "start the server or fix llm.base_url" in line
    assert not out.exists()


def test_validate_ok_and_print(capsys):
    assert main(["validate", str(ROOT / "recipes" / "quickstart.yaml"), "--print"]) == 0
    out = capsys.readouterr().out
    assert "ok (4 steps: solve -> verify -> exact -> decontaminate" in out
    assert "num_rows: 32" in out and "check_calculations: true" in out


def test_validate_with_set(capsys, scripted_recipe):
    assert main(["validate", str(scripted_recipe()), "--set", "steps[1].solve.samples=0"]) == 2
    err = capsys.readouterr().err
    assert "(--set steps[1].solve.samples=0): steps[1].solve.samples: must be at least 1" in err


def test_inspect_shows_counts_reasons_lengths_examples(scripted_recipe, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(scripted_recipe()), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out / "demo" / "v1"), "--examples", "2"]) == 0
    text = capsys.readouterr().out
    for expected in ("rows: ", "rejected: ", "[3] score", "below_min=", "length (chars)", "response",
                     "--- example 2 of"):
        assert expected in text
    assert main(["inspect", str(out / "demo" / "v1"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] + info["rejected_rows"] == 24 + info["steps"][0]["dropped"].get("over_quota", 0)
    assert info["lengths"][0]["column"] == "instruction"


def test_inspect_of_a_folder_that_is_not_a_version(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a dataset version (no manifest.json)" in capsys.readouterr().err


def test_help_describes_every_command():
    proc = factory("--help")
    assert proc.returncode == 0
    for command in ("run", "validate", "inspect", "steps", "model"):
        assert f"    {command} " in proc.stdout


def test_steps_lists_and_describes(capsys):
    assert main(["steps"]) == 0
    listing = capsys.readouterr().out
    assert "self_instruct" in listing and "score" in listing
    assert main(["steps", "solve"]) == 0
    assert "samples = 1" in capsys.readouterr().out
    assert main(["steps", "slove"]) == 2
    assert "did you mean 'solve'?" in capsys.readouterr().err


def test_inspect_shows_lineage_counts_and_chains(tmp_path, capsys):
    import polars as pl

    from factory.store import write_version

    table = pl.DataFrame({"instruction": ["A2", "B1", "A1"], "parent": ["A1", "B0", "A0"],
                          "operation": ["deepen", "breadth", "add_constraints"], "generation": [2, 1, 1],
                          "origin": ["evol_instruct"] * 3})
    version = write_version(tmp_path, "lin", table, pl.DataFrame({"drop_reason": ["x"], "drop_step": ["s"]}), {})
    assert main(["inspect", str(version)]) == 0
    text = capsys.readouterr().out
    assert "lineage: origin / operation / generation: rows" in text
    assert "  evol_instruct / deepen / 2: 1" in text
    assert "    [gen 0] A0\n      -> [gen 1, add_constraints] A1\n        -> [gen 2, deepen] A2" in text
    assert "    [gen 0] B0\n      -> [gen 1, breadth] B1" in text
    assert text.count("chain:") == 2  # A0 -> A1 is not repeated on its own
