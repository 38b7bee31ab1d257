"""`output: {rows: N}`: the run grows its prefix of the source until exactly N rows survive."""

from __future__ import annotations

import json

import pytest

from factory.build import run_recipe
from factory.cache import Cache, NullCache
from factory.cli import main
from factory.driver import Driver, next_candidates
from factory.errors import RecipeError
from factory.printing import target_warning
from factory.recipe import load_recipe
from factory.store import read_manifest, read_version

from .test_runner import CountingFactory

# The scripted model refuses every odd task; the heuristics filter drops refusals: half survive.
HALF_LLM = """\
llm:
  backend: scripted
  rules:
    - {match: "an odd task", reply: "I'm sorry, I cannot help with that."}
    - {match: ".", reply: "Answer {hash}"}
"""
HALF_STEPS = """\
steps:
  - solve: {}
  - heuristics: {checks: [refusal]}
"""


def tasks_file(folder, count: int = 200, name: str = "tasks.jsonl"):
    path = folder / name
    with path.open("w", encoding="utf-8") as f:
        for i in range(count):
            f.write(json.dumps({"instruction": f"Task {i}: an {'odd' if i % 2 else 'even'} task about topic {i}."})
                    + "\n")
    return path


def half_recipe(write_recipe, tmp_path, output: str = "{rows: 20}", count: int = 200, extra: str = "",
                steps: str = HALF_STEPS, name: str = "half"):
    """A recipe over ``count`` tasks whose every odd task is dropped (as a refusal)."""
    source = tasks_file(tmp_path, count)
    return write_recipe(f"name: {name}\n{HALF_LLM}source: {{path: {source}}}\n{steps}output: {output}\n{extra}")


def run(path, tmp_path, factory=None, cache=True, overrides=None, lines=None):
    driver = Driver(Cache(tmp_path / "cache") if cache else NullCache(), progress=False,
                    backend_factory=factory or CountingFactory())
    return run_recipe(load_recipe(path, overrides), tmp_path / "out", driver=driver,
                      on_pass=lines.append if lines is not None else None)


def test_exactly_n_rows_the_first_in_source_order_with_the_surplus_nowhere(write_recipe, tmp_path):
    counter, lines = CountingFactory(), []
    version, manifest, _ = run(half_recipe(write_recipe, tmp_path), tmp_path, counter, lines=lines)
    table = read_version(version)
    assert table.height == manifest["rows"] == 20
    assert table["instruction"].to_list() == [f"Task {i}: an even task about topic {i}." for i in range(0, 40, 2)]
    # Pass 1 reads 20 rows and keeps 10 (acceptance 0.5); pass 2 reads 20 + ceil(10 / 0.5 * 1.2) = 44
    # and keeps 22: the first 20 are written, the 2 others are surplus -- in neither data nor rejected/.
    assert manifest["target_rows"] == {"rows": 20, "max_candidates": 200, "candidates": 44, "passes": 2,
                                       "reached": True, "surplus": 2, "stopped": "reached",
                                       "history": [{"candidates": 20, "rows": 10}, {"candidates": 44, "rows": 22}]}
    assert lines == ["pass 1: 20 candidates -> 10 rows of 20", "pass 2: 44 candidates -> 20 rows of 20 (+2 surplus)"]
    rejected = read_version(version, "rejected")
    assert rejected.height == manifest["rejected_rows"] == 22 and set(rejected["drop_reason"]) == {"refusal"}
    assert [(s["rows_in"], s["rows_out"], s["acceptance"]) for s in manifest["steps"]] == [(44, 44, 1.0),
                                                                                       (44, 22, 0.5)]
    # Each source row was asked once over both passes: pass 2 found pass 1's 20 replies in the cache,
    # though its batch (44 rows) is not pass 1's (20 rows).
    assert counter.conversations == 44
    solve = manifest["steps"][0]["llm"]
    assert (solve["conversations"], solve["cached_conversations"]) == (64, 20)


def test_a_rerun_of_a_target_recipe_asks_nothing_and_writes_the_same_rows(write_recipe, tmp_path):
    path = half_recipe(write_recipe, tmp_path)
    v1, _, _ = run(path, tmp_path)
    counter = CountingFactory()
    v2, manifest, _ = run(path, tmp_path, counter)
    assert counter.conversations == 0
    assert read_version(v1).equals(read_version(v2))
    assert manifest["usage"]["scripted:scripted"]["prompt_tokens"] == 0


def test_without_a_cache_the_passes_still_ask_each_row_once(write_recipe, tmp_path):
    counter = CountingFactory()
    _, manifest, _ = run(half_recipe(write_recipe, tmp_path), tmp_path, counter, cache=False)
    assert manifest["rows"] == 20 and counter.conversations == 44
    assert not (tmp_path / "cache").exists()


def test_max_candidates_reached_writes_what_survived_and_warns(write_recipe, tmp_path, capsys):
    path = half_recipe(write_recipe, tmp_path, output="{rows: 20, max_candidates: 30}")
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out, err = capsys.readouterr()
    version = out.strip().splitlines()[-1]
    manifest = read_manifest(version)
    assert manifest["rows"] == read_version(version).height == 15
    target = manifest["target_rows"]
    assert (target["candidates"], target["reached"], target["stopped"], target["surplus"]) == \
        (30, False, "max_candidates", 0)
    assert "output.rows: only 15 of 20 rows from 30 candidates in 2 passes (max_candidates reached)" in out
    [warning] = [line for line in err.splitlines() if line.startswith("warning:")]
    assert "got 15, from 30 candidates (max_candidates reached)" in warning
    assert "steps[1].heuristics dropped 15 of 30 (refusal=15)" in warning and "raise output.max_candidates" in warning


