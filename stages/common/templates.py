"""Chat templates: how a conversation becomes tokens, and which tokens are trained.

A template is plain data: the text of each part of a conversation, with slots for the
message content and the tokenizer's special tokens. A conversation is tokenized piece by
piece, so the trained spans (each assistant reply and its end-of-turn marker) are exact
token ranges, never recovered from character offsets. The same template, written as Jinja
by `jinja`, is stored in the tokenizer, so `tokenizer.apply_chat_template` at inference
renders a prompt exactly as training did; the tests check the two agree token for token.

Tools travel beside the messages, as Hugging Face chat templates take them (stages/common/tools.py): an
assistant message that calls tools carries `tool_calls`, a tool's result is a `tool` message.
chatml shows them as Qwen2.5 and Hermes do (`HERMES`); each assistant turn is trained,
calls and answer alike, and tool results are context. The other templates of ours refuse tools.

The `tokenizer` template is the tokenizer's own chat template: its trained spans are found
by rendering successive prefixes of the conversation, which only works for a template
whose rendering of a conversation starts with its rendering of every earlier prefix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import get_args

import polars as pl

from schemas.spec import TemplateName
from stages.common.tools import Chat, ToolFormat, as_json, function_of, holds_tools

IGNORE = -100  # label of a token that carries no loss

BOS, EOS, PAD = "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]

OWN_TEMPLATE = "tokenizer"  # the template name that means: the tokenizer's own chat template

# The tool dialect of Qwen2.5 and Qwen3 (Hermes's), word for word, so a model trained here reads and writes tools as
# theirs do and servers' Hermes tool parsers read its calls; with no system message the system turn holds only the
# tools, as Qwen3's does (Qwen2.5 adds a default system message of its own)
HERMES = ToolFormat(
    definitions="# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>',
    after_system="\n\n",
    call='<tool_call>\n{"name": "{name}", "arguments": {arguments}}\n</tool_call>',
    between="\n",
    results_start=f"{IM_START}user",
    result="\n<tool_response>\n{content}\n</tool_response>",
    results_end=f"{IM_END}\n",
)


@dataclass(frozen=True)
class Template:
    """A chat format as text with slots: {content}, {input}, {system}, {bos} and {eos}.

    A conversation renders as `start`, then each user turn (the first one carrying the
    rendered system message in its {system} slot), each assistant turn as `header` +
    `reply` + `after_reply`, and, for a prompt, a final `header`. Only `reply` is trained.
    A user message may carry an alpaca row's `input` apart from its instruction: `user_input`
    renders it into the user turn's {input} slot (alpaca under its own heading; the others
    after a newline, as the normaliser joins the two when it keeps them together).
    """

    start: str
    system: str
    user: str
    user_input: str
    header: str
    reply: str
    after_reply: str
    tools: ToolFormat | None = None  # None: the template cannot show tools


TEMPLATES: dict[str, Template] = {
    "chatml": Template(
        start="",
        system=f"{IM_START}system\n{{content}}{IM_END}\n",
        user=f"{{system}}{IM_START}user\n{{content}}{{input}}{IM_END}\n",
        user_input="\n{input}",
        header=f"{IM_START}assistant\n",
        reply=f"{{content}}{IM_END}",
        after_reply="\n",
        tools=HERMES,
    ),
    # Llama 2 chat: the system message sits inside the first [INST]; every exchange is its own <s> ... </s>
    "llama2": Template(
        start="",
        system="<<SYS>>\n{content}\n<</SYS>>\n\n",
        user="{bos}[INST] {system}{content}{input} [/INST]",
        user_input="\n{input}",
        header="",
        reply=" {content} {eos}",
        after_reply="",
    ),
    # DeepSeek LLM chat: the prompt ends at "Assistant:", so the reply's leading space is generated (and trained)
    "deepseek": Template(
        start="{bos}",
        system="{content}\n\n",
        user="{system}User: {content}{input}\n\n",
        user_input="\n{input}",
        header="Assistant:",
        reply=" {content}{eos}",
        after_reply="",
    ),
    "alpaca": Template(
        start="",
        system="{content}\n\n",
        user="{system}### Instruction:\n{content}{input}\n\n",
        user_input="\n\n### Input:\n{input}",
        header="### Response:\n",
        reply="{content}{eos}",
        after_reply="",
    ),
}
TEMPLATE_NAMES = get_args(TemplateName)  # the spec's names: ours (TEMPLATES) and the tokenizer's own
NO_CHAT_TEMPLATE = (
    f"the {OWN_TEMPLATE} template needs a tokenizer with a chat template, and this one has none; "
    f"choose one of {', '.join(TEMPLATES)}"
)

SLOT = re.compile(r"\{(content|input|system|bos|eos|tools|name|arguments)\}")


def _fill(text: str, **values: str) -> str:
    # a substitution function, not str.format: message content may itself contain braces
    return SLOT.sub(lambda match: values[match.group(1)], text)


# what may follow each kind of turn: an assistant turn that calls tools is answered by their results first
FOLLOWS = {"user": ("answer", "calls"), "answer": ("user",), "calls": ("tool",), "tool": ("tool", "answer", "calls")}


def _turn(message: dict) -> str:
    if message["role"] == "assistant":
        return "calls" if message.get("tool_calls") else "answer"
    return message["role"]


def _check_roles(messages: list[dict]) -> None:
    roles = [m["role"] for m in messages]
    turns = [_turn(m) for m in (messages[1:] if roles[:1] == ["system"] else messages)]
    if not turns or turns[0] != "user" or any(b not in FOLLOWS.get(a, ()) for a, b in zip(turns, turns[1:])):
        raise ValueError(
            f"a conversation is an optional system message, then user and assistant turns alternating, "
            f"user first (an assistant turn that calls tools is followed by one or more tool turns, its results, "
            f"before the assistant speaks again); got roles {roles}"
        )


def _no_tools(template: str) -> str:
    return (
        f"the {template} template cannot show tools, tool calls or tool results; use the chatml template (which "
        f"shows them as Qwen2.5 and Hermes do) or the {OWN_TEMPLATE} template (a chat template of your own that "
        f"renders tools)"
    )


def _uses_tools(messages: list[dict], tools: list[dict] | None) -> bool:
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def _system(messages: list[dict], tools: list[dict] | None, spec: Template, special: dict[str, str]) -> str:
    """The rendered system turn: the system message, then the tool definitions where tools are offered; '' for
    neither."""
    given = messages[0]["content"] if messages[0]["role"] == "system" else None
    if tools:
        definitions = _definitions(spec.tools, tools)
        given = definitions if given is None else given + spec.tools.after_system + definitions
    return "" if given is None else _fill(spec.system, content=given, **special)


def _reply_text(message: dict, form: ToolFormat | None) -> str:
    """What an assistant turn says: its text, then each of its calls."""
    content = message.get("content") or ""
    if not message.get("tool_calls"):
        return content
    return form.between.join([content] * bool(content) + _calls(form, message["tool_calls"]))


def _definitions(form: ToolFormat, tools: list[dict]) -> str:
    return _fill(form.definitions, tools="".join("\n" + as_json(tool) for tool in tools))


def _calls(form: ToolFormat, calls: list[dict]) -> list[str]:
    return [
        _fill(form.call, name=function["name"], arguments=as_json(function["arguments"]))
        for function in map(function_of, calls)
    ]


def tool_texts(chat: Chat, template: str) -> Iterator[str]:
    """The text the template writes for a conversation's tools: the definitions as its system turn holds them, then
    each call as a reply writes it. The tokenizer learns from it, so a trained tokenizer writes the tool dialect in
    few tokens; nothing where the template cannot show tools."""
    form = TEMPLATES[template].tools if template in TEMPLATES else None
    if form is None:
        return
    if chat.tools:
        yield _definitions(form, chat.tools)
    for message in chat.messages:
        if message.get("tool_calls"):
            yield form.between.join(_calls(form, message["tool_calls"]))


def _special(tokenizer, template: str) -> dict[str, str]:
    if "{eos}" in TEMPLATES[template].reply and tokenizer.eos_token is None:
        raise ValueError(
            f"the {template} template ends each reply with the end-of-sequence token, "
            f"and this tokenizer has none (set tokenizer.eos_token)"
        )
    return {"bos": tokenizer.bos_token or "", "eos": tokenizer.eos_token or ""}


def _template_pieces(
    messages: list[dict],
    tokenizer,
    template: str,
    first_trained: int,
    generation_prompt: bool,
    tools: list[dict] | None,
) -> list[tuple[str, bool]]:
    """(text, trained) pieces: the replies of assistant turns from message index `first_trained` on are trained;
    tool results are context."""
    spec, special = TEMPLATES[template], _special(tokenizer, template)
    if spec.tools is None and _uses_tools(messages, tools):
        raise ValueError(_no_tools(template))
    system = _system(messages, tools, spec, special)
    pieces = [(_fill(spec.start, **special), False)]
    first_user = True
    for index, message in enumerate(messages):
        if message["role"] == "user":
            given = message.get("input")
            extra = _fill(spec.user_input, input=given) if given else ""
            pieces.append(
                (
                    _fill(
                        spec.user,
                        content=message["content"],
                        input=extra,
                        system=system if first_user else "",
                        **special,
                    ),
                    False,
                )
            )
            first_user = False
        elif message["role"] == "assistant":
            pieces += [
                (_fill(spec.header, **special), False),
                (_fill(spec.reply, content=_reply_text(message, spec.tools), **special), index >= first_trained),
                (_fill(spec.after_reply, **special), False),
            ]
        elif message["role"] == "tool":  # consecutive results share one turn
            form = spec.tools
            opens = messages[index - 1]["role"] != "tool"
            closes = index + 1 == len(messages) or messages[index + 1]["role"] != "tool"
            pieces.append(
                (
                    (_fill(form.results_start, **special) if opens else "")
                    + _fill(form.result, content=message["content"], **special)
                    + (_fill(form.results_end, **special) if closes else ""),
                    False,
                )
            )
    if generation_prompt:
        pieces.append((_fill(spec.header, **special), False))
    return pieces


def _render(tokenizer, messages: list[dict], generation_prompt: bool, tools: list[dict] | None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def _after(prefix: str, text: str, what: str) -> str:
    """The part of `text` after `prefix`, or a clear error where the template is not prefix-stable."""
    if not text.startswith(prefix):
        raise ValueError(
            f"the tokenizer's chat template is not prefix-stable ({what} does not start with the "
            f"rendering before it), so its trained spans cannot be found; choose another template. "
            f"Expected a start of {prefix[-80:]!r}, got {text[: len(prefix)][-80:]!r}"
        )
    return text[len(prefix) :]


def _own_pieces(
    messages: list[dict], tokenizer, first_trained: int, generation_prompt: bool, tools: list[dict] | None
) -> list[tuple[str, bool]]:
    """(text, trained) pieces of the tokenizer's own template: each reply is what its message adds to the prompt
    before it."""
    if not tokenizer.chat_template:
        raise ValueError(NO_CHAT_TEMPLATE)
    if tools and _render(tokenizer, messages, False, tools) == _render(tokenizer, messages, False, None):
        raise ValueError(
            "the tokenizer's chat template does not show the tools offered (it renders the conversation alike with "
            "and without them), so a model trained on it would never see them; choose the chatml template"
        )
    pieces: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], True, tools)
        whole = _render(tokenizer, messages[: index + 1], False, tools)
        context = _after(done, prompt, f"the prompt before message {index}")
        turn = _after(prompt, whole, f"the conversation up to message {index}")
        if unshown := [f["name"] for f in map(function_of, message.get("tool_calls") or []) if f["name"] not in turn]:
            raise ValueError(
                f"the tokenizer's chat template does not show the tool calls of message {index} "
                f"({', '.join(unshown)}); choose the chatml template"
            )
        # the separator after the end-of-turn marker is the next turn's context: generation stops at the marker
        reply = turn.rstrip()
        pieces += [(context, False), (reply, index >= first_trained), (turn[len(reply) :], False)]
        done = whole
    if generation_prompt or messages[-1]["role"] != "assistant":
        pieces.append((_after(done, _render(tokenizer, messages, generation_prompt, tools), "the prompt"), False))
    return pieces


def _tokenize(pieces: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[int]]:
    """input_ids and labels of the pieces, adjacent context pieces joined so they tokenize as one text."""
    merged: list[tuple[str, bool]] = []
    for text, trained in pieces:
        if merged and not trained and not merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, False)
        elif text:
            merged.append((text, trained))
    input_ids: list[int] = []
    labels: list[int] = []
    encoded = tokenizer([text for text, _ in merged], add_special_tokens=False)["input_ids"] if merged else []
    for ids, (_, trained) in zip(encoded, merged):
        input_ids += ids
        labels += ids if trained else [IGNORE] * len(ids)
    return input_ids, labels


def _pieces(
    messages: list[dict],
    tokenizer,
    template: str,
    first_trained: int,
    generation_prompt: bool,
    tools: list[dict] | None,
) -> list[tuple[str, bool]]:
    """The conversation's (text, trained) pieces under the template: ours, or the tokenizer's own."""
    _check_roles(messages)
    if template == OWN_TEMPLATE:
        return _own_pieces(messages, tokenizer, first_trained, generation_prompt, tools)
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}: choose one of {', '.join(TEMPLATE_NAMES)}")
    return _template_pieces(messages, tokenizer, template, first_trained, generation_prompt, tools)


def _encode(
    messages: list[dict],
    tokenizer,
    template: str,
    first_trained: int,
    generation_prompt: bool = False,
    tools: list[dict] | None = None,
) -> tuple[list[int], list[int]]:
    pieces = _pieces(messages, tokenizer, template, first_trained, generation_prompt, tools)
    input_ids, labels = _tokenize(pieces, tokenizer)
    if template == OWN_TEMPLATE:
        # a user's template may put a piece boundary inside what its tokenizer reads as one word
        whole = tokenizer("".join(text for text, _ in pieces), add_special_tokens=False)["input_ids"]
        if input_ids != whole:
            raise ValueError(
                "the tokenizer's chat template splits a reply from its context inside a token, "
                "so training would not see the tokens inference sees; choose another template"
            )
    return input_ids, labels


def encode_conversation(
    messages: list[dict], tokenizer, max_len: int, template: str = "chatml", tools: list[dict] | None = None
) -> tuple[list[int], list[int]]:
    """input_ids and labels (IGNORE outside assistant replies; every reply trained, tool calls included, tool
    results not), truncated to max_len tokens."""
    input_ids, labels = _encode(messages, tokenizer, template, first_trained=0, tools=tools)
    return input_ids[:max_len], labels[:max_len]


def encode_completion(
    prompt_messages: list[dict], completion: str, tokenizer, max_len: int, template: str = "chatml"
) -> tuple[list[int], list[int]]:
    """input_ids and labels of a prompt answered by `completion`: only the completion is trained, truncated to
    max_len."""
    messages = [*prompt_messages, {"role": "assistant", "content": completion}]
    input_ids, labels = _encode(messages, tokenizer, template, first_trained=len(prompt_messages))
    return input_ids[:max_len], labels[:max_len]


def encode_prompt(
    messages: list[dict], tokenizer, template: str = "chatml", tools: list[dict] | None = None
) -> list[int]:
    """The tokens a model continues to answer: the conversation so far plus the assistant header."""
    input_ids, _ = _encode(
        messages, tokenizer, template, first_trained=len(messages), generation_prompt=True, tools=tools
    )
    return input_ids


def after_calls(
    messages: list[dict], calls: list[dict], results: list[str], tokenizer, template: str, tools: list[dict]
) -> list[int]:
    """The tokens that follow an assistant turn calling tools, up to the next reply: the end of that turn, the tool
    turn holding each call's result, and the assistant header. A rollout appends them to the tokens the policy wrote
    (up to its end-of-turn token) and generates on; none of them is trained."""
    called = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": c} for c in calls]}
    conversation = [*messages, called, *({"role": "tool", "content": result} for result in results)]
    pieces = _pieces(conversation, tokenizer, template, len(messages), True, tools)
    reply = max(i for i, (_, trained) in enumerate(pieces) if trained)
    return tokenizer("".join(text for text, _ in pieces[reply + 1 :]), add_special_tokens=False)["input_ids"]


def end_of_turn_id(tokenizer, template: str = "chatml") -> int:
    """The token that ends an assistant reply: where generation stops."""
    probe = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
    input_ids, labels = _encode(probe, tokenizer, template, first_trained=0)
    return [i for i, label in zip(input_ids, labels) if label != IGNORE][-1]


def _jinja_text(text: str, **slots: str) -> str:
    """A Jinja expression that renders `text`, each slot read from the Jinja expression given for it."""
    slots = {"bos": "bos_token", "eos": "eos_token", **slots}
    chunks = SLOT.split(text)  # literal text at even indices, slot names at odd ones
    parts = [slots[chunk] if i % 2 else json.dumps(chunk) for i, chunk in enumerate(chunks) if i % 2 or chunk]
    return " ~ ".join(parts) or "''"


def _jinja_output(text: str, **slots: str) -> list[str]:
    """The Jinja line that outputs `text`; none where `text` is empty."""
    return ["{{- " + _jinja_text(text, **slots) + " -}}"] if text else []


def _jinja_refuse(template: str) -> str:
    return "{{- raise_exception(" + json.dumps(_no_tools(template)) + ") -}}"


def _jinja_tool_definitions(spec: Template, template: str) -> list[str]:
    """Jinja that adds the tool definitions to `system_content` (None: no system turn yet), as `_system` does."""
    if spec.tools is None:
        return ["{%- if tools -%}", _jinja_refuse(template), "{%- endif -%}"]
    return [
        "{%- if tools -%}",
        "{%- set listed = namespace(text='') -%}",
        "{%- for tool in tools -%}",
        "{%- set listed.text = listed.text ~ " + json.dumps("\n") + " ~ (tool | tojson) -%}",
        "{%- endfor -%}",
        "{%- set definitions = " + _jinja_text(spec.tools.definitions, tools="listed.text") + " -%}",
        "{%- if system_content is none -%}",
        "{%- set system_content = definitions -%}",
        "{%- else -%}",
        "{%- set system_content = system_content ~ " + _jinja_text(spec.tools.after_system) + " ~ definitions -%}",
        "{%- endif -%}",
        "{%- endif -%}",
    ]


def _jinja_assistant(spec: Template, template: str) -> list[str]:
    """Jinja of an assistant turn: its text, then each call, as `_reply_text` writes them."""
    has_calls = "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    turn = spec.header + spec.reply + spec.after_reply
    if spec.tools is None:
        return [has_calls, _jinja_refuse(template), "{%- endif -%}", *_jinja_output(turn, content="message['content']")]
    call = _jinja_text(spec.tools.call, name="function['name']", arguments="(function['arguments'] | tojson)")
    return [
        "{%- set reply = namespace(text=(message['content'] if message['content'] else '')) -%}",
        has_calls,
        "{%- for call in message['tool_calls'] -%}",
        "{%- set function = call['function'] if call['function'] is defined else call -%}",
        "{%- set reply.text = (reply.text ~ "
        + json.dumps(spec.tools.between)
        + " if reply.text else '') ~ "
        + call
        + " -%}",
        "{%- endfor -%}",
        "{%- endif -%}",
        *_jinja_output(turn, content="reply.text"),
    ]


def _jinja_tool_result(spec: Template, template: str) -> list[str]:
    """Jinja of a tool's result: consecutive results share one turn, as in `_template_pieces`."""
    if spec.tools is None:
        return [_jinja_refuse(template)]
    form = spec.tools
    return [
        "{%- if loop.first or loop.previtem['role'] != 'tool' -%}",
        *_jinja_output(form.results_start),
        "{%- endif -%}",
        *_jinja_output(form.result, content="message['content']"),
        "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}",
        *_jinja_output(form.results_end),
        "{%- endif -%}",
    ]


