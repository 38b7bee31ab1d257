"""Tools for tool-use data: their definitions, their implementations, and how a model calls them.

* **Definitions** are OpenAI's function tools (``{"type": "function", "function": {"name",
  "description", "parameters"}}``, the parameters a JSON Schema), read from a JSON or YAML file
  (a list, or ``{"tools": [...]}``; a bare ``{"name", ...}`` is taken as the function part) or
  from a row's ``tools`` column (JSON text or a list). A file's problems are reported at its
  ``file:line`` (:func:`load_tools`).
* **Implementations** are the functions of a Python file the recipe names, one per tool name
  (:class:`Implementations`); they run in the sandbox the code verifier uses
  (:mod:`factory.sandbox`: a process per call, a wall-clock limit, no network unless allowed), with
  the arguments as keyword arguments and ``__file__`` set, so that a tool can read files beside it.
* **The format check** (:func:`call_problem`): a call names a tool offered and its arguments
  validate against that tool's parameters (jsonschema's message and where).

How a model is asked for calls and how chats with calls are written (the wire format) is
:mod:`factory.llm.tool_format`'s.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import FactoryError

EXECUTION = "execution"  # drop reason: an implementation raised, hung, or a simulated result was not JSON
SEMANTIC = "semantic"  # drop reason: the judge found that the calls and results do not answer the request
_KW_CALL = "__factory_tool_call__"  # the sandbox calls the tool by name with keyword arguments through it
_KW_HELPER = f"def {_KW_CALL}(name, arguments):\n    return globals()[name](**arguments)\n"
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule; a server that enforces it refuses others


class ToolsError(FactoryError):
    """A tools file or an implementations file that cannot be used (message at file:line)."""


# -- definitions -------------------------------------------------------------------------------

def normalize(entry: Any) -> dict:
    """A tool definition in OpenAI's layout (``{"type": "function", "function": {...}}``); a bare
    function part (``{"name", "description", "parameters"}``) is wrapped. Raises ValueError."""
    if not isinstance(entry, dict):
        raise ValueError(f"a tool must be a mapping, got {type(entry).__name__}")
    # {"type": "function", "name": ...} (the Responses API's flat layout) is a bare function part too
    function = entry.get("function") if "function" in entry or (
        entry.get("type") == "function" and "name" not in entry) else entry
    if not isinstance(function, dict):
        raise ValueError("`function` must be a mapping of name, description and parameters")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError("the tool has no `name`")
    if not TOOL_NAME.fullmatch(name):
        raise ValueError(f"the tool name {name!r} must be 1 to 64 of the characters a-z A-Z 0-9 _ - "
                         "(OpenAI's rule for function names)")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise ValueError("`parameters` must be a JSON Schema (a mapping)")
    if parameters.get("type", "object") != "object":
        raise ValueError(f"`parameters` must be an object schema (type: object), got type {parameters.get('type')!r}")
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(parameters)
    except SchemaError as err:
        where = "parameters" + "".join(f".{p}" for p in err.absolute_path)
        raise ValueError(f"`{where}` is not valid JSON Schema: {err.message}") from None
    missing = _required_not_allowed(parameters)
    if missing:
        raise ValueError(f"`parameters.required` names {missing!r}, which is not in `parameters.properties` while "
                         "additionalProperties is false: no call could pass; add it to properties or drop it")
    out = {"name": name, "description": str(function.get("description") or ""), "parameters": parameters}
    if "returns" in function:  # a non-standard schema of the result: the simulator is held to it
        out["returns"] = function["returns"]
    return {"type": "function", "function": out}


def _required_not_allowed(parameters: dict) -> str | None:
    properties = parameters.get("properties")
    if parameters.get("additionalProperties") is not False or not isinstance(properties, dict):
        return None
    return next((k for k in parameters.get("required") or () if k not in properties), None)


def load_tools(path: str | Path) -> list[dict]:
    """The tool definitions in a JSON or YAML file.

    Raises:
        ToolsError: the file is missing or unreadable, or a tool is not valid (``file:line: tool i
            (name): problem``), or two tools share a name.
    """
    entries, lines = _read_tools(Path(path))
    return check_tools(entries, str(path), lines)


def _read_tools(path: Path) -> tuple[list, dict[tuple, int]]:
    """A tools file's entries (the list, or the one under ``tools:``) as written, and the line of
    each key path within that list.

    Raises:
        ToolsError: the file is missing, unreadable, not JSON (a ``.json``) or YAML, or holds no list.
    """
    if not path.is_file():
        raise ToolsError(f"{path}: no such tools file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ToolsError(f"{path}: cannot read the tools file ({err}); it must be UTF-8 text (JSON or YAML)") from None
    try:
        data = json.loads(text)
    except ValueError as err:
        if path.suffix.lower() == ".json":
            raise ToolsError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as yerr:
            mark = getattr(yerr, "problem_mark", None)
            raise ToolsError(f"{path}:{mark.line + 1 if mark else 1}: neither JSON nor YAML: "
                             f"{getattr(yerr, 'problem', None) or yerr}") from None
        lines = _lines(text)
    else:  # JSON is YAML but for tabs, which JSON allows between tokens (never inside strings)
        lines = _lines(text.replace("\t", " "))
    prefix: tuple = ()
    if isinstance(data, dict) and "tools" in data:
        data, prefix = data["tools"], ("tools",)
    if not isinstance(data, list) or not data:
        raise ToolsError(f"{path}:1: a tools file holds a non-empty list of tool definitions (or {{tools: [...]}}), "
                         f"got {type(data).__name__ if data else 'nothing'}")
    return data, {k[len(prefix):]: v for k, v in lines.items() if k[:len(prefix)] == prefix}


def check_tools(entries: list, where: str, lines: dict | None = None) -> list[dict]:
    """``entries`` as normalized definitions, or ToolsError naming each bad one (with its line
    in ``where`` when ``lines`` maps key paths to lines)."""
    lines = lines or {}
    tools, problems, seen = [], [], {}
    for i, entry in enumerate(entries):
        try:
            tool = normalize(entry)
        except ValueError as err:
            name = _raw_name(entry)
            line = lines.get((i,))
            problems.append(f"{where}{f':{line}' if line else ''}: tool {i}{f' ({name})' if name else ''}: {err}")
            continue
        name = tool["function"]["name"]
        if name in seen:
            line = lines.get((i,))
            problems.append(f"{where}{f':{line}' if line else ''}: tool {i} ({name}): the name is taken by tool "
                            f"{seen[name]}; each tool needs its own name")
            continue
        seen[name] = i
        tools.append(tool)
    if problems:
        raise ToolsError("; ".join(problems))
    return tools


def _raw_name(entry: Any) -> str | None:
    if isinstance(entry, dict):
        function = entry.get("function") if isinstance(entry.get("function"), dict) else entry
        name = function.get("name")
        return name if isinstance(name, str) and name else None
    return None


def _lines(text: str) -> dict[tuple, int]:
    """Key paths of a JSON/YAML text mapped to their lines, 1-based (empty when YAML cannot read it)."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    lines: dict[tuple, int] = {}
    todo = [((), root)] if root is not None else []
    while todo:
        path, node = todo.pop()
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            todo += [(path + (key.value,), value) for key, value in node.value]
        elif isinstance(node, yaml.SequenceNode):
            todo += [(path + (i,), item) for i, item in enumerate(node.value)]
    return lines


