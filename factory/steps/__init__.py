"""Recipe steps: the registry from recipe keys to step classes."""

from __future__ import annotations

from .base import DROP, Filter, GlobalStep, LLMStep, RowStep, Step


def registry() -> dict[str, type[Step]]:
    """Every step a recipe can name, by its key (filters by their module's name)."""
    from filters.score import ScoreFilter

    from .judge import Judge
    from .self_instruct import SelfInstruct
    from .solve import Solve

    classes = [SelfInstruct, Solve, Judge, ScoreFilter]
    return {cls.name: cls for cls in classes}


__all__ = ["DROP", "Filter", "GlobalStep", "LLMStep", "RowStep", "Step", "registry"]
