"""Tool calling: conversations that offer tools, how a template writes calls, and calls read back from a reply.

A conversation offering tools is a `Chat`: Hugging Face's messages (an assistant message that
calls tools carries `tool_calls: [{type: function, function: {name, arguments}}]`, a tool's
result is a `tool` message) and the tool definitions beside them, as `apply_chat_template(messages,
tools=...)` takes them. `ToolFormat` is how a template shows them (stages/common/templates.py gives chatml
the Qwen2.5/Hermes one); `parsed_calls` reads the calls back from the text a model generated, so
the eval stage can score a held-out call (`calls_match`). `Toolbox` runs the spec's tools on the calls a rollout's
reply makes (grpo, ppo).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import re
import sys
import threading
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from schemas.errors import LifecycleError
from schemas.rewards import Tool


@dataclass(frozen=True)
class Chat:
    """A conversation as Hugging Face chat templates take it: the messages, and the tools they may call (None:
    no tools offered)."""

    messages: list[dict]
    tools: list[dict] | None = None


def _message(role: str, content: str, calls: str) -> dict:
    message = {"role": role, "content": content}
    if calls:
        message["tool_calls"] = [{"type": "function", "function": call} for call in json.loads(calls)]
    return message


def chats(frame: pl.DataFrame) -> list[Chat]:
    """Conversation rows (roles, contents, calls, tools: schemas/tools.py) as Chats: each message's calls as its
    tool_calls, the row's tools beside the messages. A frame without calls or tools columns has none."""
    rows = len(frame)
    calls = frame["calls"].to_list() if "calls" in frame.columns else [None] * rows
    tools = frame["tools"].to_list() if "tools" in frame.columns else [None] * rows
    return [
        Chat(
            [_message(*turn) for turn in zip(roles, contents, row_calls or [""] * len(roles))],
            json.loads(row_tools) if row_tools else None,
        )
        for roles, contents, row_calls, row_tools in zip(
            frame["roles"].to_list(), frame["contents"].to_list(), calls, tools
        )
    ]


def holds_tools(frame: pl.DataFrame) -> bool:
    """Whether any conversation row offers tools or calls one."""
    tools = "tools" in frame.columns and frame["tools"].is_not_null().any()
    calls = "calls" in frame.columns and frame["calls"].list.eval(pl.element() != "").list.any().any()
    return bool(tools or calls)


# ---------------------------------------------------------------- how a template writes them


@dataclass(frozen=True)
class ToolFormat:
    """How a template shows tools. The system turn holds `definitions` (after the system message and
    `after_system`, or alone where there is none: a system turn is made for them); an assistant reply is its text
    and each `call`, joined by `between`; the results of consecutive tool turns share one turn: `results_start`,
    each `result`, `results_end`.

    Slots: {tools} (the definitions, each as a newline and its JSON), {name} and {arguments} (a call's function and
    its arguments as JSON), {content} (a tool's result)."""

    definitions: str
    after_system: str
    call: str
    between: str
    results_start: str
    result: str
    results_end: str


def as_json(value: object) -> str:
    # as the `tojson` filter of Hugging Face chat templates writes it, so a stored template renders alike
    return json.dumps(value, ensure_ascii=False)


def function_of(call: dict) -> dict:
    """A call's {name, arguments}, inside OpenAI's {type: function, function: {...}} wrapper or bare."""
    return call["function"] if "function" in call else call


# ---------------------------------------------------------------- calls read back and scored

# a call as chatml writes it (stages/common/templates.py, HERMES): JSON between the tags, on lines of its own
CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def _canonical(name: object, arguments: object) -> str | None:
    """One call as comparable text: its name and its arguments as parsed JSON, keys sorted; None if malformed."""
    if isinstance(arguments, str):  # some models write the arguments object as JSON text, as OpenAI's wire form does
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    return json.dumps([name, arguments], sort_keys=True)


def read_calls(reply: str) -> list[dict | None]:
    """Each <tool_call> block of a generated reply as {name, arguments} (None for one that is not a call's JSON:
    an object with a name). A block the reply never closed (cut by max_new_tokens) is no call."""
    found: list[dict | None] = []
    for block in CALL.findall(reply):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            found.append(None)
            continue
        found.append(call if isinstance(call, dict) and isinstance(call.get("name"), str) else None)
    return found


def parsed_calls(reply: str) -> list[str | None]:
    """Each <tool_call> block of a generated reply as `_canonical` text (None for one that is not a call's JSON)."""
    return [None if call is None else _canonical(call["name"], call.get("arguments")) for call in read_calls(reply)]


def calls_match(reply: str, reference: list[dict]) -> bool:
    """Whether the reply makes exactly the reference's calls (an assistant message's tool_calls): the same names with
    equal arguments, compared as parsed JSON. Parallel calls may come in any order: it carries no meaning."""
    made = parsed_calls(reply)
    expected = [_canonical(f["name"], f["arguments"]) for f in map(function_of, reference)]
    return None not in made and sorted(made) == sorted(expected)


