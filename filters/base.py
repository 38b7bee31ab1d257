"""The filter bases: :class:`Filter` keeps or drops each row, :class:`TableFilter` decides with a view of the table.

A filter only says keep or drop, with a reason (and optionally a detail); the drop columns
(:mod:`factory.steps.drops`) carry the verdict, and the driver counts the reasons.
"""

from __future__ import annotations

from typing import ClassVar

import polars as pl

from factory.steps.base import GlobalStep, RowStep
from factory.steps.context import StepContext
from factory.steps.drops import DROP, DROP_DETAIL


class Filter(RowStep):
    """Keeps or drops each row: override :meth:`keep`.

    ``keep`` returns True to keep the row, False to drop it with the filter's
    ``default_reason``, ``(False, "reason")``, or ``(False, "reason", "detail")``.
    """

    default_reason: ClassVar[str] = "filtered"

    def keep(self, row: dict) -> bool | tuple:
        raise NotImplementedError

    def process(self, batch: pl.DataFrame, ctx: StepContext | None = None) -> pl.DataFrame:
        reasons, details = [], []
        for row in batch.iter_rows(named=True):
            verdict = self.keep(row)
            if not isinstance(verdict, tuple):
                verdict = (True,) if verdict else (False, self.default_reason)
            kept = bool(verdict[0])
            reasons.append(None if kept else verdict[1])
            details.append(verdict[2] if not kept and len(verdict) > 2 else None)
        return batch.with_columns(pl.Series(DROP, reasons, dtype=pl.String),
                                  pl.Series(DROP_DETAIL, details, dtype=pl.String))


class TableFilter(GlobalStep):
    """Keeps or drops rows with a view of the whole table: override :meth:`keep`.

    ``keep(table, ctx)`` returns a frame with one row per input row: ``reason`` (null keeps
    the row), optionally ``detail``, and any other columns, which are added to the table
    (columns named ``_x`` only to the rejected rows, as ``x``: why a row went).
    """

    def keep(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        raise NotImplementedError

    def process(self, table: pl.DataFrame, ctx: StepContext | None = None) -> pl.DataFrame:
        return self.apply(table, self.keep(table, ctx or StepContext()))

    @staticmethod
    def apply(table: pl.DataFrame, verdicts: pl.DataFrame) -> pl.DataFrame:
        """``table`` with the verdicts' columns; ``reason``/``detail`` become the drop columns."""
        verdicts = verdicts.with_columns(pl.col("reason").cast(pl.String))
        names = {"reason": DROP, "detail": DROP_DETAIL}
        return table.with_columns(verdicts.rename({k: v for k, v in names.items() if k in verdicts.columns})
                                  .get_columns())