def test_a_source_that_runs_out_stops_the_passes(write_recipe, tmp_path):
    path = half_recipe(write_recipe, tmp_path, output="{rows: 20}", count=30)
    lines = []
    _, manifest, _ = run(path, tmp_path, lines=lines)
    assert manifest["rows"] == 15
    assert manifest["target_rows"]["stopped"] == "source_exhausted"
    assert manifest["target_rows"]["candidates"] == 30 and len(lines) == manifest["target_rows"]["passes"] == 2
    assert "the source ran out" in target_warning(manifest)


def test_a_global_step_sees_the_whole_prefix(write_recipe, tmp_path):
    # Rows 30..59 repeat rows 0..29: a duplicate appears only once a pass reads past row 30.
    source = tmp_path / "dups.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"Task {i % 30}: an even task."}) + "\n" for i in range(60)))
    path = write_recipe(f"name: dups\n{HALF_LLM}source: {{path: {source}}}\nsteps:\n  - solve: {{}}\n"
                        "  - exact: {columns: [instruction]}\noutput: {rows: 40, max_candidates: 100}\n")
    version, manifest, _ = run(path, tmp_path)
    table = read_version(version)
    assert table.height == 30 and table["instruction"].n_unique() == 30
    assert manifest["target_rows"]["stopped"] == "source_exhausted"
    assert manifest["steps"][1]["dropped"] == {"duplicate": 30}


def test_a_generator_source_makes_rows_past_its_num_rows(write_recipe, tmp_path):
    llm = HALF_LLM.replace("an odd task", "marbles|stickers")
    path = write_recipe(f"name: arith\n{llm}source: {{generator: arithmetic, num_rows: 10, min_steps: 1, max_steps: 1}}"
                        f"\n{HALF_STEPS}output: {{rows: 12}}\n")
    version, manifest, _ = run(path, tmp_path)
    table = read_version(version)
    assert table.height == 12 and manifest["target_rows"]["reached"]
    assert manifest["target_rows"]["candidates"] > 10 == manifest["recipe"]["source"]["num_rows"]
    assert not table["instruction"].str.contains("marbles|stickers").any()
    assert manifest["steps"][0]["rows_in"] == manifest["target_rows"]["candidates"]


def test_next_pass_size_follows_the_acceptance_so_far():
    assert next_candidates(20, 10, 20, 20) == 44  # 20 + ceil(10 / 0.5 * 1.2)
    assert next_candidates(20, 0, 20, 20) == 40  # nothing kept yet: twice as many
    assert next_candidates(50, 19, 20, 50) == 54  # 50 + ceil(1 / 0.38 * 1.2)
    assert next_candidates(10, 30, 31, 10) == 11  # always more than before


def test_ordinary_runs_record_acceptance_per_step(write_recipe, tmp_path):
    _, manifest, _ = run(half_recipe(write_recipe, tmp_path, output="{format: raw}", count=10), tmp_path)
    assert "target_rows" not in manifest
    assert [s["acceptance"] for s in manifest["steps"]] == [1.0, 0.5]
    assert manifest["rows"] == 5


@pytest.mark.parametrize("output, expected", [
    ("{rows: 0}", "output.rows: must be at least 1, got 0"),
    ("{rows: 20, max_candidates: 10}",
     "output.max_candidates: max_candidates 10 is below rows 20: the run could never reach them; set it to at "
     "least 20"),
    ("{max_candidates: 10}", "output.max_candidates: `max_candidates` caps the candidates of `rows`, which is not "
                             "set; add `rows: N`"),
])
def test_bad_rows_and_max_candidates_are_located_recipe_errors(write_recipe, tmp_path, output, expected):
    path = half_recipe(write_recipe, tmp_path, output=output, count=4)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    [problem] = err.value.problems
    assert expected in problem.format() and problem.line == 11


def test_rows_without_a_source_is_a_recipe_error_with_the_fix(write_recipe):
    path = write_recipe(f"name: nosource\n{HALF_LLM}steps:\n  - self_instruct: {{num_tasks: 4}}\n"
                        "output: {rows: 4}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    [problem] = [p for p in err.value.problems if p.key_path == "output.rows"]
    assert problem.line == 9
    assert "the recipe has no `source:`" in problem.message and "add a `source:`" in problem.fix


def test_max_candidates_defaults_to_ten_times_rows_and_older_recipes_keep_their_hash(write_recipe, tmp_path):
    recipe = load_recipe(half_recipe(write_recipe, tmp_path, output="{rows: 7}", count=4))
    assert recipe.output.max_candidates == 70
    assert recipe.resolved()["output"]["max_candidates"] == 70
    plain = load_recipe(half_recipe(write_recipe, tmp_path, output="{format: raw}", count=4))
    assert "rows" not in plain.resolved()["output"] and "prices" not in plain.resolved()
