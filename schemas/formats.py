"""Every accepted jsonl shape, flattened into the one canonical row of its format.

Users bring files as the anchors write them (TRL, LLaMA-Factory, Axolotl, OpenAI, PRO), so a
row's shape is recognised from the keys it has, row by row. Flattening checks only shape and
types: a row that fits none of its format's shapes raises `Shape`, naming the user's own key.
The rules beyond shape (roles alternate, nothing empty, ...) are checked once, by pandera, on
the canonical columns (schemas/data.py), whichever shape a row came in.

Canonical rows, per format:
    text           text
    conversations  roles, contents                  (parallel lists, one entry per message)
    preference     prompt_roles, prompt_contents, chosen, rejected
    ranked         prompt_roles, prompt_contents, completions, scores   (unsorted here)
    prompts        prompt_roles, prompt_contents, answer (None when not given)
    unpaired       prompt_roles, prompt_contents, completions, labels   (a line's labelled completions: TRL's
                   unpaired row gives one; a preference pair gives two, chosen true and rejected false)
"""

from __future__ import annotations

import math
import re
from typing import Literal

Format = Literal["text", "conversations", "preference", "ranked", "prompts", "unpaired"]

# sharegpt names its speakers; any other name is kept, so the role rule reports it by name.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# PRO's released HH data tags each turn with these markers; a bare final assistant marker is the generation cue.
PRO_MARKERS = re.compile(r"(<\|prompter\|>|<\|assistant\|>)")
PRO_ROLES = {"<|prompter|>": "user", "<|assistant|>": "assistant"}

Turns = tuple[list[str], list[str]]  # (roles, contents)


