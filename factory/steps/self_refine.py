"""``self_refine``: SELF (Lu et al., 2023) -- feedback then refinement, repeated.

The model critiques its own answer and says whether it is correct (``feedback``), then
rewrites it using the critique (``refine``), up to ``max_rounds`` times or until the
critique says the answer is correct. Rows keep the prompt, the initial answer, every
critique and the refined answer, so the meta-skill (critique and revision) can be trained
on as well as the final answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import option
from ..llm.base import Request
from .base import AnswerStepConfig, InvalidRow, LLMStep, dropped
from .feedback import Feedback, FeedbackConfig, verdict_of
from .refine import Refine, RefineConfig


@dataclass
class SelfRefineConfig(AnswerStepConfig):
    max_rounds: int = option(2, help="Most feedback-and-refine rounds per answer (k).", min=1, max=10)
    stop_when_correct: bool = option(True, help="Stop refining an answer once its feedback says correct.")
    response_column: str = option("response", help="The answer to improve; replaced by the final answer.")
    feedback_template: str | None = option(None, help="Jinja template of the feedback prompt (default: feedback.j2).")
    refine_template: str | None = option(None, help="Jinja template of the refine prompt (default: refine.j2).")
    feedback_max_tokens: int = option(256, help="Most tokens per critique.", min=1)
    max_tokens: int = option(512, help="Most tokens per refined answer.", min=1)

    def validate(self):
        if self.template is not None:
            return [("self_refine has two prompts", "template", "set `feedback_template` and `refine_template`")]
        return []


@dataclass
class Refinement:
    """One answer on its way through the rounds."""

    row: dict
    answer: str
    history: list[str] = field(default_factory=list)
    verdict: str | None = None
    rounds: int = 0
    active: bool = True
    failed: dict | None = None  # the row as dropped, when its first critique failed


def reply_text(completion) -> str:
    return completion.texts[0].strip() if completion.error is None else ""


class SelfRefine(LLMStep):
    """Feedback then refinement, repeated up to ``max_rounds`` times or until judged correct.

    Requires: ``instruction`` and ``response``.
    Produces: ``initial_response``, ``feedback`` (the last critique), ``feedback_history``
    (every critique), ``verdict`` (the last one), ``refined_response`` and ``response`` (the
    final answer), ``refine_rounds`` (refinements made). A first critique that is empty
    drops the row as ``parse_error``; a later failure ends the loop with the answer so far.

    Example:
        - self_refine: {max_rounds: 2}
    """

    name = "self_refine"
    Config = SelfRefineConfig
    templates = {"feedback_template": "feedback", "refine_template": "refine"}

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        c = config
        common = dict(llm=c.llm, temperature=c.temperature, top_p=c.top_p, stop=c.stop, system=c.system,
                      column=c.column, input_column=c.input_column, response_column=c.response_column)
        self.feedback = Feedback(FeedbackConfig(**common, template=c.feedback_template,
                                                max_tokens=c.feedback_max_tokens), **kwargs)
        self.refine = Refine(RefineConfig(**common, template=c.refine_template, max_tokens=c.max_tokens,
                                          replace_response=False), **kwargs)

    def requires(self):
        return [self.config.column, self.config.response_column]

    def produces(self):
        return ["initial_response", "feedback", "feedback_history", "verdict", "refined_response", "refine_rounds"]

    def exchange(self, rows, ctx):
        c = self.config
        states, out = [], []
        for row in rows:
            try:
                self.feedback.build_messages(row)
                states.append(Refinement(row, row[c.response_column]))
            except InvalidRow as err:
                out.append(dropped(row, "invalid_input", str(err)))
        for _ in range(c.max_rounds):
            active = [s for s in states if s.active]
            if not active:
                break
            critiques = yield [Request(self.feedback.build_messages({**s.row, c.response_column: s.answer}),
                                       self.feedback.generation_params()) for s in active]
            to_refine = [s for s, completion in zip(active, critiques) if self.critiqued(s, completion)]
            answers = yield [Request(self.refine.build_messages({**s.row, c.response_column: s.answer,
                                                                 "feedback": s.history[-1]}),
                                     self.refine.generation_params()) for s in to_refine]
            for state, completion in zip(to_refine, answers):
                if reply_text(completion):
                    state.answer, state.rounds = reply_text(completion), state.rounds + 1
                else:
                    state.active = False
        return out + [s.failed or self.final_row(s) for s in states]

    def critiqued(self, state: Refinement, completion) -> bool:
        """Records a critique; whether the answer goes on to be refined."""
        text = reply_text(completion)
        if not text:
            state.active = False
            if not state.history:
                state.failed = dropped(state.row, completion.error_reason if completion.error else "parse_error",
                                       completion.error or "empty feedback",
                                       completion.texts[0] if completion.texts else "")
            return False
        state.history.append(text)
        state.verdict = verdict_of(text)
        state.active = not (state.verdict == "correct" and self.config.stop_when_correct)
        return state.active

    def final_row(self, state: Refinement) -> dict:
        return {**state.row, "initial_response": state.row[self.config.response_column],
                self.config.response_column: state.answer, "feedback": state.history[-1],
                "feedback_history": state.history, "verdict": state.verdict, "refined_response": state.answer,
                "refine_rounds": state.rounds}
