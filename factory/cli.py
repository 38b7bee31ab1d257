"""The ``factory`` command line."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import textwrap
import threading

from .errors import FactoryError, error_lines

DESCRIPTION = """\
The factory: build synthetic training datasets from declarative YAML recipes.

A recipe chains task generators, solvers, judges and filters; each run writes an
immutable, versioned Hugging Face dataset (parquet shards, manifest.json, a dataset card
and the rejected rows) to OUT/<name>/v<N>.
"""

EPILOG = """\
examples:
  factory validate recipes/quickstart.yaml
  factory run recipes/quickstart.yaml --out out
  factory run recipes/quickstart.yaml --set source.num_rows=8
  factory preview recipes/quickstart.yaml --limit 5
  factory estimate recipes/judged_instructions.yaml --limit 20
  factory run recipes/judged_instructions.yaml --max-usd 5
  factory run recipes/quickstart.yaml --set output.rows=20
  factory inspect out/quickstart/v1 --plot quickstart.png
  factory export out/quickstart/v1 --format trl-sft --out exports/qs
  factory push out/quickstart/v1 --repo my-org/quickstart --dry-run
  factory diff out/quickstart/v1 out/quickstart/v2
  factory view out --sample 30
  factory evolve recipes/self_evolve_arith.yaml --out runs/arith
  factory train sft --dataset out/quickstart/v1 --out adapters/qs --max-steps 20
  factory steps solve
  factory recipes
  factory init quickstart

