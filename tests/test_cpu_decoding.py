"""What makes the embedded model fast on a CPU: packed linear layers, attention for one new token,
a key/value cache that rows leave and join in place, prompts read in chunks after a shared prefix.
Each must leave the replies as a plain ``generate`` gives them."""

from __future__ import annotations

import pytest
import torch

from factory.llm import GenerationParams, TransformersBackend, TransformersConfig, cpu, decoding

from .test_backends import VARIED, bare_greedy


@pytest.fixture(scope="module")
def varied_replies(varied_model_dir) -> list[str]:
    return bare_greedy(varied_model_dir, VARIED, 8)


def plain_model(model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


# -- packed linear layers ----------------------------------------------------------------

def test_packed_linears_give_torch_s_results(varied_model_dir):
    model = plain_model(varied_model_dir)
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert cpu.pack_linears(model) == linears > 0
    assert all(hasattr(m, "_packed_weight") for m in model.modules() if type(m) is torch.nn.Linear)
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_packed_linears_still_train(varied_model_dir):
    model = plain_model(varied_model_dir)
    assert cpu.pack_linears(model) > 0
    model.train()
    loss = model(input_ids=torch.tensor([[1, 5, 9, 200]]), labels=torch.tensor([[1, 5, 9, 200]])).loss
    loss.backward()
    # The packed copy has no gradient: with gradients on, the layers compute from their weights.
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0
               for m in model.modules() if type(m) is torch.nn.Linear)


def test_linears_stay_unpacked_when_their_copies_would_not_fit(varied_model_dir, monkeypatch):
    model = plain_model(varied_model_dir)
    monkeypatch.setattr(cpu, "available_memory", lambda: 1000)
    assert cpu.pack_linears(model) == 0
    assert not any(hasattr(m, "_packed_weight") for m in model.modules())


# -- attention for one new token -----------------------------------------------------------

