"""Sources: files of each format, saved datasets, versions, generators, and bad files."""

from __future__ import annotations

import json
from collections import Counter

import polars as pl
import pytest

from factory.errors import FactoryError, RecipeError
from factory.generators import ArithmeticConfig, arithmetic
from factory.recipe import load_recipe

from .arithmetic_templates import TEMPLATES, recompute
from .conftest import ROOT, SCRIPTED_LLM


def recipe_for(write_recipe, source: str, steps: str = "[solve]"):
    output = "output: {format: raw}\n" if steps == "[]" else ""
    return load_recipe(write_recipe(f"name: s\n{SCRIPTED_LLM}source: {source}\nsteps: {steps}\n{output}"))


ROWS = [{"instruction": "add 1 and 2", "input": ""}, {"instruction": "name a colour", "input": "pick one"}]


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet", "csv"])
def test_each_file_format_reads_the_same_rows(tmp_path, write_recipe, suffix):
    path = tmp_path / f"tasks.{suffix}"
    df = pl.DataFrame(ROWS)
    {"jsonl": df.write_ndjson, "json": df.write_json, "parquet": df.write_parquet,
     "csv": df.write_csv}[suffix](path)
    recipe = recipe_for(write_recipe, f"{{path: {path}}}")
    assert recipe.source.columns() == ["instruction", "input"]
    table = recipe.source.read()
    assert table["instruction"].to_list() == ["add 1 and 2", "name a colour"]


def test_saved_hf_dataset_with_split_limit_and_rename(tmp_path, write_recipe):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"question": f"q{i}"} for i in range(5)]),
                 "test": Dataset.from_list([{"question": "t"}])}).save_to_disk(str(tmp_path / "saved"))
    recipe = recipe_for(write_recipe, f"{{path: {tmp_path / 'saved'}, limit: 3, rename: {{question: instruction}}}}")
    assert recipe.source.read()["instruction"].to_list() == ["q0", "q1", "q2"]
    recipe = recipe_for(write_recipe, f"{{path: {tmp_path / 'saved'}, split: test, rename: {{question: instruction}}}}")
    assert recipe.source.read()["instruction"].to_list() == ["t"]


def test_a_factory_version_is_a_source_and_becomes_the_parent(tmp_path, write_recipe):
    from factory.store import write_version

    v = write_version(tmp_path / "out", "base", pl.DataFrame(ROWS), pl.DataFrame(), {})
    recipe = recipe_for(write_recipe, f"{{path: {v}}}")
    assert recipe.source.read().height == 2
    assert recipe.source.parent_version() == str(v)


def test_invalid_json_line_names_file_and_line(tmp_path, write_recipe):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "ok"}\n{"instruction": oops}\n')
    recipe = recipe_for(write_recipe, f"{{path: {path}}}")
    with pytest.raises(FactoryError, match=rf"{path}:2: not valid JSON"):
        recipe.source.read()


def test_non_utf8_bytes_name_file_and_line(tmp_path, write_recipe):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"instruction": "ok"}\n{"instruction": "caf\xe9"}\n')
    recipe = recipe_for(write_recipe, f"{{path: {path}}}")
    with pytest.raises(FactoryError, match=rf"{path}:2: byte \d+ is not valid UTF-8"):
        recipe.source.read()


def test_unknown_format_and_generator_are_recipe_errors(tmp_path, write_recipe):
    (tmp_path / "tasks.xml").write_text("<hello/>")
    with pytest.raises(RecipeError, match="cannot tell the format from '.xml'"):
        recipe_for(write_recipe, f"{{path: {tmp_path / 'tasks.xml'}}}")
    with pytest.raises(RecipeError, match="unknown generator 'arithmatic'; did you mean 'arithmetic'"):
        recipe_for(write_recipe, "{generator: arithmatic}")


def test_arithmetic_generator_is_verifiable_and_splits_never_overlap():
    train = arithmetic(ArithmeticConfig(num_rows=300, split="train"))
    evals = arithmetic(ArithmeticConfig(num_rows=100, split="eval"))
    other_seed = arithmetic(ArithmeticConfig(num_rows=300, split="train", seed=5))
    assert train.height == 300 and evals.height == 100
    assert not set(train["instruction"]) & set(evals["instruction"])
    assert not set(other_seed["instruction"]) & set(evals["instruction"])
    assert train["instruction"].n_unique() == 300
    assert set(train["num_steps"].unique()) <= {2, 3, 4}


