"""``self_refine``: SELF (Lu et al., 2023) -- feedback then refinement, repeated.

The model critiques its own answer and says whether it is correct (``feedback``), then
rewrites it using the critique (``refine``), up to ``max_rounds`` times or until the
critique says the answer is correct. Rows keep the prompt, the initial answer, every
critique and the refined answer, so the meta-skill (critique and revision) can be trained
on as well as the final answer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config import option
from ..llm.base import Request
from .drops import InvalidRow, dropped
from .feedback import Feedback, FeedbackConfig, verdict_of
from .llm_step import AnswerStepConfig, LLMStep
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

    def critiqued(self, completion, cut: dict | None, stop_when_correct: bool) -> bool:
        """Records a critique (``cut``: the row dropped as truncated when the critique was cut
        and cut replies go); whether the answer goes on to be refined."""
        text = reply_text(completion)
        if text and cut is not None:
            self.active = False  # a cut critique says nothing reliable: the first drops the row
            self.failed = self.failed or (cut if not self.history else None)
            return False
        if not text:
            self.active = False
            if not self.history:
                self.failed = dropped(self.row, completion.error_reason if completion.error else "parse_error",
                                      completion.error or "empty feedback", completion.texts[0] if completion.texts
                                      else "")
            return False
        self.history.append(text)
        self.verdict = verdict_of(text)
        self.active = not (self.verdict == "correct" and stop_when_correct)
        return self.active

    def refined(self, completion, cut: dict | None) -> None:
        """Takes a refinement; a failed, empty or cut one (``cut`` set) ends the rounds with
        the answer before it."""
        if cut is None and reply_text(completion):
            self.answer, self.rounds = reply_text(completion), self.rounds + 1
        else:
            self.active = False


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
                      on_truncation=c.on_truncation, max_continuations=c.max_continuations, column=c.column,
                      input_column=c.input_column, response_column=c.response_column)
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
        # The critiques' limit is this step's feedback_max_tokens: their cut replies are counted under that name.
        critique = dataclasses.replace(self.feedback.generation_params(), max_tokens_option="feedback_max_tokens")
        for _ in range(c.max_rounds):
            active = [s for s in states if s.active]
            if not active:
                break
            critiques = yield [Request(self.feedback.build_messages({**s.row, c.response_column: s.answer}), critique)
                               for s in active]
            to_refine = [s for s, done in zip(active, critiques)
                         if s.critiqued(done, self.cut_dropped(s.row, done, option="feedback_max_tokens"),
                                        c.stop_when_correct)]
            answers = yield [Request(self.refine.build_messages({**s.row, c.response_column: s.answer,
                                                                 "feedback": s.history[-1]}),
                                     self.refine.generation_params()) for s in to_refine]
            for state, done in zip(to_refine, answers):
                state.refined(done, self.cut_dropped(state.row, done))
        return out + [s.failed or self.final_row(s) for s in states]

    def final_row(self, state: Refinement) -> dict:
        return {**state.row, "initial_response": state.row[self.config.response_column],
                self.config.response_column: state.answer, "feedback": state.history[-1],
                "feedback_history": state.history, "verdict": state.verdict, "refined_response": state.answer,
                "refine_rounds": state.rounds}
