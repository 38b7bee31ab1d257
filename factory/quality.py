"""A version's quality section: how diverse and how clean its kept rows are, as the manifest records it.

:func:`quality_section` is computed once, when a version is written (from the final table, the
run's step entries, the resolved recipe and the LLM usage); the card, ``factory inspect`` and
``factory diff`` only read it back (:func:`quality_tables`, :func:`quality_figures`). A version
written before the section existed simply has none.

What the instructions and responses are: with a ``messages`` column (a list of ``{role,
content}``), every user turn is an instruction and every assistant turn a response; else the
``instruction`` and ``response`` columns. Duplicates are counted per row: a row's instruction
is its user turns joined by newlines, its instruction+response all its user and assistant turns.

Everything read from the table is computed over at most ``SAMPLE_ROWS`` rows, a seeded sample
kept in table order, so the section stays cheap next to the run however big the version is.
"""

from __future__ import annotations

import numpy as np
import polars as pl

SAMPLE_ROWS = 20_000  # rows the figures are computed over, at most
SAMPLE_SEED = 0
NGRAMS = (1, 2, 3)  # distinct-n for these n
OPENING_WORDS = 3
TOP_OPENINGS = 5
NEAR_THRESHOLD = 0.8  # the minhash filter's default, stated here to say it in the card
HISTOGRAM_VALUES = 20  # a score column with more distinct values is binned
HISTOGRAM_BINS = 10
_FOLD = np.uint64(0x9E3779B97F4A7C15)  # odd: folding hashes with it keeps the earlier ones' bits
WORD = r"\w+"  # what text.normalize keeps of a lowercased text, as words: its n-gram tokens


def quality_section(table: pl.DataFrame, steps: list[dict], recipe: dict | None = None, usage: dict | None = None,
                    *, source_dropped: dict | None = None, sample_rows: int = SAMPLE_ROWS,
                    seed: int = SAMPLE_SEED) -> dict:
    """The quality section of a version's manifest.

    Args:
        table: the kept rows, as written.
        steps: the manifest's step entries (``label``, ``index``, ``name``, ``dropped``, ``report``).
        recipe: the resolved recipe (which steps judged, scored and decontaminated, and their columns).
        usage: the manifest's ``usage`` (per model: tokens, requests, ``cost_usd`` when priced).
        source_dropped: rows set aside while reading the source, per reason.
        sample_rows: the most rows the table's figures are computed over.
        seed: the sample's seed.
    """
    recipe = recipe or {}
    section: dict = {"rows": row_counts(table.height, steps, source_dropped)}
    sample = sampled(table, sample_rows, seed)
    if sample.height < table.height:
        section["sample"] = {"rows": sample.height, "of": table.height, "seed": seed}
    texts = text_parts(sample)
    section["text"] = texts["describe"]
    if sample.height and texts["describe"]["from"] is not None:
        section["diversity"] = {part: diversity(texts[part]) for part in ("instructions", "responses")
                                if texts[part] is not None}
        if texts["instructions"] is not None:
            section["openings"] = openings(texts["instructions"])
        section["duplicates"] = {part: duplicates(texts[key]) for part, key in
                                 (("instructions", "row_instruction"), ("instruction_response", "row_pair"))
                                 if texts[key] is not None}
        section["duplicates"]["near_threshold"] = NEAR_THRESHOLD
    section["contamination"] = contamination(recipe, steps)
    scores = {column: score_spread(sample[column]) for column in score_columns(recipe)
              if column in sample.columns and sample.height}
    if scores := {k: v for k, v in scores.items() if v}:
        section["scores"] = scores
    if usage:
        section["usage"] = usage_totals(usage)
    return section


def sampled(table: pl.DataFrame, rows: int, seed: int) -> pl.DataFrame:
    """At most ``rows`` rows of ``table``, drawn with ``seed``, in table order (so "an earlier
    row" means the same as in the version)."""
    if table.height <= rows:
        return table
    picked = np.sort(np.random.default_rng(seed).choice(table.height, size=rows, replace=False))
    return table[picked]


