"""Every accepted row shape, flattened into the one canonical row of its format.

Users bring rows as the anchors write them (TRL, LLaMA-Factory, Axolotl, OpenAI, PRO), from any container, with
their columns already renamed to our keys by the spec's mapping; a row's shape is recognised from the keys it has,
row by row. Flattening checks only shape and types: a row that fits none of its format's shapes raises `Shape`,
naming the user's own key. The rules beyond shape (roles in order, nothing empty, ...) are checked once, by
pandera, on the canonical columns (schemas/data.py), whichever shape a row came in.

Canonical rows, per format:
    text           text
    conversations  roles, contents, calls, tools    (roles, contents, calls: parallel lists, one entry per message;
                   roles system|user|assistant|tool; calls "" for a message without tool calls, else JSON text
                   [{"name", "arguments": {...}}], an assistant turn made only of calls having content "";
                   tools null, or JSON text [{"type": "function", "function": {name, description, parameters}}]:
                   schemas/tools.py)
    preference     prompt_roles, prompt_contents, chosen, rejected
    ranked         prompt_roles, prompt_contents, completions, scores   (unsorted here)
    prompts        prompt_roles, prompt_contents, answer (None when not given)
    unpaired       prompt_roles, prompt_contents, completions, labels   (a row's labelled completions: TRL's
                   unpaired row or a labelled conversation gives one; a preference pair gives two, chosen true and
                   rejected false)

Shapes read, per format (a message is OpenAI/TRL {role, content} or sharegpt {from, value}; content may be a list
of text parts {type: text, text} or {type: text, value}; a top-level `system` is a first system turn):
    text           {text}
    conversations  {conversations | messages: [...], tools?} (tool calls as OpenAI, TRL or LLaMA-Factory write
                   them), alpaca {instruction, input?, output, history?, system?}
    preference     {prompt | question | conversations | messages, chosen, rejected}, chosen and rejected each a
                   string, one message or a list of one; or whole conversations {chosen, rejected} or
                   {chosen_messages, rejected_messages} that share every turn but the last
    ranked         alpaca {instruction, input?, output: [...], score: [...]}, PRO's {prefix, suffix, reward}
    prompts        {prompt | messages, answer?}
    unpaired       {prompt, completion, label}, a conversation with a label {conversations | messages, label},
                   or any preference pair
Tool calls and media are refused outside the shapes that read them: the stages are text-only, and only the
conversations format carries tools.
"""

from __future__ import annotations

import math
import re
from typing import Literal, NamedTuple

from schemas.tools import definitions, function_call, tool_calls
from schemas.values import Shape, get, kind, numbers, string, strings

Format = Literal["text", "conversations", "preference", "ranked", "prompts", "unpaired"]

# sharegpt names its speakers; any other name is kept, so the role rule reports it by name. LLaMA-Factory's
# function_call turn is the assistant calling tools, its observation turn the tools' results.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
}
# LLaMA-Factory's multimodal columns: rows that hold media belong to a vision or audio model, not to these stages.
MEDIA_KEYS = ("images", "videos", "audios")
# PRO's released HH data tags each turn with these markers; a bare final assistant marker is the generation cue.
PRO_MARKERS = re.compile(r"(<\|prompter\|>|<\|assistant\|>)")
PRO_ROLES = {"<|prompter|>": "user", "<|assistant|>": "assistant"}
ONLY_CONVERSATIONS_CALL = "calls tools, and tool calls are read only in the conversations format"

Turns = tuple[list[str], list[str]]  # (roles, contents)


class Chat(NamedTuple):
    """Messages as parallel lists, `calls` holding each message's canonical tool calls ("" for none)."""

    roles: list[str]
    contents: list[str]
    calls: list[str]


def _content(value: object, field: str) -> str:
    """A message's text; a list of content parts is read when every part is text."""
    if not isinstance(value, list):
        return string(value, field)
    texts = []
    for i, part in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(part, dict):
            raise Shape(where, f"must be a content part {{type: text, text}}, not {kind(part)}")
        part_type = get(part, "type", f"{where}.type")
        if part_type != "text":
            raise Shape(
                where,
                f"is a part of type {part_type!r}, and this stage is text-only: only text parts {{type: text, text}} "
                "are read",
            )
        key = "value" if "text" not in part and "value" in part else "text"
        texts.append(string(part.get(key), f"{where}.{key}"))
    return "".join(texts)


