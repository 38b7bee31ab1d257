"""JSON Schemas enforced while a transformers model decodes, with outlines-core.

The schema becomes a regular expression, the regular expression an index over the model's
vocabulary (which token may follow which state), and a logits processor masks, at each step
and for each sequence of the batch, every token the schema does not allow there. Building
the index takes about a tenth of a second for a schema of a few fields on a 49k vocabulary;
it is built once per schema and model. ``bench/structured.py`` measures the cost per token
beside xgrammar's processor.

outlines-core (a 5 MB Rust wheel with no dependencies) was picked over xgrammar, which was
about as fast here but pulls in triton (1 GB) on Linux.
"""

from __future__ import annotations

import functools
import importlib.util
import json

from ..errors import FactoryError

# Optional whitespace between JSON tokens: one space at most, so that a small model cannot
# spend its tokens on blank lines.
WHITESPACE = r"[ ]?"


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether outlines-core is installed (else replies are checked after the fact)."""
    return importlib.util.find_spec("outlines_core") is not None


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-unicode map (how byte-level BPE vocabularies spell bytes)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes(tokenizer) -> dict[bytes, list[int]]:
    """Each ordinary token's bytes (what it adds to the text) -> its ids. Byte-level BPE
    vocabularies (GPT-2, Llama 3, Qwen, SmolLM) and SentencePiece ones (``▁`` for a space,
    ``<0x0A>`` byte tokens) are both read; special tokens are left out."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    byte_level = sum("Ġ" in t for t in vocab) > sum("▁" in t for t in vocab)
    decoder = _byte_decoder() if byte_level else {}
    out: dict[bytes, list[int]] = {}
    for token, index in vocab.items():
        if index in special:
            continue
        if byte_level:
            try:
                raw = bytes(decoder[c] for c in token)
            except KeyError:
                raw = token.encode("utf-8")
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            raw = bytes([int(token[3:5], 16)])
        else:
            raw = token.replace("▁", " ").encode("utf-8")
        if raw:
            out.setdefault(raw, []).append(index)
    return out


class JsonGrammars:
    """Indexes of JSON Schemas over one tokenizer's vocabulary, built once per schema."""

    def __init__(self, tokenizer, eos_id: int):
        import outlines_core

        self._oc = outlines_core
        self.vocabulary = outlines_core.Vocabulary(eos_id, token_bytes(tokenizer))
        self._indexes: dict[str, object] = {}

    def processor(self, schema_text: str) -> "JsonLogitsProcessor":
        """A fresh logits processor for one ``generate`` call (it keeps each sequence's state)."""
        if schema_text not in self._indexes:
            try:
                regex = self._oc.json_schema.build_regex_from_schema(schema_text, WHITESPACE)
                self._indexes[schema_text] = self._oc.Index(regex, self.vocabulary)
            except Exception as err:  # noqa: BLE001 - outlines-core raises its own types
                schema = json.loads(schema_text)
                raise FactoryError(f"cannot enforce the JSON Schema {json.dumps(schema)[:200]} while decoding "
                                   f"({type(err).__name__}: {err}); simplify the schema (plain types, enums, "
                                   "lists, nested objects)") from None
        return JsonLogitsProcessor(self._oc, self._indexes[schema_text])


class JsonLogitsProcessor:
    """Masks the tokens a JSON Schema does not allow next, for each sequence of a batch.

    A sequence that ends another way (a stop string, after which ``generate`` pads it) is let
    go: from then on its tokens are not held to the schema.
    """

    def __init__(self, outlines_core, index):
        self._oc = outlines_core
        self.index = index
        self.guides = None

    def __call__(self, input_ids, scores):
        import torch

        rows = input_ids.shape[0]
        if self.guides is None:
            self.guides = [self._oc.Guide(self.index) for _ in range(rows)]
            self.live = [True] * rows
            self.mask = torch.zeros((rows, (scores.shape[1] + 31) // 32), dtype=torch.int32)
            self.shifts = torch.arange(32, dtype=torch.int32)
        else:
            last = input_ids[:, -1].tolist()
            for i, guide in enumerate(self.guides):
                if self.live[i]:
                    try:
                        guide.advance(last[i], return_tokens=False)
                    except Exception:  # noqa: BLE001 - not allowed: the sequence ended another way
                        self.live[i] = False
        for i, guide in enumerate(self.guides):
            if self.live[i]:
                guide.write_mask_into(self.mask[i].data_ptr(), self.mask.shape[1], 4)
            else:
                self.mask[i].fill_(-1)
        allowed = ((self.mask.unsqueeze(-1) >> self.shifts) & 1).bool().view(rows, -1)[:, :scores.shape[1]]
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))
