"""Decoding on slots: a finished sequence leaves the batch at once and a waiting one takes its place.

``model.generate`` decodes a static batch: every sequence waits for the longest one, and
the finished ones are computed on as padding. On a CPU, where each decoding step costs
about the same whatever the answers' lengths, that wastes most of the time when short and
long answers share a batch (a one-word answer beside a 200-token explanation). Here the
batch is a set of ``slots``: after each step the finished sequences are dropped from the
batch and its key/value cache, and when enough slots are free the next prompts are
prefilled and their caches joined to the running ones (left-padded to a common length and
masked, as ``generate`` pads a batch). Columns that are padding in every row are cut off.
The cache does all of that in place (:func:`growing_layer`): a row that leaves is overwritten
by the last row, joining rows are written below the others. Prompts are read once for their
common prefix (a system prompt, a few-shot template) and then in chunks of similar lengths
(:func:`shared_prefix`, :func:`length_chunks`). ``bench/embedded_profile.py`` shows where a
step's time goes; ``docs/performance.md`` has the figures.

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
        self._columns = room_for(self.model, self.slots, params.max_tokens)
        with native_gqa(self.device):
            self._run(sequences, params, on_finished, generator)

    def _run(self, sequences: list[Sequence], params: GenerationParams, on_finished: Finished,
             generator: torch.Generator | None) -> None:
        waiting = list(reversed(sequences))  # pop() takes from the front of the list
        live: list[Sequence] = []
        cache, mask, last = None, None, None
        # Refill once a quarter of the slots is free: each refill is a forward pass of its own.
        refill_at = max(1, self.slots // 4)
        while waiting or live:
            free = self.slots - len(live)
            if waiting and (not live or free >= min(refill_at, len(waiting))):
                joining, parts, logits = self._prefill([waiting.pop() for _ in range(min(free, len(waiting)))],
                                                       running=cache is not None)
                first = self._choose(logits, params, generator)
                for part_cache, part_mask in parts:
                    if cache is None:
                        cache, mask = part_cache, part_mask
                    else:
                        mask = _append_rows(cache, mask, part_cache, part_mask)
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
                if not keep:
                    live, cache, mask, last = [], None, None, None
                    continue
                order = _fill_holes(keep)
                mask, last = _drop_rows(cache, mask, last, order)
                live = [live[i] for i in order]

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

    def _prefill(self, joining: list[Sequence], running: bool):
        """Reads the prompts of the joining sequences, each distinct prompt once. Returns the
        sequences in the order of their rows, the caches and attention masks of the rows (in
        parts, to be appended one after the other) and each row's next-token logits. Without a
        ``running`` cache, the first part becomes it: only that one reserves room for every slot
        and the replies' tokens; the prefix and the other parts are copied out and dropped.

        The prompts' common prefix (a system prompt, a few-shot template) is read once and its
        cache shared by every row; the rest of each prompt is read in chunks of similar lengths,
        so that little is computed on padding. A row's cache is [prefix, padding, its own
        tokens], masked where it is padding."""
        distinct: dict[tuple[int, ...], list[Sequence]] = {}
        for sequence in joining:
            distinct.setdefault(tuple(sequence.prompt), []).append(sequence)
        prompts = list(distinct)
        shared = shared_prefix(prompts)
        prefix = self._read([prompts[0][:shared]], None, reserve=False)[0] if shared else None
        ordered, parts, logits = [], [], []
        for chunk in length_chunks([len(p) - shared for p in prompts]):
            cache, mask, last = self._read([prompts[i][shared:] for i in chunk], prefix,
                                           reserve=not running and not parts)
            rows = [row for row, i in enumerate(chunk) for _ in distinct[prompts[i]]]
            if len(rows) > len(chunk):  # several samples of a prompt: its row copied for each
                index = torch.tensor(rows, device=self.device)
                cache.batch_select_indices(index)
                mask, last = mask[index], last[index]
            ordered += [sequence for i in chunk for sequence in distinct[prompts[i]]]
            parts.append((cache, mask))
            logits.append(last)
        return ordered, parts, torch.cat(logits)

    def _read(self, prompts: list[tuple[int, ...]], prefix, reserve: bool):
        """One forward pass over ``prompts`` (left-padded to a common length), after the one-row
        cache ``prefix`` when given; returns the cache (with room for every slot and the replies'
        tokens when ``reserve``), the attention mask and the last logits."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        cache = growing_cache(self.model, rows=self.slots, columns=self._columns) if reserve else \
            growing_cache(self.model)
        held = 0
        if prefix is not None:
            held = prefix.layers[0].keys.shape[-2]
            for layer, shared in zip(cache.layers, prefix.layers):
                layer.lazy_initialization(shared.keys, shared.values)
                layer.keys = shared.keys.expand(len(prompts), -1, -1, -1)
                layer.values = shared.values.expand(len(prompts), -1, -1, -1)
            mask = torch.cat([mask.new_ones((len(prompts), held)), mask], dim=1)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, held:]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self.cache_key: cache})
        return self._cache_of(out), mask, out.logits[:, -1, :]

    def _cache_of(self, out):
        return out.get(self.cache_key)

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


