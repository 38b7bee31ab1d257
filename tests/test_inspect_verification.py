"""``factory inspect`` shows each verify step's pass rate and why the other rows failed: over
the rows the step checked (kept, dropped by it, or dropped later), never those dropped before it."""

from __future__ import annotations

import polars as pl

from factory.inspect import render, verification

MANIFEST = {"recipe": {"steps": [{"solve": {}}, {"verify": {"method": "code", "output_column": "correct"}},
                                 {"select": {}}]}}


def test_pass_rate_and_reasons_of_a_code_verify_step():
    kept = pl.DataFrame({"correct": [True, True], "code_result": ["passed", "passed"]})
    rejected = pl.DataFrame({
        "correct": [None, False, False, False, None, None],
        "code_result": [None, "wrong_answer", "timeout", "wrong_answer", None, None],
        "drop_step": ["steps[0].solve", "steps[1].verify", "steps[1].verify", "steps[2].select", "steps[1].verify",
                      "steps[1].verify"],
        "drop_reason": ["no_answer", "wrong_answer", "timeout", "not_correct", "no_tests", "no_tests"]})
    found = verification(kept, rejected, MANIFEST)
    assert found == [{"index": 1, "method": "code", "checked": 7, "passed": 2, "pass_rate": round(2 / 7, 4),
                      "reasons": {"no_tests": 2, "wrong_answer": 2, "timeout": 1}}]
    text = render({"path": "p", "name": "n", "version": 1, "created_at": "-", "recipe_hash": "h", "parent": None,
                   "models": [], "rows": 2, "rejected_rows": 6, "columns": {}, "steps": [], "lengths": [],
                   "examples": [], "lineage": {}, "verification": found})
    assert "verify [1] (code): 2 of 7 passed (28.6 %); no_tests 2, wrong_answer 2, timeout 1" in text


def test_a_labelling_verify_step_counts_its_false_verdicts_as_incorrect():
    manifest = {"recipe": {"steps": [{"verify": {"method": "math", "output_column": "ok"}}]}}
    kept = pl.DataFrame({"ok": [True, False, False, True, True]})
    assert verification(kept, pl.DataFrame(), manifest)[0]["reasons"] == {"incorrect": 2}
    assert verification(kept, pl.DataFrame(), {"recipe": {"steps": [{"solve": {}}]}}) == []
