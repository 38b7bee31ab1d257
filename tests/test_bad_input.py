"""Bad recipes and bad data: exit code 2, one clear line, no traceback, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from factory.cli import main

from .conftest import ROOT, SCRIPTED_LLM

BAD = sorted((Path(__file__).parent / "bad_recipes").glob("*.yaml"))


def expectation(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <message>'"
    return first[len("# expect: "):]


def test_the_corpus_is_big_enough():
    assert len(BAD) >= 20


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_recipe_exits_2_with_a_located_message_and_writes_nothing(path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines and all(line.startswith(f"error: {path}") for line in lines), err
    assert any(expectation(path) in line for line in lines), f"expected {expectation(path)!r} in:\n{err}"
    assert "Traceback" not in err
    assert not out.exists()


def test_bad_recipe_through_the_real_command_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "factory", "validate", str(BAD[0])], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def recipe_over(write_recipe, source: Path, steps: str = "  - solve: {}\n") -> Path:
    return write_recipe(f"name: data\n{SCRIPTED_LLM}source: {{path: {source}}}\nsteps:\n{steps}")


def run_cli(path: Path, out: Path, capsys) -> tuple[int, str, str]:
    code = main(["run", str(path), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_empty_source_is_a_clear_error(write_recipe, tmp_path, capsys):
    source = tmp_path / "empty.jsonl"
    source.write_text("")
    path = recipe_over(write_recipe, source)
    code, _, err = run_cli(path, tmp_path / "out", capsys)
    assert code == 2
    assert err.strip() == f"error: {path}:8: source.path: source {source} has no rows; point `source:` at a file " \
                          "with data"
    assert not (tmp_path / "out").exists()


def test_non_utf8_source_is_a_clear_error(write_recipe, tmp_path, capsys):
    source = tmp_path / "latin1.jsonl"
    source.write_bytes(b'{"instruction": "ok"}\n{"instruction": "na\xefve"}\n')
    code, _, err = run_cli(recipe_over(write_recipe, source), tmp_path / "out", capsys)
    assert code == 2 and err.startswith(f"error: {source}:2: byte ") and "not valid UTF-8" in err


def test_broken_json_line_is_a_clear_error(write_recipe, tmp_path, capsys):
    source = tmp_path / "broken.jsonl"
    source.write_text('{"instruction": "ok"}\n{"instruction": "cut off\n')
    code, _, err = run_cli(recipe_over(write_recipe, source), tmp_path / "out", capsys)
    assert code == 2 and err.startswith(f"error: {source}:2: not valid JSON")


def test_missing_non_string_and_very_long_fields_are_dropped_with_reasons(write_recipe, tmp_path, capsys):
    source = tmp_path / "mixed.jsonl"
    rows = [{"instruction": "fine"}, {"instruction": None}, {"other": 1}, {"instruction": ["a", "list"]},
            {"instruction": "word " * 50_000}, {"instruction": "   "}]
    source.write_text("\n".join(json.dumps(r) for r in rows))
    path = recipe_over(write_recipe, source, "  - solve: {}\n  - heuristics: {columns: [instruction], max_words: 1000, checks: [length]}\n")
    code, out, err = run_cli(path, tmp_path / "out", capsys)
    assert code == 0, err
    version = Path(out.strip().splitlines()[-1])
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["source"]["rows_read"] == 6 and manifest["source"]["dropped"] == {"invalid_input": 1}
    assert manifest["steps"][0]["dropped"] == {"invalid_input": 3}
    assert manifest["steps"][1]["dropped"] == {"too_long": 1}
    assert manifest["rows"] == 1
    from factory.store import read_version

    rejected = read_version(version, "rejected")
    at_source = rejected.filter(rejected["drop_step"] == "source").row(0, named=True)
    assert at_source["drop_detail"] == f"{source}:4: column 'instruction' is a list, not a scalar as in other rows"
    assert json.loads(at_source["raw_row"]) == {"instruction": ["a", "list"]}
    assert manifest["rejected_rows"] == 5