def growing_cache(model, rows: int = 0, columns: int = 0):
    """An empty cache for ``model`` whose layers grow in place (:func:`growing_layer`), with room
    for ``rows`` rows and ``columns`` columns beyond the first tokens written."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    check_cache(cache)
    layer = growing_layer()
    cache.layers = [layer(rows, columns) for _ in cache.layers]
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
    whole cache at every step, and cutting or joining rows copies it again. This layer keeps its
    keys and values as views ``buffer[:rows, :, start:end]`` of buffers with room for more rows
    and columns: a token is written in place, a finished row is overwritten by the last row,
    joining rows are written below the others, and leading padding is cut by moving ``start``.
    It copies the cache only when a buffer is full, or when its keys were replaced from outside
    (transformers' own ``batch_select_indices``, say)."""
    global _GROWING
    if _GROWING is None:
        from transformers.cache_utils import DynamicLayer

        class GrowingLayer(DynamicLayer):
            def __init__(self, rows: int = 0, columns: int = 0):
                super().__init__()
                self.room_rows, self.room_columns = rows, columns
                self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
                self.rows = self.start = self.end = 0
                self._view = None

            def update(self, key_states, value_states, *args, **kwargs):
                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                self._adopt(key_states)
                new = key_states.shape[-2]
                self._make_room(self.rows, right=new)
                keys, values = self.buffers
                keys[:self.rows, :, self.end:self.end + new] = key_states
                values[:self.rows, :, self.end:self.end + new] = value_states
                self.end += new
                return self._set_view()

            def _adopt(self, like: torch.Tensor) -> None:
                """Takes keys and values set from outside (or none yet) into buffers of its own."""
                if self.buffers is not None and self.keys is self._view:
                    return
                held = self.keys.shape[-2] if self.keys is not None and self.keys.numel() else 0
                self.rows = self.keys.shape[0] if held else like.shape[0]
                old = (self.keys, self.values)
                self.buffers, self.start, self.end = None, 0, 0
                self._allocate(self.rows, held, like)
                if held:
                    self.buffers[0][:self.rows, :, :held], self.buffers[1][:self.rows, :, :held] = old
                self.end = held

            def _allocate(self, rows: int, columns: int, like: torch.Tensor, left: int = 0) -> None:
                """New buffers for ``rows`` rows and ``columns`` columns (plus room), holding the current
                rows ``left`` columns to the right of column 0, which is zeros up to there."""
                width = left + columns
                # Room for the tokens still to come on the first allocation (the rows' prompts), and
                # then twice what is held: each new buffer's pages are faulted in as it is written.
                room = max(self.room_columns, 32) if self.buffers is None else max(width, self.room_columns, 32)
                shape = (max(rows, self.room_rows), like.shape[1], width + room, like.shape[-1])
                keys, values = like.new_empty(shape), like.new_empty(shape)
                if self.buffers is not None:
                    held = self.end - self.start
                    keys[:self.rows, :, left:left + held] = self.buffers[0][:self.rows, :, self.start:self.end]
                    values[:self.rows, :, left:left + held] = self.buffers[1][:self.rows, :, self.start:self.end]
                    self.start, self.end = 0, left + held
                if left:
                    keys[:self.rows, :, :left] = 0
                    values[:self.rows, :, :left] = 0
                self.buffers = keys, values

            def _make_room(self, rows: int, right: int = 0, left: int = 0) -> None:
                """Room for ``rows`` rows, ``right`` more columns after the last and ``left`` more before
                the first (zeros in the current rows)."""
                keys, _ = self.buffers
                if rows > keys.shape[0] or self.end + right > keys.shape[2] or left > self.start:
                    self._allocate(rows, self.end - self.start + right, keys, left=left)
                elif left:
                    self.start -= left
                    for buffer in self.buffers:
                        buffer[:self.rows, :, self.start:self.start + left] = 0

            def _set_view(self):
                keys, values = self.buffers
                self.keys = self._view = keys[:self.rows, :, self.start:self.end]
                self.values = values[:self.rows, :, self.start:self.end]
                return self.keys, self.values

            def append_rows(self, other) -> None:
                """Writes the rows of ``other`` below these, right-aligned (left-padded with zeros)."""
                self._adopt(other.keys)
                count, width = other.keys.shape[0], other.keys.shape[-2]
                self._make_room(self.rows + count, left=max(0, width - (self.end - self.start)))
                for buffer, states in zip(self.buffers, (other.keys, other.values)):
                    buffer[self.rows:self.rows + count, :, self.start:self.end - width] = 0
                    buffer[self.rows:self.rows + count, :, self.end - width:self.end] = states
                self.rows += count
                self._set_view()

            def move_rows(self, holes: torch.Tensor, movers: torch.Tensor, rows: int) -> None:
                """Copies rows ``movers`` onto rows ``holes`` and keeps the first ``rows``."""
                self._adopt(self.keys)
                if len(holes):
                    for buffer in self.buffers:
                        buffer[holes, :, self.start:self.end] = buffer[movers, :, self.start:self.end]
                self.rows = rows
                self._set_view()

            def cut_left(self, columns: int) -> None:
                self._adopt(self.keys)
                self.start += columns
                self._set_view()

        _GROWING = GrowingLayer
    return _GROWING