def tool_lines(path: str | Path) -> dict[str, int]:
    """The line where each tool of a tools file is defined (its name's line), by name; empty when
    the file cannot be read."""
    try:
        entries, lines = _read_tools(Path(path))
    except ToolsError:
        return {}
    out = {}
    for i, entry in enumerate(entries):
        name = _raw_name(entry)
        key = (i, "function", "name") if isinstance(entry, dict) and "function" in entry else (i, "name")
        line = lines.get(key) or lines.get((i,))
        if name and line:
            out[name] = line
    return out


def tools_of(value: Any) -> list[dict]:
    """A row's ``tools`` value (JSON text or a list of definitions) as normalized definitions.
    Raises ValueError (with what is wrong) for anything else."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise ValueError(f"the tools are not JSON: {err}") from None
    else:  # read from a table: struct columns give every tool every key any tool has, missing ones None
        value = _without_nulls(value)
    if isinstance(value, dict) and "tools" in value:
        value = value["tools"]
    if not isinstance(value, list):
        raise ValueError(f"the tools must be a list of definitions, got {type(value).__name__}")
    try:
        return check_tools(value, "the row's tools")
    except ToolsError as err:
        raise ValueError(str(err)) from None


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def tools_text(tools: list[dict]) -> str:
    """Definitions as compact JSON text (what rows, requests and cache keys carry)."""
    return json.dumps(tools, ensure_ascii=False, separators=(",", ":"))


def by_name(tools: list[dict]) -> dict[str, dict]:
    return {t["function"]["name"]: t["function"] for t in tools}


# -- implementations ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CallResult:
    """What running one call gave: ``ok`` and the result as JSON text, or the error."""

    ok: bool
    content: str = ""
    error: str = ""


class Implementations:
    """The functions of one Python file, run by tool name in the sandbox.

    Args:
        path: the file (read once; never imported into this process).
        timeout: seconds one call may take (its process is killed after).
        memory_mb: address space of a call's process.
        network: whether calls may reach the network (an implementation that calls an API).
    """

    def __init__(self, path: str | Path, timeout: float = 5.0, memory_mb: int = 1024, network: bool = False):
        self.path = Path(path).resolve()
        try:
            self.code = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ToolsError(f"{path}: cannot read the implementations file ({err})") from None
        self.functions = top_level_functions(self.code, str(self.path))
        self.timeout, self.memory_mb, self.network = timeout, memory_mb, network

    def has(self, name: str) -> bool:
        return name in self.functions

    def limits(self):
        from .sandbox import Limits

        return Limits(time=self.timeout, memory_mb=self.memory_mb, network=self.network)

    def program(self, calls: list[tuple[str, dict]]):
        from .sandbox import Program

        return Program(self.code, setup=(f"__file__ = {str(self.path)!r}\n", _KW_HELPER),
                       calls=tuple((_KW_CALL, (name, arguments)) for name, arguments in calls))

    def check_imports(self) -> str | None:
        """Why the file cannot be loaded (its error at file:line), or None: it runs in the sandbox."""
        from .sandbox import run_program

        from .sandbox import Program

        # The file runs under its own name, so that the line that failed is known.
        loader = (f"import traceback as _tb\n_path, _code = {str(self.path)!r}, {self.code!r}\n"
                  "try:\n    exec(compile(_code, _path, 'exec'), {'__file__': _path, '__name__': 'tools'})\n"
                  "except BaseException as _err:\n"
                  "    _lines = [f.lineno for f in _tb.extract_tb(_err.__traceback__) if f.filename == _path]\n"
                  "    print('LINE', _lines[-1] if _lines else getattr(_err, 'lineno', None) or '', flush=True)\n"
                  "    raise\n")
        result = run_program(Program(loader, calls=(("str", (1,)),)), self.limits())
        if result.completed:
            return None
        line = next((part[5:].strip() for part in result.stdout.splitlines() if part.startswith("LINE ")), "")
        return f"{self.path}{':' + line if line else ''}: " \
               f"{describe_failure(result, self.timeout, 'loading the file')}"

    def run(self, calls: list[tuple[str, dict]]) -> list[CallResult]:
        """Each call run on its own (a process each, side by side), results in order."""
        from .sandbox import run_many

        # A call that cannot run is answered here: no process, and a message that says why.
        refused = [self._refusal(name, arguments) for name, arguments in calls]
        results = iter(run_many([self.program([call]) for call, why in zip(calls, refused) if why is None],
                                self.limits()))
        out = []
        for (name, _), why in zip(calls, refused):
            if why is not None:
                out.append(CallResult(False, error=why))
                continue
            result = next(results)
            record = result.first("call")
            if record is not None and record[2] == "ok":
                out.append(CallResult(True, record[3]))
            elif record is not None:
                detail = record[4] if len(record) > 4 and record[4] else record[3] if len(record) > 3 else "an error"
                out.append(CallResult(False, error=f"{name} raised {detail}"))
            else:
                out.append(CallResult(False, error=f"{name}: {describe_failure(result, self.timeout, 'the call')}"))
        return out

    def _refusal(self, name: str, arguments: Any) -> str | None:
        if not self.has(name):
            public = ", ".join(sorted(f for f in self.functions if not f.startswith("_"))) or "none"
            return f"{name}: {self.path.name} has no function {name!r} (its functions: {public})"
        if not isinstance(arguments, dict):
            return f"{name}: the arguments are not a JSON object ({str(arguments)[:80]!r})"
        return None


def top_level_functions(code: str, where: str) -> set[str]:
    """The names of the functions a file defines at its top level.

    Raises:
        ToolsError: the file does not parse (at its line).
    """
    try:
        tree = ast.parse(code, filename=where)
    except SyntaxError as err:
        raise ToolsError(f"{where}:{err.lineno}: {err.msg}") from None
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def describe_failure(result, timeout: float, what: str) -> str:
    if result.outcome == "timeout":
        return f"{what} did not finish within {timeout:g} s"
    if result.outcome == "output_limit":
        return f"{what} printed past the output limit"
    error = result.first("error")
    if error is not None:
        return f"{what} raised {error[3]}" if len(error) > 3 else f"{what} failed ({error})"
    exited = result.first("exit")
    if exited is not None:
        return f"{what} exited with status {exited[1]}"
    return f"{what} ended with {result.outcome}" + (f" ({result.signal})" if result.signal else "") + \
        (f": {result.stderr.strip().splitlines()[-1]}" if result.stderr.strip() else "")


# -- the format check ---------------------------------------------------------------------------

def call_problem(call: dict, tools: dict[str, dict]) -> str | None:
    """Why a call is not well formed (an unknown tool, arguments that are not an object or fail
    the tool's schema: jsonschema's message and where), or None."""
    name = call["name"]
    if name not in tools:
        return f"calls {name!r}, which is not one of the tools offered ({', '.join(sorted(tools))})"
    arguments = call["arguments"]
    if not isinstance(arguments, dict):
        return f"{name}: the arguments are not a JSON object ({str(arguments)[:80]!r})"
    errors = sorted(_validator(json.dumps(tools[name]["parameters"], sort_keys=True)).iter_errors(arguments),
                    key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        at = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        return f"{name}: arguments{at}: {err.message}"
    return None


@functools.lru_cache(maxsize=256)
def _validator(schema_text: str):
    from jsonschema import Draft202012Validator

    return Draft202012Validator(json.loads(schema_text))
