"""The four backends behind one interface."""

from __future__ import annotations

import pytest

from factory.errors import BackendError, FactoryError
from factory.llm import (GenerationParams, OpenAIBackend, OpenAIConfig, ScriptedBackend, ScriptedConfig,
                         TransformersBackend, TransformersConfig, VLLMBackend, VLLMConfig)
from factory.llm.vllm_backend import vllm_available

from .fake_openai import FakeOpenAI

USER = [{"role": "user", "content": "Say something."}]


# -- scripted ----------------------------------------------------------------------------

def test_scripted_rules_are_deterministic_and_fill_templates():
    backend = ScriptedBackend(ScriptedConfig(rules=[{"match": r"capital of (?P<country>\w+)",
                                                     "reply": "The capital of {country} is X ({sample})"}],
                                             default="no idea {hash}"))
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    [a] = backend.chat([conv], GenerationParams(n=2))
    assert a.texts == ["The capital of France is X (0)", "The capital of France is X (1)"]
    [b, c] = backend.chat([USER, USER], GenerationParams())
    assert b.texts == c.texts and b.texts[0].startswith("no idea ")


def test_scripted_applies_stop_strings():
    backend = ScriptedBackend(ScriptedConfig(default="line one\nline two"))
    [a] = backend.chat([USER], GenerationParams(stop=("\n",)))
    assert a.texts == ["line one"]


# -- transformers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_backend(tiny_model_dir):
    backend = TransformersBackend(TransformersConfig(model=str(tiny_model_dir), batch_size=4))
    yield backend
    backend.close()


# Prompts of different lengths: in a batch, all but the longest are left-padded.
VARIED = [[{"role": "user", "content": text}] for text in (
    "Name a colour.", "Write one line about the sea, the ships on it and the lights of the harbour at night.",
    "What is 2 + 2?", "List three fruits, then say which of them is the sweetest and why you think so.", "Hello")]


def bare_greedy(model_dir, conversations, max_tokens: int) -> list[str]:
    """Each conversation's greedy reply from plain ``generate`` on its prompt alone: no padding, no
    mask, none of the backend's code. Near-ties would let float noise between a padded and an
    unpadded read flip a token: every step's best token leads the next by a clear margin."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    replies = []
    for conversation in conversations:
        prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out = model.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        assert min(float(top[0] - top[1]) for top in (s[0].topk(2).values for s in out.scores)) > 1e-3
        replies.append(tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True))
    return replies


@pytest.fixture(scope="module")
def varied_replies(varied_model_dir) -> list[str]:
    return bare_greedy(varied_model_dir, VARIED, 8)


def varied_backend(model_dir, **options) -> TransformersBackend:
    # float32: `auto` is bfloat16 where the CPU probe finds it faster, and padding alone can break its near-ties apart.
    return TransformersBackend(TransformersConfig(model=str(model_dir), dtype="float32", **options))


def test_the_varied_model_replies_by_its_prompt_and_notices_padding(varied_model_dir, varied_replies):
    """What makes the batching tests below able to fail: every prompt has its own reply, and a
    padded batch read without its attention mask replies otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert len(set(varied_replies)) == len(VARIED)
    tokenizer = AutoTokenizer.from_pretrained(varied_model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(varied_model_dir, dtype=torch.float32).eval()
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in VARIED]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        masked = model(**batch).logits[:, -1].argmax(-1)
        unmasked = model(input_ids=batch["input_ids"]).logits[:, -1].argmax(-1)
    assert int((masked != unmasked).sum()) >= 2


@pytest.mark.parametrize("continuous", [True, False], ids=["slots", "static"])
def test_transformers_batches_keep_order_and_match_single_requests(varied_model_dir, varied_replies, continuous):
    # 5 prompts on 4 rows: a batch of 4 with 3 left-padded, then the last one alone.
    backend = varied_backend(varied_model_dir, batch_size=4, continuous=continuous)
    params = GenerationParams(max_tokens=8)
    together = backend.chat(VARIED, params)
    alone = [backend.chat([c], params)[0] for c in VARIED]
    assert [c.texts for c in together] == [[reply] for reply in varied_replies]
    assert [c.texts for c in alone] == [[reply] for reply in varied_replies]
    prompt_lengths = [len(backend.tokenizer(backend.render(c), add_special_tokens=False)["input_ids"]) for c in VARIED]
    assert [c.prompt_tokens for c in together] == [c.prompt_tokens for c in alone] == prompt_lengths
    assert len(set(prompt_lengths)) == 5
    assert all(c.completion_tokens == 8 for c in together)  # this model writes no end of sequence this soon
    backend.close()


def test_transformers_generation_leaves_autograd_on_for_training_in_the_same_process(tiny_backend):
    import torch

    tiny_backend.chat([USER], GenerationParams(max_tokens=2))
    assert torch.is_grad_enabled()
    assert not any(p.requires_grad for p in tiny_backend.model.parameters())


