"""The end of `make test-mutation`: mutmut's verdicts per module, and every mutant no test killed.

Run from the checkout's root after `mutmut run` (it reads mutants/). Each surviving mutant is
shown by its name and its change (the original line, then the mutated one), marked with its
triage from bench/mutation_triage.txt (why it is equivalent, or not worth a test) or as NEW:
a NEW survivor is a change to the code that no test notices. ``--diff`` prints whole diffs.

A triage entry is ``function<TAB>mutated line<TAB>reason``: the function's name as mutmut gives
it (``x_canonical_number``, ``xǁScoreFilterǁkeep``) and the mutated line stripped, so that an
entry still holds when mutmut numbers a function's mutants anew after an edit elsewhere in it.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

TRIAGE = Path(__file__).with_name("mutation_triage.txt")
NOT_KILLED = ("survived", "no tests", "suspicious", "skipped")


def triage_entries(path: Path = TRIAGE) -> dict[tuple[str, str], str]:
    entries = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                function, mutated, reason = line.split("\t")
                entries[(function, mutated.strip())] = reason
    return entries


def changed_lines(diff: str) -> tuple[str, str]:
    """The first removed and added lines of a mutant's diff, stripped."""
    body = diff.splitlines()[2:]
    removed = next((line[1:].strip() for line in body if line.startswith("-")), "")
    added = next((line[1:].strip() for line in body if line.startswith("+")), "")
    return removed, added


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diff", action="store_true", help="print each survivor's whole diff")
    args = parser.parse_args()
    if not Path("mutants").is_dir():
        sys.exit("no mutants/ here: run `mutmut run` (or `make test-mutation`) from the checkout's root first")

    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code
    from mutmut.utils.file_utils import walk_mutatable_files

    triage = triage_entries()
    counts: dict[str, Counter] = {}
    survivors: dict[str, list[str]] = defaultdict(list)
    new = 0
    for path in sorted(walk_mutatable_files()):
        data = SourceFileMutationData(path=path)
        data.load()
        if not data.exit_code_by_key:
            continue
        module = str(path)
        counts[module] = Counter(status_by_exit_code[code] for code in data.exit_code_by_key.values())
        for name, code in sorted(data.exit_code_by_key.items(), key=lambda kv: _order(kv[0])):
            status = status_by_exit_code[code]
            if status not in NOT_KILLED:
                continue
            diff = get_diff_for_mutant(name, path=path)
            removed, added = changed_lines(diff)
            function = name.rpartition(".")[2].partition("__mutmut_")[0]
            reason = triage.get((function, added))
            new += reason is None
            mark = f"triaged: {reason}" if reason else "NEW"
            survivors[module].append(f"  {name} [{status}] {mark}\n      - {removed}\n      + {added}"
                                     + ("\n" + _indent(diff) if args.diff else ""))

    print(f"{'module':34} {'total':>6} {'killed':>7} {'survived':>9} {'no tests':>9} {'timeout':>8} {'other':>6}")
    for module, c in counts.items():
        other = sum(c.values()) - c["killed"] - c["survived"] - c["no tests"] - c["timeout"]
        print(f"{module:34} {sum(c.values()):6} {c['killed']:7} {c['survived']:9} {c['no tests']:9} "
              f"{c['timeout']:8} {other:6}")
    for module, lines in survivors.items():
        print(f"\n{module}: {len(lines)} not killed")
        print("\n".join(lines))
    print(f"\n{new} survivor(s) not in {TRIAGE.name}" if new else f"\nevery survivor is triaged in {TRIAGE.name}")
    return 0


def _order(name: str) -> tuple[str, int]:
    function, _, number = name.rpartition("__mutmut_")
    return function, int(number) if number.isdigit() else 0


def _indent(text: str) -> str:
    return "\n".join("      " + line for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