def row_counts(kept: int, steps: list[dict], source_dropped: dict | None = None) -> dict:
    """Rows kept and dropped, with the drops per ``step label: reason`` (``source: reason`` while reading)."""
    reasons = {f"source: {reason}": n for reason, n in (source_dropped or {}).items() if n}
    for s in steps:
        label = s.get("label") or f"steps[{s.get('index')}].{s.get('name')}"
        reasons.update({f"{label}: {reason}": n for reason, n in (s.get("dropped") or {}).items() if n})
    return {"kept": kept, "dropped": sum(reasons.values()), "dropped_by": reasons}


def text_parts(table: pl.DataFrame) -> dict:
    """The instruction texts, response texts, and per row its instruction and its instruction+response
    (each a String Series, or None where the table has no such text), and how they were found."""
    none = {"instructions": None, "responses": None, "row_instruction": None, "row_pair": None}
    if "messages" in table.columns and is_chat(table.schema["messages"]):
        turns = (table.select(pl.col("messages")).with_row_index("_row").explode("messages")
                 .select("_row", pl.col("messages").struct.field("role").alias("role"),
                         pl.col("messages").struct.field("content").cast(pl.String).alias("content"))
                 .filter(pl.col("content").is_not_null() & (pl.col("content") != "")))  # a turn of tool calls only
        rows = pl.DataFrame({"_row": np.arange(table.height, dtype=np.uint32)})

        def joined(roles: list[str]) -> pl.Series:
            per_row = (turns.filter(pl.col("role").is_in(roles)).group_by("_row", maintain_order=True)
                       .agg(pl.col("content").str.join("\n")))
            return rows.join(per_row, on="_row", how="left", maintain_order="left")["content"]

        users = turns.filter(pl.col("role") == "user")
        return {"instructions": users["content"], "responses": turns.filter(pl.col("role") == "assistant")["content"],
                "row_instruction": joined(["user"]), "row_pair": joined(["user", "assistant"]),
                "describe": {"from": "messages", "mean_turns": round(len(users) / table.height, 2)
                             if table.height else None}}
    present = [c for c in ("instruction", "response") if c in table.columns and table.schema[c] in (pl.String, pl.Null)]
    if not present:
        return {**none, "describe": {"from": None}}
    column = {c: table[c].cast(pl.String) for c in present}
    pair = (table.select(pl.concat_str([pl.col(c).cast(pl.String) for c in present], separator="\n",
                                       ignore_nulls=True).alias("pair"))["pair"] if len(present) == 2 else None)
    return {"instructions": column.get("instruction"), "responses": column.get("response"),
            "row_instruction": column.get("instruction"), "row_pair": pair, "describe": {"from": present}}


def is_chat(dtype) -> bool:
    """A list of structs with ``role`` and text ``content``."""
    inner = getattr(dtype, "inner", None)
    fields = {f.name: f.dtype for f in inner.fields} if isinstance(dtype, pl.List) and isinstance(inner, pl.Struct) \
        else {}
    return "role" in fields and fields.get("content") in (pl.String, pl.Null)


def words_of(texts: pl.Series) -> pl.Series:
    """Lowercased word tokens of each text: ``text.normalize(t).split()``, vectorised."""
    return texts.str.to_lowercase().str.extract_all(WORD)


def normalized(texts: pl.Series) -> pl.Series:
    """``text.normalize`` of each text, vectorised: its lowercased words, one space apart."""
    return texts.str.to_lowercase().str.replace_all(r"\W+", " ").str.strip_chars(" ")


def diversity(texts: pl.Series) -> dict:
    """Distinct-n (distinct n-grams over all n-grams, across the texts) and the spread of
    lengths in whitespace-separated words (``text.count_words``), of the non-null texts."""
    texts = texts.drop_nulls()
    out: dict = {"texts": len(texts)}
    if not len(texts):
        return out
    tokens = (pl.DataFrame({"tokens": words_of(texts)}).with_row_index("row").explode("tokens")
              .drop_nulls("tokens"))
    # Each n-gram as a 64-bit hash of its words' hashes (collisions: about one in 10^6 at 5 million
    # n-grams): counting distinct integers is several times faster than counting joined strings.
    word_hash, row = tokens["tokens"].hash(seed=0).to_numpy(), tokens["row"].to_numpy()
    for n in NGRAMS:
        count = max(len(word_hash) - n + 1, 0)
        gram = word_hash[:count].copy()
        for k in range(1, n):
            gram = gram * _FOLD + word_hash[k:k + count]
        grams = gram[row[:count] == row[n - 1:n - 1 + count]]  # the n words are of one text
        out[f"distinct_{n}"] = round(pl.Series(grams).n_unique() / len(grams), 4) if len(grams) else None
    lengths = texts.str.count_matches(r"\S+").to_numpy()
    p10, median, p90 = np.percentile(lengths, [10, 50, 90])
    out["words"] = {"min": int(lengths.min()), "p10": round(float(p10), 1), "median": round(float(median), 1),
                    "p90": round(float(p90), 1), "max": int(lengths.max()), "mean": round(float(lengths.mean()), 1)}
    return out


