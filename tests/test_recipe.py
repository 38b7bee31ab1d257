"""Recipe validation: every problem names file, line, key path and fix, before any model loads."""

from __future__ import annotations

import pytest

from factory.errors import RecipeError
from factory.recipe import load_recipe, parse_key_path

from .conftest import HUB_RECIPES, ROOT, SCRIPTED_LLM, SEEDS


def problems_of(path, overrides=None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return [p.format() for p in info.value.problems]


def test_every_shipped_recipe_validates():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        recipe = load_recipe(path, HUB_RECIPES.get(path.stem))
        assert recipe.steps, path


def test_quickstart_resolves_defaults_and_hash_is_stable():
    a = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    b = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    assert a.hash == b.hash
    resolved = a.resolved()
    solve = resolved["steps"][0]["solve"]
    assert solve["samples"] == 4 and solve["llm"]["model"] == "embedded" and solve["max_continuations"] == 2
    assert [s.name for s in a.steps] == ["solve", "verify", "exact", "decontaminate"]


def test_unknown_step_names_line_path_and_closest_step(write_recipe):
    path = write_recipe(f"""\
        name: t
        source: {{path: {SEEDS}}}
        steps:
          - slove: {{samples: 2}}
        output: {{format: raw}}
        """)
    [line] = problems_of(path)
    assert line == f"{path}:4: steps[0]: unknown step 'slove'; did you mean 'solve'?"


def test_unknown_key_and_wrong_type_and_bound_are_all_reported(write_recipe):
    path = write_recipe(f"""\
        name: t
        source: {{path: {SEEDS}}}
        steps:
          - solve:
              sampels: 2
              temperature: hot
          - judge: {{scale: -3}}
        """)
    lines = problems_of(path)
    assert f"{path}:5: steps[0].solve.sampels: unknown key 'sampels'; did you mean 'samples'?" in lines
    assert any(l.startswith(f"{path}:6: steps[0].solve.temperature: expected a number, got 'hot'") for l in lines)
    assert f"{path}:7: steps[1].judge.scale: must be at least 2, got -3; set it to 2 or more" in lines


def test_yaml_syntax_error_names_the_line(write_recipe):
    path = write_recipe("name: t\nsteps:\n  - solve: {samples: 2\n  - judge: {}\n")
    [line] = problems_of(path)
    assert line.startswith(f"{path}:4: YAML syntax error")


def test_duplicate_keys_are_refused(write_recipe):
    path = write_recipe(f"name: a\nname: b\nsource: {{path: {SEEDS}}}\nsteps: [solve]\n")
    [line] = problems_of(path)
    assert line.startswith(f"{path}:2: name: duplicate key 'name'")


def test_missing_source_file(write_recipe):
    path = write_recipe("name: t\nsource: {path: nowhere/tasks.jsonl}\nsteps: [solve]\n")
    [line] = problems_of(path)
    assert line.startswith(f"{path}:2: source.path: source file 'nowhere/tasks.jsonl' does not exist")


def test_column_that_no_step_produces(write_recipe):
    path = write_recipe(f"name: t\nsource: {{path: {SEEDS}}}\nsteps:\n  - judge: {{}}\n  - score: {{min: 3}}\n")
    lines = problems_of(path)
    assert any(l.startswith(f"{path}:4: steps[0].judge: needs column 'response'") for l in lines), lines


def test_column_typo_suggests_the_existing_column(write_recipe):
    path = write_recipe(f"name: t\nsource: {{path: {SEEDS}}}\nsteps:\n  - solve: {{column: instructon}}\n")
    [line] = problems_of(path)
    assert "needs column 'instructon'" in line and "did you mean 'instruction'?" in line


def test_unknown_backend_and_top_level_key(write_recipe):
    path = write_recipe(f"name: t\nllm: {{backend: llamacpp}}\nsorce: x\nsource: {{path: {SEEDS}}}\nsteps: [solve]\n")
    lines = problems_of(path)
    assert any(l.startswith(f"{path}:2: llm.backend: unknown backend 'llamacpp'") for l in lines)
    assert f"{path}:3: sorce: unknown top-level key 'sorce'; did you mean 'source'?" in lines


def test_messages_output_needs_a_response(write_recipe):
    path = write_recipe(f"name: t\nsource: {{path: {SEEDS}}}\nsteps:\n  - score: {{min: 1, column: id}}\n"
                        "output: {format: messages}\n")
    [line] = problems_of(path)
    assert "output.format: format 'messages' needs `instruction` and `response` columns" in line
    # Without `output:` the same recipe is valid: it writes the rows as they are.
    recipe = load_recipe(write_recipe(f"name: t\nsource: {{path: {SEEDS}}}\nsteps:\n  - score: {{min: 1, column: id}}\n"))
    assert recipe.output.format == "auto"


def test_set_overrides_any_key(scripted_recipe):
    path = scripted_recipe()
    recipe = load_recipe(path, ["steps[1].solve.samples=5", "seed=11", "llm.default=hello"])
    assert recipe.steps[1].config.samples == 5
    assert recipe.seed == 11
    assert recipe.llm.default == "hello"


def test_set_errors_point_at_the_override(scripted_recipe):
    path = scripted_recipe()
    [line] = problems_of(path, ["steps[1].solve.samples=-1"])
    assert line.startswith(f"{path} (--set steps[1].solve.samples=-1): steps[1].solve.samples: must be at least 1")
    [line] = problems_of(path, ["steps[9].solve.samples=2"])
    assert "there is no item 9" in line


def test_step_llm_override_merges_with_recipe_llm(write_recipe):
    path = write_recipe(f"""\
        name: t
        {SCRIPTED_LLM.replace(chr(10), chr(10) + '        ')}
        source: {{path: {SEEDS}}}
        steps:
          - solve: {{}}
          - judge: {{llm: {{default: "Score: 4"}}}}
          - judge: {{llm: {{backend: openai, model: judge, base_url: "http://127.0.0.1:9/v1"}}, output_column: s2}}
        """)
    recipe = load_recipe(path)
    solve, judge, judge2 = recipe.steps
    assert judge.llm_config.backend == "scripted" and judge.llm_config.default == "Score: 4"
    assert judge.llm_config.rules == solve.llm_config.rules
    assert judge2.llm_config.backend == "openai" and judge2.llm_config.model == "judge"


def test_key_paths():
    assert parse_key_path("steps[2].solve.samples") == ("steps", 2, "solve", "samples")
    assert parse_key_path("steps.2.solve") == ("steps", 2, "solve")
    with pytest.raises(ValueError):
        parse_key_path("steps[x")


def test_empty_and_non_mapping_recipes(write_recipe):
    assert "the recipe is empty" in problems_of(write_recipe("# nothing\n"))[0]
    assert "must be a mapping" in problems_of(write_recipe("- solve\n"))[0]
    assert "recipe file not found" in problems_of("does/not/exist.yaml")[0]
