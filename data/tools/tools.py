"""The implementations of the bundled tools (data/tools/tools.json): one function per tool name.

Each function takes the tool's arguments as keyword arguments, returns a JSON-serializable
value, and raises ValueError with a message a model can act on when the input is wrong. The
factory runs them in its sandbox (a process per call, as an unprivileged user when it runs as
root), with ``__file__`` set to this file, so the country table is found beside it. Only the
standard library is imported.
"""

import ast
import datetime
import json
import math
import operator
import re
from pathlib import Path

# -- calculator --------------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 500
MAX_INT_BITS = 4096  # past this an integer result is refused, before it is computed (9**9**9 would hang)
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_SYMBOLS = {ast.BitXor: "^ (write ** for a power)", ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<",
            ast.RShift: ">>", ast.MatMult: "@", ast.Invert: "~", ast.Not: "not"}


def calculator(expression):
    """The value of an arithmetic expression: numbers, + - * / // % **, parentheses, unary minus."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("expression must be a non-empty text such as '(2 + 3) * 4'")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"cannot read the expression {expression!r}: {err.msg}") from None
    except RecursionError:
        raise ValueError("the expression is nested too deeply") from None
    try:
        value = _evaluate(tree.body)
    except RecursionError:
        raise ValueError("the expression is nested too deeply") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("the result is too large to represent")
    return value


def _evaluate(node):
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ValueError(f"only numbers are allowed, not {node.value!r}")
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ValueError("division by zero")
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            value = _BINARY[type(node.op)](left, right)
        except OverflowError:
            raise ValueError("the result is too large to represent") from None
        if isinstance(value, complex):
            raise ValueError("a negative number raised to a fractional power has no real value")
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise ValueError("the result is too large (over 1200 digits)")
        return value
    op = getattr(node, "op", None)
    if op is not None and type(op) in _SYMBOLS:
        raise ValueError(f"the operator {_SYMBOLS[type(op)]} is not supported; use + - * / // % ** and parentheses")
    if isinstance(node, ast.Name):
        raise ValueError(f"unknown name {node.id!r}: the expression may hold only numbers and operators")
    if isinstance(node, ast.Call):
        raise ValueError("function calls are not supported; use + - * / // % ** and parentheses")
    if isinstance(node, ast.Tuple):
        raise ValueError("a comma is not allowed (write 1000, not 1,000)")
    raise ValueError(f"{type(node).__name__} is not allowed: the expression may hold only numbers, "
                     "+ - * / // % ** and parentheses")


def _check_power(base, exponent):
    if base == 0 and exponent < 0:
        raise ValueError("division by zero (zero raised to a negative power)")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS:
            raise ValueError("the result is too large (over 1200 digits)")


# -- convert_units -------------------------------------------------------------------------------

# Each unit's size in its kind's base unit (metre, kilogram, litre, second); exact by definition.
UNITS = {
    "length": {"mm": 0.001, "cm": 0.01, "m": 1.0, "km": 1000.0, "in": 0.0254, "ft": 0.3048, "yd": 0.9144,
               "mi": 1609.344, "nmi": 1852.0},
    "mass": {"mg": 1e-6, "g": 0.001, "kg": 1.0, "t": 1000.0, "oz": 0.028349523125, "lb": 0.45359237,
             "st": 6.35029318},
    "volume": {"ml": 0.001, "l": 1.0, "m3": 1000.0, "tsp": 0.00492892159375, "tbsp": 0.01478676478125,
               "fl_oz": 0.0295735295625, "cup": 0.2365882365, "pt": 0.473176473, "qt": 0.946352946,
               "gal": 3.785411784, "imp_gal": 4.54609},
    "time": {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "day": 86400.0, "week": 604800.0},
    "temperature": {"celsius": None, "fahrenheit": None, "kelvin": None},
}
KIND = {unit: kind for kind, units in UNITS.items() for unit in units}
ABSOLUTE_ZERO_C = -273.15


def convert_units(value, from_unit, to_unit):
    """``value`` in ``from_unit`` expressed in ``to_unit`` (same kind of quantity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"value must be a finite number, got {value!r}")
    for role, unit in (("from_unit", from_unit), ("to_unit", to_unit)):
        if unit not in KIND:
            raise ValueError(f"{role}: unknown unit {unit!r}; known units: {', '.join(KIND)}")
    kind = KIND[from_unit]
    if KIND[to_unit] != kind:
        raise ValueError(f"cannot convert {kind} ({from_unit}) to {KIND[to_unit]} ({to_unit})")
    if kind == "temperature":
        celsius = _to_celsius(value, from_unit)
        if celsius < ABSOLUTE_ZERO_C - 1e-9:
            raise ValueError(f"{value} {from_unit} is below absolute zero")
        result = _from_celsius(celsius, to_unit)
    else:
        result = value * UNITS[kind][from_unit] / UNITS[kind][to_unit]
    return {"value": float(f"{result:.12g}"), "unit": to_unit}