def openings(texts: pl.Series) -> dict:
    """The share of instructions whose first three words (lowercased word tokens) open another
    instruction too, and the most common openings. A text of fewer than three words has no opening."""
    texts = texts.drop_nulls()
    tokens = words_of(texts)
    first = tokens.filter(tokens.list.len() >= OPENING_WORDS).list.head(OPENING_WORDS).list.join(" ")
    counts = first.value_counts(name="count").sort(["count", first.name], descending=[True, False])
    shared = int(counts.filter(pl.col("count") > 1)["count"].sum())
    share = round(shared / len(texts), 4) if len(texts) else None
    return {"texts": len(texts), "shared": shared, "shared_share": share,
            "top": [{"opening": o, "count": c} for o, c in counts.head(TOP_OPENINGS).iter_rows()]}


def duplicates(texts: pl.Series) -> dict:
    """Rows left that repeat an earlier row: exactly, after ``text.normalize``, and nearly (MinHash as
    the ``minhash`` filter's defaults run it: what it would still drop). Null and empty texts are
    never duplicates. The near count simplifies text the filter's way (numbers become 0, punctuation
    is deleted), so an exact duplicate is almost always a near one too, but not always: "2+2" and
    "2 + 2" are the same words to ``normalize`` and different ones to the filter."""
    keys = normalized(texts.cast(pl.String))
    keys = keys.filter(keys.is_not_null() & (keys != ""))
    return {"rows": len(texts), "exact": len(keys) - keys.n_unique(), "near": near_duplicate_rows(texts)}


def near_duplicate_rows(texts: pl.Series) -> int:
    """How many rows the ``minhash`` filter with its defaults (Jaccard 0.8, 128 permutations, word
    3-gram shingles, verified pairs) would drop as near-duplicates of an earlier row."""
    from filters.minhash import MinHashConfig, band_layout, lsh_band_keys, near_duplicates, signatures_of

    config = MinHashConfig()
    texts = texts.cast(pl.String)
    bands, per_band = band_layout(config)
    keys = np.empty((len(texts), bands), dtype=np.uint64)
    has_shingles = np.zeros(len(texts), dtype=bool)
    for rows, chunk, counts in signatures_of(texts, config, then=lambda s: lsh_band_keys(s, bands, per_band)):
        keys[rows], has_shingles[rows] = chunk, counts > 0
    first, _, _ = near_duplicates(texts, [(keys, has_shingles)], config)
    return int(np.count_nonzero(first != np.arange(len(texts))))


def contamination(recipe: dict, steps: list[dict]) -> dict:
    """Each ``decontaminate`` step: its eval set, the columns checked, eval items matched and rows dropped."""
    checks = []
    for i, step in enumerate(recipe.get("steps") or []):
        params = step.get("decontaminate") if isinstance(step, dict) else None
        if params is None:
            continue
        stats = next((s for s in steps if s.get("index") == i), {})
        report = stats.get("report") or {}
        checks.append({"step": stats.get("label") or f"steps[{i}].decontaminate", "eval": params.get("eval"),
                       "columns": params.get("columns"), "eval_items": report.get("eval_items"),
                       "eval_items_matched": report.get("eval_items_matched"),
                       "dropped": (stats.get("dropped") or {}).get("contaminated", 0)})
    return {"checked": bool(checks), "checks": checks}


