"""One JSON value checked against what its key must hold, the user's key path in every refusal.

The shapes (schemas/formats.py) and the tool calls inside them (schemas/tools.py) both read user values
through these, so a wrong value is refused with the same sentence wherever it stands.
"""

from __future__ import annotations

import json


class Shape(Exception):
    """A row that has none of its format's shapes: the user's key and what it must hold."""

    def __init__(self, field: str, rule: str):
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


def kind(value: object) -> str:
    """What a JSON value is, in the words a refusal uses."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if value == [] or value == {}:
        return f"an empty {'list' if isinstance(value, list) else 'object'}"
    return {str: "a string", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def get(row: dict, key: str, field: str | None = None) -> object:
    if key not in row:
        raise Shape(field or key, "required")
    return row[key]


def string(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise Shape(field, f"must be a string, not {kind(value)}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # JSON's \ud800-style escapes can name half a surrogate pair, which no UTF-8 text can hold.
            raise Shape(
                field, "holds an unpaired surrogate escape (\\ud800-\\udfff), which is not valid Unicode"
            ) from None
    return value


def strings(value: object, field: str) -> list[str]:
    if not isinstance(value, list):
        raise Shape(field, f"must be a list of strings, not {kind(value)}")
    return [string(item, f"{field}[{i}]") for i, item in enumerate(value)]


def number(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Shape(field, f"must be a number, not {kind(value)}")
    try:
        return float(value)
    except OverflowError:
        raise Shape(field, "is too large for a float") from None


def numbers(value: object, field: str) -> list[float]:
    if not isinstance(value, list):
        raise Shape(field, f"must be a list of numbers, not {kind(value)}")
    return [number(item, f"{field}[{i}]") for i, item in enumerate(value)]


def parsed(text: str, field: str) -> object:
    """A JSON document held in a string (tool calls and tool lists are often stored so)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise Shape(field, f"not valid JSON: {err.msg} at column {err.colno}") from None
    except RecursionError:
        raise Shape(field, "not valid JSON: nested too deeply") from None
    except ValueError as err:  # an integer literal of more digits than Python converts; its advice is for programmers
        raise Shape(field, f"not valid JSON: {str(err).split(':')[0]}") from None


def dumped(value: object, field: str) -> str:
    """`value` as the JSON text a canonical column holds; refused where strict JSON or UTF-8 cannot hold it."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise Shape(field, "holds NaN or Infinity, which JSON cannot write") from None
    except RecursionError:
        raise Shape(field, "is nested too deeply") from None
    return string(text, field)
