"""Recipe steps: the registry from recipe keys to step classes."""

from __future__ import annotations

from .base import DROP, Filter, GlobalStep, LLMStep, RowStep, Step


def registry() -> dict[str, type[Step]]:
    """Every step a recipe can name, by its key (filters by their module's name)."""
    from filters.consistency import Consistency
    from filters.decontaminate import Decontaminate
    from filters.exact import ExactDedup
    from filters.heuristics import Heuristics
    from filters.minhash import MinHashFilter
    from filters.score import ScoreFilter

    from .backtranslation import Backtranslate, SelfCurate
    from .evol_instruct import EvolInstruct
    from .grounded import Chunk, GroundedAnswer, GroundedQuestions, Groundedness
    from .judge import Judge
    from .pairwise import Pairwise, PreferencePairs
    from .refine import Feedback, Refine, SelfRefine
    from .self_instruct import SelfInstruct
    from .solve import Solve
    from .verify import Verify

    classes = [
        # experience acquisition: task generators
        SelfInstruct, EvolInstruct, Backtranslate, SelfCurate, Chunk, GroundedQuestions, GroundedAnswer,
        # solving and verifying
        Solve, Verify,
        # judging
        Judge, Pairwise, PreferencePairs, Groundedness,
        # SELF: self-feedback and self-refinement
        Feedback, Refine, SelfRefine,
        # curation filters
        MinHashFilter, ExactDedup, Consistency, ScoreFilter, Heuristics, Decontaminate,
    ]
    return {cls.name: cls for cls in classes}


__all__ = ["DROP", "Filter", "GlobalStep", "LLMStep", "RowStep", "Step", "registry"]
