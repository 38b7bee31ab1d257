"""The drop-column protocol: how a step marks a row as dropped, and why, for the driver to count.

A step marks a row as dropped by setting the ``_drop_reason`` column (see :func:`dropped`);
the driver moves such rows to the rejected table and counts them per reason. Columns named
``_x`` go with the rejected rows only (as ``x``: the raw reply, the detail of the reason).
"""

from __future__ import annotations

import polars as pl

DROP = "_drop_reason"
RAW_REPLY = "_raw_reply"
DROP_DETAIL = "_drop_detail"
TRUNCATED = "truncated"  # the drop reason of a reply cut at max_tokens, and the column that marks kept ones
CUT = "_cut"  # marks, until the driver counts them, kept rows whose reply was cut
INTERNAL_PREFIX = "_"


class InvalidRow(ValueError):
    """A row lacks what a step needs (missing or non-text field): dropped as ``invalid_input``."""


def dropped(row: dict, reason: str, detail: str | None = None, reply: str | None = None) -> dict:
    """``row`` marked as dropped with ``reason`` (and why, and the raw reply, when known)."""
    out = {**row, DROP: reason}
    if detail is not None:
        out[DROP_DETAIL] = detail
    if reply is not None:
        out[RAW_REPLY] = reply
    return out


def rows_to_frame(rows: list[dict], like: pl.DataFrame | None = None, schema: dict | None = None) -> pl.DataFrame:
    """Rows (dicts) as a frame with a ``_drop_reason`` column; with no rows, an empty frame
    with ``schema``, else ``like``'s, so that no later step misses a column."""
    if not rows:
        frame = pl.DataFrame(schema=schema) if schema is not None else like.clear() if like is not None \
            else pl.DataFrame()
    else:
        frame = pl.from_dicts(rows, infer_schema_length=None, strict=False)
    return frame if DROP in frame.columns else frame.with_columns(pl.lit(None, dtype=pl.String).alias(DROP))