def _append_rows(cache, mask: torch.Tensor, new_cache, new_mask: torch.Tensor) -> torch.Tensor:
    """Appends the rows of ``new_cache`` to ``cache``; returns the attention mask of all rows."""
    for layer, new in zip(cache.layers, new_cache.layers):
        layer.append_rows(new)
    width = max(mask.shape[1], new_mask.shape[1])
    return torch.cat([_pad_left(mask, width, -1), _pad_left(new_mask, width, -1)])


def _fill_holes(keep: list[int]) -> list[int]:
    """The rows' new order when only ``keep`` go on: each kept row stays where it is, except the
    last ones, which move into the places of the rows that left (one copy per row that left)."""
    count = len(keep)
    kept = set(keep)
    movers = iter(row for row in keep if row >= count)
    return [row if row in kept else next(movers) for row in range(count)]


def _drop_rows(cache, mask: torch.Tensor, last: torch.Tensor, order: list[int]):
    """Keeps the rows ``order`` (from :func:`_fill_holes`) of the cache, the mask and the last
    tokens, then cuts the leading columns that are padding in every row."""
    moved = [(hole, row) for hole, row in enumerate(order) if hole != row]
    holes = torch.tensor([h for h, _ in moved], dtype=torch.long, device=mask.device)
    movers = torch.tensor([r for _, r in moved], dtype=torch.long, device=mask.device)
    for layer in cache.layers:
        layer.move_rows(holes, movers, len(order))
    index = torch.tensor(order, device=mask.device)
    mask, last = mask[index], last[index]
    lead = int(mask.any(dim=0).long().argmax())
    if lead > 0:
        for layer in cache.layers:
            layer.cut_left(lead)
        mask = mask[:, lead:]
    return mask, last


CACHE_MEMORY_SHARE = 0.125  # of the available memory, for the key/value cache reserved at once


def room_for(model, rows: int, tokens: int) -> int:
    """Columns of key/value cache to reserve beyond the prompts: ``tokens`` (the reply's budget) when
    ``rows`` rows of it take at most an eighth of the free memory (the GPU's, for a model on one),
    else 0 (the cache then grows as it fills)."""
    config = getattr(model, "config", None)
    try:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers, heads = text.num_hidden_layers, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    except (AttributeError, TypeError, ZeroDivisionError):
        return 0
    weight = next(model.parameters())
    needed = 2 * layers * heads * dim * weight.element_size() * rows * tokens
    if weight.device.type == "cuda":
        available = torch.cuda.mem_get_info(weight.device)[0]
    else:
        from .cpu import available_memory

        available = available_memory()
    return tokens if available is None or needed <= CACHE_MEMORY_SHARE * available else 0


SHARED_MIN = 8  # a common prefix shorter than this is read with each prompt
CHUNK_MIN = 256  # tokens: a prefill chunk is not cut before it holds this many (small matmuls are slow)


def shared_prefix(prompts: list[tuple[int, ...]]) -> int:
    """The length of the prompts' common prefix worth reading once: 0 for one prompt or a prefix
    under :data:`SHARED_MIN` tokens; at most the shortest prompt's length less one, so that every
    prompt keeps a token of its own to read (its logits give the first reply token)."""
    if len(prompts) < 2:
        return 0
    first, shortest = prompts[0], min(len(p) for p in prompts)
    length = 0
    while length < shortest - 1 and all(p[length] == first[length] for p in prompts):
        length += 1
    return length if length >= SHARED_MIN else 0


def length_chunks(lengths: list[int]) -> list[list[int]]:
    """The indices of ``lengths``, longest first, cut into chunks to prefill one at a time: a chunk
    is closed when the next length would make more than a fifth of it padding, once it holds
    :data:`CHUNK_MIN` tokens."""
    chunks: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if current:
            width = lengths[current[0]]
            padded = (len(current) + 1) * width
            if len(current) * width >= CHUNK_MIN and padded - (tokens + lengths[i]) > padded / 5:
                chunks.append(current)
                current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    return chunks + [current] if current else chunks


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(tensor, pad)
