"""Tests of tool definitions (load_tools, tools_of), implementations run in the sandbox, and data/tools.

The bundled tools' values are checked against figures worked out by hand (2 km = 2000 / 1609.344 mi,
100 °C = 212 °F, February 2024 has 29 days), and their arguments against the reply schema.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import stat
import tempfile
import textwrap
from pathlib import Path

import jsonschema
import pytest

from factory.llm.tool_format import reply_schema
from factory.tools import (CallResult, Implementations, ToolsError, call_problem, by_name, load_tools,
                           tools_of, tools_text)

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "data" / "tools"

CALC = {"type": "function", "function": {
    "name": "calc", "description": "Adds.",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# -- definitions -------------------------------------------------------------------------------

def test_load_tools_wraps_bare_function_parts_and_fills_defaults(tmp_path):
    path = write(tmp_path, "tools.json", json.dumps([
        CALC,
        {"name": "now", "description": "The time."},  # bare function part, no parameters
        {"type": "function", "name": "flat", "parameters": EMPTY_PARAMETERS},  # the Responses API's layout
    ], indent=1))
    assert load_tools(path) == [
        CALC,
        {"type": "function", "function": {"name": "now", "description": "The time.", "parameters": EMPTY_PARAMETERS}},
        {"type": "function", "function": {"name": "flat", "description": "", "parameters": EMPTY_PARAMETERS}},
    ]


def test_load_tools_reads_yaml_and_a_tools_key(tmp_path):
    path = write(tmp_path, "tools.yaml", """\
        tools:
          - type: function
            function:
              name: calc
              description: Adds.
              parameters:
                type: object
                properties: {a: {type: number}, b: {type: number}}
                required: [a, b]
                additionalProperties: false
        """)
    assert load_tools(path) == [CALC]
    assert load_tools(write(tmp_path, "wrapped.json", json.dumps({"tools": [CALC]}))) == [CALC]


def test_invalid_json_is_reported_at_its_line(tmp_path):
    path = write(tmp_path, "tools.json", '[\n  {"name": "a"},\n  {"name": "b"\n  {"name": "c"}\n]\n')
    with pytest.raises(ToolsError) as err:
        load_tools(path)
    assert str(err.value) == f"{path}:4: not valid JSON: Expecting ',' delimiter"


def test_a_tool_without_a_name_is_reported_at_its_line(tmp_path):
    path = write(tmp_path, "tools.json", '[\n  {"name": "a"},\n\n  {"description": "nameless"}\n]\n')
    with pytest.raises(ToolsError) as err:
        load_tools(path)
    assert str(err.value) == f"{path}:4: tool 1: the tool has no `name`"
    yaml_path = write(tmp_path, "tools.yaml", "tools:\n  - name: a\n  - description: nameless\n    parameters: {}\n")
    with pytest.raises(ToolsError) as err:
        load_tools(yaml_path)
    assert str(err.value) == f"{yaml_path}:3: tool 1: the tool has no `name`"


def test_tab_indented_json_keeps_its_lines(tmp_path):
    # JSON allows tabs between tokens, YAML does not: the lines must still be found
    path = write(tmp_path, "tools.json", '[\n\t{"name": "a"},\n\t{"description": "nameless"}\n]\n')
    with pytest.raises(ToolsError) as err:
        load_tools(path)
    assert str(err.value) == f"{path}:3: tool 1: the tool has no `name`"


def test_parameters_that_are_not_json_schema_name_the_path(tmp_path):
    path = write(tmp_path, "tools.json", """\
        [
          {"name": "ok"},
          {"name": "bad",
           "parameters": {"type": "object", "properties": {"x": {"type": "integr"}}}},
          {"name": "array", "parameters": {"type": "array"}}
        ]
        """)
    with pytest.raises(ToolsError) as err:
        load_tools(path)
    assert str(err.value) == (
        f"{path}:3: tool 1 (bad): `parameters.properties.x.type` is not valid JSON Schema: "
        "'integr' is not valid under any of the given schemas; "
        f"{path}:5: tool 2 (array): `parameters` must be an object schema (type: object), got type 'array'")


def test_duplicate_names_and_bad_names(tmp_path):
    path = write(tmp_path, "tools.yaml", "- name: a\n- name: b\n- name: a\n- name: get weather\n- name: café\n"
                                         f"- name: {'x' * 65}\n- name: a.b\n- name: {'y' * 64}\n")
    with pytest.raises(ToolsError) as err:
        load_tools(path)
    rule = "must be 1 to 64 of the characters a-z A-Z 0-9 _ - (OpenAI's rule for function names)"
    assert str(err.value) == "; ".join([
        f"{path}:3: tool 2 (a): the name is taken by tool 0; each tool needs its own name",
        f"{path}:4: tool 3 (get weather): the tool name 'get weather' {rule}",
        f"{path}:5: tool 4 (café): the tool name 'café' {rule}",
        f"{path}:6: tool 5 ({'x' * 65}): the tool name '{'x' * 65}' {rule}",
        f"{path}:7: tool 6 (a.b): the tool name 'a.b' {rule}",
    ])


def test_a_required_argument_that_no_call_can_give_is_refused(tmp_path):
    tool = {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string"}},
                                        "required": ["x", "y"], "additionalProperties": False}}
    with pytest.raises(ToolsError, match=r"tool 0 \(f\): `parameters.required` names 'y', which is not in"):
        load_tools(write(tmp_path, "tools.json", json.dumps([tool])))
    tool["parameters"]["additionalProperties"] = True  # then y may come as an extra property
    assert load_tools(write(tmp_path, "open.json", json.dumps([tool])))[0]["function"]["parameters"]["required"] == \
        ["x", "y"]


@pytest.mark.parametrize("text, message", [
    ("[]", ":1: a tools file holds a non-empty list of tool definitions (or {tools: [...]}), got nothing"),
    ('"calc"', ":1: a tools file holds a non-empty list of tool definitions (or {tools: [...]}), got str"),
    ("tools:\n  - name: a\n   bad: [\n",
     ":3: neither JSON nor YAML: expected <block end>, but found '<block mapping start>'"),
])
def test_files_that_hold_no_tools(tmp_path, text, message):
    path = write(tmp_path, "tools.yaml", text)
    with pytest.raises(ToolsError) as err:
        load_tools(path)
    assert str(err.value) == f"{path}{message}"


def test_missing_and_unreadable_tools_files(tmp_path):
    with pytest.raises(ToolsError, match=r"nope\.json: no such tools file$"):
        load_tools(tmp_path / "nope.json")
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"name": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(ToolsError, match=r"latin\.json: cannot read the tools file .* it must be UTF-8 text"):
        load_tools(latin)


def test_tools_of_reads_a_rows_value():
    text = tools_text([CALC])
    assert json.loads(text) == [CALC] and " " not in text.replace("Adds.", "")  # compact
    assert tools_of(text) == [CALC]
    assert tools_of([CALC["function"]]) == [CALC]  # a list, bare function parts
    assert tools_of(json.dumps({"tools": [CALC]})) == [CALC]
    with pytest.raises(ValueError, match="^the tools are not JSON: Expecting property name enclosed in double quotes"):
        tools_of("[{")
    with pytest.raises(ValueError, match="^the tools must be a list of definitions, got int$"):
        tools_of(3)
    with pytest.raises(ValueError, match=r"^the row's tools: tool 0: the tool has no `name`$"):
        tools_of('[{"description": "x"}]')


# -- implementations ---------------------------------------------------------------------------

IMPLEMENTATIONS = """\
import json
import time
from pathlib import Path