def jinja(template: str) -> str:
    """The template as a Jinja chat template: stored in a tokenizer, `apply_chat_template` (given `tools=` where the
    conversation offers tools) renders as training does."""
    if template not in TEMPLATES:
        own = " (the tokenizer template is the tokenizer's own, already stored)" if template == OWN_TEMPLATE else ""
        raise ValueError(f"{template!r} has no Jinja form to store: choose one of {', '.join(TEMPLATES)}{own}")
    spec = TEMPLATES[template]
    generation_prompt = _jinja_output(spec.header)
    return "\n".join(
        [
            "{%- if messages[0]['role'] == 'system' -%}",
            "{%- set system_content = messages[0]['content'] -%}",
            "{%- set turns = messages[1:] -%}",
            "{%- else -%}",
            "{%- set system_content = none -%}",
            "{%- set turns = messages -%}",
            "{%- endif -%}",
            *_jinja_tool_definitions(spec, template),
            "{%- if system_content is none -%}",
            "{%- set system = '' -%}",
            "{%- else -%}",
            "{%- set system = " + _jinja_text(spec.system, content="system_content") + " -%}",
            "{%- endif -%}",
            *_jinja_output(spec.start),
            "{%- for message in turns -%}",
            "{%- if message['role'] == 'user' -%}",
            "{%- if message['input'] is defined and message['input'] -%}",
            "{%- set user_input = " + _jinja_text(spec.user_input, input="message['input']") + " -%}",
            "{%- else -%}",
            "{%- set user_input = '' -%}",
            "{%- endif -%}",
            *_jinja_output(
                spec.user, content="message['content']", input="user_input", system="(system if loop.first else '')"
            ),
            "{%- elif message['role'] == 'tool' -%}",
            *_jinja_tool_result(spec, template),
            "{%- else -%}",
            *_jinja_assistant(spec, template),
            "{%- endif -%}",
            "{%- endfor -%}",
            *(["{%- if add_generation_prompt -%}", *generation_prompt, "{%- endif -%}"] if generation_prompt else []),
        ]
    )


