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
def test_self_instruct_recipe_on_the_embedded_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "factory", "run", str(ROOT / "recipes" / "self_instruct.yaml"),
                           "--out", str(tmp_path), "--quiet", "--set", "steps[0].self_instruct.num_tasks=6"],
                          capture_output=True, text=True, cwd=ROOT, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "self-instruct" / "v1" / "manifest.json").read_text())
    generated = manifest["steps"][0]
    assert generated["rows_out"] + generated["dropped"].get("no_instance", 0) >= 6
    assert set(manifest["columns"]) >= {"instruction", "input", "response", "origin", "generation", "messages"}
