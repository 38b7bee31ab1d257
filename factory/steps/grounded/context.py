"""Passages in a ``context``: written by ``grounded_questions``, read by ``grounded_answer``
and ``groundedness``.

Each passage is introduced by its id in square brackets (and its heading path) on a line
of its own, its text below, passages a blank line apart.
"""

from __future__ import annotations

import re

from ..drops import InvalidRow


def format_context(passages: list[dict]) -> str:
    """Passages (``chunk_id``, ``heading``, ``chunk_text``) as one text, each under its id."""
    blocks = []
    for p in passages:
        label = f"[{p['chunk_id']}]" + (f" {p['heading']}" if p.get("heading") else "")
        blocks.append(f"{label}\n{p['chunk_text']}")
    return "\n\n".join(blocks)


def passages_in(context: str, chunk_ids: list[str]) -> list[dict]:
    """The passages of ``chunk_ids`` in a context made by :func:`format_context`, in that
    order, as dicts of ``chunk_id``, ``heading`` and ``chunk_text``.

    Raises:
        InvalidRow: an id has no passage in the context.
    """
    # Only the row's own ids mark passages: a line of a passage may start with a bracket too.
    ids = "|".join(re.escape(chunk_id) for chunk_id in sorted(set(chunk_ids), key=len, reverse=True))
    labels = list(re.finditer(rf"^\[({ids})\][ \t]*([^\n]*)$", context, re.M))
    found = {}
    for k, label in enumerate(labels):
        end = labels[k + 1].start() if k + 1 < len(labels) else len(context)
        found.setdefault(label.group(1), {"chunk_id": label.group(1), "heading": label.group(2).strip(),
                                          "chunk_text": context[label.end():end].strip()})
    missing = [chunk_id for chunk_id in chunk_ids if chunk_id not in found]
    if missing:
        raise InvalidRow(f"chunk '{missing[0]}' has no passage in the context (expected a line starting with "
                         f"'[{missing[0]}]')")
    return [found[chunk_id] for chunk_id in chunk_ids]


def passage_list(row: dict, column: str) -> list[str]:
    """``row[column]`` as a non-empty list of chunk ids, or :class:`InvalidRow`."""
    value = row.get(column)
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise InvalidRow(f"column '{column}' must be a non-empty list of chunk ids")
    return list(value)
