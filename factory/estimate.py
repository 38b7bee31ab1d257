"""What a recipe will cost before it runs: ``factory estimate RECIPE [--limit N]``.

The recipe runs on the first N rows of its source, as a preview does (its replies cached, so
the run afterwards pays nothing for them), and each step's figures are extrapolated to the
whole source:

* rows into a step: the source's rows times the share of rows every step before it kept
  (its measured acceptance; a 90% Wilson interval gives the range);
* requests: rows in times the requests per row the step made;
* tokens in and out: requests times the mean tokens per request, the range from the spread
  between requests (a 90% interval of the mean); cached replies count with the tokens they
  took when they were made, so a second estimate gives the same figures;
* cost: tokens at ``prices:`` (a Batch API's share when ``llm.batch``);
* time: the preview's seconds scaled by requests -- in waves of ``max_concurrency`` on a server,
  bounded below by the rate limits it stated -- from the first estimate whose requests were
  really sent (kept in the cache), or unknown.

A generator with a fixed size (``num_tasks``) makes the same requests whatever the source.
With ``output.rows`` the source rows are those the run would read to make them.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .cache import Cache, NullCache
from .hashing import fingerprint
from .manifest import cost_usd

Z90 = 1.645  # two-sided 90%


class _RepliesOnly(Cache):
    """The run's cache without its finished batches: steps run again, their replies come from the cache."""

    def get_frame(self, namespace, key):
        return None if namespace == "steps" else super().get_frame(namespace, key)


@dataclass
class Range:
    value: float
    low: float
    high: float

    def scaled(self, by: "Range") -> "Range":
        return Range(self.value * by.value, self.low * by.low, self.high * by.high)

    def times(self, factor: float) -> "Range":
        return Range(self.value * factor, self.low * factor, self.high * factor)

    def plus(self, other: "Range") -> "Range":
        return Range(self.value + other.value, self.low + other.low, self.high + other.high)