# How a chatml reply reads back as a message (transformers' `tokenizer.parse_response`, which its server uses to
# answer with `tool_calls`): text up to the end of the turn, and each <tool_call> block of HERMES a call
CHATML_REPLY = {
    "defaults": {"role": "assistant"},
    "start_anchor": f"{IM_START}assistant\n",
    "fields": {
        "tool_calls": {
            "open_pattern": r"\s*<tool_call>",
            "close": "</tool_call>",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"close_pattern": r"\s*(?:<\|im_end\|>|<\|endoftext\|>)", "content": "text"},
    },
}


def store_template(tokenizer, template: str) -> None:
    """Make `template` the tokenizer's chat template, so inference renders prompts as training did; chatml's comes
    with the response template that reads its replies (and tool calls) back."""
    if template == OWN_TEMPLATE:
        if not tokenizer.chat_template:
            raise ValueError(NO_CHAT_TEMPLATE)
        return
    tokenizer.chat_template = jinja(template)
    read_replies(tokenizer)


def read_replies(tokenizer) -> None:
    """A tokenizer holding our chatml template and no response template gets chatml's (a checkpoint saved before
    templates carried one included)."""
    if getattr(tokenizer, "response_template", None) is None and tokenizer.chat_template == jinja("chatml"):
        tokenizer.response_template = CHATML_REPLY


def conversations(frame: pl.DataFrame, prefix: str = "") -> list[list[dict]]:
    """Canonical rows (parallel roles and contents) as message lists; prefix "prompt_" reads a prompt's columns.
    Conversations that may offer tools read through `stages.common.tools.chats`, which keeps them."""
    if not prefix and holds_tools(frame):
        raise ValueError(
            "these conversations hold tools or tool calls, which message lists would lose: read them with chats"
        )
    return [
        [{"role": r, "content": c} for r, c in zip(roles, contents)]
        for roles, contents in zip(frame[f"{prefix}roles"].to_list(), frame[f"{prefix}contents"].to_list())
    ]
