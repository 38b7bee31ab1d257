"""Persona sets and persona-driven generation: the bundled set, the `personas` step, the
`source: {personas: ...}` form, self_instruct's `personas:` and `{{ persona }}` in `generate`."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from factory import hubdata, personas
from factory.cli import main
from factory.config import to_dict
from factory.errors import RecipeError
from factory.recipe import load_recipe

from .conftest import ROOT

BUNDLED = ROOT / "data" / "personas" / "personas.jsonl"
TOPICS = [{"topic": "fractions"}, {"topic": "tides"}, {"topic": "taxes"}]


def bundled_lines() -> list[str]:
    return [json.loads(line)["persona"] for line in BUNDLED.read_text(encoding="utf-8").splitlines()]


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(write_recipe, tmp_path, text: str, name: str = "recipe.yaml") -> pl.DataFrame:
    """Runs a recipe (written in tmp_path) and returns the rows of the version it wrote."""
    path = write_recipe(text, name)
    out = tmp_path / f"out-{path.stem}"
    assert main(["run", str(path), "--out", str(out), "--quiet", "--examples", "0", "--no-cache"]) == 0
    (version,) = sorted(p for p in out.iterdir())[0].iterdir()
    return pl.read_parquet(version / "data")


def crossing(seed: int, per_row: int = 2) -> str:
    return (f"name: crossed\nseed: {seed}\nsource: {{path: topics.jsonl}}\n"
            f"steps:\n  - personas: {{from: bundled, per_row: {per_row}}}\n")


# -- the bundled set -------------------------------------------------------------------------------

def test_the_bundled_set_is_hundreds_of_distinct_personas_in_one_column():
    rows = [json.loads(line) for line in BUNDLED.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 300
    assert all(list(row) == ["persona"] and row["persona"].endswith(".") for row in rows)
    assert len({row["persona"] for row in rows}) == 300
    assert personas.bundled_file() == BUNDLED  # in a checkout, the project's own file
    assert personas.load("bundled", ROOT) == tuple(bundled_lines())


# -- the sampler -----------------------------------------------------------------------------------

def test_draws_repeat_with_the_same_key_and_differ_with_another():
    pool = tuple(f"person {i}" for i in range(50))
    first = personas.draw(pool, 5, 7, "row", 0)
    assert first == personas.draw(pool, 5, 7, "row", 0)
    assert len(set(first)) == 5 and set(first) <= set(pool)
    assert first != personas.draw(pool, 5, 8, "row", 0)  # another seed
    assert first != personas.draw(pool, 5, 7, "row", 1)  # another row
    order = personas.shuffled(pool, 3)
    assert sorted(order) == sorted(pool) and order != list(pool)


# -- the personas step ------------------------------------------------------------------------------

def test_each_row_becomes_per_row_rows_with_distinct_personas_drawn_with_the_seed(write_recipe, tmp_path):
    jsonl(tmp_path / "topics.jsonl", TOPICS)
    rows = run(write_recipe, tmp_path, crossing(seed=3, per_row=2))
    assert rows.columns == ["topic", "persona"]
    assert rows["topic"].to_list() == ["fractions", "fractions", "tides", "tides", "taxes", "taxes"]
    known = set(bundled_lines())
    assert all(p in known for p in rows["persona"])  # every row a step shaped has one of the set
    for topic in ("fractions", "tides", "taxes"):
        assert rows.filter(pl.col("topic") == topic)["persona"].n_unique() == 2
    assert rows["persona"].n_unique() >= 5  # rows draw apart (6 from 300: a repeat across rows is rare)

    again = run(write_recipe, tmp_path, crossing(seed=3, per_row=2), "again.yaml")
    other = run(write_recipe, tmp_path, crossing(seed=4, per_row=2), "other.yaml")
    assert again["persona"].to_list() == rows["persona"].to_list()
    assert other["persona"].to_list() != rows["persona"].to_list()


def test_the_column_and_a_file_of_personas_are_options(write_recipe, tmp_path):
    jsonl(tmp_path / "topics.jsonl", TOPICS)
    jsonl(tmp_path / "people.jsonl", [{"who": "a baker"}, {"who": "a pilot"}, {"who": "a nurse"}])
    rows = run(write_recipe, tmp_path, "name: cols\nsource: {path: topics.jsonl}\nsteps:\n"
                                       "  - personas: {from: {path: people.jsonl, column: who}, per_row: 3, "
                                       "column: speaker}\n")
    assert rows.height == 9 and rows.columns == ["topic", "speaker"]
    for topic in ("fractions", "tides", "taxes"):  # 3 of a set of 3: each row meets every person once
        assert sorted(rows.filter(pl.col("topic") == topic)["speaker"]) == ["a baker", "a nurse", "a pilot"]


def test_without_a_source_the_step_emits_count_personas(write_recipe, tmp_path):
    rows = run(write_recipe, tmp_path, "name: people\nseed: 9\nsteps:\n  - personas: {count: 12}\n")
    assert rows.columns == ["persona"] and rows.height == 12
    assert rows["persona"].n_unique() == 12 and set(rows["persona"]) <= set(bundled_lines())


@pytest.mark.parametrize("step, line, message", [
    ("{from: people.jsonl}", 4, "steps[0].personas.from: the persona set {dir}/people.jsonl has no column 'persona' "
                                "(it has who)"),
    ("{from: {path: people.jsonl, column: who}, per_row: 4}", 4,
     "steps[0].personas.per_row: draws 4 distinct personas, and the set holds 3; set it to 3 or less"),
    ("{from: empty.jsonl}", 4, "steps[0].personas.from: the persona set {dir}/empty.jsonl has no personas in "
                               "column 'persona'"),
    ("{from: missing.jsonl}", 4, "steps[0].personas.from: persona file 'missing.jsonl' does not exist"),
    ("{frm: bundled}", 4, "steps[0].personas.frm: unknown key 'frm'; did you mean 'from'?"),
    ("{per_row: 301}", 4, "steps[0].personas.per_row: draws 301 distinct personas, and the set holds 300"),
])
def test_bad_persona_sets_are_recipe_errors_at_their_line(write_recipe, tmp_path, step, line, message):
    jsonl(tmp_path / "topics.jsonl", TOPICS)
    jsonl(tmp_path / "people.jsonl", [{"who": "a baker"}, {"who": "a pilot"}, {"who": "a nurse"}])
    (tmp_path / "empty.jsonl").write_text("")
    path = write_recipe(f"name: bad\nsource: {{path: topics.jsonl}}\nsteps:\n  - personas: {step}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    assert f"{path}:{line}: {message.format(dir=tmp_path)}" in str(err.value)


# -- a Hub dataset in Persona Hub's layout ----------------------------------------------------------

@pytest.fixture
def persona_hub(tmp_path, monkeypatch) -> Path:
    """A local copy of a dataset repository laid out as proj-persona/PersonaHub: config `persona`
    (column `persona`) and config `math` (columns `input persona`, `synthesized text`)."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    monkeypatch.setattr(hubdata, "_OPENED", {})
    folder = tmp_path / "PersonaHub"
    folder.mkdir()
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: persona\n  data_files: persona.jsonl\n"
                                      "- config_name: math\n  data_files: math.jsonl\n---\n# personas\n")
    jsonl(folder / "persona.jsonl", [{"persona": f"hub person {i}"} for i in range(6)])
    jsonl(folder / "math.jsonl", [{"input persona": f"math person {i}", "synthesized text": "a problem"}
                                  for i in range(4)])
    return folder


