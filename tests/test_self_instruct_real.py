"""Self-Instruct parsing on real replies of the embedded model (tests/data/self_instruct_replies.json).

The replies were captured from SmolLM2-135M-Instruct on recipes/self_instruct.yaml's prompts:
every one must parse to a clean task or instance, or raise ParseError (never crash or
pass garbage on); what each instance reply must give is in
tests/data/self_instruct_verdicts.json, written by reading the replies.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from factory.errors import ParseError
from factory.steps.self_instruct import clean_task, parse_instance
from factory.store import read_version

from .conftest import ROOT

REPLIES = json.loads((Path(__file__).parent / "data" / "self_instruct_replies.json").read_text())


@pytest.mark.parametrize("reply", REPLIES["tasks"])
def test_every_real_task_reply_parses_to_one_clean_line(reply):
    task = clean_task(reply)
    assert task and "\n" not in task and not task[0].isspace() and not task[0].isdigit()


def test_real_task_replies_keep_their_text():
    assert clean_task(REPLIES["tasks"][0]) == ("A man has three sons. Each son has three brothers. "
                                               "How many sons does the man have?")


# What each saved instance reply must give, pinned by reading the replies
# (tests/data/self_instruct_verdicts.json).
VERDICTS = json.loads((Path(__file__).parent / "data" / "self_instruct_verdicts.json").read_text())


def outcome(reply: str):
    """``("ok", (input, output))``, or ``("refused", reason, message)`` for a ParseError."""
    try:
        return ("ok", parse_instance(reply))
    except ParseError as err:
        return ("refused", err.reason, str(err))


def test_a_verdict_is_pinned_for_every_saved_instance():
    assert [v["reply"] for v in VERDICTS["instances"]] == [r[:40] for r in REPLIES["instances"]]


@pytest.mark.parametrize("reply, verdict", list(zip(REPLIES["instances"], VERDICTS["instances"])),
                         ids=[str(i) for i in range(len(REPLIES["instances"]))])
def test_every_real_instance_reply_gives_its_pinned_instance(reply, verdict):
    got = outcome(reply)
    if "refused" in verdict:
        assert got[:2] == ("refused", verdict["refused"]) and verdict["because"] in got[2], got
        return
    assert got == ("ok", (verdict["input"], verdict["output"]))
    task_input, output = got[1]
    assert output and "Output:" not in output and "Input:" not in output
    assert "<noinput>" not in task_input


def test_most_real_instance_replies_parse():
    """A parser that refuses everything fails here even if the table were pinned from it."""
    parsed = sum(outcome(r)[0] == "ok" for r in REPLIES["instances"])
    assert parsed >= 0.8 * len(REPLIES["instances"]), f"{parsed} of {len(REPLIES['instances'])} instances parse"


@pytest.mark.parametrize("index, expected", [
    (0, ("3", "1")),                                           # then 20 more "Output:" lines, cut
    (2, ("The largest number in a list of numbers is 3.", "3")),  # "Output:" on the same line
    (5, ("", "Love, peace, Santa.")),                          # <noinput> means no input
    (12, ("", "3")),                                           # so does a bare "noinput"
    (13, ("17", "391")),
    (9, None),                                                 # no output at all: refused
])
def test_tricky_real_instances(index, expected):
    reply = REPLIES["instances"][index]
    if expected is None:
        with pytest.raises(ParseError):
            parse_instance(reply)
    else:
        assert parse_instance(reply) == expected


@pytest.mark.slow
@pytest.mark.timeout(1560)  # the run below may take its 1500 s
def test_self_instruct_recipe_on_the_embedded_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "factory", "run", str(ROOT / "recipes" / "self_instruct.yaml"),
                           "--out", str(tmp_path), "--quiet", "--set", "steps[0].self_instruct.num_tasks=6"],
                          capture_output=True, text=True, cwd=ROOT, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    version = tmp_path / "self-instruct" / "v1"
    manifest = json.loads((version / "manifest.json").read_text())
    # Each of the 6 tasks gets an instance, or is dropped for its instance reply: none parses
    # (no_instance) or it hit instance_max_tokens (truncated; a truncated task reply has no task).
    rejected = read_version(version, "rejected")
    instance_drops = rejected.filter(rejected["instruction"].is_not_null()
                                     & rejected["drop_reason"].is_in(["no_instance", "truncated"])).height \
        if rejected.height else 0
    assert manifest["steps"][0]["rows_out"] + instance_drops == 6, manifest["steps"][0]["dropped"]
    assert set(manifest["columns"]) >= {"instruction", "input", "response", "origin", "generation", "messages"}
    check_self_instruct_rows(version, manifest)


def check_self_instruct_rows(version: Path, manifest: dict) -> None:
    """Rows are kept, and each is a new task (not a seed) with its instance, as a chat. (Two runs on
    2 CPU cores kept 2: of the 6 tasks, 1 instance reply had no output, 2 were cut at
    instance_max_tokens and 1 output was too short for the heuristics.)"""
    rows = read_version(version).to_dicts()
    drops = [s["dropped"] for s in manifest["steps"]]
    assert len(rows) == manifest["rows"] >= 1, drops
    # A row is lost only for what the model wrote, never for a failure of the pipeline.
    assert {r for d in drops for r in d} <= {"parse_error", "no_instance", "too_similar", "blacklisted", "over_quota",
                                             "truncated", "too_short", "too_long", "refusal", "repetitive"}, drops
    seeds = {json.loads(line)["instruction"] for line in (ROOT / "data" / "seeds" / "tasks.jsonl").open()}
    for row in rows:
        assert row["instruction"].strip() and row["instruction"] not in seeds, row
        assert row["response"].strip() and "Output:" not in row["response"], row
        assert "<noinput>" not in (row["input"] or "") and "Output:" not in (row["input"] or ""), row
        assert (row["origin"], row["operation"]) == ("self_instruct", "bootstrap") and row["generation"] >= 1, row
        user, assistant = row["messages"][-2:]
        assert user["role"] == "user" and user["content"].startswith(row["instruction"]), row
        assert assistant == {"role": "assistant", "content": row["response"]}, row
