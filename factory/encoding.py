"""JSON text written many times a run (cache keys, journal lines), with its encoder built once."""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable
from typing import Any


def json_encoder(**options) -> Callable[[Any], str]:
    """``json.dumps(value, **options)`` as a function, exactly, for acyclic values.

    ``json.dumps`` builds an encoder and its C counterpart on every call, which costs about as
    much as encoding a short request; this builds both once. The circular-reference check is
    left out (a value holding itself would recurse until Python stops it, not raise ValueError).
    """
    encoder = json.JSONEncoder(**options)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None or encoder.indent is not None:  # no C encoder (PyPy), or indented text
        return encoder.encode
    strings = json.encoder.encode_basestring_ascii if encoder.ensure_ascii else json.encoder.encode_basestring
    chunks = make(None, encoder.default, strings, encoder.indent, encoder.key_separator, encoder.item_separator,
                  encoder.sort_keys, encoder.skipkeys, encoder.allow_nan)

    def encode(value: Any) -> str:
        if isinstance(value, str):
            return strings(value)
        return "".join(chunks(value, 0))

    return encode
