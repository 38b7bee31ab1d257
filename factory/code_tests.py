"""Tests for code in the shapes public sets store them, the code of a response, and how outputs compare.

Shapes read (``auto`` tells them apart by the value):

* ``humaneval`` -- a string of Python defining ``check(candidate)`` (often after ``METADATA``),
  called as ``check(<entry point>)``: one test (HumanEval, MBPP+ / EvalPlus-style sets).
* ``asserts`` -- a list of ``assert`` strings, one test each (MBPP ``test_list``), or one string
  whose top-level statements are all asserts.
* ``io`` -- stdin/stdout pairs: APPS ``input_output`` (a JSON string ``{"inputs": [...],
  "outputs": [...]}``; with ``"fn_name"`` the inputs are arguments of that function, LeetCode
  style), CodeContests ``public_tests`` / ``private_tests`` / ``generated_tests`` (``{input: [...],
  output: [...]}``).

A value that cannot be read raises :class:`BadTests` with its reason: ``no_tests``,
``bad_tests`` or ``no_entry_point``. The tests are data: they are parsed here, never run here.
"""

from __future__ import annotations

import ast
import builtins
import functools
import json
import math
import re
from dataclasses import dataclass

FORMATS = ("auto", "humaneval", "asserts", "io")
PYTHON_TAGS = {"python", "py", "python3", "py3", "ipython", "python3.11"}
DETAIL_CHARS = 300


