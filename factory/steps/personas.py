"""``personas``: crosses the input rows (topics, tasks...) with personas drawn from a persona set.

Persona-driven generation (Persona Hub, Ge et al., 2024) shapes each prompt with a short
description of a person, so that the data covers many kinds of users; a later step's template
shows the persona as ``{{ persona }}``. Where the personas come from is :mod:`factory.personas`.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from .. import personas as persona_sets
from ..config import option
from ..hashing import fingerprint
from .base import GlobalStep
from .context import StepContext


@dataclass
class PersonasConfig:
    from_: str | dict = option(persona_sets.BUNDLED, help="The persona set: `bundled` (300 people written for the "
                                                          "factory), a .jsonl/.parquet/.csv file with a `persona` "
                                                          "column (relative to the recipe), or a mapping such as "
                                                          "{hub: proj-persona/PersonaHub, config: persona, limit: "
                                                          "10000} or {path: FILE, column: NAME}.")
    per_row: int = option(1, help="Rows made from each input row, each with a different persona.", min=1)
    column: str = option(persona_sets.COLUMN, help="The column the persona goes to.")
    count: int | None = option(None, help="With no input rows (a recipe with no `source:`): how many personas "
                                          "become rows (default: the whole set), a seeded sample.", min=1)


class Personas(GlobalStep):
    """Makes ``per_row`` rows of each input row, each with a different persona, drawn with the recipe's
    seed: the same seed draws the same personas, and each row draws apart from the others. With no
    input rows at all (a recipe without a source) the personas themselves become the rows.

    Requires: nothing (any columns pass through).
    Produces: ``persona`` (or ``column``).

    Example:
        - personas: {from: bundled, per_row: 3}
        - personas: {from: {hub: proj-persona/PersonaHub, config: persona, limit: 5000}, count: 200}
    """

    name = "personas"
    Config = PersonasConfig

    def produces(self):
        return [self.config.column]

    def check(self):
        c = self.config
        return persona_sets.problems_of(c.from_, "from", self.base_dir, {"per_row": c.per_row, "count": c.count})

    def personas(self) -> tuple[str, ...]:
        return persona_sets.load(self.config.from_, self.base_dir, self.label)

    def fingerprint(self) -> str:
        # What the set holds, not only its name: an edited file is another set.
        return fingerprint([super().fingerprint(), persona_sets.digest(self.personas())])

    def process(self, data: pl.DataFrame, ctx: StepContext | None = None) -> pl.DataFrame:
        return cross(data, self.personas(), self.config, self.seed, self.index)


def cross(data: pl.DataFrame, personas: tuple[str, ...], config: PersonasConfig, seed: int,
          index: int) -> pl.DataFrame:
    """``per_row`` copies of each row of ``data``, each with its own persona in ``config.column``
    (row ``i`` draws with ``(seed, index, i)``); with no columns at all, ``count`` personas as rows."""
    column = config.column
    if data.width == 0:  # no source: the personas are the rows
        chosen = persona_sets.shuffled(personas, seed, index)[:config.count or len(personas)]
        return pl.DataFrame({column: chosen}, schema={column: pl.String})
    if data.height == 0:  # an empty table keeps its schema
        return data.with_columns(pl.lit(None, dtype=pl.String).alias(column))
    drawn = [persona_sets.draw(personas, config.per_row, seed, index, i) for i in range(data.height)]
    return data.with_columns(pl.Series(column, drawn, dtype=pl.List(pl.String))).explode(column)