def _message(message: object, where: str, defined: list[str] | None) -> tuple[str, str, str]:
    """One message as (role, content, calls): OpenAI/TRL {role, content, tool_calls?} or sharegpt {from, value}."""
    if isinstance(message, dict) and "role" in message:
        role, key = string(message["role"], f"{where}.role"), "content"
    elif isinstance(message, dict) and "from" in message:
        speaker = string(message["from"], f"{where}.from")
        role, key = SHAREGPT_ROLES.get(speaker, speaker), "value"
        if speaker == "function_call":  # LLaMA-Factory's call turn: its value is the calls, and nothing is said
            return role, "", function_call(get(message, "value", f"{where}.value"), f"{where}.value", defined)
    else:
        raise Shape(where, f"must be an object with string role and content (or from and value), not {kind(message)}")
    calls = message.get("tool_calls")
    if calls is None or calls == []:  # exports write null or [] on every message that calls nothing
        return role, _content(get(message, key, f"{where}.{key}"), f"{where}.{key}"), ""
    if role != "assistant":
        raise Shape(f"{where}.tool_calls", f"only an assistant message may call tools, not a {role!r} one")
    content = message.get(key)  # OpenAI leaves out (or nulls) the content of a turn that only calls tools
    return (
        role,
        "" if content is None else _content(content, f"{where}.{key}"),
        tool_calls(calls, f"{where}.tool_calls", defined),
    )


def _chat(value: object, field: str, defined: list[str] | None = None) -> Chat:
    """A list of messages, each OpenAI/TRL or sharegpt; `defined` names the tools calls may name (None: any)."""
    if not isinstance(value, list) or not value:
        raise Shape(
            field, f"must be a non-empty list of messages {{role, content}} or {{from, value}}, not {kind(value)}"
        )
    chat = Chat([], [], [])
    for i, message in enumerate(value):
        for column, item in zip(chat, _message(message, f"{field}[{i}]", defined)):
            column.append(item)
    return chat


def _messages(value: object, field: str) -> Turns:
    """Messages where tool calls have no column (every format but conversations): a call is refused, not dropped."""
    roles, contents, calls = _chat(value, field)
    for i, call in enumerate(calls):
        if call:
            raise Shape(f"{field}[{i}]", ONLY_CONVERSATIONS_CALL)
    return roles, contents


def _with_system(row: dict, turns: Turns) -> Turns:
    """Prepend the row's top-level `system` (LLaMA-Factory, orca-style pairs) as the first turn."""
    system = row.get("system")
    if system is None or system == "":  # exports write "" for 'no system prompt'
        return turns
    system = string(system, "system")
    roles, contents = turns
    if roles and roles[0] == "system":
        raise Shape("system", "is given twice: as a key and as the first message")
    return ["system", *roles], [system, *contents]


def _alpaca_prompt(row: dict) -> Turns:
    """system, then history's [user, assistant] pairs, then instruction and input as one user turn."""
    history = row.get("history") or []
    if not isinstance(history, list):
        raise Shape("history", f"must be a list of [user, assistant] pairs, not {kind(history)}")
    roles: list[str] = []
    contents: list[str] = []
    for i, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            raise Shape(f"history[{i}]", "must be a pair [user, assistant] of strings")
        roles += ["user", "assistant"]
        contents += [string(pair[0], f"history[{i}][0]"), string(pair[1], f"history[{i}][1]")]
    instruction = string(get(row, "instruction"), "instruction")
    extra = row.get("input")
    extra = "" if extra is None else string(extra, "input")
    roles.append("user")
    contents.append("\n".join(part for part in (instruction, extra) if part))  # LLaMA-Factory's join
    return _with_system(row, (roles, contents))