def add(a, b):
    return a + b


def greet(name, punctuation="!"):
    return {"text": f"Hello, {name}{punctuation}"}


def city(name):
    raise ValueError(f"no such city: {name}")


def wait():
    time.sleep(60)


def table(key):
    return json.loads((Path(__file__).parent / "table.json").read_text())[key]


def _helper():
    return 1
"""


@pytest.fixture(scope="module")
def shared_folder():
    """A folder every user can read: the sandbox runs calls as `nobody` when the tests run as root."""
    with tempfile.TemporaryDirectory(prefix="factory-tools-test-") as folder:
        os.chmod(folder, 0o755)
        yield Path(folder)


@pytest.fixture(scope="module")
def implementations(shared_folder):
    path = write(shared_folder, "impl.py", IMPLEMENTATIONS)
    (shared_folder / "table.json").write_text(json.dumps({"pi": 3.14159}))
    for file in (path, shared_folder / "table.json"):
        os.chmod(file, 0o644)
    return Implementations(path, timeout=10.0)


def test_calls_give_their_results_in_order(implementations):
    results = implementations.run([("greet", {"name": "Ada"}), ("add", {"a": 2, "b": 3}),
                                   ("greet", {"name": "Bo", "punctuation": "?"}), ("table", {"key": "pi"})])
    assert results == [CallResult(True, '{"text": "Hello, Ada!"}'), CallResult(True, "5"),
                       CallResult(True, '{"text": "Hello, Bo?"}'), CallResult(True, "3.14159")]


def test_calls_that_fail_say_why(implementations):
    path = implementations.path
    results = implementations.run([("city", {"name": "Atlantis"}), ("nope", {}), ("add", {"a": 1}),
                                   ("add", [1, 2])])
    assert results == [
        CallResult(False, error="city raised ValueError: no such city: Atlantis"),
        CallResult(False, error=f"nope: {path.name} has no function 'nope' (its functions: add, city, greet, "
                                "table, wait)"),
        CallResult(False, error="add raised TypeError: add() missing 1 required positional argument: 'b'"),
        CallResult(False, error="add: the arguments are not a JSON object ('[1, 2]')"),
    ]
    hurried = Implementations(path, timeout=1.0)  # a call that hangs is killed at the limit
    assert hurried.run([("wait", {})]) == [CallResult(False, error="wait: the call did not finish within 1 s")]


def test_the_file_is_checked_before_any_call(implementations, shared_folder):
    assert implementations.functions == {"add", "greet", "city", "wait", "table", "_helper"}
    assert implementations.has("add") and not implementations.has("json")  # an imported module is no tool
    assert implementations.check_imports() is None
    broken = write(shared_folder, "broken.py", "import json\n\nimport not_a_module_xyz\n\n\ndef f():\n    pass\n")
    assert Implementations(broken).check_imports() == (
        f"{broken}:3: loading the file raised ModuleNotFoundError: No module named 'not_a_module_xyz'")
    raising = write(shared_folder, "raising.py", "def f():\n    return 1 / 0\n\n\nVALUE = f()\n")
    assert Implementations(raising).check_imports() == (
        f"{raising}:2: loading the file raised ZeroDivisionError: division by zero")
    syntax = write(shared_folder, "syntax.py", "def f():\n    return 1\n\ndef g(:\n    pass\n")
    with pytest.raises(ToolsError) as err:
        Implementations(syntax)
    assert str(err.value) == f"{syntax}:4: invalid syntax"
    with pytest.raises(ToolsError, match=r"missing\.py: cannot read the implementations file"):
        Implementations(shared_folder / "missing.py")


# -- the bundled tools ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundled():
    """data/tools/tools.py imported here, for checks of many values (the sandbox runs it too, below)."""
    spec = importlib.util.spec_from_file_location("bundled_tools", BUNDLED / "tools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def definitions():
    return load_tools(BUNDLED / "tools.json")


def test_bundled_files_are_readable_by_every_user():
    # the sandbox runs each call as `nobody` when the factory runs as root
    for path in [BUNDLED, *BUNDLED.iterdir()]:
        mode = path.stat().st_mode
        wanted = stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0)
        assert mode & wanted == wanted, f"{path} has mode {oct(mode & 0o777)}"


def test_every_bundled_definition_has_a_function_with_its_arguments(definitions):
    assert [t["function"]["name"] for t in definitions] == ["calculator", "convert_units", "date_helper", "lookup"]
    tree = ast.parse((BUNDLED / "tools.py").read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    for tool in definitions:
        function, parameters = tool["function"], tool["function"]["parameters"]
        assert function["description"] and parameters["additionalProperties"] is False and parameters["required"]
        assert all(p.get("description") for p in parameters["properties"].values()), function["name"]
        node = functions[function["name"]]
        names = [a.arg for a in node.args.args]
        assert set(names) == set(parameters["properties"]), function["name"]
        without_default = names[:len(names) - len(node.args.defaults)]
        assert without_default == parameters["required"], function["name"]


def test_bundled_tools_run_in_the_sandbox(definitions):
    implementations = Implementations(BUNDLED / "tools.py", timeout=10)
    assert implementations.check_imports() is None
    assert all(implementations.has(t["function"]["name"]) for t in definitions)
    results = implementations.run([
        ("calculator", {"expression": "(2 + 3) * 4"}),
        ("convert_units", {"value": 100, "from_unit": "celsius", "to_unit": "fahrenheit"}),
        ("date_helper", {"operation": "days_between", "date": "2024-02-01", "other_date": "2024-03-01"}),
        ("lookup", {"operation": "get", "country": "France", "fields": ["capital"]}),  # reads countries.json
        ("calculator", {"expression": "1 / 0"}),
    ])
    assert results == [CallResult(True, "20"), CallResult(True, '{"value": 212.0, "unit": "fahrenheit"}'),
                       CallResult(True, '{"days": 29}'), CallResult(True, '{"name": "France", "capital": "Paris"}'),
                       CallResult(False, error="calculator raised ValueError: division by zero")]


@pytest.mark.parametrize("expression, value", [
    ("(2 + 3) * 4", 20), ("7 / 2", 3.5), ("7 // 2", 3), ("-7 % 3", 2), ("2 ** 10 - 1", 1023),
    ("-(3 - 5) * 1.5", 3.0), ("1e3 + 1", 1001.0), ("2 ** -2", 0.25), ("--4", 4), ("  12.5 ", 12.5),
    ("10 ** 100", 10 ** 100),
])
def test_calculator_values(bundled, expression, value):
    result = bundled.calculator(expression)
    assert result == value and type(result) is type(value)


@pytest.mark.parametrize("expression, message", [
    ("1 / 0", "division by zero"), ("5 // (2 - 2)", "division by zero"), ("5 % 0", "division by zero"),
    ("0 ** -1", "division by zero (zero raised to a negative power)"),
    ("x + 1", "unknown name 'x': the expression may hold only numbers and operators"),
    ("__import__('os').getcwd()", "function calls are not supported; use + - * / // % ** and parentheses"),
    ("2 ^ 3", "the operator ^ (write ** for a power) is not supported; use + - * / // % ** and parentheses"),
    ("9 ** 9 ** 9", "the result is too large (over 1200 digits)"),  # refused before it is computed
    ("10.0 ** 400", "the result is too large to represent"),
    ("(-8) ** 0.5", "a negative number raised to a fractional power has no real value"),
    ("1,000", "a comma is not allowed (write 1000, not 1,000)"),
    ("'a' * 3", "only numbers are allowed, not 'a'"), ("True + 1", "only numbers are allowed, not True"),
    ("1 < 2", "Compare is not allowed: the expression may hold only numbers, + - * / // % ** and parentheses"),
    ("", "expression must be a non-empty text such as '(2 + 3) * 4'"),
    ("1 +", "cannot read the expression '1 +': invalid syntax"),
])
def test_calculator_errors(bundled, expression, message):
    with pytest.raises(ValueError) as err:
        bundled.calculator(expression)
    assert str(err.value) == message


@pytest.mark.parametrize("value, from_unit, to_unit, expected", [
    (2, "km", "mi", 2000 / 1609.344), (100, "celsius", "fahrenheit", 212), (-40, "fahrenheit", "celsius", -40),
    (0, "kelvin", "celsius", -273.15), (98.6, "fahrenheit", "kelvin", 310.15), (1, "gal", "l", 3.785411784),
    (1, "imp_gal", "ml", 4546.09), (90, "min", "h", 1.5), (1, "week", "s", 7 * 24 * 3600), (1, "lb", "g", 453.59237),
    (1, "st", "lb", 14), (12, "in", "ft", 1), (1, "nmi", "m", 1852), (3, "tsp", "tbsp", 1), (2, "cup", "pt", 1),
])
def test_convert_units_values(bundled, value, from_unit, to_unit, expected):
    assert bundled.convert_units(value, from_unit, to_unit) == {"value": pytest.approx(expected, rel=1e-11),
                                                                "unit": to_unit}


def test_convert_units_knows_exactly_the_units_its_schema_offers(bundled, definitions):
    schema = by_name(definitions)["convert_units"]["parameters"]["properties"]
    offered = schema["from_unit"]["enum"]
    assert offered == schema["to_unit"]["enum"] and len(offered) == len(set(offered)) == 36
    for unit in offered:
        assert bundled.convert_units(1, unit, unit) == {"value": 1.0, "unit": unit}
    with pytest.raises(ValueError, match="^from_unit: unknown unit 'furlong'; known units: mm, cm"):
        bundled.convert_units(1, "furlong", "m")


@pytest.mark.parametrize("args, message", [
    ((1, "km", "kg"), "cannot convert length (km) to mass (kg)"),
    ((-300, "celsius", "kelvin"), "-300 celsius is below absolute zero"),
    ((-1, "kelvin", "celsius"), "-1 kelvin is below absolute zero"),
    (("3", "m", "cm"), "value must be a finite number, got '3'"),
    ((True, "m", "cm"), "value must be a finite number, got True"),
    ((float("nan"), "m", "cm"), "value must be a finite number, got nan"),
])
def test_convert_units_errors(bundled, args, message):
    with pytest.raises(ValueError) as err:
        bundled.convert_units(*args)
    assert str(err.value) == message


@pytest.mark.parametrize("kwargs, expected", [
    ({"operation": "days_between", "date": "2024-02-01", "other_date": "2024-03-01"}, {"days": 29}),  # leap year
    ({"operation": "days_between", "date": "2023-02-01", "other_date": "2023-03-01"}, {"days": 28}),
    ({"operation": "days_between", "date": "2024-03-01", "other_date": "2024-02-01"}, {"days": -29}),
    ({"operation": "days_between", "date": "2023-01-01", "other_date": "2024-01-01"}, {"days": 365}),
    ({"operation": "add_days", "date": "2024-02-28", "days": 2}, {"date": "2024-03-01", "weekday": "Friday"}),
    ({"operation": "add_days", "date": "2024-01-01", "days": -1}, {"date": "2023-12-31", "weekday": "Sunday"}),
    ({"operation": "add_days", "date": "2024-01-01", "days": 3.0}, {"date": "2024-01-04", "weekday": "Thursday"}),
    ({"operation": "weekday", "date": "2000-01-01"}, {"weekday": "Saturday"}),
    ({"operation": "weekday", "date": "1969-07-20"}, {"weekday": "Sunday"}),
])
def test_date_helper_values(bundled, kwargs, expected):
    assert bundled.date_helper(**kwargs) == expected


@pytest.mark.parametrize("kwargs, message", [
    ({"operation": "weekday", "date": "01/03/2024"},
     "date must be an ISO date YYYY-MM-DD such as 2024-03-01, got '01/03/2024'"),
    ({"operation": "weekday", "date": "20240301"},
     "date must be an ISO date YYYY-MM-DD such as 2024-03-01, got '20240301'"),
    ({"operation": "weekday", "date": "2023-02-29"},
     "date '2023-02-29' is not a date on the calendar (day is out of range for month)"),
    ({"operation": "days_between", "date": "2024-01-01"}, "days_between needs other_date (YYYY-MM-DD)"),
    ({"operation": "days_between", "date": "2024-01-01", "other_date": "2024-13-01"},
     "other_date '2024-13-01' is not a date on the calendar (month must be in 1..12)"),
    ({"operation": "add_days", "date": "2024-01-01", "days": "3"},
     "add_days needs days, a whole number (negative to go back), got '3'"),
    ({"operation": "add_days", "date": "2024-01-01", "days": 1.5},
     "add_days needs days, a whole number (negative to go back), got 1.5"),
    ({"operation": "add_days", "date": "9999-12-31", "days": 1}, "the resulting date is outside the years 1 to 9999"),
    ({"operation": "yesterday", "date": "2024-01-01"},
     "unknown operation 'yesterday'; use days_between, add_days or weekday"),
])
def test_date_helper_errors(bundled, kwargs, message):
    with pytest.raises(ValueError) as err:
        bundled.date_helper(**kwargs)
    assert str(err.value) == message


def test_country_table_holds_what_its_readme_says():
    data = json.loads((BUNDLED / "countries.json").read_text(encoding="utf-8"))
    assert "2023" in data["about"]["population"] and "rounded to the nearest 100,000" in data["about"]["population"]
    rows = data["countries"]
    assert len(rows) >= 40 and len({r["name"] for r in rows}) == len(rows)
    for row in rows:
        assert isinstance(row["population"], int) and row["population"] % 100_000 == 0 and row["population"] > 0
        assert isinstance(row["area_km2"], int) and row["area_km2"] > 0
        assert all(isinstance(row[k], str) and row[k] for k in ("capital", "continent", "currency"))
        assert len(row["currency_code"]) == 3 and row["currency_code"].isupper()
        assert row["official_languages"] and all(isinstance(x, str) for x in row["official_languages"])
        assert row["continent"] in {"Africa", "Asia", "Europe", "North America", "South America", "Oceania"}


@pytest.mark.parametrize("kwargs, expected", [
    ({"operation": "get", "country": "Japan", "fields": ["capital"]}, {"name": "Japan", "capital": "Tokyo"}),
    ({"operation": "get", "country": "  kEnYa ", "fields": ["capital", "currency_code"]},
     {"name": "Kenya", "capital": "Nairobi", "currency_code": "KES"}),
    ({"operation": "get", "country": "USA", "fields": ["capital"]},
     {"name": "United States", "capital": "Washington, D.C."}),
    ({"operation": "get", "country": "Switzerland", "fields": ["official_languages"]},
     {"name": "Switzerland", "official_languages": ["German", "French", "Italian", "Romansh"]}),
    ({"operation": "list", "field": "continent", "value": "oceania", "fields": ["capital"]},
     {"count": 2, "countries": [{"name": "Australia", "capital": "Canberra"},
                                {"name": "New Zealand", "capital": "Wellington"}]}),
    ({"operation": "list", "field": "official_languages", "value": "French", "fields": ["name"]},
     {"count": 4, "countries": [{"name": n} for n in ("Belgium", "Canada", "France", "Switzerland")]}),
    ({"operation": "list", "sort_by": "area_km2", "limit": 2, "fields": ["name"]},
     {"count": 46, "countries": [{"name": "Russia"}, {"name": "Canada"}]}),
    ({"operation": "list", "sort_by": "population", "limit": 2, "fields": ["name"]},
     {"count": 46, "countries": [{"name": "India"}, {"name": "China"}]}),  # India passed China in 2023
])
def test_lookup_values(bundled, kwargs, expected):
    assert bundled.lookup(**kwargs) == expected


def test_lookup_lists_the_euro_countries(bundled):
    euro = {"Austria", "Belgium", "Finland", "France", "Germany", "Greece", "Ireland", "Italy", "Netherlands",
            "Portugal", "Spain"}
    got = bundled.lookup("list", field="currency_code", value="EUR")
    assert got["count"] == len(euro) and {c["name"] for c in got["countries"]} == euro
    assert set(got["countries"][0]) == {"name", "capital", "continent", "population", "area_km2", "currency",
                                        "currency_code", "official_languages"}  # every field by default


@pytest.mark.parametrize("kwargs, message", [
    ({"operation": "get", "country": "Atlantis"},
     "no country named 'Atlantis' in the table; list with operation 'list' to see the names"),
    ({"operation": "get"}, "get needs country, a country's name such as 'France'"),
    ({"operation": "get", "country": "Peru", "fields": ["gdp"]},
     "unknown field 'gdp'; the fields are name, capital, continent, population, area_km2, currency, "
     "currency_code, official_languages"),
    ({"operation": "list", "field": "population", "value": "5"},
     "field must be one of name, capital, continent, currency, currency_code, official_languages to match on "
     "(numbers are sorted with sort_by, not matched), got 'population'"),
    ({"operation": "list", "field": "continent"},
     "list by continent needs value, the text to match (such as 'Europe')"),
    ({"operation": "list", "limit": 0}, "limit must be a whole number of at least 1, got 0"),
    ({"operation": "delete"}, "unknown operation 'delete'; use get (one country) or list (countries that match)"),
])
def test_lookup_errors(bundled, kwargs, message):
    with pytest.raises(ValueError) as err:
        bundled.lookup(**kwargs)
    assert str(err.value) == message


# -- the reply schema and call checks on the bundled tools ---------------------------------------

VALID_CALLS = [
    ("calculator", {"expression": "2 ** 10"}),
    ("convert_units", {"value": 2.5, "from_unit": "km", "to_unit": "mi"}),
    ("date_helper", {"operation": "add_days", "date": "2024-02-28", "days": 2}),
    ("lookup", {"operation": "list", "field": "continent", "value": "Europe", "sort_by": "population", "limit": 3}),
]


def test_valid_calls_pass_the_reply_schema_and_the_call_check(definitions):
    schema, tools = reply_schema(definitions), by_name(definitions)
    for name, arguments in VALID_CALLS:
        assert call_problem({"name": name, "arguments": arguments}, tools) is None
        jsonschema.validate({"tool_calls": [{"name": name, "arguments": arguments}]}, schema)
    jsonschema.validate({"tool_calls": [{"name": n, "arguments": a} for n, a in VALID_CALLS]}, schema)  # parallel
    jsonschema.validate({"answer": "Paris is the capital."}, schema)


@pytest.mark.parametrize("name, arguments, problem", [
    ("convert_units", {"value": 1, "from_unit": "km", "to_unit": "furlong"},
     "convert_units: arguments.to_unit: 'furlong' is not one of ['mm', 'cm', 'm', 'km'"),
    ("date_helper", {"operation": "weekday"}, "date_helper: arguments: 'date' is a required property"),
    ("calculator", {"expression": "1 + 1", "precision": 2},
     "calculator: arguments: Additional properties are not allowed ('precision' was unexpected)"),
    ("date_helper", {"operation": "weekday", "date": "1 March 2024"},
     "date_helper: arguments.date: '1 March 2024' does not match '^[0-9]{4}-[0-9]{2}-[0-9]{2}$'"),
    ("lookup", {"operation": "list", "limit": 0}, "lookup: arguments.limit: 0 is less than the minimum of 1"),
    ("weather", {"city": "Paris"}, "calls 'weather', which is not one of the tools offered (calculator, "
                                   "convert_units, date_helper, lookup)"),
])
def test_invalid_calls_are_refused(definitions, name, arguments, problem):
    assert call_problem({"name": name, "arguments": arguments}, by_name(definitions)).startswith(problem)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool_calls": [{"name": name, "arguments": arguments}]}, reply_schema(definitions))
