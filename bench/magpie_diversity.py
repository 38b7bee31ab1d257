"""How diverse are Magpie's instructions beside Self-Instruct's, from the same model, in one run.

Both generators run on the same model (default: the embedded SmolLM2-135M-Instruct) for the same
number of kept instructions (``--rows``): ``magpie`` from nothing but the chat template (temperature
1.0, no system prompt: the template's own), and ``self_instruct`` from the 40 bundled seed tasks
(``data/seeds/tasks.jsonl``, its defaults: 6 in-context examples, ROUGE-L novelty 0.7). Each
generator's own drops stay as they are (Magpie: cut, empty, short and template echoes;
Self-Instruct: too short or long, blacklisted, too similar); instructions are then compared with
the figures of every version's quality section (:mod:`factory.quality`): distinct-1/2/3, the share
that opens with the same three words as another, the most common openings, length spread,
duplicates left (exact and MinHash at 0.8), and the seconds each took (the model's load included).

Usage: python bench/magpie_diversity.py [--rows 48] [--model embedded] [--out /tmp/factory-bench-magpie]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def recipes(rows: int, model: str) -> dict[str, str]:
    llm = json.dumps({"backend": "transformers", "model": model})
    return {
        "magpie": f"""name: bench-magpie
seed: 7
llm: {llm}
steps:
  - magpie: {{num_rows: {rows * 2}, response: false, max_tokens: 96}}
output: {{format: raw}}
""",
        "self_instruct": f"""name: bench-self-instruct
seed: 7
llm: {llm}
source: {{path: {ROOT / "data" / "seeds" / "tasks.jsonl"}}}
steps:
  - self_instruct: {{num_tasks: {rows}}}
output: {{format: raw}}
""",
    }


def run(name: str, text: str, out: Path, rows: int) -> dict:
    import polars as pl

    from factory.build import run_recipe
    from factory.quality import diversity, duplicates, openings
    from factory.recipe import recipe_from_text

    recipe = recipe_from_text(text, base_dir=ROOT)
    began = time.perf_counter()
    _, manifest, result = run_recipe(recipe, out / name, use_cache=False, progress=False)
    seconds = time.perf_counter() - began
    texts = result.table["instruction"].head(rows).cast(pl.String)
    dropped = {reason: count for step in manifest["steps"] for reason, count in (step.get("dropped") or {}).items()}
    return {"name": name, "seconds": seconds, "kept": len(texts), "dropped": dropped,
            "diversity": diversity(texts), "openings": openings(texts), "duplicates": duplicates(texts)}


def table(results: list[dict]) -> str:
    def row(label, get):
        return f"{label:<34}" + "".join(f"{get(r)!s:>16}" for r in results)

    lines = [row("", lambda r: r["name"]), row("instructions kept", lambda r: r["kept"])]
    for n in (1, 2, 3):
        lines.append(row(f"distinct-{n}", lambda r, n=n: r["diversity"].get(f"distinct_{n}")))
    lines.append(row("share opening like another", lambda r: f"{100 * (r['openings']['shared_share'] or 0):.1f} %"))
    for key in ("min", "median", "mean", "max"):
        lines.append(row(f"words {key}", lambda r, key=key: r["diversity"].get("words", {}).get(key)))
    lines.append(row("exact duplicates left", lambda r: r["duplicates"]["exact"]))
    lines.append(row("near duplicates left (0.8)", lambda r: r["duplicates"]["near"]))
    lines.append(row("seconds (load included)", lambda r: f"{r['seconds']:.0f}"))
    lines.append("")
    for r in results:
        top = ", ".join(f"'{o['opening']}' {o['count']}" for o in r["openings"]["top"])
        lines.append(f"{r['name']}: top openings {top}")
        lines.append(f"{r['name']}: dropped {r['dropped'] or 'none'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48, help="Instructions kept by each generator.")
    parser.add_argument("--model", default="embedded", help="A local model folder, or `embedded`.")
    parser.add_argument("--out", default=None, help="Where the versions go (default: a temporary folder).")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out or tempfile.mkdtemp(prefix="factory-bench-magpie-"))
    results = [run(name, text, out, args.rows) for name, text in recipes(args.rows, args.model).items()]
    print(f"model {args.model}, {args.rows} instructions each (versions in {out})\n")
    print(table(results))


if __name__ == "__main__":
    main()