def test_a_hub_dataset_in_persona_hubs_layout_reads_offline(write_recipe, tmp_path, persona_hub):
    jsonl(tmp_path / "topics.jsonl", TOPICS)
    rows = run(write_recipe, tmp_path, f"name: hubbed\nsource: {{path: topics.jsonl}}\nsteps:\n"
                                       f"  - personas: {{from: {{hub: {persona_hub}, config: persona}}, per_row: 2}}\n")
    assert rows.height == 6 and set(rows["persona"]) <= {f"hub person {i}" for i in range(6)}
    other = {"hub": str(persona_hub), "config": "math", "column": "input persona", "limit": 3}
    assert personas.load(other, tmp_path) == ("math person 0", "math person 1", "math person 2")
    path = write_recipe(f"name: bad\nsteps:\n  - personas: {{from: {{hub: {persona_hub}, config: math}}}}\n", "b.yaml")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    assert (f"b.yaml:3: steps[0].personas.from: the persona set hub dataset '{persona_hub}' (split train) has no "
            "column 'persona' (it has input persona, synthesized text)") in str(err.value)


# -- source: {personas: ...} ------------------------------------------------------------------------

def test_a_persona_source_is_the_whole_set_or_a_seeded_sample(write_recipe, tmp_path):
    whole = load_recipe(str(write_recipe("name: all\nsource: {personas: bundled}\n"
                                         "steps: [{exact: {column: persona}}]\n")))
    assert whole.source.columns() == ["persona"]
    assert whole.source.read()["persona"].to_list() == bundled_lines()  # the file, in its order

    def sample(seed: int, limit: int = 50) -> list[str]:
        recipe = load_recipe(str(write_recipe(f"name: some\nsource: {{personas: bundled, limit: {limit}, "
                                              f"seed: {seed}}}\nsteps: [{{exact: {{column: persona}}}}]\n", "s.yaml")))
        return recipe.source.read()["persona"].to_list()

    fifty = sample(1)
    assert len(fifty) == 50 and len(set(fifty)) == 50 and set(fifty) <= set(bundled_lines())
    assert fifty != bundled_lines()[:50]  # a sample, not the first lines
    assert sample(1) == fifty and sample(2) != fifty
    assert sample(1, limit=10) == fifty[:10]  # a preview's rows are the first of a longer run's


