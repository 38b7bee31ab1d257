"""Decoding on slots: a finished sequence leaves the batch at once and a waiting one takes its place.

``model.generate`` decodes a static batch: every sequence waits for the longest one, and
the finished ones are computed on as padding. On a CPU, where each decoding step costs
about the same whatever the answers' lengths, that wastes most of the time when short and
long answers share a batch (a one-word answer beside a 200-token explanation). Here the
batch is a set of ``slots``: after each step the finished sequences are dropped from the
batch and its key/value cache, and when enough slots are free the next prompts are
prefilled and their caches joined to the running ones (left-padded to a common length and
masked, as ``generate`` pads a batch). Columns that are padding in every row are cut off.

It handles what the factory's requests ask of a local model: greedy decoding or sampling
(temperature, top-p, and the model's own top-k as ``generate`` applies it), several samples
per prompt (one prefill, its cache copied), end-of-sequence tokens, stop strings, and a
token budget. Requests under a JSON Schema, and models whose cache is not a plain
:class:`transformers.DynamicCache`, go through ``model.generate`` instead (the caller's choice,
on :class:`SlotsUnsupported`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import GenerationParams


class SlotsUnsupported(Exception):
    """The model's cache cannot be cut and joined row by row."""


@dataclass
class Sequence:
    """One sample of one prompt: its request, its sample number, its prompt and its tokens so far."""

    request: int
    sample: int
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)


Finished = Callable[[Sequence], None]


class SlotDecoder:
    """Decodes sequences on ``slots`` rows of one batch, refilling rows as sequences finish."""

    def __init__(self, model, tokenizer, eos_ids: set[int], slots: int):
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.slots = slots
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
        self.device = next(model.parameters()).device
        self.top_k = getattr(model.generation_config, "top_k", None)
        self.cache_key = cache_argument(model)

    def run(self, sequences: list[Sequence], params: GenerationParams, on_finished: Finished,
            generator: torch.Generator | None = None) -> None:
        """Decodes every sequence (in order of the list, refilling as slots free up); calls
        ``on_finished`` with each as it ends."""
        with native_gqa(self.device):
            self._run(sequences, params, on_finished, generator)

    def _run(self, sequences: list[Sequence], params: GenerationParams, on_finished: Finished,
             generator: torch.Generator | None) -> None:
        waiting = list(reversed(sequences))  # pop() takes from the front of the list
        live: list[Sequence] = []
        cache, mask, last = None, None, None
        # Refill once a quarter of the slots is free: each refill copies the running cache once.
        refill_at = max(1, self.slots // 4)
        while waiting or live:
            free = self.slots - len(live)
            if waiting and (not live or free >= min(refill_at, len(waiting))):
                joining = [waiting.pop() for _ in range(min(free, len(waiting)))]
                new_cache, new_mask, logits = self._prefill(joining)
                first = self._choose(logits, params, generator)
                cache, mask = (new_cache, new_mask) if cache is None else self._join(cache, mask, new_cache, new_mask)
                running = len(live)
                live += joining
                last = first if last is None else torch.cat([last, first])
                # Only the joining rows got a token; the running ones' last token is still to be read.
                keep = list(range(running)) + [running + row for row in
                                               self._advance(joining, first.tolist(), params, on_finished)]
            else:
                positions = mask.sum(dim=1, keepdim=True)
                mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
                out = self.model(input_ids=last[:, None], attention_mask=mask, position_ids=positions,
                                 use_cache=True, **{self.cache_key: cache})
                cache = self._cache_of(out)
                last = self._choose(out.logits[:, -1, :], params, generator)
                keep = self._advance(live, last.tolist(), params, on_finished)
            if len(keep) < len(live):
                live = [live[i] for i in keep]
                if not live:
                    cache, mask, last = None, None, None
                    continue
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, last = mask[index], last[index]
                cache, mask = self._trim(cache, mask)

    def _advance(self, live: list[Sequence], tokens: list[int], params: GenerationParams,
                 on_finished: Finished) -> list[int]:
        """Appends each row's new token; returns the rows that go on."""
        keep = []
        for row, (sequence, token) in enumerate(zip(live, tokens)):
            sequence.tokens.append(token)
            ended = token in self.eos_ids or (params.stop and self._stopped(sequence, params.stop))
            if ended or len(sequence.tokens) >= params.max_tokens:
                on_finished(sequence)
            else:
                keep.append(row)
        return keep

    def _stopped(self, sequence: Sequence, stop: tuple[str, ...]) -> bool:
        # A stop string ends within the last tokens: decode only those (plus a margin for
        # strings longer than one token).
        tail = self.tokenizer.decode(sequence.tokens[-(max(len(s) for s in stop) + 8):], skip_special_tokens=True)
        return any(s in tail for s in stop)

    def _prefill(self, joining: list[Sequence]):
        """Reads the prompts of the joining sequences (each distinct prompt once); returns their
        cache, attention mask and next-token logits, one row per sequence."""
        distinct: dict[tuple[int, ...], int] = {}
        rows = [distinct.setdefault(tuple(s.prompt), len(distinct)) for s in joining]
        prompts = list(distinct)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self.cache_key: growing_cache(self.model)})
        cache = self._cache_of(out)
        logits = out.logits[:, -1, :]
        if rows != list(range(len(prompts))):
            index = torch.tensor(rows, device=self.device)
            cache.batch_select_indices(index)
            mask, logits = mask[index], logits[index]
        return cache, mask, logits

    def _cache_of(self, out):
        return out.get(self.cache_key)

    @staticmethod
    def _join(cache, mask, new_cache, new_mask):
        """The running rows and the joining ones in one cache, left-padded to a common length."""
        width = max(mask.shape[1], new_mask.shape[1])
        for old, new in zip(cache.layers, new_cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, width, -2), _pad_left(new.keys, width, -2)])
            old.values = torch.cat([_pad_left(old.values, width, -2), _pad_left(new.values, width, -2)])
        return cache, torch.cat([_pad_left(mask, width, -1), _pad_left(new_mask, width, -1)])

    @staticmethod
    def _trim(cache, mask):
        """Cuts the leading columns that are padding in every row."""
        lead = int(mask.any(dim=0).long().argmax())
        if lead > 0:
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            mask = mask[:, lead:]
        return cache, mask

    def _choose(self, logits: torch.Tensor, params: GenerationParams,
                generator: torch.Generator | None) -> torch.Tensor:
        """The next token of each row: the most likely, or a sample as ``generate`` draws it."""
        if params.greedy:
            return logits.argmax(dim=-1)
        scores = logits.float() / params.temperature
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if params.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True, dim=-1)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            # Drop the tokens after the nucleus; the most likely token always stays.
            drop = cumulative - ordered.softmax(dim=-1) > params.top_p
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        probabilities = scores.softmax(dim=-1)
        return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)