class Shape(Exception):
    """A row that has none of its format's shapes: the user's key and what it must hold."""

    def __init__(self, field: str, rule: str):
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if value == [] or value == {}:
        return f"an empty {'list' if isinstance(value, list) else 'object'}"
    return {str: "a string", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def _get(row: dict, key: str, field: str | None = None) -> object:
    if key not in row:
        raise Shape(field or key, "required")
    return row[key]


def _string(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise Shape(field, f"must be a string, not {_kind(value)}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # JSON's \ud800-style escapes can name half a surrogate pair, which no UTF-8 text can hold.
            raise Shape(
                field, "holds an unpaired surrogate escape (\\ud800-\\udfff), which is not valid Unicode"
            ) from None
    return value


def _strings(value: object, field: str) -> list[str]:
    if not isinstance(value, list):
        raise Shape(field, f"must be a list of strings, not {_kind(value)}")
    return [_string(item, f"{field}[{i}]") for i, item in enumerate(value)]


def _number(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Shape(field, f"must be a number, not {_kind(value)}")
    try:
        return float(value)
    except OverflowError:
        raise Shape(field, "is too large for a float") from None


def _numbers(value: object, field: str) -> list[float]:
    if not isinstance(value, list):
        raise Shape(field, f"must be a list of numbers, not {_kind(value)}")
    return [_number(item, f"{field}[{i}]") for i, item in enumerate(value)]


def _content(value: object, field: str) -> str:
    """A message's text; OpenAI's list of content parts is accepted when every part is text."""
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise Shape(f"{field}[{i}]", "only text content parts {type: text, text} are supported")
            parts.append(_string(part.get("text"), f"{field}[{i}].text"))
        return "".join(parts)
    return _string(value, field)


def _messages(value: object, field: str) -> Turns:
    """OpenAI/TRL {role, content} or sharegpt {from, value} messages, per message."""
    if not isinstance(value, list) or not value:
        raise Shape(
            field, f"must be a non-empty list of messages {{role, content}} or {{from, value}}, not {_kind(value)}"
        )
    roles, contents = [], []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if isinstance(message, dict) and "role" in message:
            roles.append(_string(message["role"], f"{where}.role"))
            contents.append(_content(_get(message, "content", f"{where}.content"), f"{where}.content"))
        elif isinstance(message, dict) and "from" in message:
            speaker = _string(message["from"], f"{where}.from")
            roles.append(SHAREGPT_ROLES.get(speaker, speaker))
            contents.append(_string(_get(message, "value", f"{where}.value"), f"{where}.value"))
        else:
            raise Shape(
                where, f"must be an object with string role and content (or from and value), not {_kind(message)}"
            )
    return roles, contents


def _with_system(row: dict, turns: Turns) -> Turns:
    """Prepend the row's top-level `system` (LLaMA-Factory, orca-style pairs) as the first turn."""
    system = row.get("system")
    if system is None or system == "":  # exports write "" for 'no system prompt'
        return turns
    system = _string(system, "system")
    roles, contents = turns
    if roles and roles[0] == "system":
        raise Shape("system", "is given twice: as a key and as the first message")
    return ["system", *roles], [system, *contents]


def _alpaca_prompt(row: dict) -> Turns:
    """system, then history's [user, assistant] pairs, then instruction and input as one user turn."""
    history = row.get("history") or []
    if not isinstance(history, list):
        raise Shape("history", f"must be a list of [user, assistant] pairs, not {_kind(history)}")
    roles: list[str] = []
    contents: list[str] = []
    for i, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            raise Shape(f"history[{i}]", "must be a pair [user, assistant] of strings")
        roles += ["user", "assistant"]
        contents += [_string(pair[0], f"history[{i}][0]"), _string(pair[1], f"history[{i}][1]")]
    instruction = _string(_get(row, "instruction"), "instruction")
    extra = row.get("input")
    extra = "" if extra is None else _string(extra, "input")
    roles.append("user")
    contents.append("\n".join(part for part in (instruction, extra) if part))  # LLaMA-Factory's join
    return _with_system(row, (roles, contents))


def _prompt(row: dict, key: str) -> Turns:
    value = row[key]
    if isinstance(value, list):
        return _with_system(row, _messages(value, key))
    if not isinstance(value, str):
        raise Shape(key, f"must be a string or a list of messages, not {_kind(value)}")
    return _with_system(row, (["user"], [_string(value, key)]))


def _pro_prompt(value: object, field: str) -> Turns:
    """One PRO prefix: a plain prompt string, or turns tagged <|prompter|>/<|assistant|> (a list, or joined)."""
    text = "".join(_strings(value, field)) if isinstance(value, list) else _string(value, field)
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
    """A reply: a string, or a list holding one assistant message (TRL's conversational form)."""
    if isinstance(value, list):
        roles, contents = _messages(value, field)
        if roles != ["assistant"]:
            raise Shape(field, "beside a prompt, must be a string or a list of one assistant message")
        return contents[0]
    return _string(value, field)


def _text(row: dict) -> dict:
    return {"text": _string(_get(row, "text"), "text")}


def _conversation(row: dict) -> dict:
    key = next((k for k in ("conversations", "messages") if k in row), None)
    if key is None and "instruction" in row:
        roles, contents = _alpaca_prompt(row)
        return {"roles": [*roles, "assistant"], "contents": [*contents, _string(_get(row, "output"), "output")]}
    if key is None:
        raise Shape(
            "conversations",
            "required: a list of messages {role, content} (or messages, sharegpt {from, value}, "
            "or alpaca instruction/input/output)",
        )
    roles, contents = _with_system(row, _messages(row[key], key))
    return {"roles": roles, "contents": contents}


def _preference(row: dict) -> dict:
    chosen, rejected = _get(row, "chosen"), _get(row, "rejected")
    prompt_key = next((k for k in ("prompt", "question") if k in row), None)
    if prompt_key is not None and not (isinstance(chosen, list) and len(chosen) > 1):
        roles, contents = _prompt(row, prompt_key)
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
    chosen_roles, chosen_contents = _messages(chosen, "chosen")
    if len(chosen_roles) < 2:
        raise Shape("chosen", "without a prompt key, must be a whole conversation: the prompt's turns, then the reply")
    rejected_roles, rejected_contents = _messages(rejected, "rejected")
    if (chosen_roles[:-1], chosen_contents[:-1]) != (rejected_roles[:-1], rejected_contents[:-1]):
        raise Shape("rejected", "must repeat every turn of chosen but the last: the shared turns are the prompt")
    for field, roles in (("chosen", chosen_roles), ("rejected", rejected_roles)):
        if roles[-1] != "assistant":
            raise Shape(field, f"the last turn must be the assistant's, not {roles[-1]!r}")
    return {
        "prompt_roles": chosen_roles[:-1],
        "prompt_contents": chosen_contents[:-1],
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
        "completions": _strings(_get(row, "output"), "output"),
        "scores": _numbers(_get(row, "score"), "score"),
    }


def _pro_ranked(row: dict) -> dict:
    """PRO's release: the prompt repeated once per candidate in `prefix`, candidates in `suffix`, scores in `reward`."""
    prefixes = _get(row, "prefix")
    completions = _strings(_get(row, "suffix"), "suffix")
    scores = _numbers(_get(row, "reward"), "reward")
    if not isinstance(prefixes, list) or not prefixes:
        raise Shape("prefix", f"must be a list holding the prompt once per suffix, not {_kind(prefixes)}")
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
    return _string(value, "answer")


def _prompts(row: dict) -> dict:
    key = next((k for k in ("prompt", "messages") if k in row), None)
    if key is None:
        raise Shape("prompt", "required: a string or a list of messages (or messages)")
    roles, contents = _prompt(row, key)
    return {"prompt_roles": roles, "prompt_contents": contents, "answer": _answer(row.get("answer"))}


def _label(value: object) -> bool:
    if not isinstance(value, bool):
        raise Shape("label", f"must be true (desirable) or false (undesirable), not {_kind(value)}")
    return value


def _unpaired(row: dict) -> dict:
    """TRL's unpaired {prompt, completion, label}; a preference pair, in any of its shapes, as its two labelled
    completions."""
    if "completion" not in row and "label" not in row and ("chosen" in row or "rejected" in row):
        pair = _preference(row)
        return {
            "prompt_roles": pair["prompt_roles"],
            "prompt_contents": pair["prompt_contents"],
            "completions": [pair["chosen"], pair["rejected"]],
            "labels": [True, False],
        }
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
        "completions": [_completion(_get(row, "completion"), "completion")],
        "labels": [_label(_get(row, "label"))],
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
    """The row as its format's canonical columns; raise Shape when it has none of the accepted shapes."""
    return FLATTEN[fmt](row)