class _Attention(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


def test_decode_attention_matches_sdpa_with_shared_heads_and_padding():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    rows, kv_heads, length, dim = 4, 2, 11, 8
    query = torch.randn(rows, kv_heads * 3, 1, dim, generator=g)
    key = torch.randn(rows, kv_heads, length + 5, dim, generator=g)[:, :, 2:2 + length]  # a view, as the cache
    value = torch.randn(rows, kv_heads, length + 5, dim, generator=g)[:, :, 2:2 + length]
    mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    mask[0, ..., :4] = False  # left padding
    mask[2, ..., 3:6] = False  # padding between a shared prefix and a prompt
    for attention_mask in (mask, None, torch.zeros(rows, 1, 1, length).masked_fill(~mask, float("-inf"))):
        expected, _ = sdpa_attention_forward(_Attention(), query, key, value, attention_mask, scaling=0.3)
        got, _ = cpu._decode_attention(_Attention(), query, key, value, attention_mask, scaling=0.3)
        assert got.shape == expected.shape == (rows, 1, kv_heads * 3, dim)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Several new tokens (a prompt) go to SDPA itself.
    prompt = torch.randn(rows, kv_heads * 3, 3, dim, generator=g)
    causal = torch.ones(rows, 1, 3, length, dtype=torch.bool).tril(diagonal=length - 3)
    assert torch.equal(cpu._decode_attention(_Attention(), prompt, key, value, causal)[0],
                       sdpa_attention_forward(_Attention(), prompt, key, value, causal)[0])


def test_decode_attention_is_used_for_bfloat16_only(varied_model_dir, varied_replies):
    assert not cpu.use_decode_attention(plain_model(varied_model_dir))
    model = plain_model(varied_model_dir, torch.bfloat16)
    assert cpu.use_decode_attention(model)
    assert model.config._attn_implementation == cpu.ATTENTION
    b = TransformersBackend(TransformersConfig(model=str(varied_model_dir), dtype="bfloat16"))
    b.load()
    assert b.model.config._attn_implementation == cpu.ATTENTION
    replies = [c.texts[0] for c in b.chat(VARIED, GenerationParams(max_tokens=8))]
    # bfloat16 rounds differently from float32; the replies still follow their prompts.
    assert len(set(replies)) == len(VARIED)
    assert sum(r == e for r, e in zip(replies, varied_replies)) >= 3


# -- the cache: rows leave and join in place -------------------------------------------------

def test_the_growing_cache_keeps_what_plain_tensors_would():
    g = torch.Generator().manual_seed(0)
    heads, dim = 2, 4

    def states(rows, width):
        return torch.randn(rows, heads, width, dim, generator=g)

    layer = decoding.growing_layer()(rows=3, columns=0)
    first = states(2, 5)
    layer.update(first, first + 1)
    ref_k, ref_v = first.clone(), first + 1
    for _ in range(40):  # past the first buffer's room: it grows
        step = states(2, 1)
        layer.update(step, step * 2)
        ref_k, ref_v = torch.cat([ref_k, step], 2), torch.cat([ref_v, step * 2], 2)
    assert torch.equal(layer.keys, ref_k) and torch.equal(layer.values, ref_v)

    # Rows joining: a wider one (the others are padded on the left) and a narrower one.
    for width in (50, 7):
        other = decoding.growing_layer()()
        new = states(1, width)
        other.update(new, new * 3)
        layer.append_rows(other)
        full = max(ref_k.shape[2], width)
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, full - t.shape[2], 0))  # noqa: E731
        ref_k, ref_v = torch.cat([pad(ref_k), pad(new)]), torch.cat([pad(ref_v), pad(new * 3)])
        assert torch.equal(layer.keys, ref_k) and torch.equal(layer.values, ref_v)

    # Row 1 leaves: the last row takes its place; then the leading columns are cut.
    order = decoding._fill_holes([0, 2, 3])
    assert order == [0, 3, 2]
    holes, movers = torch.tensor([1]), torch.tensor([3])
    layer.move_rows(holes, movers, 3)
    ref_k, ref_v = ref_k[order], ref_v[order]
    layer.cut_left(4)
    ref_k, ref_v = ref_k[:, :, 4:], ref_v[:, :, 4:]
    assert torch.equal(layer.keys, ref_k) and torch.equal(layer.values, ref_v)
    step = states(3, 1)
    layer.update(step, step)
    assert torch.equal(layer.keys, torch.cat([ref_k, step], 2))


def test_rows_that_leave_are_filled_from_the_end():
    assert decoding._fill_holes([0, 1, 2]) == [0, 1, 2]
    assert decoding._fill_holes([1, 2, 3, 4]) == [4, 1, 2, 3]
    assert decoding._fill_holes([0, 3, 5, 6, 7]) == [0, 5, 6, 3, 7]  # rows 5, 6, 7 fill 1, 2, 4


# -- prompts: a shared prefix read once, the rest in chunks ------------------------------------

def test_the_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    assert decoding.shared_prefix([tuple(range(20))]) == 0  # one prompt: nothing to share
    assert decoding.shared_prefix([tuple(range(20)), tuple(range(12)) + (99,)]) == 12
    assert decoding.shared_prefix([tuple(range(20)), tuple(range(10))]) == 9  # the shorter keeps its last
    assert decoding.shared_prefix([tuple(range(20)), tuple(range(5)) + (99,) * 10]) == 0  # under SHARED_MIN


def test_length_chunks_cut_where_padding_would_grow(monkeypatch):
    monkeypatch.setattr(decoding, "CHUNK_MIN", 10)
    chunks = decoding.length_chunks([5, 40, 38, 6, 39, 5])
    assert sorted(i for c in chunks for i in c) == list(range(6))
    assert chunks == [[1, 4, 2], [3, 0, 5]]
    monkeypatch.setattr(decoding, "CHUNK_MIN", 1000)
    assert decoding.length_chunks([5, 40, 38, 6, 39, 5]) == [[1, 4, 2, 3, 0, 5]]