Exit codes: 0 success, 1 no space left on device, 2 bad input (recipe, data, unreachable server),
130 interrupted (Ctrl-C), 143 terminated (SIGTERM). An interrupted run resumes from its cache.
"""


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a recipe key (value read as YAML); repeatable, e.g. "
                             "--set steps[1].solve.samples=4 --set llm.model=./my-model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="factory", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"factory {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe and write a new dataset version",
                         description="Run RECIPE and write OUT/<name>/v<N>. Finished batches are cached, so "
                                     "re-running the same command after a crash resumes. The last line printed "
                                     "is the version folder. A recipe with `output: {rows: N}` reads more and "
                                     "more of its source until N rows survive every step (one line per pass), "
                                     "and warns when the source or output.max_candidates runs out first. The "
                                     "summary ends with the LLM tokens per step and per model, and their cost "
                                     "when the recipe has `prices:`. With `budget: {max_usd: X}` (or --max-usd X) "
                                     "the run stops before its requests could cost more, writes nothing, and the "
                                     "same command with a larger budget pays only for what is new. With --limit N: "
                                     "a preview (see `factory preview`), nothing written.")
    run.add_argument("recipe", help="the recipe YAML file")
    run.add_argument("--out", default="out", help="output folder (default: out)")
    _add_set(run)
    _add_cache(run)
    run.add_argument("--parent", default=None, help="record this version folder as the parent in the manifest")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--examples", type=int, default=3, metavar="N",
                     help="rows of the new version shown after the summary (default: 3; 0 shows none)")
    _add_max_usd(run)
    run.add_argument("--limit", type=_positive, default=None, metavar="N",
                     help="preview: run on the first N source rows only, print the rows and the drops per step, "
                          "write no version (the same as `factory preview RECIPE --limit N`)")
    _add_executor(run)
    run.set_defaults(func=cmd_run)

    preview = sub.add_parser("preview", help="run a recipe on its first rows and show them; write nothing",
                             description="Run RECIPE on the first N rows of its source (a generator makes only N) "
                                         "and print the rows that survive (up to 20) and, per step, rows in, rows "
                                         "out and the drops by reason. No version is written. The cache is the "
                                         "run's (OUT/.cache unless --cache-dir), so `factory run` afterwards "
                                         "reuses the preview's LLM replies. `output.rows` is not applied.")
    _add_first_rows(preview, 5, "source rows to run on (default: 5)")
    _add_max_usd(preview)
    _add_executor(preview)
    preview.set_defaults(func=cmd_preview)

    estimate = sub.add_parser("estimate", help="what a recipe will cost: requests, tokens, USD and time, from its "
                                               "first rows",
                              description="Run RECIPE on the first N rows of its source (a preview: its replies are "
                                          "cached, so `factory run` afterwards pays nothing for them) and extrapolate "
                                          "each step to the whole source: rows in (from the share each step before it "
                                          "kept), requests, tokens in and out, cost (with `prices:`) and time, each "
                                          "with a 90% range from the spread between the rows. Nothing is written.")
    _add_first_rows(estimate, 20, "source rows to run on (default: 20; more rows, narrower ranges)")
    _add_executor(estimate)
    estimate.set_defaults(func=cmd_estimate)

    validate = sub.add_parser("validate", help="check a recipe without running it",
                              description="Check RECIPE (YAML, keys, types, files, columns) without loading any "
                                          "model. Exit 0 when valid, 2 with one line per problem otherwise.")
    validate.add_argument("recipe", help="the recipe YAML file")
    _add_set(validate)
    validate.add_argument("--print", dest="print_resolved", action="store_true",
                          help="print the resolved recipe (every default filled in) as YAML")
    validate.set_defaults(func=cmd_validate)

    inspect = sub.add_parser("inspect", help="show counts, drop reasons, lengths and examples of a version",
                             description="Summarise a dataset version: rows, columns, per-step counts and drop "
                                         "reasons, text lengths and a few examples.")
    inspect.add_argument("version_dir", help="a version folder such as out/quickstart/v1")
    inspect.add_argument("--examples", type=int, default=3, help="examples to show (default: 3)")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.add_argument("--tokenizer", default=None, help="count tokens with this model's tokenizer (default: the "
                                                          "embedded model's; `none` to skip)")
    inspect.add_argument("--plot", metavar="PNG", default=None,
                         help="also write a PNG: length histograms, score distribution, drop reasons")
    inspect.set_defaults(func=cmd_inspect)

    diff = sub.add_parser("diff", help="rows added and removed, recipe differences and metric shifts between two "
                                       "versions",
                          description="Compare two dataset versions: rows added and removed (matched on their "
                                      "content), recipe differences, and shifts in counts, drops, lengths and scores.")
    diff.add_argument("version_a", help="the older version folder")
    diff.add_argument("version_b", help="the newer version folder")
    diff.add_argument("--key", action="append", default=None, help="column(s) that identify a row (repeatable; "
                                                                     "default: instruction and response)")
    diff.add_argument("--json", action="store_true", help="print the comparison as JSON")
    diff.set_defaults(func=cmd_diff)

    export = sub.add_parser("export", help="write a version in a training stack's format (TRL, OpenAI, alpaca, "
                                           "sharegpt, LLaMA-Factory, axolotl)",
                            description="Write a dataset version for a training stack: trl-sft, trl-dpo, openai, "
                                        "alpaca, sharegpt, llama-factory (data file + dataset_info.json), axolotl "
                                        "(data file + the datasets: YAML snippet).")
    export.add_argument("version_dir", help="a version folder such as out/quickstart/v1")
    from .exports import FORMATS

    export.add_argument("--format", required=True, choices=FORMATS, help="the target format")
    export.add_argument("--out", required=True, help="the folder to write")
    export.add_argument("--style", default=None, help="trl-sft: messages (default) or prompt-completion; trl-dpo: "
                                                       "conversational (default) or standard")
    export.set_defaults(func=cmd_export)

    push = sub.add_parser("push", help="push a version to the Hugging Face Hub as a commit tagged v<N>",
                          description="Push a dataset version to the Hugging Face Hub: parquet shards, the dataset "
                                      "card and manifest.json in one commit on main, tagged v<N> so that "
                                      "load_dataset(repo, revision='v<N>') gets exactly that version. The token comes "
                                      "from HF_TOKEN or `hf auth login`.")
    push.add_argument("version_dir", help="a version folder such as out/quickstart/v1")
    push.add_argument("--repo", required=True, help="ORG/NAME of the dataset repo (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--config-name", default="default", help="push as this config of the repo (its files under "
                                                                "CONFIG/, tag CONFIG-v<N>)")
    push.add_argument("--dry-run", action="store_true", help="print the files and the commit, push nothing")
    push.add_argument("--force", action="store_true", help="push even when the repo has a newer version tag")
    push.set_defaults(func=cmd_push)

    view = sub.add_parser("view", help="a local web page over an output folder: versions, rows, drops, diffs, "
                                       "evolve runs, and people's verdicts that measure the judges",
                          description="Serve a web page over OUT (its datasets, versions, kept and rejected rows, "
                                      "diffs, cards and evolve runs) on this machine. Nothing is opened by itself: "
                                      "open the printed URL. Read-only, except that verdicts people give rows "
                                      "(good/bad and a note) are appended to OUT/<name>/annotations/v<N>.jsonl, "
                                      "beside the version; `factory inspect` then reports how each judge, "
                                      "verifier and filter agrees with them. Ctrl-C stops it.")
    view.add_argument("out", nargs="?", default="out", help="the output folder (default: out)")
    view.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1, this "
                                                          "machine only)")
    view.add_argument("--port", type=_at_least(int, 0, "a port number"), default=0,
                      help="the port (default: 0, a free one)")
    view.add_argument("--sample", type=_positive, default=20, metavar="N",
                      help="rows per version offered for labelling, spread over kept rows and each drop reason "
                           "(default: 20)")
    view.set_defaults(func=cmd_view)

    fetch = sub.add_parser("fetch", help="download Hugging Face Hub datasets into the local cache, for offline runs",
                           description="Download and prepare Hub datasets in the `datasets` cache, so that a recipe "
                                       "naming them runs with HF_HUB_OFFLINE=1 (on this machine, or one that shares "
                                       "HF_HOME). TARGET is a dataset id (ORG/NAME) or a recipe, whose every `hub:` "
                                       "(source, decontaminate and evolve eval sets) is fetched with its config and "
                                       "revision.")
    fetch.add_argument("target", help="ORG/NAME, or a recipe file")
    fetch.add_argument("--config", default=None, help="the dataset's config (default: its default config)")
    fetch.add_argument("--revision", default=None, help="a tag, branch or commit sha (default: main)")
    fetch.set_defaults(func=cmd_fetch)

    evolve = sub.add_parser("evolve", help="self-evolution: generate -> curate -> train -> evaluate, round after round",
                            description="Run the recipe's `evolve:` loop: each round generates and curates a dataset "
                                        "version with the current model (base + the previous round's adapter), trains "
                                        "a LoRA adapter on it, evaluates it, and measures the generation-verification "
                                        "gap. Writes OUT/evolve.json, datasets/, adapters/ and report.{json,md,png}. "
                                        "It stops early when the verifier that picks the data has no gap "
                                        "(evolve.min_gap), when pass@k or diversity collapse (evolve.collapse) or "
                                        "when accuracy stalls (evolve.patience). With `evolve.compare: [programmatic, "
                                        "majority, judge]` it runs the loop once per verifier into OUT/<verifier>/ "
                                        "and draws accuracy and gain against gap side by side in OUT/report.png. "
                                        "Run the same command again to resume an interrupted loop.")
    evolve.add_argument("recipe", help="a recipe with an `evolve:` section")
    evolve.add_argument("--rounds", type=int, default=None, help="rounds to run (default: evolve.rounds)")
    evolve.add_argument("--out", required=True, help="the run folder")
    _add_set(evolve)
    evolve.add_argument("--quiet", action="store_true", help="no progress bars or trainer output")
    _add_executor(evolve)
    evolve.set_defaults(func=cmd_evolve)

    evaluate = sub.add_parser("eval", help="accuracy of a model (+ LoRA adapter) on a verifiable eval set",
                              description="Ask a model every question of EVAL_SET with a `solve` prompt (step by "
                                          "step, then a final answer) and check each answer against the reference "
                                          "column by program. The model is the embedded one (--model, --adapter, "
                                          "--llm for any backend), or a recipe's llm and the prompt of its `solve` "
                                          "step (--recipe: what `factory evolve` evaluates). The questions take the "
                                          "path a recipe's steps take: replies are cached, so a second eval of the "
                                          "same model on the same set asks it nothing. Prints one JSON line: "
                                          "accuracy, items, correct, no_answer, truncated.")
    evaluate.add_argument("eval_set", help="an eval file (.jsonl/.parquet/.csv or a saved dataset folder), or a Hub "
                                           "dataset ORG/NAME (with --config and --split)")
    evaluate.add_argument("--config", default=None, help="the Hub dataset's config, e.g. main")
    evaluate.add_argument("--split", default=None, help="the split to read, e.g. test (default: train)")
    evaluate.add_argument("--recipe", default=None, help="take the llm and the `solve` prompt from this recipe")
    _add_set(evaluate)
    evaluate.add_argument("--model", default=None, help="the base model: `embedded` (default) or a local HF folder")
    evaluate.add_argument("--adapter", default=None, help="a LoRA adapter folder on top of the model")
    evaluate.add_argument("--llm", default=None, metavar="YAML", help="an `llm:` mapping, e.g. '{backend: openai, "
                                                                      "base_url: http://127.0.0.1:8000/v1, model: m}'")
    evaluate.add_argument("--column", default="instruction", help="the question column (default: instruction)")
    evaluate.add_argument("--answer-column", default="answer",
                          help="the reference column: a bare value or a worked solution ending in `#### n`, "
                               "`\\boxed{n}` or 'The answer is n' (default: answer)")
    evaluate.add_argument("--limit", type=_positive, default=None, metavar="N", help="the first N items only")
    evaluate.add_argument("--no-cot", dest="cot", action="store_false", help="ask for the answer alone, no steps")
    evaluate.add_argument("--answer-format", choices=["number", "choice", "text", "math"], default="number",
                          help="how final answers are read (default: number)")
    evaluate.add_argument("--method", choices=["auto", "exact", "numeric", "normalized", "choice", "math"],
                          default="auto",
                          help="how answers are compared (default: auto, from the answer format)")
    evaluate.add_argument("--max-tokens", type=_positive, default=None,
                          help="most tokens per answer (default: the recipe's solve step's, else 256)")
    evaluate.add_argument("--batch-size", type=_positive, default=64, help="questions per batch (default: 64)")
    evaluate.add_argument("--results", default=None, metavar="JSON", help="also write every item's result here, and "
                                                                          "what the eval asked of the model (usage)")
    evaluate.add_argument("--out", default="out", help="the output folder whose cache the eval shares "
                                                       "(default: out; nothing else is written there)")
    _add_cache(evaluate)
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_executor(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    report = sub.add_parser("report", help="redraw an evolve run's report.json, report.md and report.png",
                            description="Redraw the report of a `factory evolve` run from its evolve.json (or of a "
                                        "comparison, `evolve.compare`, from its runs).")
    report.add_argument("run_dir", help="the --out folder of a `factory evolve` run")
    report.set_defaults(func=cmd_report)

    train = sub.add_parser("train", help="train a LoRA adapter on a dataset version (sft or dpo)",
                           description="Train on a dataset version: `factory train sft --dataset DIR --out DIR ...` "
                                       "is `python -m trainers.sft ...` (and dpo likewise); `factory train sft -h` "
                                       "lists every option.", add_help=True)
    train.add_argument("method", choices=["sft", "dpo"], help="sft: LoRA SFT on messages; dpo: LoRA DPO on "
                                                               "chosen/rejected")
    train.add_argument("options", nargs=argparse.REMAINDER, help="the trainer's options (see -h of the method)")
    train.set_defaults(func=cmd_train)

    model = sub.add_parser("model", help="model utilities (export the embedded model as a Hugging Face folder)",
                           description="Model utilities.")
    model_sub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    export = model_sub.add_parser("export-embedded", help="write the embedded SmolLM2-135M-Instruct as a plain "
                                  "Hugging Face folder (safetensors, tokenizer, config)",
                                  description="Write the embedded SmolLM2-135M-Instruct (de-quantised from its GGUF) "
                                              "as a Hugging Face folder that vLLM, the trainers and other tools "
                                              "load without any download.")
    export.add_argument("out_dir", help="folder to write")
    export.set_defaults(func=cmd_export_embedded)

    steps = sub.add_parser("steps", help="list the steps a recipe can use; with NAME, the step's file and options",
                           description="List recipe steps, or the file that holds one step, its documentation "
                                       "and every option with its default and help. `factory steps distilabel` "
                                       "also lists the tasks of distilabel's library that the step runs, and "
                                       "`factory steps distilabel TASK` a task's options.")
    steps.add_argument("name", nargs="?", help="a step name, e.g. solve")
    steps.add_argument("task", nargs="?", help="with `distilabel`: a task of distilabel's library, e.g. "
                                               "UltraFeedback (its inputs, outputs and options)")
    steps.set_defaults(func=cmd_steps)

    recipes = sub.add_parser("recipes", help="list the bundled recipes (start one with `factory init NAME`)",
                             description="List the recipes that ship with the factory, one line each: the name "
                                         "`factory init` takes and what the recipe makes.")
    recipes.set_defaults(func=cmd_recipes)

    init = sub.add_parser("init", help="write a bundled recipe and the data files it reads into this folder",
                          description="Write the bundled recipe NAME (default: quickstart) into the current folder, "
                                      "with the data files it references at the same relative paths (data/...), so "
                                      "that it runs from here as it is. Existing files are never overwritten "
                                      "(identical ones are left alone) unless --force is given.")
    init.add_argument("name", nargs="?", default="quickstart", metavar="NAME",
                      help="a name from `factory recipes` (default: quickstart)")
    init.add_argument("--force", action="store_true", help="overwrite files that already exist")
    init.set_defaults(func=cmd_init)
    return parser


def _at_least(cast, least, what: str, unit: str = ""):
    """An argparse type: ``cast(text)``, at least ``least``; errors say what was expected."""
    def read(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected at least {least}{unit}, got {value}")
        return value

    return read


_positive = _at_least(int, 1, "a whole number of rows", " row")
_usd = _at_least(float, 0.0, "an amount in US dollars")


def _add_first_rows(parser: argparse.ArgumentParser, limit: int, limit_help: str) -> None:
    """The options of a command that runs a recipe on its first rows and writes no version."""
    parser.add_argument("recipe", help="the recipe YAML file")
    parser.add_argument("--limit", type=_positive, default=limit, metavar="N", help=limit_help)
    parser.add_argument("--out", default="out", help="the output folder whose cache a later run uses "
                                                     "(default: out; nothing else is written there)")
    _add_set(parser)
    _add_cache(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_max_usd(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-usd", type=_usd, default=None, metavar="X",
                        help="stop before the requests this run sends could cost more than X US dollars (the "
                             "recipe's budget.max_usd; needs `prices:` for its models); nothing is written then, and "
                             "the same command with a larger budget goes on, paying only for what is new")


def _overrides(args) -> list[str]:
    """The --set overrides, with --max-usd as the budget's."""
    extra = [f"budget.max_usd={args.max_usd}"] if getattr(args, "max_usd", None) is not None else []
    return list(args.overrides) + extra