def _prompt(row: dict, key: str) -> Turns:
    value = row[key]
    if isinstance(value, list):
        return _with_system(row, _messages(value, key))
    if not isinstance(value, str):
        raise Shape(key, f"must be a string or a list of messages, not {kind(value)}")
    return _with_system(row, (["user"], [string(value, key)]))


def _pro_prompt(value: object, field: str) -> Turns:
    """One PRO prefix: a plain prompt string, or turns tagged <|prompter|>/<|assistant|> (a list, or joined)."""
    text = "".join(strings(value, field)) if isinstance(value, list) else string(value, field)
    pieces = PRO_MARKERS.split(text)
    if len(pieces) == 1:
        return ["user"], [text]
    if pieces[0].strip():
        raise Shape(field, "has text before its first <|prompter|> or <|assistant|> marker")
    roles = [PRO_ROLES[marker] for marker in pieces[1::2]]
    contents = pieces[2::2]
    if roles[-1] == "assistant" and not contents[-1].strip():
        roles, contents = roles[:-1], contents[:-1]
    return roles, contents


def _completion(value: object, field: str) -> str:
    """A reply: a string, a list holding one assistant message (TRL's conversational form), or one message
    (LLaMA-Factory's sharegpt pairs)."""
    if isinstance(value, dict):
        role, content, calls = _message(value, field, None)
        if calls:
            raise Shape(field, ONLY_CONVERSATIONS_CALL)
        if role != "assistant":
            raise Shape(field, f"must be the assistant's turn, not {role!r}")
        return content
    if isinstance(value, list):
        roles, contents = _messages(value, field)
        if roles != ["assistant"]:
            raise Shape(field, "beside a prompt, must be a string or a list of one assistant message")
        return contents[0]
    return string(value, field)


def _text(row: dict) -> dict:
    return {"text": string(get(row, "text"), "text")}


def _conversation(row: dict) -> dict:
    tools, names = definitions(row.get("tools"))
    key = next((k for k in ("conversations", "messages") if k in row), None)
    if key is None and "instruction" in row:
        roles, contents = _alpaca_prompt(row)
        roles, contents = [*roles, "assistant"], [*contents, string(get(row, "output"), "output")]
        return {"roles": roles, "contents": contents, "calls": [""] * len(roles), "tools": tools}
    if key is None:
        raise Shape(
            "conversations",
            "required: a list of messages {role, content} (or messages, sharegpt {from, value}, "
            "or alpaca instruction/input/output)",
        )
    chat = _chat(row[key], key, names)
    roles, contents = _with_system(row, (chat.roles, chat.contents))
    calls = [""] * (len(roles) - len(chat.roles)) + chat.calls  # a system turn from the key calls nothing
    return {"roles": roles, "contents": contents, "calls": calls, "tools": tools}


def _preference(row: dict) -> dict:
    if "chosen_messages" in row or "rejected_messages" in row:
        return _conversation_pair(row, "chosen_messages", "rejected_messages")
    chosen, rejected = get(row, "chosen"), get(row, "rejected")
    # conversations/messages beside single-turn chosen and rejected: LLaMA-Factory's sharegpt pairs
    prompt_key = next((k for k in ("prompt", "question", "conversations", "messages") if k in row), None)
    alpaca = prompt_key is None and "instruction" in row  # LLaMA-Factory's alpaca pairs: the prompt as alpaca's
    if alpaca or (prompt_key is not None and not (isinstance(chosen, list) and len(chosen) > 1)):
        roles, contents = _alpaca_prompt(row) if alpaca else _prompt(row, prompt_key)
        return {
            "prompt_roles": roles,
            "prompt_contents": contents,
            "chosen": _completion(chosen, "chosen"),
            "rejected": _completion(rejected, "rejected"),
        }
    # Whole conversations (a redundant prompt key beside them, as UltraFeedback has, adds nothing):
    # the turns they share are the prompt, their final assistant turns the two replies.
    if not isinstance(chosen, list):
        raise Shape("prompt", "required when chosen and rejected are strings (or give both as whole conversations)")
    return _conversation_pair(row, "chosen", "rejected")