def calling_turns(conversations: list[Chat]) -> list[tuple[Chat, list[dict]]]:
    """Each assistant turn that called tools: the conversation before it (offering its tools) and the calls made."""
    return [
        (Chat(chat.messages[:index], chat.tools), message["tool_calls"])
        for chat in conversations
        for index, message in enumerate(chat.messages)
        if message["role"] == "assistant" and message.get("tool_calls")
    ]


def tool_call_accuracy(replies: list[str], references: list[list[dict]]) -> float:
    """Share of replies that make exactly their reference's calls (`calls_match`); nan without any."""
    if not references:
        return float("nan")
    return sum(calls_match(reply, calls) for reply, calls in zip(replies, references)) / len(references)


# ---------------------------------------------------------------- the spec's tools, run on a reply's calls


class FunctionError(LifecycleError):
    """A spec's Python function (a reward or a tool) that cannot be imported or offered."""


def _from_file(path: str):
    """The module a .py file holds, loaded once per process under a name of its own (a reward and a tool from one
    file share it, and what it defines can find its module, as dataclasses and pickling do)."""
    name = f"lifecycle_functions_{hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    found = importlib.util.spec_from_file_location(name, path)
    if found is None:
        raise ImportError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module
    try:
        found.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def imported(function: str, what: str) -> Callable:
    """The function `module:name` (imported) or `file.py:name` (loaded from that file) names; `what` names it in an
    error ("reward mypkg:score"), whatever its module raised while it loaded."""
    module, name = function.rsplit(":", 1)
    try:
        loaded = _from_file(module) if module.endswith(".py") else importlib.import_module(module)
        return getattr(loaded, name)
    except Exception as err:  # a syntax error or a failing import in the user's file: named with the function
        raise FunctionError(f"{what}: cannot import it ({type(err).__name__}: {err})") from None


JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def definition(function: Callable, name: str) -> dict:
    """The tool definition a template offers for a Python function (OpenAI's shape): its docstring's first paragraph
    as the description, a JSON Schema type for each parameter from its annotation, those without a default
    required."""
    try:
        hints = typing.get_type_hints(function)
    except Exception as err:  # an annotation naming what the module never imported
        raise FunctionError(f"tool {name}: its annotations cannot be read ({type(err).__name__}: {err})") from None
    properties, required = {}, []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        annotation = typing.get_origin(hints.get(parameter.name)) or hints.get(parameter.name)
        if parameter.name in hints and annotation not in JSON_TYPES:
            raise FunctionError(
                f"tool {name}: parameter {parameter.name} is annotated {hints[parameter.name]!r}; a tool's parameters "
                f"are {', '.join(t.__name__ for t in JSON_TYPES)} (or unannotated), as a call's JSON arguments are"
            )
        properties[parameter.name] = {"type": JSON_TYPES[annotation]} if parameter.name in hints else {}
        if parameter.default is parameter.empty:
            required.append(parameter.name)
    description = " ".join((inspect.getdoc(function) or "").split("\n\n")[0].split())
    parameters = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


class Toolbox:
    """The spec's tools: their definitions, as a prompt offers them, and `run`, which answers one call."""

    def __init__(self, tools: list[Tool]):
        self.functions = {tool.name(): imported(tool.function, f"tool {tool.function}") for tool in tools}
        self.timeouts = {tool.name(): tool.timeout for tool in tools}
        self.definitions = [definition(function, name) for name, function in self.functions.items()]

    def run(self, call: dict | None) -> str:
        """A call's result as a tool turn's text: what the function returned (JSON for anything but a string), or an
        error in words when the call is malformed, names no tool, raises, or runs past its time limit (the thread is
        left to finish on its own: Python cannot stop it)."""
        if call is None:
            return 'error: the call is not JSON of the form {"name": ..., "arguments": {...}}'
        name, arguments = call["name"], call.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if name not in self.functions:
            return f"error: there is no tool {name!r}; the tools are {', '.join(self.functions)}"
        if not isinstance(arguments, dict):
            return f"error: the arguments of {name} must be a JSON object"
        outcome: list = []

        def call_it() -> None:
            try:
                value = self.functions[name](**arguments)
                # JSON for anything but text, what JSON cannot write as its text
                outcome.append(("ok", value if isinstance(value, str) else json.dumps(value, default=str)))
            except BaseException as err:  # a tool's failure is the reply's to read, not the stage's (SystemExit too)
                outcome.append(("error", f"{type(err).__name__}: {err}"))

        worker = threading.Thread(target=call_it, name=f"tool-{name}", daemon=True)
        worker.start()
        worker.join(self.timeouts[name])
        if not outcome:
            return f"error: {name} ran past its {self.timeouts[name]:g} s time limit"
        status, text = outcome[0]
        return f"error: {name} raised {text}" if status == "error" else text