@pytest.mark.parametrize("continuous", [True, False], ids=["slots", "static"])
def test_transformers_samples_share_one_prefill_and_match_the_plain_path(varied_model_dir, varied_replies,
                                                                         continuous):
    # Greedy samples of a prompt read once and copied n times equal the prompt's greedy reply on its
    # own. 9 rows for 3 prompts x 3 samples: the prompts share a batch, left-padded.
    backend = varied_backend(varied_model_dir, batch_size=9, continuous=continuous)
    three = backend.chat(VARIED[:3], GenerationParams(n=3, max_tokens=8))
    assert backend._shares_prefill  # static batches: the shared prefill was taken, not the fallback
    assert [c.texts for c in three] == [[reply] * 3 for reply in varied_replies[:3]]
    assert [c.completion_tokens for c in three] == [3 * 8] * 3
    one = backend.chat(VARIED[:3], GenerationParams(max_tokens=8))  # the plain path (n=1)
    assert [c.texts * 3 for c in one] == [c.texts for c in three]
    backend.close()


@pytest.mark.parametrize("continuous", [True, False])
def test_transformers_reports_progress_per_generate_call_through_the_client(tiny_model_dir, continuous):
    from factory.llm.requests import LLMClient

    backend = TransformersBackend(TransformersConfig(model=str(tiny_model_dir), batch_size=2, continuous=continuous))
    client, answered = LLMClient(backend), []
    client.on_progress = answered.append
    client.chat([[{"role": "user", "content": f"q{i}"}] for i in range(5)], GenerationParams(max_tokens=2))
    # Static batches report a batch at a time; continuous batching each reply as it ends.
    expected = [1, 1, 1, 1, 1] if continuous else [2, 2, 1]
    assert answered == expected
    client.on_progress = None
    client.chat([[{"role": "user", "content": "again"}]], GenerationParams(max_tokens=2))
    assert answered == expected  # the callback lives only as long as the client has it
    backend.close()


def test_transformers_samples_are_seeded_and_varied(tiny_backend):
    params = GenerationParams(n=4, temperature=1.5, max_tokens=8, seed=123)
    [a] = tiny_backend.chat([USER], params)
    [b] = tiny_backend.chat([USER], params)
    [c] = tiny_backend.chat([USER], params.with_seed(124))
    assert len(a.texts) == 4 and a.texts == b.texts
    assert a.texts != c.texts
    assert len(set(a.texts)) > 1


def test_transformers_prefill_continues_the_assistant_message(tiny_backend):
    prompt = tiny_backend.render(USER + [{"role": "assistant", "content": "1. apples\n2."}])
    assert prompt.endswith("1. apples\n2.")
    assert not prompt.endswith("<|im_end|>\n")