def _conversation_pair(row: dict, chosen_key: str, rejected_key: str) -> dict:
    """Two whole conversations: the turns they share are the prompt, their final assistant turns the two replies."""
    chosen_roles, chosen_contents = _messages(get(row, chosen_key), chosen_key)
    if len(chosen_roles) < 2:
        lead = "without a prompt key, " if chosen_key == "chosen" else ""
        raise Shape(chosen_key, f"{lead}must be a whole conversation: the prompt's turns, then the reply")
    rejected_roles, rejected_contents = _messages(get(row, rejected_key), rejected_key)
    if (chosen_roles[:-1], chosen_contents[:-1]) != (rejected_roles[:-1], rejected_contents[:-1]):
        raise Shape(
            rejected_key, f"must repeat every turn of {chosen_key} but the last: the shared turns are the prompt"
        )
    for field, roles in ((chosen_key, chosen_roles), (rejected_key, rejected_roles)):
        if roles[-1] != "assistant":
            raise Shape(field, f"the last turn must be the assistant's, not {roles[-1]!r}")
    roles, contents = _with_system(row, (chosen_roles[:-1], chosen_contents[:-1]))
    return {
        "prompt_roles": roles,
        "prompt_contents": contents,
        "chosen": chosen_contents[-1],
        "rejected": rejected_contents[-1],
    }


def _ranked(row: dict) -> dict:
    if "prefix" in row or "suffix" in row:
        return _pro_ranked(row)
    if "instruction" not in row:
        raise Shape(
            "instruction",
            "required: a ranked list is {instruction, input, output: [...], score: [...]} "
            "or PRO's {prefix, suffix, reward}",
        )
    roles, contents = _alpaca_prompt(row)
    return {
        "prompt_roles": roles,
        "prompt_contents": contents,
        "completions": strings(get(row, "output"), "output"),
        "scores": numbers(get(row, "score"), "score"),
    }


def _pro_ranked(row: dict) -> dict:
    """PRO's release: the prompt repeated once per candidate in `prefix`, candidates in `suffix`, scores in `reward`."""
    prefixes = get(row, "prefix")
    completions = strings(get(row, "suffix"), "suffix")
    scores = numbers(get(row, "reward"), "reward")
    if not isinstance(prefixes, list) or not prefixes:
        raise Shape("prefix", f"must be a list holding the prompt once per suffix, not {kind(prefixes)}")
    if len(prefixes) != len(completions):
        raise Shape(
            "prefix",
            f"holds {len(prefixes)} prompt(s) for {len(completions)} suffix(es); PRO repeats the prompt once per "
            "suffix",
        )
    prompts = [_pro_prompt(prefix, f"prefix[{i}]") for i, prefix in enumerate(prefixes)]
    if any(prompt != prompts[0] for prompt in prompts[1:]):
        raise Shape("prefix", "every candidate must share one prompt")
    roles, contents = prompts[0]
    return {"prompt_roles": roles, "prompt_contents": contents, "completions": completions, "scores": scores}


