"""Tool calls and tool definitions, in each dialect the anchors write, as the conversations format's columns.

    OpenAI chat fine-tuning  an assistant message's tool_calls: [{id?, type: function, function: {name,
                             arguments: "<JSON text>"}}]; the row's tools: [{type: function, function: {name,
                             description?, parameters?}}]
    TRL conversational       the same, arguments possibly already an object
    LLaMA-Factory sharegpt   a function_call turn's value: JSON text of one call {name, arguments} or a list of them;
                             the row's tools: JSON text of a list of bare {name, description, parameters} (or OpenAI's)

Canonical, so the template side reads one encoding whatever the dialect:
    calls  per message: "" for a message without calls, else a JSON array [{"name": str, "arguments": {...}}]
           (arguments always an object, parsed where given as JSON text)
    tools  null when the row defines none, else a JSON array [{"type": "function", "function": {"name",
           "description", "parameters"}}] (bare definitions wrapped; a missing description is "", missing
           parameters the schema of no arguments)
both written by json.dumps(..., ensure_ascii=False).
"""

from __future__ import annotations

from schemas.values import Shape, dumped, get, kind, parsed, string

# What OpenAI assumes for a function defined without parameters: one taking no arguments.
NO_PARAMETERS = {"type": "object", "properties": {}}
TOOLS_SHAPE = (
    "a list of tool definitions {type: function, function: {name, description, parameters}} "
    "(or bare {name, description, parameters}), or that list as JSON text"
)


def _function(item: object, where: str) -> tuple[dict, str]:
    """The function inside OpenAI's {type: function, function: {...}} wrapper, or the item itself when bare."""
    if not isinstance(item, dict):
        raise Shape(where, f"must be an object, not {kind(item)}")
    if "function" not in item:
        return item, where
    if item.get("type", "function") != "function":
        raise Shape(f"{where}.type", f"must be 'function' (the only kind of tool read), not {item['type']!r}")
    function = item["function"]
    if not isinstance(function, dict):
        raise Shape(f"{where}.function", f"must be an object {{name, ...}}, not {kind(function)}")
    return function, f"{where}.function"


def _name(function: dict, where: str) -> str:
    name = string(get(function, "name", f"{where}.name"), f"{where}.name")
    if not name.strip():
        raise Shape(f"{where}.name", "must not be empty")
    return name


def definitions(value: object, field: str = "tools") -> tuple[str | None, list[str] | None]:
    """The row's tools as canonical JSON and the names they define; (None, None) when the row defines none."""
    if value is None or value == "" or value == []:  # exports write null, "" or [] for 'no tools'
        return None, None
    if isinstance(value, str):
        value = parsed(string(value, field), field)
    if value == []:
        return None, None
    if not isinstance(value, list):
        raise Shape(field, f"must be {TOOLS_SHAPE}, not {kind(value)}")
    tools: list[dict] = []
    names: list[str] = []
    for i, item in enumerate(value):
        function, where = _function(item, f"{field}[{i}]")
        name = _name(function, where)
        if name in names:
            raise Shape(f"{where}.name", f"defines {name!r} a second time")
        description = function.get("description")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise Shape(f"{where}.parameters", f"must be an object (a JSON Schema), not {kind(parameters)}")
        names.append(name)
        tools.append(
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": "" if description is None else string(description, f"{where}.description"),
                    "parameters": NO_PARAMETERS if parameters is None else parameters,
                },
            }
        )
    return dumped(tools, field), names


def _call(item: object, where: str, defined: list[str] | None) -> dict:
    function, where = _function(item, where)
    name = _name(function, where)
    if defined is not None and name not in defined:
        raise Shape(
            f"{where}.name", f"calls {name!r}, which the row's tools do not define (they define {', '.join(defined)})"
        )
    arguments = get(function, "arguments", f"{where}.arguments")
    if isinstance(arguments, str):  # OpenAI's wire form: the arguments object as JSON text
        arguments = parsed(arguments, f"{where}.arguments")
    if not isinstance(arguments, dict):
        raise Shape(f"{where}.arguments", f"must be a JSON object of named arguments, not {kind(arguments)}")
    return {"name": name, "arguments": arguments}


def tool_calls(value: object, field: str, defined: list[str] | None) -> str:
    """An OpenAI or TRL message's tool_calls as canonical calls; `defined` None lets a call name any tool."""
    if not isinstance(value, list):
        raise Shape(
            field, f"must be a list of tool calls {{type: function, function: {{name, arguments}}}}, not {kind(value)}"
        )
    return dumped([_call(item, f"{field}[{i}]", defined) for i, item in enumerate(value)], field)


def function_call(value: object, field: str, defined: list[str] | None) -> str:
    """A LLaMA-Factory function_call turn's value (JSON text of one call {name, arguments} or a list of them) as
    canonical calls."""
    calls = parsed(string(value, field), field) if isinstance(value, str) else value
    if isinstance(calls, dict):
        return dumped([_call(calls, field, defined)], field)
    if isinstance(calls, list) and calls:
        return dumped([_call(call, f"{field}[{i}]", defined) for i, call in enumerate(calls)], field)
    raise Shape(field, f"must be JSON text of a tool call {{name, arguments}} or a list of them, not {kind(calls)}")