def score_columns(recipe: dict) -> list[str]:
    """Columns a judge or reward model wrote scores into, or a score filter read, in recipe order."""
    found: list[str] = []
    for step in recipe.get("steps") or []:
        if not isinstance(step, dict) or len(step) != 1:
            continue
        name, params = next(iter(step.items()))
        params = params or {}
        if name == "judge" and params.get("mode", "score") == "score":
            found.append(params.get("output_column", "score"))
        elif name == "reward_model":
            found.append(params.get("output_column", "reward"))
        elif name == "score":
            found.append(params.get("column", "score"))
    return list(dict.fromkeys(found))


def score_spread(values: pl.Series) -> dict | None:
    """Count, mean, population std, min, max and a histogram (by value; in equal-width bins past
    ``HISTOGRAM_VALUES`` distinct values) of a numeric column's values (None when it holds none)."""
    if not (values.dtype.is_numeric() or values.dtype == pl.String):
        return None
    numbers = values.cast(pl.Float64, strict=False).drop_nulls().drop_nans().to_numpy()
    if not len(numbers):
        return None
    distinct, counts = np.unique(numbers, return_counts=True)
    if len(distinct) <= HISTOGRAM_VALUES:
        histogram = {f"{v:g}": int(c) for v, c in zip(distinct, counts)}
    else:
        counts, edges = np.histogram(numbers, bins=HISTOGRAM_BINS)
        histogram = {f"{lo:.3g}..{hi:.3g}": int(c) for lo, hi, c in zip(edges, edges[1:], counts)}
    return {"count": len(numbers), "mean": round(float(numbers.mean()), 4), "std": round(float(numbers.std()), 4),
            "min": float(numbers.min()), "max": float(numbers.max()), "histogram": histogram}


def usage_totals(usage: dict) -> dict:
    """Tokens, requests and cost summed over the models of the manifest's ``usage``."""
    total = {name: sum(u.get(name, 0) for u in usage.values())
             for name in ("prompt_tokens", "completion_tokens", "conversations", "cached_conversations")}
    if any("cost_usd" in u for u in usage.values()):
        total["cost_usd"] = round(sum(u.get("cost_usd", 0.0) for u in usage.values()), 6)
    return total


# -- reading it back: the card, `factory inspect`, `factory diff` --------------------------------

def summary_lines(section: dict) -> list[str]:
    """The section's one-line facts: sample, rows and drops, where the text came from, contamination, usage."""
    rows = section["rows"]
    lines = []
    if sample := section.get("sample"):
        lines.append(f"Figures over a sample of {sample['rows']:,} of {sample['of']:,} rows (seed {sample['seed']}).")
    drops = ", ".join(f"{reason} {n}" for reason, n in rows["dropped_by"].items())
    lines.append(f"Rows: {rows['kept']} kept, {rows['dropped']} dropped" + (f" ({drops})." if drops else "."))
    text = section.get("text") or {}
    if text.get("from") == "messages":
        lines.append(f"Text: the `messages` turns (user turns are instructions, assistant turns responses); "
                     f"{text.get('mean_turns')} user turns per conversation on average.")
    elif text.get("from"):
        lines.append("Text: the " + " and ".join(f"`{c}`" for c in text["from"]) + " column" +
                     ("s." if len(text["from"]) > 1 else "."))
    else:
        lines.append("Text: none (no `messages`, `instruction` or `response` column): no diversity or duplicate "
                     "figures.")
    checks = (section.get("contamination") or {}).get("checks") or []
    for c in checks:
        matched = "" if c.get("eval_items") is None else \
            f", {c.get('eval_items_matched')} of {c['eval_items']} eval items matched"
        lines.append(f"Contamination: checked by {c['step']} against {_eval_name(c['eval'])} (columns "
                     f"{', '.join(c.get('columns') or [])}){matched}, {c['dropped']} rows dropped.")
    if not checks:
        lines.append("Contamination: not checked (the recipe has no `decontaminate` step).")
    if usage := section.get("usage"):
        cost = f", ${usage['cost_usd']:.4f}" if "cost_usd" in usage else ""
        lines.append(f"Tokens: {usage['prompt_tokens']} in, {usage['completion_tokens']} out, "
                     f"{usage['conversations']} requests ({usage['cached_conversations']} from the cache){cost}.")
    return lines


def _eval_name(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items() if v is not None)
    return f"`{value}`"


