"""Tool calling: conversations that offer tools, how a template writes calls, and calls read back from a reply.

A conversation offering tools is a `Chat`: Hugging Face's messages (an assistant message that
calls tools carries `tool_calls: [{type: function, function: {name, arguments}}]`, a tool's
result is a `tool` message) and the tool definitions beside them, as `apply_chat_template(messages,
tools=...)` takes them. `ToolFormat` is how a template shows them (stages/common/templates.py gives chatml
the Qwen2.5/Hermes one); `parsed_calls` reads the calls back from the text a model generated, so
the eval stage can score a held-out call (`calls_match`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import polars as pl


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


def parsed_calls(reply: str) -> list[str | None]:
    """Each <tool_call> block of a generated reply as `_canonical` text (None for one that is not a call's JSON).
    A block the reply never closed (cut by max_new_tokens) is no call."""
    found = []
    for block in CALL.findall(reply):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            found.append(None)
            continue
        found.append(_canonical(call.get("name"), call.get("arguments")) if isinstance(call, dict) else None)
    return found


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