def wilson(kept: int, total: int, units: int | None = None) -> Range:
    """The share kept, with its 90% Wilson interval (a step that makes several rows of one: as measured).
    ``units``: the independent draws behind ``total`` (several samples of one task are not independent)."""
    if total <= 0:
        return Range(1.0, 1.0, 1.0)
    share = kept / total
    if share > 1:
        return Range(share, share, share)
    total = min(total, units) if units else total
    z2 = Z90 * Z90
    centre = (share + z2 / (2 * total)) / (1 + z2 / total)
    half = Z90 * math.sqrt(share * (1 - share) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return Range(share, max(0.0, centre - half), min(1.0, centre + half))


def mean_range(values: list[float]) -> Range:
    """The mean of ``values`` with a 90% interval from their spread."""
    if not values:
        return Range(0.0, 0.0, 0.0)
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Range(mean, mean, mean)
    half = Z90 * statistics.stdev(values) / math.sqrt(len(values))
    return Range(mean, max(0.0, mean - half), mean + half)


def estimate_recipe(recipe, driver, limit: int) -> dict:
    """Runs ``recipe`` on its first ``limit`` source rows and extrapolates to the whole source."""
    ledger: dict[int, list] = {}
    driver.ledger = ledger
    cache = driver.cache
    if isinstance(cache, Cache) and not isinstance(cache, NullCache):
        # Every batch is computed again (its replies from the reply cache, for nothing): what its
        # requests took is known even when an earlier estimate or run made them.
        driver.cache = _RepliesOnly(cache.root)
    driver.preflight(recipe)
    try:
        result = driver.run(recipe, limit=limit)
    finally:
        driver.ledger, driver.cache = None, cache
    source_rows, how = _source_rows(recipe, driver.cache)
    timings_key = fingerprint(["estimate", recipe.hash, limit])
    timings = driver.cache.get_json("estimates", timings_key) or {}
    steps, measured = [], {}
    keep = Range(1.0, 1.0, 1.0)  # the share of source rows that reach the step
    for stats in result.steps:
        step = next(s for s in recipe.steps if s.index == stats.index)
        acceptance = wilson(stats.rows_out, stats.rows_in, result.source_rows)
        entry = {"index": stats.index, "name": stats.name, "kind": stats.kind,
                 "acceptance": acceptance, "preview_rows_in": stats.rows_in}
        fixed = stats.kind == "global" and hasattr(step.config, "num_tasks")
        if stats.llm is not None:
            replies = ledger.get(stats.index, [])
            per_row = len(replies) / max(stats.rows_in, 1)
            rows_in = Range(stats.rows_in, stats.rows_in, stats.rows_in) if fixed else keep.times(source_rows)
            requests = rows_in.times(per_row)
            tokens_in = requests.scaled(mean_range([r[0] for r in replies]))
            tokens_out = requests.scaled(mean_range([r[1] for r in replies]))
            entry.update(rows_in=rows_in, requests=requests, tokens_in=tokens_in, tokens_out=tokens_out,
                         fixed=fixed, model=stats.llm.get("model"), batch=bool(stats.llm.get("batch")))
            price = recipe.prices.get(str(stats.llm.get("model")))
            if price is not None:
                entry["cost"] = Range(*(cost_usd(i, o, price, entry["batch"]) for i, o in
                                        ((tokens_in.value, tokens_out.value), (tokens_in.low, tokens_out.low),
                                         (tokens_in.high, tokens_out.high))))
            sent = stats.llm.get("conversations", 0) - stats.llm.get("cached_conversations", 0)
            if sent and stats.seconds > 0:
                measured[str(stats.index)] = {"seconds": stats.seconds, "sent": sent}
            timing = measured.get(str(stats.index)) or timings.get(str(stats.index))
            entry["seconds"] = _seconds(timing, requests.value, stats.llm, step) if timing else None
        else:
            entry.update(rows_in=keep.times(source_rows))
        steps.append(entry)
        if not fixed:
            keep = keep.scaled(acceptance)
    if measured:
        driver.cache.put_json("estimates", timings_key, {**timings, **measured})
    if recipe.output.rows is not None and keep.value > 0:
        wanted = recipe.output.rows / keep.value
        how += f"; output.rows {recipe.output.rows} needs about {wanted:.0f} of them at this acceptance"
    return {"name": recipe.name, "limit": limit, "preview_rows": result.source_rows, "source_rows": source_rows,
            "source": how, "steps": steps, "rows_out": keep.times(source_rows),
            "priced": bool(recipe.prices)}


def _seconds(timing: dict, requests: float, llm: dict, step) -> float | str:
    """The step's time for ``requests``, from the preview's: in waves of max_concurrency on a server,
    no faster than the limits it stated; linear elsewhere; a Batch API within its window."""
    config = step.llm_config
    if getattr(config, "batch", False):
        return f"within {config.batch_window}"
    seconds, sent = timing["seconds"], timing["sent"]
    concurrency = getattr(config, "max_concurrency", None)
    if llm.get("backend") != "openai" or not concurrency:
        return seconds * requests / sent
    waves = seconds * math.ceil(requests / concurrency) / math.ceil(sent / concurrency)
    limits = llm.get("rate_limits") or {}
    paced = (limits.get("requests") or {}).get("per_minute")
    return max(waves, requests / (paced / 60) if paced else 0.0)


def _source_rows(recipe, cache) -> tuple[int, str]:
    """The rows the whole run reads from the source, and how that was learned."""
    source = recipe.source
    if source is None:
        return 1, "the recipe has no source"
    if source.generator_config is not None and hasattr(source.generator_config, "num_rows"):
        rows = source.generator_config.num_rows
        rows = min(rows, source.config.limit) if source.config.limit else rows
        return rows, f"generator {source.config.generator} makes {rows}"
    if source.hub_ref is not None:
        splits = source.hub.builder().info.splits or {}
        split = splits.get(source.hub_ref.split) if hasattr(splits, "get") else None
        if split is not None and split.num_examples:
            rows = min(split.num_examples, source.config.limit or split.num_examples)
            return rows, f"{source.name()} has {split.num_examples}"
        return 0, f"{source.name()} does not say how many rows it has"
    rows = source.read(cache).height
    name = source.name()
    try:
        name = str(Path(name).relative_to(Path.cwd()))
    except ValueError:
        pass
    return rows, f"{name} has {rows}"


def _number(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.1f}M"
    if value >= 1e4:
        return f"{value / 1e3:.0f}k"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def _span(r: Range, fmt=_number) -> str:
    if fmt(r.low) == fmt(r.high):
        return fmt(r.value)
    return f"{fmt(r.value)} ({fmt(r.low)}-{fmt(r.high)})"


def _usd(value: float) -> str:
    return f"${value:.2f}" if value >= 1 else f"${value:.4f}"


def _duration(seconds: float | str | None) -> str:
    if seconds is None:
        return "unknown"
    if isinstance(seconds, str):
        return seconds
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_estimate(info: dict) -> str:
    """What ``factory estimate`` prints: per step rows, requests, tokens, cost and time, with ranges."""
    lines = [f"estimate for {info['name']}: {info['source_rows']} source rows ({info['source']}), extrapolated from "
             f"the first {info['preview_rows']} (--limit {info['limit']})"]
    header = ["step", "rows in", "requests", "tokens in", "tokens out"] + (["cost (USD)"] if info["priced"] else []) \
        + ["time"]
    table = []
    totals = {name: Range(0.0, 0.0, 0.0) for name in ("requests", "tokens_in", "tokens_out", "cost")}
    seconds, unknown = 0.0, False
    for s in info["steps"]:
        label = f"[{s['index']}] {s['name']}"
        if "requests" not in s:
            table.append([label, _span(s["rows_in"]), "-", "-", "-"] + (["-"] if info["priced"] else []) + ["-"])
            continue
        for name in ("requests", "tokens_in", "tokens_out"):
            totals[name] = totals[name].plus(s[name])
        cost = s.get("cost")
        if cost is not None:
            totals["cost"] = totals["cost"].plus(cost)
        if isinstance(s["seconds"], (int, float)):
            seconds += s["seconds"]
        else:
            unknown = True
        row = [label + (" (fixed size)" if s["fixed"] else ""), _span(s["rows_in"]), _span(s["requests"]),
               _span(s["tokens_in"]), _span(s["tokens_out"])]
        if info["priced"]:
            row.append(_span(cost, _usd) if cost is not None else "no price")
        row.append(_duration(s["seconds"]))
        table.append(row)
    total = ["total", "", _span(totals["requests"]), _span(totals["tokens_in"]), _span(totals["tokens_out"])]
    if info["priced"]:
        total.append(_span(totals["cost"], _usd))
    total.append(_duration(seconds) + (" + unknown" if unknown and seconds else "") if seconds or not unknown
                 else "unknown")
    table.append(total)
    widths = [max(len(str(row[i])) for row in [header] + table) for i in range(len(header))]
    for row in [header] + table:
        lines.append("  " + "  ".join(str(cell).ljust(width) if i == 0 else str(cell).rjust(width)
                                      for i, (cell, width) in enumerate(zip(row, widths))))
    lines.append(f"  rows written: {_span(info['rows_out'])}")
    lines.append("  ranges: 90% intervals from the spread between the preview's requests and each step's acceptance"
                 + ("; time unknown where every reply came from the cache and no earlier estimate measured it"
                    if unknown else ""))
    lines.append(f"the preview's replies are cached: `factory run` pays nothing for its first {info['preview_rows']} "
                 "rows")
    return "\n".join(lines)