@pytest.mark.parametrize("shared_min, chunk_min", [(8, 1), (10_000, 1), (8, 10_000)],
                         ids=["shared-prefix-and-chunks", "chunks-only", "one-chunk"])
def test_prompts_read_in_parts_reply_as_plain_generate(varied_model_dir, varied_replies, monkeypatch,
                                                       shared_min, chunk_min):
    monkeypatch.setattr(decoding, "SHARED_MIN", shared_min)
    monkeypatch.setattr(decoding, "CHUNK_MIN", chunk_min)
    reads = []
    original = decoding.SlotDecoder._read
    monkeypatch.setattr(decoding.SlotDecoder, "_read",
                        lambda self, prompts, prefix, reserve: reads.append((len(prompts), prefix is not None))
                        or original(self, prompts, prefix, reserve))
    b = TransformersBackend(TransformersConfig(model=str(varied_model_dir), dtype="float32", batch_size=8))
    assert [c.texts[0] for c in b.chat(VARIED, GenerationParams(max_tokens=8))] == varied_replies
    if shared_min == 8:  # the prefix read on its own (one row), then the prompts after it
        assert reads[0] == (1, False) and all(prefix for _, prefix in reads[1:])
    else:
        assert not any(prefix for _, prefix in reads)
    chunks = [rows for rows, prefix in reads if prefix or shared_min > 8]
    assert sum(chunks) == len(VARIED)
    assert len(chunks) > 1 if (shared_min, chunk_min) == (8, 1) else len(chunks) == 1


# -- the embedded model ----------------------------------------------------------------------

EMBEDDED_PROMPTS = [[{"role": "user", "content": text}] for text in (
    "What is 7 times 8?", "Write a haiku about rain.",
    "Explain in detail how a bicycle stays upright when it moves, and why it falls over when it stops.",
    "Name three countries in Africa.", "Say hello.",
    "Describe the water cycle: evaporation, condensation, precipitation and collection, one sentence each.",
    "What colour is the sky on a clear day?", "Give one tip for learning a new language.")]


def test_embedded_greedy_replies_are_token_identical_to_plain_generate(monkeypatch):
    """float32 on every path of the fast decoder at once: packed linear layers, a shared system
    prompt read once, prompts in several chunks (CHUNK_MIN lowered, as a bigger batch would cut),
    4 slots for 8 prompts (rows leave and join), against ``generate`` on each prompt alone on a
    model loaded apart, none of the backend's code."""
    from factory.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer("embedded")
    model = load_causal_lm("embedded", device="cpu", dtype="float32").eval()
    expected = []
    for conversation in EMBEDDED_PROMPTS:
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.inference_mode():
            out = model.generate(input_ids=ids, max_new_tokens=32, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        expected.append(out[0, ids.shape[1]:].tolist())
    del model

    monkeypatch.setattr(decoding, "CHUNK_MIN", 32)
    reads = []
    original = decoding.SlotDecoder._read
    monkeypatch.setattr(decoding.SlotDecoder, "_read",
                        lambda self, prompts, prefix, reserve: reads.append(prefix is not None)
                        or original(self, prompts, prefix, reserve))
    b = TransformersBackend(TransformersConfig(model="embedded", dtype="float32", batch_size=4))
    b.load()
    assert sum(hasattr(m, "_packed_weight") for m in b.model.modules()) > 200
    got = b.chat(EMBEDDED_PROMPTS, GenerationParams(max_tokens=32))
    eos = {tokenizer.eos_token_id}
    for completion, ids in zip(got, expected):
        cut = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
        assert completion.texts[0] == tokenizer.decode(ids[:cut], skip_special_tokens=True)
        assert completion.completion_tokens == cut
    assert len({c.completion_tokens for c in got}) > 1  # rows ended apart
    assert reads[:3] == [False, True, True]  # the first 4 prompts: their shared prefix, then 2 chunks after it