def _add_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", default=None, help="cache folder (default: OUT/.cache)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")


def _add_executor(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="local (this process, the default) or ray (Ray Data on a local or remote cluster)")
    parser.add_argument("--address", default=None, help="Ray cluster address (e.g. auto or ray://head:10001); "
                                                        "default: start a local cluster")
    parser.add_argument("--replicas", type=int, default=1, help="Ray: actor replicas per LLM step")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0, help="Ray: GPUs per LLM replica")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0,
                        help="Ray: CPUs per LLM replica (below 1 for replicas that wait on a server)")


def make_driver(args, cache_dir, use_cache: bool = True, progress: bool = True):
    """The driver on the executor the command line asked for."""
    from .cache import Cache, NullCache
    from .driver import Driver

    cache = Cache(cache_dir) if use_cache else NullCache()
    return Driver(cache, executor=make_executor(args), progress=progress)


def make_executor(args):
    if getattr(args, "executor", "local") != "ray":
        return None  # the driver's default: this process
    try:
        import ray  # noqa: F401
    except ImportError:
        raise FactoryError("--executor ray needs Ray: pip install 'ray[data]' (or install the project's "
                           "`ray` extra)") from None
    from .executors.ray import RayExecutor

    return RayExecutor(address=args.address, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                       cpus_per_replica=args.cpus_per_replica)


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cache_dir(args):
    from pathlib import Path

    return args.cache_dir or Path(args.out) / ".cache"