def test_transformers_stop_strings_cut_the_reply(tiny_backend):
    [free] = tiny_backend.chat([USER], GenerationParams(max_tokens=12))
    text = free.texts[0]
    assert len(text) > 2
    stop = text[len(text) // 2: len(text) // 2 + 1]
    [cut] = tiny_backend.chat([USER], GenerationParams(max_tokens=12, stop=(stop,)))
    assert stop not in cut.texts[0] and text.startswith(cut.texts[0])


def test_transformers_too_long_prompt_fails_only_that_conversation(tiny_model_dir):
    backend = TransformersBackend(TransformersConfig(model=str(tiny_model_dir), max_input_tokens=60))
    ok, long = backend.chat([USER, [{"role": "user", "content": "word " * 100}]], GenerationParams(max_tokens=3))
    assert ok.error is None and long.error_reason == "prompt_too_long"


def test_transformers_loads_a_lora_adapter(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    plain = TransformersBackend(TransformersConfig(model=str(tiny_model_dir)))
    adapted = TransformersBackend(TransformersConfig(model=str(tiny_model_dir), adapter=str(tmp_path / "adapter")))
    adapted.check()
    assert plain.model_id != adapted.model_id and "+lora:" in adapted.model_id
    plain.load(), adapted.load()
    q_plain = plain.model.model.layers[0].self_attn.q_proj.weight
    q_adapted = adapted.model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_plain, q_adapted)
    k_plain = plain.model.model.layers[0].self_attn.k_proj.weight
    assert torch.equal(k_plain, adapted.model.model.layers[0].self_attn.k_proj.weight)


def test_transformers_check_names_missing_model_and_adapter(tmp_path):
    with pytest.raises(FactoryError, match="is not a local folder"):
        TransformersBackend(TransformersConfig(model=str(tmp_path / "nope"))).check()
    with pytest.raises(FactoryError, match="not a PEFT adapter folder"):
        TransformersBackend(TransformersConfig(adapter=str(tmp_path))).check()


# -- openai-compatible -------------------------------------------------------------------

def openai(server, **kw):
    return OpenAIBackend(OpenAIConfig(model="fake", base_url=server.base_url, backoff=0.01, **kw))


def test_openai_round_trip_with_samples_and_prefill():
    with FakeOpenAI() as server:
        backend = openai(server)
        backend.check()
        convs = [USER, USER + [{"role": "assistant", "content": "Sure:"}]]
        a, b = backend.chat(convs, GenerationParams(n=3, max_tokens=5, stop=("\n",)))
        assert a.texts == ["echo: Say something. #0", "echo: Say something. #1", "echo: Say something. #2"]
        assert a.prompt_tokens == 7 and a.completion_tokens == 9
        first, second = sorted(server.requests, key=lambda r: len(r["messages"]))
        assert first["n"] == 3 and first["max_tokens"] == 5 and first["stop"] == ["\n"]
        assert "continue_final_message" not in first
        assert second["continue_final_message"] is True and second["add_generation_prompt"] is False


# The reason each fault is retried for: the status, a dropped connection, a body that is not
# an answer, no answer in time.
REASONS = {500: "http_500", 503: "http_503", "reset": "connection", "not_json": "bad_body", "truncated": "bad_body",
           "empty_choices": "empty_choices", "slow": "timeout"}


@pytest.mark.parametrize("fault", [500, 503, "reset", "not_json", "truncated", "empty_choices", "slow"])
def test_openai_retries_transient_faults(fault):
    # A "slow" answer is due in 600 s: the server moves the client's clock on by that much, so that
    # its 60 s timeout fires at once, however loaded the machine (one request is in flight at a time).
    with FakeOpenAI(slow_seconds=600) as server:
        server.faults = [fault, fault]
        backend = openai(server, timeout=60.0)
        server.clock_client(backend._open().loop)
        [c] = backend.chat([USER], GenerationParams())
        assert c.error is None and c.texts == ["echo: Say something. #0"]
        assert server.injected == [fault, fault] and len(server.requests) == 3  # two faults, then the answer
        assert backend.stats.retries == 2 and backend.stats.throttled == 0
        assert backend.stats.retry_reasons == {REASONS[fault]: 2}


@pytest.mark.parametrize("fault", [429, "retry_after"])
def test_a_429_is_throttling_waited_out_never_a_retry_or_a_failure(fault):
    with FakeOpenAI() as server:
        server.faults = [fault] * 8  # more 429s than max_retries allows retries
        backend = openai(server, max_retries=2)
        [c] = backend.chat([USER], GenerationParams())
        assert c.error is None and c.texts == ["echo: Say something. #0"]
        assert backend.stats.throttled == 8 and backend.stats.retries == 0 and backend.stats.failures == 0


def test_openai_gives_up_after_max_retries_with_the_reason():
    with FakeOpenAI() as server:
        server.faults = [503] * 10
        backend = openai(server, max_retries=2)
        ok_later = backend.chat([USER], GenerationParams())[0]
        assert ok_later.error == "http_503: HTTP 503 (after 2 retries)"
        assert backend.stats.retries == 2 and backend.stats.failures == 1


def test_openai_client_errors_are_not_retried():
    with FakeOpenAI() as server:
        server.faults = [400]
        backend = openai(server)
        [c] = backend.chat([USER], GenerationParams())
        assert c.error.startswith("http_400: HTTP 400") and backend.stats.retries == 0


def test_openai_many_requests_run_concurrently_and_keep_order():
    with FakeOpenAI(reply_fn=lambda payload, i: payload["messages"][-1]["content"].upper()) as server:
        backend = openai(server, max_concurrency=8)
        convs = [[{"role": "user", "content": f"item {i}"}] for i in range(40)]
        out = backend.chat(convs, GenerationParams())
        assert [c.texts[0] for c in out] == [f"ITEM {i}" for i in range(40)]


def test_openai_unreachable_server_is_a_clear_error():
    backend = OpenAIBackend(OpenAIConfig(model="m", base_url="http://127.0.0.1:9/v1", timeout=2))
    with pytest.raises(BackendError, match="nothing answers at http://127.0.0.1:9/v1 .connection refused."):
        backend.check()


# -- vLLM ----------------------------------------------------------------------------------

def test_vllm_without_gpu_or_package_is_a_clear_error():
    if vllm_available():
        pytest.skip("vLLM and a GPU are present")
    with pytest.raises(FactoryError, match="vllm backend needs"):
        VLLMBackend(VLLMConfig()).check()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not (vllm_available() and _cuda()), reason="needs vLLM and a CUDA GPU (the CPU build is "
                                                                "tested in tests/test_vllm_real.py)")
def test_vllm_generates_samples_on_gpu():
    backend = VLLMBackend(VLLMConfig(model="embedded", gpu_memory_utilization=0.3))
    [c] = backend.chat([USER], GenerationParams(n=2, temperature=0.8, max_tokens=16, seed=1))
    assert len(c.texts) == 2 and c.completion_tokens > 0
