"""What a step gets while it runs (:class:`StepContext`: its LLM clients, a progress bar, its report).

Executors build one per batch (or per global step) and send back its :meth:`StepContext.facts`;
:func:`merge_reports` adds up the reports of a step's parts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from ..llm.requests import LLMClient


class Progress(Protocol):
    """The part of a tqdm bar a step may move."""

    def update(self, n: int = 1) -> object: ...

    def reset(self, total: int | None = None) -> object: ...

    def set_postfix_str(self, text: str, refresh: bool = True) -> object: ...


class NoProgress:
    """A progress bar that shows nothing (the default outside the command line)."""

    def update(self, n=1):
        pass

    def reset(self, total=None):
        pass

    def set_postfix_str(self, text, refresh=True):
        pass


@dataclass
class StepContext:
    """What a step gets while it runs.

    Attributes:
        llm: the step's LLM client (LLM steps only); the clients of its other models, if it has
            any, are :attr:`llms`.
        progress: a tqdm-like bar a global step may move.
        report: facts the step wants in the manifest (which eval items matched, clusters...).
    """

    llm: LLMClient | None = None
    progress: Progress = field(default_factory=NoProgress)
    report: dict = field(default_factory=dict)

    @property
    def llms(self) -> dict[str, LLMClient]:
        """The clients of the step's other models (its ``extra_llm_configs``), by name."""
        return self.llm.others if self.llm is not None else {}

    @property
    def complete(self) -> bool:
        """No request of the step failed, to any of its models (its output may be cached as a result)."""
        return self.llm is None or not self.llm.total_usage().failures

    def full_report(self) -> dict:
        """The step's report, with what its LLM clients counted of cut replies (``truncation``)
        when any reply was cut."""
        cut = self.llm.total_truncation() if self.llm is not None else None
        return {**self.report, "truncation": cut} if cut and (cut["cut"] or cut["continued"]) else self.report

    def facts(self) -> dict:
        """The report and the LLM usage (of all the step's models), as an executor sends them back
        to the driver."""
        return {"report": self.full_report(),
                "usage": self.llm.total_usage().to_json() if self.llm is not None else None}


def merge_reports(reports: Iterable[dict]) -> dict:
    """Step reports from parts of the table: numbers add up, lists concatenate, mappings merge."""
    merged: dict = {}
    for report in reports:
        for key, value in report.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[key] = merged.get(key, 0) + value
            elif isinstance(value, list):
                merged[key] = merged.get(key, []) + value
            elif isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = merge_reports([merged[key], value])
            else:
                merged[key] = value
    return merged
