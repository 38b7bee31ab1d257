"""SELF (Lu et al., 2023): self-feedback and self-refinement.

``feedback``: the model critiques its own answer in natural language and says whether it
is correct. ``refine``: it rewrites the answer using the feedback. ``self_refine`` repeats
both up to ``max_rounds`` times, or until the feedback says the answer is correct. Rows
keep the prompt, the initial answer, the feedback and the refined answer, so the
meta-skill (critique and revision) can be trained on as well as the final answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from ..config import option
from ..errors import ParseError
from .base import DROP, DROP_DETAIL, RAW_REPLY, InvalidRow, LLMStep, LLMStepConfig, rows_to_frame
from .judge import parse_verdict


def verdict_of(feedback: str) -> str:
    """``correct``, ``incorrect``, or ``unclear`` when the feedback gives no verdict."""
    try:
        return "correct" if parse_verdict(feedback) else "incorrect"
    except ParseError:
        return "unclear"


def _task_input(row: dict, column: str) -> str:
    value = row.get(column)
    return value if isinstance(value, str) else ""


@dataclass
class FeedbackConfig(LLMStepConfig):
    column: str = option("instruction", help="The task text.")
    input_column: str = option("input", help="Optional task input, shown when present.")
    response_column: str = option("response", help="The answer to critique.")
    feedback_column: str = option("feedback", help="Where the critique goes.")
    verdict_column: str = option("verdict", help="Where the verdict goes: correct, incorrect or unclear.")
    max_tokens: int = option(256, help="Most tokens per critique.", min=1)


class Feedback(LLMStep):
    """The model critiques an answer and says whether it is correct (SELF's self-feedback).

    Requires: ``instruction`` and ``response``.
    Produces: ``feedback`` (text) and ``verdict`` (``correct``, ``incorrect``, or ``unclear``
    when the critique ends without one). An empty critique drops the row as ``parse_error``.

    Example:
        - feedback: {}
    """

    name = "feedback"
    Config = FeedbackConfig

    def requires(self):
        return [self.config.column, self.config.response_column]

    def produces(self):
        return [self.config.feedback_column, self.config.verdict_column]

    def build_messages(self, row):
        c = self.config
        return self.messages(self.render(row, task=self.text(row, c.column), task_input=_task_input(row, c.input_column),
                                         response=self.text(row, c.response_column)))

    def parse(self, reply, row):
        text = reply.strip()
        if not text:
            raise ParseError("empty feedback")
        return {self.config.feedback_column: text, self.config.verdict_column: verdict_of(text)}


@dataclass
class RefineConfig(LLMStepConfig):
    column: str = option("instruction", help="The task text.")
    input_column: str = option("input", help="Optional task input, shown when present.")
    response_column: str = option("response", help="The answer to improve.")
    feedback_column: str = option("feedback", help="The feedback to use.")
    output_column: str = option("refined_response", help="Where the improved answer goes.")
    replace_response: bool = option(True, help="Also put the improved answer in `response`, keeping the "
                                               "original in `initial_response`.")
    max_tokens: int = option(512, help="Most tokens per improved answer.", min=1)


class Refine(LLMStep):
    """The model rewrites an answer using feedback on it (SELF's self-refinement).

    Requires: ``instruction``, ``response`` and ``feedback``.
    Produces: ``refined_response``; with ``replace_response`` (default) also the new
    ``response`` and the old one in ``initial_response``.

    Example:
        - feedback: {}
        - refine: {}
    """

    name = "refine"
    Config = RefineConfig

    def requires(self):
        c = self.config
        return [c.column, c.response_column, c.feedback_column]

    def produces(self):
        c = self.config
        return [c.output_column] + (["initial_response"] if c.replace_response else [])

    def build_messages(self, row):
        c = self.config
        return self.messages(self.render(row, task=self.text(row, c.column), task_input=_task_input(row, c.input_column),
                                         response=self.text(row, c.response_column),
                                         feedback=self.text(row, c.feedback_column)))

    def parse(self, reply, row):
        c = self.config
        text = reply.strip()
        if not text:
            raise ParseError("empty refined answer")
        columns = {c.output_column: text}
        if c.replace_response:
            columns[c.response_column] = text
            columns["initial_response"] = row.get("initial_response") or row[c.response_column]
        return columns


@dataclass
class SelfRefineConfig(LLMStepConfig):
    max_rounds: int = option(2, help="Most feedback-and-refine rounds per answer (k).", min=1, max=10)
    stop_when_correct: bool = option(True, help="Stop refining an answer once its feedback says correct.")
    column: str = option("instruction", help="The task text.")
    input_column: str = option("input", help="Optional task input, shown when present.")
    response_column: str = option("response", help="The answer to improve; replaced by the final answer.")
    feedback_template: str | None = option(None, help="Jinja template of the feedback prompt (default: feedback.j2).")
    refine_template: str | None = option(None, help="Jinja template of the refine prompt (default: refine.j2).")
    feedback_max_tokens: int = option(256, help="Most tokens per critique.", min=1)
    max_tokens: int = option(512, help="Most tokens per refined answer.", min=1)

    def validate(self):
        if self.template is not None:
            return [("self_refine has two prompts", "template", "set `feedback_template` and `refine_template`")]
        return []


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

    def check(self):
        return self.feedback.check() + self.refine.check()

    def template_source(self) -> str:
        return self.feedback.template_source() + "\n" + self.refine.template_source()

    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        c = self.config
        self.feedback.llm = self.refine.llm = self.llm
        states, out = [], []
        for row in batch.to_dicts():
            try:
                self.feedback.build_messages(row)
            except InvalidRow as err:
                out.append({**row, DROP: "invalid_input", DROP_DETAIL: str(err)})
                continue
            states.append({"row": row, "answer": row[c.response_column], "history": [], "verdict": None,
                           "rounds": 0, "active": True, "failed": None})
        for _ in range(c.max_rounds):
            active = [s for s in states if s["active"]]
            if not active:
                break
            replies = self.llm.chat([self.feedback.build_messages({**s["row"], c.response_column: s["answer"]})
                                     for s in active], self.feedback.generation_params())
            to_refine = []
            for state, completion in zip(active, replies):
                text = completion.texts[0].strip() if completion.error is None else ""
                if not text:
                    state["active"] = False
                    if not state["history"]:
                        state["failed"] = (completion.error_reason if completion.error else "parse_error",
                                           completion.error or "empty feedback",
                                           completion.texts[0] if completion.texts else "")
                    continue
                state["history"].append(text)
                state["verdict"] = verdict_of(text)
                if state["verdict"] == "correct" and c.stop_when_correct:
                    state["active"] = False
                else:
                    to_refine.append(state)
            if not to_refine:
                continue
            replies = self.llm.chat([self.refine.build_messages({**s["row"], c.response_column: s["answer"],
                                                                 "feedback": s["history"][-1]}) for s in to_refine],
                                    self.refine.generation_params())
            for state, completion in zip(to_refine, replies):
                text = completion.texts[0].strip() if completion.error is None else ""
                if not text:
                    state["active"] = False
                    continue
                state["answer"] = text
                state["rounds"] += 1
        for s in states:
            row = s["row"]
            if s["failed"]:
                reason, detail, raw = s["failed"]
                out.append({**row, DROP: reason, DROP_DETAIL: detail, RAW_REPLY: raw})
                continue
            out.append({**row, "initial_response": row[c.response_column], c.response_column: s["answer"],
                        "feedback": s["history"][-1], "feedback_history": s["history"], "verdict": s["verdict"],
                        "refined_response": s["answer"], "refine_rounds": s["rounds"]})
        return rows_to_frame(out, like=batch)