def _answer(value: object) -> str | None:
    """A reference answer; numbers are accepted as written, since math sets often store them so."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Shape("answer", f"must be a string or a finite number, not {value}")
        return str(value)
    return string(value, "answer")


def _prompts(row: dict) -> dict:
    key = next((k for k in ("prompt", "messages") if k in row), None)
    if key is None:
        raise Shape("prompt", "required: a string or a list of messages (or messages)")
    roles, contents = _prompt(row, key)
    return {"prompt_roles": roles, "prompt_contents": contents, "answer": _answer(row.get("answer"))}


def _label(value: object) -> bool:
    if not isinstance(value, bool):
        raise Shape("label", f"must be true (desirable) or false (undesirable), not {kind(value)}")
    return value


def _unpaired(row: dict) -> dict:
    """TRL's unpaired {prompt, completion, label}; a labelled conversation (LLaMA-Factory's kto_tag); a preference
    pair, in any of its shapes, as its two labelled completions."""
    pair_keys = ("chosen", "rejected", "chosen_messages", "rejected_messages")
    if "completion" not in row and "label" not in row and any(key in row for key in pair_keys):
        pair = _preference(row)
        return {
            "prompt_roles": pair["prompt_roles"],
            "prompt_contents": pair["prompt_contents"],
            "completions": [pair["chosen"], pair["rejected"]],
            "labels": [True, False],
        }
    conversation = next((k for k in ("conversations", "messages") if k in row), None)
    if "prompt" not in row and conversation is not None:
        return _labelled_conversation(row, conversation)
    if "prompt" not in row:
        raise Shape(
            "prompt",
            "required: an unpaired row is {prompt, completion, label: true|false} "
            "(or give a preference pair {prompt, chosen, rejected})",
        )
    roles, contents = _prompt(row, "prompt")
    return {
        "prompt_roles": roles,
        "prompt_contents": contents,
        "completions": [_completion(get(row, "completion"), "completion")],
        "labels": [_label(get(row, "label"))],
    }


def _labelled_conversation(row: dict, key: str) -> dict:
    """A whole conversation and a label judging its last turn, the assistant's: the turns before it are the prompt."""
    roles, contents = _with_system(row, _messages(row[key], key))
    if len(roles) < 2 or roles[-1] != "assistant":
        raise Shape(
            key, "beside a label, must be a whole conversation ending in the assistant's reply, which the label judges"
        )
    return {
        "prompt_roles": roles[:-1],
        "prompt_contents": contents[:-1],
        "completions": [contents[-1]],
        "labels": [_label(get(row, "label"))],
    }


FLATTEN = {
    "text": _text,
    "conversations": _conversation,
    "preference": _preference,
    "ranked": _ranked,
    "prompts": _prompts,
    "unpaired": _unpaired,
}


def flatten(fmt: Format, row: dict) -> dict:
    """The row as its format's canonical columns; raise Shape when it has none of the accepted shapes.

    A null value is an absent key: a csv, parquet or arrow file gives every row each of its columns, null where
    the row has none, so a file mixing shapes (messages in some rows, conversations in others) reads as written."""
    row = {key: value for key, value in row.items() if value is not None}
    for key in MEDIA_KEYS:
        if row.get(key) not in (None, "", []):  # LLaMA-Factory writes [] where a row has no media
            raise Shape(key, f"holds {key}, and this stage is text-only: give rows without media")
    if fmt != "conversations" and row.get("tools") not in (None, "", []):
        raise Shape("tools", "are read only in the conversations format: this format's stages use no tools")
    return FLATTEN[fmt](row)


def shape_of(row: dict) -> str:
    """The shape a row came in, in the words docs/data.md uses, for `lifecycle inspect` to say how a source was
    read (the format decides what the row becomes; this only names what it looked like)."""
    if "prefix" in row and "suffix" in row:
        return "PRO ranked list"
    if "instruction" in row:
        return "alpaca ranked list" if isinstance(row.get("output"), list) else "alpaca"
    if "chosen_messages" in row:
        return "chosen_messages/rejected_messages"
    key = next((k for k in ("conversations", "messages") if isinstance(row.get(k), list)), None)
    if key is not None:
        first = next((m for m in row[key] if isinstance(m, dict)), {})
        words = ["sharegpt" if "from" in first else "messages"]
        roles = {m.get("role", m.get("from")) for m in row[key] if isinstance(m, dict)}
        if (
            row.get("tools")
            or "tool" in roles
            or "function_call" in roles
            or any(isinstance(m, dict) and m.get("tool_calls") for m in row[key])
        ):
            words.append("with tool calls")
        if "chosen" in row:
            words.append("+ chosen/rejected turns")
        if "label" in row:
            words.append("+ label")
        return " ".join(words)
    if "chosen" in row:
        whole = isinstance(row["chosen"], list) and len(row["chosen"]) > 1 and "prompt" not in row
        return "chosen/rejected conversations" if whole else "prompt/chosen/rejected"
    if "completion" in row:
        return "prompt/completion/label"
    if "prompt" in row:
        return "prompt" + ("/answer" if "answer" in row else "")
    if "text" in row:
        return "text"
    return "unknown"