def test_a_persona_source_runs_and_its_errors_are_located(write_recipe, tmp_path):
    rows = run(write_recipe, tmp_path, "name: src\nsource: {personas: bundled, limit: 5}\n"
                                       "steps: [{exact: {column: persona}}]\n")
    assert rows.columns == ["persona"] and rows.height == 5
    jsonl(tmp_path / "people.jsonl", [{"who": "a baker"}])
    path = write_recipe("name: bad\nsource: {personas: people.jsonl, limit: 5}\nsteps: [exact]\n", "bad.yaml")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    assert f"bad.yaml:2: source.personas: the persona set {tmp_path}/people.jsonl has no column 'persona'" \
        in str(err.value)
    both = write_recipe("name: bad\nsource: {personas: bundled, path: x.jsonl}\nsteps: [exact]\n", "both.yaml")
    with pytest.raises(RecipeError, match="both `path:` and `personas:` are given"):
        load_recipe(str(both))


# -- generators that take a persona -----------------------------------------------------------------

SHOWN = r"following person might ask[^:]*: (?P<who>[^\n]+)"


def test_self_instruct_shows_each_prompt_a_persona_and_each_task_carries_it(write_recipe, tmp_path):
    seeds = jsonl(tmp_path / "seeds.jsonl", [{"instruction": f"Seed task number {i} about something"}
                                             for i in range(4)])
    recipe = (f"name: si\nseed: 5\nllm: {{backend: scripted, rules: [{{match: '{SHOWN}', "
              "reply: ' Task {hash} asked by {who}'}]}\n"
              f"source: {{path: {seeds}}}\nsteps:\n  - self_instruct: {{num_tasks: 6, personas: bundled, "
              "novelty_threshold: 1.0}\n")
    rows = run(write_recipe, tmp_path, recipe)
    assert rows.height == 6 and "persona" in rows.columns
    known = set(bundled_lines())
    for task, persona in zip(rows["instruction"], rows["persona"]):
        assert persona in known
        assert task.endswith(f"asked by {persona}")  # the prompt that made the task showed this persona
    assert rows["persona"].n_unique() >= 4  # prompts draw apart


def test_self_instruct_without_personas_sends_the_prompt_it_always_sent(write_recipe):
    from factory.steps.self_instruct import SelfInstruct, SelfInstructConfig

    plain = SelfInstruct(SelfInstructConfig())
    prompt = plain.task_request(["a", "b"]).messages[0]["content"]
    assert prompt == ("Come up with a list of diverse tasks that a text-only assistant can answer. Mix topics (math, "
                      "writing, coding, science, everyday life, reasoning) and task types (questions, instructions, "
                      "classification, rewriting). Each task is one line.")
    # An option left unset stays out of the resolved recipe, so recipes written before it keep their hash.
    assert "personas" not in to_dict(plain.config) and to_dict(shaped_config := SelfInstructConfig(
        personas="bundled"))["personas"] == "bundled"
    assert plain.produces() == ["instruction", "origin", "operation", "generation"]
    shaped = SelfInstruct(shaped_config, base_dir=ROOT)
    text = shaped.task_request(["a", "b"], "A 40-year-old beekeeper in Cork.").messages[0]["content"]
    assert text.endswith("in their own words: A 40-year-old beekeeper in Cork.\nMix task types (questions, "
                         "instructions, classification, rewriting). Each task is one line.")
    assert shaped.fingerprint() != plain.fingerprint() and shaped.produces()[-1] == "persona"


def test_generate_renders_the_persona_of_each_row(write_recipe, tmp_path):
    jsonl(tmp_path / "topics.jsonl", TOPICS[:2])
    recipe = ("name: gen\nseed: 2\nllm: {backend: scripted, rules: [{match: 'Speaker: (?P<who>[^\\n]+)', "
              "reply: 'Question from {who}'}]}\nsource: {path: topics.jsonl}\nsteps:\n"
              "  - personas: {per_row: 2}\n"
              "  - generate: {template: \"Topic: {{ topic }}\\nSpeaker: {{ persona }}\", output: question}\n")
    rows = run(write_recipe, tmp_path, recipe)
    assert rows.height == 4
    assert rows["question"].to_list() == [f"Question from {p}" for p in rows["persona"]]