class BadTests(ValueError):
    """A row's tests cannot be run: ``reason`` is ``no_tests``, ``bad_tests`` or ``no_entry_point``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Suite:
    """A row's tests, ready for the sandbox.

    Attributes:
        kind: ``checks`` (snippets run after the program, in one process), ``calls`` (a function
            called with each input, in one process) or ``io`` (one process per stdin/stdout case).
        checks: the snippets (an assert, or ``check(f)`` after the test code).
        cases: ``io``: ``(stdin, expected stdout)``; ``calls``: ``(args, expected return value)``.
        function: the function the program must define (the entry point, or APPS's ``fn_name``).
        setup: code run before the program (imports the tests need, MBPP ``test_setup_code``).
        names: the functions the tests call (what picks the response's code block).
    """

    kind: str
    checks: tuple[str, ...] = ()
    cases: tuple[tuple, ...] = ()
    function: str | None = None
    setup: tuple[str, ...] = ()
    names: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return len(self.checks) if self.kind == "checks" else len(self.cases)


def read_suite(values: list, fmt: str = "auto", entry_point: str | None = None, setup: list | None = None,
               max_tests: int | None = None) -> Suite:
    """The tests of a row.

    Args:
        values: the row's value in each tests column (several columns add their tests up:
            CodeContests' public, private and generated tests).
        fmt: one of :data:`FORMATS`.
        entry_point: the function HumanEval-style tests call (the row's ``entry_point``).
        setup: the row's setup code values (strings or lists of lines).
        max_tests: keep the first this many tests.

    Raises:
        BadTests: no tests, tests that do not parse, or no entry point where one is needed.
    """
    suites = [suite for value in values if (suite := read_value(value, fmt, entry_point)) is not None]
    if not suites:
        raise BadTests("no_tests", "the row has no tests")
    kinds = {(s.kind, s.function) for s in suites}
    if len(kinds) > 1:
        raise BadTests("bad_tests", "the tests columns hold tests of different kinds: "
                                    + ", ".join(sorted(k for k, _ in kinds)))
    first = suites[0]
    checks = tuple(c for s in suites for c in s.checks)[:max_tests]
    cases = tuple(c for s in suites for c in s.cases)[:max_tests]
    if not checks and not cases:
        raise BadTests("no_tests", "the row's tests are empty")
    function = first.function
    if function is None and first.kind == "checks" and entry_point:
        if not str(entry_point).isidentifier():
            raise BadTests("no_entry_point", f"the entry point {entry_point!r} is not a Python name")
        function = str(entry_point)
    names = tuple(dict.fromkeys([function] * bool(function) + [n for s in suites for n in s.names]))
    return Suite(first.kind, checks, cases, function, setup_code(setup or []), names)


def read_value(value, fmt: str, entry_point: str | None) -> Suite | None:
    """One column's tests (None when the value is empty)."""
    if value is None or (isinstance(value, (str, list, tuple, dict)) and not value):
        return None
    if isinstance(value, str) and value.strip()[:1] in ("{", "[") and fmt in ("auto", "io"):
        try:
            value = json.loads(value)
        except ValueError as err:
            if fmt == "io" or value.strip()[:1] == "{":
                raise BadTests("bad_tests", f"the tests are not valid JSON: {err}") from None
        if not value:
            return None
    if isinstance(value, dict):
        if fmt not in ("auto", "io"):
            raise BadTests("bad_tests", f"{fmt} tests are Python code, got a mapping with keys {sorted(value)}")
        return io_suite(value)
    if fmt == "io":
        raise BadTests("bad_tests", "io tests are a mapping {inputs: [...], outputs: [...]} (APPS) or "
                                    "{input: [...], output: [...]} (CodeContests)")
    if isinstance(value, str) and (fmt == "humaneval" or (fmt == "auto" and re.search(r"^def check\(", value, re.M))):
        return humaneval_suite(value, entry_point)
    if isinstance(value, (str, list, tuple)):
        return assert_suite(value)
    raise BadTests("bad_tests", f"cannot read tests from a {type(value).__name__}")


def humaneval_suite(code: str, entry_point: str | None) -> Suite:
    tree = parse(code, "the test code")
    if not any(isinstance(node, ast.FunctionDef) and node.name == "check" for node in tree.body):
        raise BadTests("bad_tests", "the test code defines no check(candidate) function")
    if not entry_point:
        raise BadTests("no_entry_point", "check(candidate) tests need the function to pass them: set `entry_point:` "
                                         "to the column that names it")
    if not str(entry_point).isidentifier():
        raise BadTests("no_entry_point", f"the entry point {entry_point!r} is not a Python name")
    return Suite("checks", (explained(code) + f"\n\ncheck({entry_point})\n",), function=entry_point,
                 names=(entry_point,))


def assert_suite(value) -> Suite:
    if isinstance(value, str):
        tree = parse(value, "the tests")
        if tree.body and all(isinstance(node, ast.Assert) for node in tree.body):
            tests = [ast.get_source_segment(value, node) or ast.unparse(node) for node in tree.body]
        else:
            tests = [value]
    else:
        tests = list(value)
    checks, names = [], []
    for i, test in enumerate(tests):
        if not isinstance(test, str):
            raise BadTests("bad_tests", f"test {i + 1} is a {type(test).__name__}, not Python code")
        names += called_names(parse(test, f"test {i + 1}"))
        checks.append(explained(test))
    return Suite("checks", tuple(checks), names=tuple(dict.fromkeys(names)))


def io_suite(value: dict) -> Suite:
    inputs = value.get("inputs", value.get("input"))
    outputs = value.get("outputs", value.get("output"))
    if inputs is None or outputs is None:
        raise BadTests("bad_tests", f"io tests need inputs and outputs, got keys {sorted(value)}")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
        raise BadTests("bad_tests", f"io tests need as many outputs as inputs, got "
                                    f"{len_of(inputs)} inputs and {len_of(outputs)} outputs")
    function = value.get("fn_name")
    if function:
        if not isinstance(function, str) or not function.isidentifier():
            raise BadTests("bad_tests", f"fn_name {function!r} is not a Python name")
        cases = tuple((tuple(args) if isinstance(args, list) else (args,), expected)
                      for args, expected in zip(inputs, outputs))
        return Suite("calls", cases=cases, function=function, names=(function,))
    cases = []
    for i, (stdin, expected) in enumerate(zip(inputs, outputs)):
        stdin, expected = as_text(stdin), as_text(expected)
        if stdin is None or expected is None:
            raise BadTests("bad_tests", f"io test {i + 1}: inputs and outputs are text (or lists of lines)")
        cases.append((stdin, expected))
    return Suite("io", cases=tuple(cases))


def setup_code(values: list) -> tuple[str, ...]:
    """Setup values (a string, or a list of lines such as MBPP's ``test_imports``) as code."""
    snippets = []
    for value in values:
        code = "\n".join(value) if isinstance(value, (list, tuple)) else value
        if code and str(code).strip():
            parse(str(code), "the setup code")
            snippets.append(str(code))
    return tuple(snippets)


@functools.lru_cache(maxsize=4096)
def parse(code: str, what: str) -> ast.Module:
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        line = f" (line {err.lineno})" if isinstance(err, SyntaxError) and err.lineno else ""
        raise BadTests("bad_tests", f"{what} does not parse: {getattr(err, 'msg', err)}{line}") from None


def called_names(tree: ast.AST) -> list[str]:
    """Functions a test calls by name, builtins aside (``assert min_cost(...) == 8`` -> min_cost)."""
    return [node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and not hasattr(builtins, node.func.id)]


@functools.lru_cache(maxsize=4096)
def explained(code: str) -> str:
    """``code`` with each ``assert a == b`` rewritten to say what ``a`` was when it fails, and to
    refuse an ``a`` that claims to equal anything (see ``sandbox_harness.equal``)."""
    tree = ast.parse(code)
    changed = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1 \
                and isinstance(node.test.ops[0], ast.Eq):
            changed = True
            source = (ast.get_source_segment(code, node) or ast.unparse(node)).splitlines()[0]
            value = ast.NamedExpr(target=ast.Name("_sandbox_value", ast.Store()), value=node.test.left)
            node.test = ast.Call(ast.Name("_sandbox_equal", ast.Load()), [value, node.test.comparators[0]], [])
            node.msg = ast.Call(ast.Name("_sandbox_got", ast.Load()),
                                [ast.Name("_sandbox_value", ast.Load()), ast.Constant(source)]
                                + ([node.msg] if node.msg is not None else []), [])
    return ast.unparse(ast.fix_missing_locations(tree)) if changed else code


# -- the code of a response -------------------------------------------------------------------------

FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([^\s`]*)")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """The fenced blocks of ``text`` as ``(language, code)``; a last block left open (a reply
    cut at its token limit) runs to the end."""
    blocks, lines, opened = [], [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if opened is None:
            if match:
                opened, lines = (match.group(1), match.group(2).lower()), []
        elif match and match.group(1)[0] == opened[0][0] and len(match.group(1)) >= len(opened[0]) \
                and not match.group(2):
            blocks.append((opened[1], "\n".join(lines)))
            opened = None
        else:
            lines.append(line)
    if opened is not None and lines:
        blocks.append((opened[1], "\n".join(lines)))
    return blocks


def response_code(text: str | None, names: tuple[str, ...] = ()) -> str:
    """The program in a response.

    The candidates are the blocks tagged Python (``python``, ``py``...), else the untagged
    blocks, else the whole text (a reply that is only code). Of them, the last one that
    defines a function the tests call; else the last one. The last, because a model that
    revises its answer writes the final version last; one that defines the tested function,
    because the block after a solution is often its example usage, which would hide it.
    """
    text = text or ""
    blocks = code_blocks(text)
    candidates = [code for lang, code in blocks if lang in PYTHON_TAGS] or [code for lang, code in blocks if not lang]
    if not candidates:
        return text.strip("\n") if not blocks else blocks[-1][1]
    if names:
        pattern = re.compile(r"^\s*(?:async\s+def|def|class)\s+(" + "|".join(map(re.escape, names)) + r")\b"
                             r"|^(" + "|".join(map(re.escape, names)) + r")\s*=", re.M)
        defining = [code for code in candidates if pattern.search(code)]
        if defining:
            return defining[-1]
    return candidates[-1]


# -- comparing what a program gave ------------------------------------------------------------------

def outputs_match(got: str, expected: str, tolerance: float = 1e-6) -> tuple[bool, str | None]:
    """Whether a program's stdout answers a case, and if not, where it differs.

    Lines compare with trailing spaces and trailing blank lines ignored; failing that, the
    whitespace-separated tokens compare, a token with a decimal point as a number within
    ``tolerance`` (absolute or relative) -- what judges of APPS and CodeContests accept.
    """
    got_lines, want_lines = lines_of(got), lines_of(expected)
    if got_lines == want_lines:
        return True, None
    got_tokens, want_tokens = got.split(), expected.split()
    if len(got_tokens) == len(want_tokens) and all(tokens_match(g, w, tolerance)
                                                   for g, w in zip(got_tokens, want_tokens)):
        return True, None
    for i, (g, w) in enumerate(zip(got_lines, want_lines)):
        if g != w:
            return False, short(f"line {i + 1}: expected {w!r}, got {g!r}")
    return False, short(f"expected {len(want_lines)} lines, got {len(got_lines)}"
                        + (f" (first missing: {want_lines[len(got_lines)]!r})" if len(got_lines) < len(want_lines)
                           else f" (first extra: {got_lines[len(want_lines)]!r})"))


def lines_of(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def tokens_match(got: str, want: str, tolerance: float) -> bool:
    if got == want:
        return True
    if "." not in want:
        return False
    try:
        g, w = float(got), float(want)
    except ValueError:
        return False
    return math.isclose(g, w, rel_tol=tolerance, abs_tol=tolerance)


def call_matches(got_json: str, expected) -> tuple[bool, str | None]:
    """Whether a function's return value (as the harness wrote it, JSON) is the expected one.
    APPS stores a return value wrapped in a list (``[[1, 2]]`` for ``[1, 2]``): both count."""
    try:
        got = json.loads(got_json)
    except (ValueError, RecursionError):
        return False, short(f"returned a value that is not JSON: {got_json[:60]!r}")
    want = json.loads(json.dumps(expected))  # tuples as lists, as the program's value
    if got == want or (isinstance(want, list) and len(want) == 1 and got == want[0]):
        return True, None
    shown = want[0] if isinstance(want, list) and len(want) == 1 else want
    return False, short(f"returned {json.dumps(got)}, expected {json.dumps(shown)}")


def short(text: str) -> str:
    return text if len(text) <= DETAIL_CHARS else text[:DETAIL_CHARS - 3] + "..."


def len_of(value) -> str:
    return str(len(value)) if isinstance(value, list) else f"a {type(value).__name__}"


def as_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value) + "\n"
    return None