def test_every_arithmetic_template_s_answer_is_recomputed_from_its_text():
    """Each problem is read back by exactly one of the twelve templates (four of one operation, eight
    of several), whose numbers give the answer and the operation count by arithmetic done here; every
    template turns up. A template whose formula is off, or a new one this table does not know, fails."""
    tables = [arithmetic(ArithmeticConfig(num_rows=rows, split=split, seed=seed, min_steps=low, max_steps=high))
              for (low, high, rows) in ((1, 1, 60), (2, 4, 300), (3, 4, 100)) for split in ("train", "eval")
              for seed in (0, 7)]
    shipped = [json.loads(line) for line in (ROOT / "data" / "eval" / "arithmetic.jsonl").open(encoding="utf-8")]
    seen = Counter()
    for generated, row in [(True, r) for r in pl.concat(tables).iter_rows(named=True)] + [(False, r) for r in shipped]:
        template, answer, steps = recompute(row["instruction"])
        seen[template] += generated  # only what the generator makes now counts as exercising a template
        assert (row["answer"], row["num_steps"]) == (str(answer), steps), (template, row["instruction"])
        assert answer >= 0, row["instruction"]
    assert len(TEMPLATES) == 12
    never = sorted(t for t in TEMPLATES if seen[t] < 5)
    assert not never, f"templates generated fewer than 5 times: {never} ({dict(seen)})"


def test_generator_source_in_a_recipe(write_recipe):
    recipe = recipe_for(write_recipe, "{generator: arithmetic, num_rows: 7, max_steps: 3}")
    table = recipe.source.read()
    assert table.height == 7 and (table["num_steps"] <= 3).all()
    with pytest.raises(RecipeError, match="source.num_row: unknown key 'num_row'; did you mean 'num_rows'"):
        recipe_for(write_recipe, "{generator: arithmetic, num_row: 7}")


def test_a_folder_of_documents_is_one_row_per_file(write_recipe, tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.md").write_text("Intro line\n# Alpha Title\n\nBody.")
    (tmp_path / "docs" / "sub" / "b_notes.txt").write_text("plain text")
    (tmp_path / "docs" / "skip.png").write_bytes(b"\x89PNG")
    recipe = recipe_for(write_recipe, f"{{path: {tmp_path / 'docs'}}}", steps="[]")
    assert recipe.source.columns() == ["doc_id", "title", "text"]
    rows = recipe.source.read().to_dicts()
    assert rows == [{"doc_id": "a.md", "title": "Alpha Title", "text": "Intro line\n# Alpha Title\n\nBody."},
                    {"doc_id": "sub/b_notes.txt", "title": "b notes", "text": "plain text"}]


def test_the_shipped_documents_read():
    from factory.sources import read_documents

    docs = read_documents(ROOT / "data" / "documents")
    assert docs.height >= 6 and docs["text"].str.len_chars().min() > 1000


def test_a_parsed_json_source_is_read_back_from_the_cache_until_its_bytes_change(tmp_path):
    from factory.cache import Cache
    from factory.sources import read_table_with_rejects

    path = tmp_path / "rows.jsonl"
    path.write_text('{"instruction": "a", "tags": ["x"]}\n{"instruction": "b", "tags": "y"}\n'
                    '{"instruction": "c", "tags": ["z"]}\n')
    cache = Cache(tmp_path / "cache")
    first, rejected = read_table_with_rejects(path, "jsonl", cache=cache)
    assert first["instruction"].to_list() == ["a", "c"] and rejected["raw_row"].str.contains('"b"').to_list() == [True]
    assert list((tmp_path / "cache").rglob("*.*"))  # kept: the rows and the rows set aside
    again, rejected_again = read_table_with_rejects(path, "jsonl", cache=cache)
    assert again.equals(first) and rejected_again.equals(rejected)
    path.write_text('{"instruction": "a", "tags": ["x"]}\n{"instruction": "d", "tags": ["w"]}\n')
    edited, none_aside = read_table_with_rejects(path, "jsonl", cache=cache)
    assert edited["instruction"].to_list() == ["a", "d"] and none_aside is None
