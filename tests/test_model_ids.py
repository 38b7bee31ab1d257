"""A recipe's ``llm.model`` may name a Hub id that is already in the local Hugging Face cache
(what a GPU machine that ran `hf download` has); runs still never download a model."""

from __future__ import annotations

import shutil

import pytest

from factory.errors import FactoryError
from factory.models import load_tokenizer, resolve_model


def test_a_cached_hub_id_resolves_to_its_snapshot_and_an_absent_one_says_how_to_get_it(tiny_model_dir, tmp_path,
                                                                                        monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    ref = resolve_model("org/tiny")
    assert ref.directory == repo / "snapshots" / commit and ref.label == "org/tiny" and ref.gguf_file is None
    assert load_tokenizer("org/tiny").vocab_size == load_tokenizer(str(tiny_model_dir)).vocab_size
    with pytest.raises(FactoryError, match=r"model 'org/absent' is neither a local folder nor in the local Hugging "
                                           r"Face cache; .* \(`hf download org/absent`\)"):
        resolve_model("org/absent")