def cmd_run(args) -> int:
    from .build import run_recipe
    from .printing import format_examples, format_summary, target_warning
    from .recipe import load_recipe
    from .store import read_version

    if args.limit is not None:
        return cmd_preview(args)
    recipe = load_recipe(args.recipe, _overrides(args))
    driver = make_driver(args, _cache_dir(args), use_cache=not args.no_cache, progress=not args.quiet)
    version_dir, manifest, _ = run_recipe(recipe, args.out, driver=driver, parent=args.parent)
    print(format_summary(manifest))
    if manifest["rows"] and args.examples > 0:
        print(format_examples(read_version(version_dir), args.examples))
    warning = target_warning(manifest)
    if warning:
        print(warning, file=sys.stderr)
    elif manifest["rows"] == 0:
        print("warning: the version has no rows; see rejected/ and `factory inspect` for why", file=sys.stderr)
    print(version_dir)
    return 0


def cmd_preview(args) -> int:
    from .build import preview_recipe
    from .printing import format_preview
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, _overrides(args))
    driver = make_driver(args, _cache_dir(args), use_cache=not args.no_cache, progress=not args.quiet)
    table, result = preview_recipe(recipe, driver, args.limit)
    print(format_preview(recipe, table, result, args.limit, None if args.no_cache else str(_cache_dir(args))))
    return 0


