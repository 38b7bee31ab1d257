"""Recipe keys and the step classes behind them: one hop from a key to its file.

Each key names the module its class lives in, and that module is named after the key
(``solve`` -> ``factory/steps/solve.py``; a family shares a package:
``grounded_answer`` -> ``factory/steps/grounded/grounded_answer.py``; filters live in
``filters/<key>.py``). Modules are imported when a recipe uses their key, so validating a
recipe loads only what it needs. This module sits above ``factory.steps`` and
``filters``; neither imports it.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from .steps.base import Step

STEPS: dict[str, str] = {
    # experience acquisition: task generators
    "self_instruct": "factory.steps.self_instruct:SelfInstruct",
    "evol_instruct": "factory.steps.evol_instruct:EvolInstruct",
    "backtranslate": "factory.steps.backtranslation.backtranslate:Backtranslate",
    "self_curate": "factory.steps.backtranslation.self_curate:SelfCurate",
    "chunk": "factory.steps.grounded.chunk:Chunk",
    "grounded_questions": "factory.steps.grounded.grounded_questions:GroundedQuestions",
    "grounded_answer": "factory.steps.grounded.grounded_answer:GroundedAnswer",
    "magpie": "factory.steps.magpie:Magpie",
    "personas": "factory.steps.personas:Personas",
    "tool_queries": "factory.steps.tool_queries:ToolQueries",
    # your own prompt (text or typed columns)
    "generate": "factory.steps.generate:Generate",
    # distilabel's task library (optional extra: dataset-factory[distilabel])
    "distilabel": "factory.steps.distilabel.distilabel:Distilabel",
    # solving and verifying
    "solve": "factory.steps.solve:Solve",
    "conversation": "factory.steps.conversation:Conversation",
    "tool_calls": "factory.steps.tool_calls:ToolCalls",
    "verify": "factory.steps.verify:Verify",
    "reward_model": "factory.steps.reward_model:RewardModel",
    # judging
    "judge": "factory.steps.judge:Judge",
    "pairwise": "factory.steps.pairwise:Pairwise",
    "preference_pairs": "factory.steps.preference_pairs:PreferencePairs",
    "groundedness": "factory.steps.grounded.groundedness:Groundedness",
    # SELF: self-feedback and self-refinement
    "feedback": "factory.steps.feedback:Feedback",
    "refine": "factory.steps.refine:Refine",
    "self_refine": "factory.steps.self_refine:SelfRefine",
    # curation filters
    "minhash": "filters.minhash:MinHashFilter",
    "exact": "filters.exact:ExactDedup",
    "consistency": "filters.consistency:Consistency",
    "score": "filters.score:ScoreFilter",
    "select": "filters.select:Select",
    "heuristics": "filters.heuristics:Heuristics",
    "decontaminate": "filters.decontaminate:Decontaminate",
}


def step_class(key: str) -> type[Step]:
    """The class of recipe key ``key`` (a key of :data:`STEPS`)."""
    module, _, name = STEPS[key].partition(":")
    return getattr(importlib.import_module(module), name)


def registry() -> dict[str, type[Step]]:
    """Every step a recipe can name, by its key."""
    return {key: step_class(key) for key in STEPS}


def source_file(key: str) -> Path:
    """The file that holds the step of recipe key ``key``."""
    return Path(inspect.getsourcefile(step_class(key)))