def _to_celsius(value, unit):
    return {"celsius": value, "fahrenheit": (value - 32) * 5 / 9, "kelvin": value + ABSOLUTE_ZERO_C}[unit]


def _from_celsius(celsius, unit):
    return {"celsius": celsius, "fahrenheit": celsius * 9 / 5 + 32, "kelvin": celsius - ABSOLUTE_ZERO_C}[unit]


# -- date_helper ---------------------------------------------------------------------------------

ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def date_helper(operation, date, other_date=None, days=None):
    """Calendar arithmetic on ISO dates (YYYY-MM-DD): days_between, add_days, weekday."""
    start = _iso_date(date, "date")
    if operation == "days_between":
        if other_date is None:
            raise ValueError("days_between needs other_date (YYYY-MM-DD)")
        return {"days": (_iso_date(other_date, "other_date") - start).days}
    if operation == "add_days":
        if isinstance(days, float) and days.is_integer():
            days = int(days)  # JSON has one number type: 3.0 is an integer to JSON Schema
        if isinstance(days, bool) or not isinstance(days, int):
            raise ValueError(f"add_days needs days, a whole number (negative to go back), got {days!r}")
        try:
            end = start + datetime.timedelta(days=days)
        except OverflowError:
            raise ValueError("the resulting date is outside the years 1 to 9999") from None
        return {"date": end.isoformat(), "weekday": WEEKDAYS[end.weekday()]}
    if operation == "weekday":
        return {"weekday": WEEKDAYS[start.weekday()]}
    raise ValueError(f"unknown operation {operation!r}; use days_between, add_days or weekday")


def _iso_date(text, role):
    if not isinstance(text, str) or not ISO_DATE.fullmatch(text.strip()):
        raise ValueError(f"{role} must be an ISO date YYYY-MM-DD such as 2024-03-01, got {text!r}")
    try:
        return datetime.date.fromisoformat(text.strip())
    except ValueError as err:
        raise ValueError(f"{role} {text!r} is not a date on the calendar ({err})") from None


# -- lookup --------------------------------------------------------------------------------------

FIELDS = ("name", "capital", "continent", "population", "area_km2", "currency", "currency_code",
          "official_languages")
NUMERIC = ("population", "area_km2")


def lookup(operation, country=None, fields=None, field=None, value=None, sort_by=None, limit=None):
    """Facts about countries from countries.json: one country's fields, or the countries that match."""
    rows = _countries()
    shown = _fields(fields)
    if operation == "get":
        if not isinstance(country, str) or not country.strip():
            raise ValueError("get needs country, a country's name such as 'France'")
        row = _find(rows, country)
        return {key: row[key] for key in ("name",) + shown}
    if operation == "list":
        matched = [row for row in rows if _matches(row, field, value)]
        if sort_by is not None:
            if sort_by not in ("name",) + NUMERIC:
                raise ValueError(f"sort_by must be one of name, {', '.join(NUMERIC)}; got {sort_by!r}")
            matched.sort(key=lambda row: row[sort_by], reverse=sort_by in NUMERIC)
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"limit must be a whole number of at least 1, got {limit!r}")
            count, matched = len(matched), matched[:limit]
        else:
            count = len(matched)
        return {"count": count, "countries": [{key: row[key] for key in ("name",) + shown} for row in matched]}
    raise ValueError(f"unknown operation {operation!r}; use get (one country) or list (countries that match)")


def _countries():
    data = json.loads((Path(__file__).parent / "countries.json").read_text(encoding="utf-8"))
    return data["countries"]


def _fields(fields):
    if fields is None:
        return FIELDS[1:]
    if not isinstance(fields, list) or not fields:
        raise ValueError(f"fields must be a non-empty list of field names from {', '.join(FIELDS)}")
    unknown = [f for f in fields if f not in FIELDS]
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
    return tuple(f for f in dict.fromkeys(fields) if f != "name")


def _find(rows, name):
    wanted = name.strip().casefold()
    for row in rows:
        if wanted in (alias.casefold() for alias in [row["name"]] + row.get("other_names", [])):
            return row
    raise ValueError(f"no country named {name!r} in the table; list with operation 'list' to see the names")


def _matches(row, field, value):
    if field is None and value is None:
        return True
    if field not in FIELDS or field in NUMERIC:
        raise ValueError(f"field must be one of {', '.join(f for f in FIELDS if f not in NUMERIC)} to match on "
                         f"(numbers are sorted with sort_by, not matched), got {field!r}")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"list by {field} needs value, the text to match (such as 'Europe')")
    cell = row[field]
    wanted = value.strip().casefold()
    return any(wanted == item.casefold() for item in cell) if isinstance(cell, list) else cell.casefold() == wanted