@contextlib.contextmanager
def native_gqa(device: torch.device):
    """On a CPU, grouped-query attention with the key/value heads as they are.

    Given an attention mask (every batch of padded rows has one), transformers' SDPA path copies
    each key/value head for the query heads that share it, at every layer and step, since CUDA's
    fused kernels take no mask with shared heads. torch's CPU kernel does: the copies go (about a
    tenth of a decoding step of the embedded model, the same replies). transformers reads the
    switch from the environment at each call; it is set for the decoding only, unless set already.
    """
    if device.type != "cpu" or FORCE_GQA in os.environ:
        yield
        return
    os.environ[FORCE_GQA] = "1"
    try:
        yield
    finally:
        os.environ.pop(FORCE_GQA, None)


FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


def cache_argument(model) -> str:
    """The name of the forward's cache argument, and of its output's: transformers 5 renamed
    `past_key_values` to `cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def growing_cache(model):
    """An empty cache for ``model`` whose layers grow in place (:func:`growing_layer`)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    check_cache(cache)
    cache.layers = [growing_layer()() for _ in cache.layers]
    return cache


def check_cache(cache) -> None:
    """Raises :class:`SlotsUnsupported` unless every layer of ``cache`` is a plain growing one
    (not a sliding window's, not a quantized or offloaded one), which rows can be cut from and
    joined to."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        raise SlotsUnsupported(f"{type(cache).__name__} with layers "
                               f"{sorted({type(layer).__name__ for layer in layers or []})}")


_GROWING = None


def growing_layer() -> type:
    """transformers' ``DynamicLayer`` appends a token by concatenation, which copies the layer's
    whole cache at every step (about a seventh of a CPU decoding step of the embedded model).
    This one keeps its keys and values as views of buffers with room to grow, and writes each
    token in place; it copies only when the buffer is full or the rows changed (a row left,
    rows joined, padding was cut)."""
    global _GROWING
    if _GROWING is None:
        from transformers.cache_utils import DynamicLayer

        class GrowingLayer(DynamicLayer):
            buffers: tuple[torch.Tensor, torch.Tensor] | None = None

            def update(self, key_states, value_states, *args, **kwargs):
                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                held = self.keys.shape[-2] if self.keys.numel() else 0
                needed = held + key_states.shape[-2]
                room = self.buffers
                if (room is None or needed > room[0].shape[-2] or room[0].shape[0] != key_states.shape[0]
                        or (held and self.keys.data_ptr() != room[0].data_ptr())):
                    shape = (*key_states.shape[:2], needed + max(32, needed // 4), key_states.shape[-1])
                    room = key_states.new_empty(shape), value_states.new_empty(shape)
                    if held:
                        room[0][:, :, :held], room[1][:, :, :held] = self.keys, self.values
                    self.buffers = room
                room[0][:, :, held:needed], room[1][:, :, held:needed] = key_states, value_states
                self.keys, self.values = room[0][:, :, :needed], room[1][:, :, :needed]
                return self.keys, self.values

        _GROWING = GrowingLayer
    return _GROWING


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(tensor, pad)
