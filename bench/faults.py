"""Fault injection report: rows expected vs rows written under backend faults.

Runs the reliability recipe (60 tasks: solve -> judge -> score, OpenAI backend) against
the test suite's fault-injecting server: once clean, then once per fault kind (every 7th
request fails once), once with one task whose request always fails, and once with a dead
server. Prints, per case, the faults injected, the retries counted in the manifest and
the rows expected vs written.

Usage: python bench/faults.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from factory.errors import FactoryError  # noqa: E402
from tests.fake_openai import FAULTS, FakeOpenAI  # noqa: E402
from tests.test_reliability import model, run_in_process, write_recipe  # noqa: E402


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="factory-faults-"))
    (work / "clean").mkdir()
    with FakeOpenAI(reply_fn=model) as server:
        _, clean, _ = run_in_process(write_recipe(work / "clean", server.base_url), work, "clean")
    expected = clean["rows"]
    cases = [(str(f), lambda p, n, f=f: f if n % 7 == 0 else None, 3, expected) for f in FAULTS]
    cases.append(("task 7 always 503", lambda p, n: 503 if "Task 7:" in p["messages"][-1]["content"] else None, 3,
                  None))
    cases.append(("server always 500", lambda p, n: 500, 1, 0))
    print(f"{'case':<22} {'injected':>8} {'retries':>8} {'backend_error rows':>19} {'rows expected':>14} "
          f"{'rows written':>13}")
    print(f"{'clean':<22} {0:>8} {clean['retries']:>8} {0:>19} {expected:>14} {expected:>13}")
    for i, (name, fault_fn, retries, want) in enumerate(cases):
        folder = work / f"case{i}"
        folder.mkdir()
        with FakeOpenAI(reply_fn=model, fault_fn=fault_fn) as server:
            try:
                _, manifest, _ = run_in_process(write_recipe(folder, server.base_url, max_retries=retries), folder,
                                                "run")
                written, counted, failed = manifest["rows"], manifest["retries"], manifest["backend_failures"]
            except FactoryError as err:
                written, counted, failed = f"none ({str(err).split(';')[0].split(': ', 1)[1]})", "-", "-"
            injected = len(server.injected)
        if want is None:  # the failing task's row is dropped, unless the score filter would have dropped it
            want = f"{expected} or {expected - 1}"
        print(f"{name:<22} {injected:>8} {counted!s:>8} {failed!s:>19} {want!s:>14} {written!s:>13}")


if __name__ == "__main__":
    main()
