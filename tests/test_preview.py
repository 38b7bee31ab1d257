"""`factory preview` / `factory run --limit`: the recipe on its first rows, shown, nothing written."""

from __future__ import annotations

import polars as pl

from factory.cli import main
from factory.generators import ArithmeticConfig, arithmetic
from factory.printing import format_rows
from factory.store import read_manifest, read_version

from .test_target_rows import HALF_LLM, half_recipe


def test_preview_writes_no_version_and_the_full_run_reuses_its_replies(write_recipe, tmp_path, capsys):
    path = half_recipe(write_recipe, tmp_path, output="{format: raw}", count=30)
    out = tmp_path / "out"
    assert main(["preview", str(path), "--out", str(out), "--limit", "6", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("preview of half: the first 6 source rows (--limit 6) -> 3 rows")
    assert text.strip().splitlines()[-1].startswith("preview: nothing was written (no dataset version)")
    assert sorted(p.name for p in out.iterdir()) == [".cache"]  # no out/half, no version
    shown = [line.split("instruction: ")[1] for line in text.splitlines() if "instruction: " in line]
    assert shown == [f"Task {i}: an even task about topic {i}." for i in (0, 2, 4)]

    assert main(["run", str(out.parent / "recipe.yaml"), "--out", str(out), "--quiet"]) == 0
    version = capsys.readouterr().out.strip().splitlines()[-1]
    solve = read_manifest(version)["steps"][0]["llm"]
    # The full run's first batch (30 rows) is not the preview's (6 rows), yet its 6 replies came from the cache.
    assert (solve["conversations"], solve["cached_conversations"]) == (30, 6)
    assert read_version(version)["response"].head(3).to_list() == \
        [line.split("response: ")[1] for line in text.splitlines() if "response: " in line]


def test_run_limit_shows_the_drops_per_step_and_keeps_run_options(write_recipe, tmp_path, capsys):
    path = half_recipe(write_recipe, tmp_path, output="{rows: 20}", count=30)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--limit", "4", "--quiet", "--no-cache", "--executor", "local",
                 "--set", "steps[1].heuristics.min_words=1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    [solve] = [line.split() for line in lines if "[0] solve" in line]
    [heuristics] = [line.split() for line in lines if "[1] heuristics" in line]
    assert solve[2:5] == ["4", "4", "100%"] and solve[-1] == "-"
    assert heuristics[2:5] == ["4", "2", "50%"] and heuristics[-1] == "refusal=2"
    assert "  (output.rows: 20 is not applied in a preview)" in lines
    assert lines[-1] == "preview: nothing was written (no dataset version)"  # --no-cache: no cache either
    assert not out.exists()


def test_preview_shows_at_most_twenty_rows_cut_to_the_terminal(write_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    source = tmp_path / "long.jsonl"
    source.write_text("".join(f'{{"instruction": "Task {i}: an even task. {"word " * 30}"}}\n' for i in range(30)))
    path = write_recipe(f"name: long\n{HALF_LLM}source: {{path: {source}}}\nsteps: [solve]\n")
    assert main(["preview", str(path), "--out", str(tmp_path / "out"), "--limit", "25", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "the first 20 of the 25 rows:" in lines
    rows = [line for line in lines if "user: " in line or "assistant: " in line]
    assert len(rows) == 40 and rows[-2].startswith("  20. user: Task 19")
    assert all(len(line) <= 60 for line in rows) and rows[0].endswith("...")


def test_preview_of_a_generator_source_makes_only_the_first_rows(write_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    path = write_recipe(f"name: arith\n{HALF_LLM}source: {{generator: arithmetic, num_rows: 200, seed: 4}}\n"
                        "steps: [solve]\n")
    assert main(["preview", str(path), "--out", str(tmp_path / "out"), "--limit", "3", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2:4] for line in lines if "[0] solve" in line] == [["3", "3"]]
    first = arithmetic(ArithmeticConfig(num_rows=200, seed=4))["instruction"].head(3).to_list()
    assert [line.split("user: ")[1] for line in lines if "user: " in line] == first


def test_arithmetic_generator_is_prefix_stable():
    for steps in ((1, 1), (2, 4)):
        long = arithmetic(ArithmeticConfig(num_rows=300, min_steps=steps[0], max_steps=steps[1]))
        for k in (1, 17, 120):
            assert arithmetic(ArithmeticConfig(num_rows=k, min_steps=steps[0], max_steps=steps[1])).equals(long.head(k))


def test_rows_are_one_line_per_column_cut_to_the_width():
    table = pl.DataFrame({"instruction": ["short", "x" * 200], "response": ["a\nb", None]})
    lines = format_rows(table, [0, 1], width=40)
    assert lines == ["  1.  instruction: short", "      response: a b", "  2.  instruction: " + "x" * 18 + "...",
                     "      response: None"]
    assert all(len(line) <= 40 for line in lines)
