"""Stable hashes of texts and data: the digests behind cache keys, fingerprints and seeds.

Every cache key, step fingerprint and derived sampling seed is made here, so the values must
never change: a different digest for the same data would make every cached reply a miss.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .encoding import json_encoder


def digest(text: str) -> str:
    """The sha256 hex digest of a text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seed_of(text: str) -> int:
    """A stable 32-bit integer from a text (a sampling seed)."""
    return int(digest(text)[:8], 16)


_CANONICAL = json_encoder(sort_keys=True, ensure_ascii=False, default=str, separators=(",", ":"))


def canonical(data: Any) -> str:
    """The JSON text that :func:`fingerprint` digests (sorted keys, no spaces)."""
    return _CANONICAL(data)


def fingerprint(data: Any) -> str:
    """A stable sha256 hex digest of JSON-serialisable data."""
    return digest(canonical(data))


def fingerprint_int(data: Any) -> int:
    """A stable 32-bit integer from JSON-serialisable data (for seeds)."""
    return seed_of(canonical(data))