def cmd_estimate(args) -> int:
    from .estimate import estimate_recipe, format_estimate
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    driver = make_driver(args, _cache_dir(args), use_cache=not args.no_cache, progress=not args.quiet)
    print(format_estimate(estimate_recipe(recipe, driver, args.limit)))
    return 0


def cmd_validate(args) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_resolved:
        import yaml

        print(yaml.safe_dump(recipe.resolved(), sort_keys=False).rstrip())
    chain = " -> ".join(s.name for s in recipe.steps)
    llm = recipe.llm
    print(f"{args.recipe}: ok ({len(recipe.steps)} steps: {chain}; llm {llm.backend}:{getattr(llm, 'model', '')}; "
          f"columns at the end: {', '.join(recipe.columns_after())})")
    return 0


def cmd_inspect(args) -> int:
    from .inspect import load_inspect_tokenizer, plot, render, summarize
    from .store import read_manifest

    read_manifest(args.version_dir)  # a clear error for a folder that is not a version, before any loading
    tokenizer = load_inspect_tokenizer(args.tokenizer)
    info = summarize(args.version_dir, examples=args.examples, tokenizer=tokenizer)
    print(json.dumps(info, indent=2, ensure_ascii=False, default=str) if args.json else render(info))
    if args.plot:
        print(plot(args.version_dir, args.plot, tokenizer), file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_diff(args) -> int:
    from .diff import diff, render

    info = diff(args.version_a, args.version_b, key=args.key)
    print(json.dumps(info, indent=2, ensure_ascii=False, default=str) if args.json else render(info))
    return 0


def cmd_export(args) -> int:
    from .exports import export

    for path in export(args.version_dir, args.format, args.out, style=args.style):
        print(path)
    return 0


def cmd_push(args) -> int:
    from .hub import push

    plan = push(args.version_dir, args.repo, private=args.private, config_name=args.config_name,
                dry_run=args.dry_run, force=args.force)
    print(plan.describe())
    print("dry run: nothing was pushed" if args.dry_run else
          f"pushed: https://huggingface.co/datasets/{args.repo}/tree/{plan.tag}")
    return 0


def cmd_view(args) -> int:
    from .view.server import serve

    try:
        serve(args.out, host=args.host, port=args.port, sample=args.sample)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the expected way to stop a server, nothing to resume
        print("factory view: stopped", file=sys.stderr)
    return 0


def cmd_fetch(args) -> int:
    from .hubdata import fetch_target

    for line in fetch_target(args.target, args.config, args.revision):
        print(line)
    return 0


def cmd_evolve(args) -> int:
    from .evolve.loop import Evolution
    from .recipe import load_recipe
    from .report import markdown, rows

    from pathlib import Path

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.evolve is not None and recipe.evolve.compare:
        from .evolve.compare import Comparison, comparison_markdown, comparison_rows

        states = Comparison(args.recipe, args.out, args.overrides, rounds=args.rounds, progress=not args.quiet,
                            make_driver=lambda cache: make_driver(args, cache, progress=not args.quiet)).run()
        print(comparison_markdown(states, comparison_rows(states)).rstrip())
        print(f"\nreport: {args.out}/report.md, {args.out}/report.png")
        print(args.out)
        return 0
    driver = make_driver(args, Path(args.out) / ".cache", progress=not args.quiet)
    state = Evolution(args.recipe, args.out, args.overrides, rounds=args.rounds, progress=not args.quiet,
                      driver=driver).run()
    print(markdown(state, rows(state)).split("## Rounds")[0].rstrip())
    print(f"\n{state['stopped']}; report: {args.out}/report.md, {args.out}/report.png")
    print(args.out)
    return 0


def cmd_eval(args) -> int:
    import json
    from pathlib import Path

    from .evolve.evaluate import EvalRequest, evaluate_model
    from .recipe import load_recipe

    if args.overrides and not args.recipe:
        raise FactoryError("--set changes a recipe; give the recipe with --recipe")
    recipe = load_recipe(args.recipe, args.overrides) if args.recipe else None
    request = EvalRequest(spec=args.eval_set, config=args.config, split=args.split, llm=args.llm, model=args.model,
                          adapter=args.adapter, column=args.column, answer_column=args.answer_column,
                          limit=args.limit, cot=args.cot, answer_format=args.answer_format, method=args.method,
                          max_tokens=args.max_tokens, batch_size=args.batch_size)
    driver = make_driver(args, _cache_dir(args), use_cache=not args.no_cache, progress=not args.quiet)
    result = evaluate_model(driver, request, recipe)
    print(json.dumps(result.summary()))
    if args.results:
        Path(args.results).write_text(json.dumps({**result.summary(), "usage": result.usage,
                                                  "results": result.results}, indent=1) + "\n", encoding="utf-8")
    return 0


def cmd_report(args) -> int:
    from pathlib import Path

    from .evolve.compare import MANIFEST, write_comparison
    from .report import redraw

    print(write_comparison(args.run_dir) if (Path(args.run_dir) / MANIFEST).is_file() else redraw(args.run_dir))
    return 0


def cmd_train(args) -> int:
    import importlib

    trainer = importlib.import_module(f"trainers.{args.method}")
    trainer.main(args.options)
    return 0


def cmd_export_embedded(args) -> int:
    from .models import EMBEDDED, export_model

    print(export_model(EMBEDDED, args.out_dir))
    return 0


def cmd_steps(args) -> int:
    import inspect
    from pathlib import Path

    from .config import closest, option_help
    from .registry import STEPS, source_file, step_class

    if args.name is None:
        for name in STEPS:
            cls = step_class(name)
            doc = (cls.__doc__ or "").strip().splitlines()[0]
            print(f"{name:<18} {cls.kind:<7} {doc}")
        return 0
    if args.name not in STEPS:
        match = closest(args.name, STEPS)
        raise FactoryError(f"unknown step '{args.name}'; " + (f"did you mean '{match}'?" if match else
                                                              f"steps: {', '.join(STEPS)}"))
    if args.task and args.name != "distilabel":
        raise FactoryError(f"only `factory steps distilabel` takes a task name ('{args.task}')")
    if args.name == "distilabel":  # the task library (errors before the step's page is printed)
        from .steps.distilabel import tasks

        library = tasks.task_lines(args.task) if args.task else tasks.catalog_lines()
    cls = step_class(args.name)
    path = source_file(args.name)
    print(f"{args.name}: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}\n")
    print(inspect.cleandoc(cls.__doc__ or ""))
    print("\noptions:")
    for name, default, text in option_help(cls.Config):
        print(f"  {name} = {default}")
        print(textwrap.fill(text, width=96, initial_indent="      ", subsequent_indent="      "))
    if args.name == "distilabel":
        print("\n" + "\n".join(library))
    return 0


def cmd_recipes(args) -> int:
    from .bundled import recipes, summary

    for name, path in recipes().items():
        print(f"{name:<24} {summary(path)}")
    return 0


def cmd_init(args) -> int:
    from .bundled import init

    done = init(args.name, ".", force=args.force)
    for rel, written in done:
        print(f"wrote {rel}" if written else f"kept  {rel} (already there, the same)")
    print(f"next: factory run {done[0][0]} --out out")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the job): stop as cleanly as on Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.func(args)
    except FactoryError as err:
        print("\n".join(error_lines(err)), file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as err:
        what = "terminated" if isinstance(err, Terminated) else "interrupted"
        print(f"\n{what}: nothing was written; finished batches are cached, so the same command resumes",
              file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        print(f"error: no space left on device ({err.filename or 'writing the output or cache'}); free some space "
              "and run the same command again: finished batches are cached", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
