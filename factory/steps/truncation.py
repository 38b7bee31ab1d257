"""Replies cut at the token limit: what an LLM step does with them, and what the manifest counts of them.

A step's ``on_truncation`` says what becomes of a reply cut at ``max_tokens`` (or at another
option's limit, such as ``feedback_max_tokens``): ``drop`` its row as ``truncated`` (a step
that reads a verdict keeps one read before the cut), ``keep`` it (marked in a ``truncated``
column), or ``continue`` it (:func:`continuations`; the LLM path asks the model to go on).
The LLM client counts the replies cut per option that set their limit (a request's
``max_tokens_option``, in :attr:`factory.llm.requests.LLMClient.truncation`); :func:`truncation_facts`
turns those counts and the rows kept or dropped into the manifest's ``truncation`` and a hint
that names the option to raise.

The functions here take ``step``, an :class:`~factory.steps.llm_step.LLMStep` (whose
``rows_from_completion`` and ``cut_dropped`` methods call the functions of those names).
"""

from __future__ import annotations

import polars as pl

from ..errors import ParseError
from ..llm.base import Completion
from .drops import CUT, DROP, TRUNCATED, dropped


def continuations(config) -> int:
    """How often a cut reply is asked to go on (``on_truncation: continue``), else 0."""
    return config.max_continuations if config.on_truncation == "continue" else 0


def rows_from_completion(step, row: dict, completion: Completion, parse=None,
                         option: str = "max_tokens") -> list[dict]:
    """The rows one completion gives: one per sample, its parsed columns added; a failed
    request, an unreadable reply or one cut at the token limit (the config's ``option``)
    drops the row with the reason and the raw reply (see ``on_truncation``)."""
    if completion.error is not None:
        return [dropped(row, completion.error_reason, completion.error)]
    parse = parse or step.parse
    keep_cut = step.config.on_truncation == "keep"
    out = []
    for k, reply in enumerate(completion.texts):
        extra = {step.sample_column: k} if step.samples > 1 else {}
        cut = completion.cut(k)
        if cut and not step.reads_verdict and not keep_cut:
            out.append(dropped({**row, **extra}, TRUNCATED, truncation_detail(step, option), reply))
            continue
        try:
            columns = parse(reply, row)
        except ParseError as err:
            out.append(dropped({**row, **extra}, *unparsed(step, err, cut, option=option), reply))
            continue
        if keep_cut:
            extra[TRUNCATED] = cut
        if cut:
            extra[CUT] = True  # counted as kept though cut (the column goes with the kept rows)
        out.append({**row, **columns, **extra})
    return out


def unparsed(step, err: ParseError, cut: bool, limit: int | None = None,
             option: str = "max_tokens") -> tuple[str, str]:
    """The drop reason and detail of a reply whose parse failed (``cut``: it ended at the
    token limit ``limit``, by default the step's own request's). A cut reply fails because it
    was cut -- unless the limit is a cap of the step's own below ``max_tokens`` (a verdict
    asked for in a few tokens): a reply that rambles past it gave no verdict, which no
    max_tokens would change."""
    if not cut:
        return err.reason, str(err)
    limit = step.generation_params().max_tokens if limit is None else limit
    if option == "max_tokens" and limit < step.config.max_tokens:
        return err.reason, f"{err} (the reply ran past the {limit} tokens a verdict gets)"
    return TRUNCATED, f"{truncation_detail(step, option)} ({err})"


def truncation_detail(step, option: str = "max_tokens") -> str:
    """Why a cut reply's row went, and the fix (``option``: the limit that cut it). A JSON reply
    (the step's :attr:`asks_json`) is neither continued nor readable when cut: only the limit helps."""
    return (f"the reply stopped at the token limit ({option}: {getattr(step.config, option)} on {step.label}), "
            f"mid-text; raise {option}" + (" (a JSON reply cannot be continued)" if step.asks_json
                                           else ", or set on_truncation: continue (or keep)"))


def cut_dropped(step, row: dict, completion: Completion, k: int = 0, option: str = "max_tokens") -> dict | None:
    """``row`` dropped as ``truncated`` when reply ``k`` was cut at the token limit (the
    config's ``option``) and the step does not keep cut replies; else None. For steps that
    read replies themselves."""
    if completion.cut(k) and step.config.on_truncation != "keep":
        return dropped(row, TRUNCATED, truncation_detail(step, option), completion.texts[k])
    return None


# -- what the manifest counts ----------------------------------------------------------------

def count_kept_cut(frame: pl.DataFrame) -> int:
    """Rows of a step's output that it kept although their reply was cut (marked ``_cut``)."""
    if CUT not in frame.columns:
        return 0
    kept = frame.filter(pl.col(DROP).is_null()) if DROP in frame.columns else frame
    return int(kept[CUT].fill_null(False).sum())


def note_kept_cut(stats, count: int) -> None:
    """Adds ``count`` kept-though-cut rows to the truncation report of ``stats`` (a step's
    :class:`~factory.driver.StepStats`)."""
    if count:
        stats.report.setdefault("truncation", {})["kept"] = count


def truncation_facts(step, stats) -> dict | None:
    """What the step's replies cut at a token limit came to (None when none was cut), from the
    counts in ``stats.report`` (a :class:`~factory.driver.StepStats`):

    ``cut`` replies of ``replies`` ended at a token limit (``limits``: how many per option that set
    it, such as ``{"max_tokens": 3}``), ``dropped`` of them went as ``truncated``, ``kept`` stayed
    (``on_truncation: keep``, or a score or verdict read before the cut; the others went for
    another reason), ``continued`` continuations were asked for; with a ``hint`` that names the
    option to raise (the one most replies were cut at) when rows were lost."""
    counted = stats.report.pop("truncation", None)
    if not counted or not (counted.get("cut") or counted.get("continued")):
        return None
    c = step.config
    lost = stats.dropped.get(TRUNCATED, 0)
    limits: dict[str, int] = {}
    for name, count in counted.get("limits", {}).items():
        # A batch report cached before limits were counted by option holds the limit's value instead.
        name = name if hasattr(c, name) else "max_tokens"
        limits[name] = limits.get(name, 0) + count
    facts = {"replies": counted.get("replies", 0), "cut": counted["cut"], "dropped": lost,
             "kept": counted.get("kept", 0), "limits": limits,
             "continued": counted.get("continued", 0), "on_truncation": c.on_truncation}
    if lost or (facts["kept"] and c.on_truncation == "keep"):
        name = max(limits, key=limits.get) if limits else "max_tokens"
        facts["hint"] = (f"raise {name} (now {getattr(c, name)}) on {stats.label}"
                         + ("" if c.on_truncation == "continue" else " or set on_truncation: continue"))
    return facts