def quality_tables(section: dict) -> list[tuple[str, list[str], list[list]]]:
    """The section's tables: (title, header, rows), for the card and the terminal alike."""
    tables = []
    diversity_of = section.get("diversity") or {}
    if diversity_of:
        parts = list(diversity_of)
        figures = [("texts", lambda d: d.get("texts"))]
        figures += [(f"distinct-{n}", lambda d, n=n: d.get(f"distinct_{n}")) for n in NGRAMS]
        figures += [(f"words {k}", lambda d, k=k: (d.get("words") or {}).get(k))
                    for k in ("min", "p10", "median", "p90", "max", "mean")]
        tables.append(("Diversity", ["", *parts],
                       [[name, *(_shown(get(diversity_of[p])) for p in parts)] for name, get in figures]))
    if (opening := section.get("openings")) and opening["top"]:
        tables.append((f"Openings: {opening['shared']} of {opening['texts']} instructions "
                       f"({_percent(opening['shared_share'])}) share their first three words with another",
                       ["first three words", "instructions"], [[o["opening"], o["count"]] for o in opening["top"]]))
    dup = section.get("duplicates") or {}
    if any(isinstance(v, dict) for v in dup.values()):
        tables.append(("Duplicates left (counted, not removed)",
                       ["", "rows", "exact", f"near (MinHash, Jaccard >= {dup.get('near_threshold')})"],
                       [[part.replace("_", "+"), d["rows"], d["exact"], d["near"]] for part, d in dup.items()
                        if isinstance(d, dict)]))
    if scores := section.get("scores"):
        tables.append(("Scores", ["column", "count", "mean", "std", "min", "max", "histogram"],
                       [[column, s["count"], s["mean"], s["std"], f"{s['min']:g}", f"{s['max']:g}",
                         ", ".join(f"{k}: {v}" for k, v in s["histogram"].items())] for column, s in scores.items()]))
    return tables


def _shown(value) -> str:
    return "-" if value is None else str(value)


def _percent(share) -> str:
    return "-" if share is None else f"{100 * share:.1f} %"


def quality_card_lines(section: dict | None) -> list[str]:
    """The card's "Quality" section, in Markdown (nothing for a version written without one)."""
    if not section:
        return []
    lines = ["## Quality", "", *[f"- {line}" for line in summary_lines(section)]]
    for title, header, rows in quality_tables(section):
        lines += ["", f"{title}:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return lines + [""]


def quality_text_lines(section: dict | None) -> list[str]:
    """The section for the terminal (``factory inspect``): the facts, then aligned tables."""
    if not section:
        return ["quality: none recorded (a version written before the quality section)"]
    lines = ["quality:", *[f"  {line}" for line in summary_lines(section)]]
    for title, header, rows in quality_tables(section):
        cells = [header] + [[str(v) for v in row] for row in rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
        lines += ["", f"  {title}:"]
        lines += ["    " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                                     enumerate(zip(r, widths))).rstrip() for r in cells]
    return lines


def quality_figures(section: dict, prefix: str = "") -> dict[str, float]:
    """Every number of the section by its path (``diversity.responses.distinct_2``,
    ``openings.top.what is the``, ``scores.score.histogram.7``): what ``factory diff`` compares."""
    out: dict[str, float] = {}
    for key, value in section.items():
        path = f"{prefix}{key}"
        if key == "top" and isinstance(value, list):
            out.update({f"{path}.{o['opening']}": o["count"] for o in value})
        elif key == "checks" and isinstance(value, list):
            for c in value:
                out.update(quality_figures({k: v for k, v in c.items() if k in ("eval_items", "eval_items_matched",
                                                                                  "dropped")}, f"{path}.{c['step']}."))
        elif isinstance(value, dict):
            out.update(quality_figures(value, path + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "seed":
            out[path] = value
    return out


def quality_shifts(a: dict | None, b: dict | None) -> dict:
    """Each figure of two versions' sections, old and new and the change (``None`` where one lacks it)."""
    fa, fb = quality_figures(a or {}), quality_figures(b or {})
    shifts = {}
    for name in list(fa) + [n for n in fb if n not in fa]:
        old, new = fa.get(name), fb.get(name)
        shifts[name] = {"a": old, "b": new,
                        "delta": round(new - old, 4) if old is not None and new is not None else None}
    return shifts
