"""Continuous batching in the transformers backend: the same replies as static batches, with
rows leaving and joining the batch as replies end."""

from __future__ import annotations

import json

import pytest

from factory.llm import GenerationParams, TransformersBackend, TransformersConfig
from factory.llm import decoding

PROMPTS = [[{"role": "user", "content": f"question {i}: " + "more words " * (i % 5)}] for i in range(9)]


def backend(model_dir, **options) -> TransformersBackend:
    # float32 everywhere: `auto` is bfloat16 where the CPU probe finds it faster, and its near-ties could break apart.
    b = TransformersBackend(TransformersConfig(model=str(model_dir), **{"dtype": "float32", **options}))
    b.load()
    return b


@pytest.fixture(scope="module")
def end_tokens(varied_model_dir) -> list[int]:
    """Tokens that the model generates a few tokens into some replies: declared ends of sequence,
    they make replies end at different lengths, as real answers do."""
    b = backend(varied_model_dir)
    replies = []
    for prompt in PROMPTS:
        ids = b.tokenizer(b.render(prompt), add_special_tokens=False, return_tensors="pt")
        replies.append(b.model.generate(**ids, max_new_tokens=16, do_sample=False)[0, ids["input_ids"].shape[1]:])
    return sorted({int(replies[i][2 + i]) for i in range(0, len(PROMPTS), 3)})


def with_early_end(b: TransformersBackend, tokens: list[int]) -> TransformersBackend:
    eos = b.model.generation_config.eos_token_id
    b.model.generation_config.eos_token_id = [*(eos if isinstance(eos, list) else [eos]), *tokens]
    return b


def test_continuous_batching_replies_as_static_batches_do(varied_model_dir, end_tokens):
    params = GenerationParams(max_tokens=16)
    static = with_early_end(backend(varied_model_dir, batch_size=3, continuous=False), end_tokens).chat(PROMPTS, params)
    slots = with_early_end(backend(varied_model_dir, batch_size=3), end_tokens)
    continuous = slots.chat(PROMPTS, params)
    assert slots._slots  # the tiny Llama's cache can be cut and joined
    assert [c.texts for c in continuous] == [c.texts for c in static]
    assert [c.finish_reasons for c in continuous] == [c.finish_reasons for c in static]
    assert [c.completion_tokens for c in continuous] == [c.completion_tokens for c in static]
    # Replies of several lengths on 3 slots for 9 prompts: rows left and joined the batch.
    assert len({c.completion_tokens for c in continuous}) > 1
    assert {r for c in continuous for r in c.finish_reasons} == {"stop", "length"}


def test_samples_share_one_prefill_and_stop_strings_end_a_row(varied_model_dir):
    b = backend(varied_model_dir, batch_size=4)
    [one] = b.chat(PROMPTS[:1], GenerationParams(max_tokens=10))
    [three] = b.chat(PROMPTS[:1], GenerationParams(max_tokens=10, n=3))
    assert three.texts == one.texts * 3  # greedy: three equal samples
    assert three.completion_tokens == 3 * one.completion_tokens
    stop = one.texts[0][len(one.texts[0]) // 2:][:3]
    [cut] = b.chat(PROMPTS[:1], GenerationParams(max_tokens=10, stop=(stop,)))
    assert cut.texts[0] == one.texts[0][:one.texts[0].index(stop)]
    assert cut.finish_reasons == ["stop"] and cut.completion_tokens < one.completion_tokens


def test_sampling_on_slots_is_seeded(varied_model_dir):
    b = backend(varied_model_dir, batch_size=2)
    params = GenerationParams(n=3, temperature=1.0, top_p=0.9, max_tokens=8, seed=5)
    first = b.chat(PROMPTS[:3], params)
    assert [c.texts for c in b.chat(PROMPTS[:3], params)] == [c.texts for c in first]
    assert [c.texts for c in b.chat(PROMPTS[:3], params.with_seed(6))] != [c.texts for c in first]


def test_a_cache_that_cannot_be_cut_falls_back_to_static_batches(varied_model_dir, monkeypatch):
    params = GenerationParams(max_tokens=8)
    expected = [c.texts for c in backend(varied_model_dir, continuous=False).chat(PROMPTS[:4], params)]

    def refuse(cache):
        raise decoding.SlotsUnsupported("a sliding-window cache")

    monkeypatch.setattr(decoding, "check_cache", refuse)
    b = backend(varied_model_dir)
    assert [c.texts for c in b.chat(PROMPTS[:4], params)] == expected
    assert not b._slots  # and the next calls go straight to static batches


def test_auto_dtype_is_bfloat16_only_where_the_probe_finds_it_faster(tiny_model_dir, monkeypatch):
    import torch

    from factory.llm import cpu

    for speedup, expected in ((1.9, torch.bfloat16), (1.1, torch.float32)):
        monkeypatch.setattr(cpu, "bfloat16_speedup", lambda speedup=speedup: {"speedup": speedup})
        b = TransformersBackend(TransformersConfig(model=str(tiny_model_dir), device="cpu"))
        b.load()
        assert b.model.dtype == expected
        assert b.chat(PROMPTS[:2], GenerationParams(max_tokens=4))[0].completion_tokens == 4
    explicit = TransformersBackend(TransformersConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"))
    assert explicit.dtype_on("cpu") == "float32"


def test_the_dtype_probe_is_measured_once_per_machine_and_kept(tmp_path, monkeypatch):
    from factory.llm import cpu

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    timed = []

    def fake_time(dtype):
        timed.append(str(dtype))
        return 2.0 if "float32" in str(dtype) else 1.0

    monkeypatch.setattr(cpu, "_time_linears", fake_time)
    first = cpu.bfloat16_speedup()
    assert first["speedup"] == 2.0 and len(timed) == 2
    assert cpu.bfloat16_speedup() == first and len(timed) == 2  # read back, not measured again
    kept = json.loads((tmp_path / "factory" / cpu.PROBE_FILE).read_text())
    assert list(kept.values()) == [first] and cpu._machine_key() in kept
    assert cpu.cpu_prefers_bfloat16()
    monkeypatch.setattr(cpu, "_time_linears", lambda dtype: 1.0)
    assert cpu.bfloat16_speedup(refresh=True)["speedup"] == 1.0 and not cpu.cpu_prefers_bfloat16()
    (tmp_path / "factory" / cpu.PROBE_FILE).write_text("not json")  # a damaged file is measured again
    assert cpu.bfloat16_speedup()["speedup"] == 1.0


def test_the_real_probe_times_both_dtypes():
    from factory.llm import cpu

    for dtype in ("float32", "bfloat16"):
        assert 0 < cpu._time_linears(getattr(__import__("torch"), dtype)) < 1000
