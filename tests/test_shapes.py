"""Shapes: each row shape LLaMA-Factory, TRL, Axolotl and OpenAI document reads as our canonical row, under the
same contracts; tool calls in every dialect read as one encoding; what the stages cannot read (media, tools outside
conversations) is refused by name. Every row here is written for the test, in the shape its project documents."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from pandera.errors import SchemaErrors

from schemas.data import SCHEMAS, DataError, read_file

TOOL_ORDER = (
    "with tool calls, roles must be system/user/assistant/tool: an optional system turn, then user; after user, "
    "assistant; an assistant turn that calls tools is followed by one or more tool turns, then assistant; one that "
    "does not, by user; the last turn is the assistant's, calling nothing"
)
TEXT_ONLY_PART = "and this stage is text-only: only text parts {type: text, text} are read"


def rows_of(tmp_path: Path, fmt: str, *rows: dict) -> list[dict]:
    """The rows, written as one jsonl file, read back in canonical form (without their line numbers)."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return [{k: v for k, v in row.items() if k != "line"} for row in read_file(path, fmt).frame.to_dicts()]


def refusals(tmp_path: Path, fmt: str, row: dict) -> list[str]:
    """Every `field: rule` the row is refused with."""
    path = tmp_path / "row.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_file(path, fmt)
    return [f"{p.field}: {p.rule}" for p in err.value.problems]


def said(role: str, content: object) -> dict:
    return {"role": role, "content": content}


def spoke(speaker: str, value: object) -> dict:
    return {"from": speaker, "value": value}


def plain(roles: list[str], contents: list[str]) -> dict:
    """A canonical conversation without tools."""
    return {"roles": roles, "contents": contents, "calls": [""] * len(roles), "tools": None}


def calls(*made: tuple[str, dict]) -> str:
    return json.dumps([{"name": name, "arguments": arguments} for name, arguments in made], ensure_ascii=False)


# ---- content parts and media ---------------------------------------------------------------


def test_text_parts_read_as_their_text_whichever_key_holds_it(tmp_path: Path) -> None:
    parts = [{"type": "text", "text": "Name a "}, {"type": "text", "value": "green fruit."}]
    assert (
        rows_of(
            tmp_path,
            "conversations",
            {"messages": [said("user", parts), said("assistant", [{"type": "text", "text": "A lime."}])]},
            {"conversations": [spoke("human", parts), spoke("gpt", "A lime.")]},
        )
        == [plain(["user", "assistant"], ["Name a green fruit.", "A lime."])] * 2
    )


@pytest.mark.parametrize("part_type", ["image", "image_url", "audio", "input_audio", "video"])
def test_a_part_that_is_not_text_is_refused_as_text_only(tmp_path: Path, part_type: str) -> None:
    question = [{"type": "text", "text": "What is in this picture?"}, {"type": part_type, part_type: "x"}]
    row = {"messages": [said("user", question), said("assistant", "A boat.")]}
    assert refusals(tmp_path, "conversations", row) == [
        f"messages[0].content[1]: is a part of type {part_type!r}, {TEXT_ONLY_PART}"
    ]


@pytest.mark.parametrize("key", ["images", "videos", "audios"])
def test_a_row_holding_media_is_refused_as_text_only_and_an_empty_media_column_is_none(
    tmp_path: Path, key: str
) -> None:
    row = {"conversations": [spoke("human", "<image>What is this?"), spoke("gpt", "A boat.")]}
    assert refusals(tmp_path, "conversations", {**row, key: ["boat.jpg"]}) == [
        f"{key}: holds {key}, and this stage is text-only: give rows without media"
    ]
    assert refusals(tmp_path, "preference", {"prompt": "Q", "chosen": "a", "rejected": "b", key: ["q.wav"]}) == [
        f"{key}: holds {key}, and this stage is text-only: give rows without media"
    ]
    assert rows_of(tmp_path, "conversations", {**row, key: []}) == [
        plain(["user", "assistant"], ["<image>What is this?", "A boat."])
    ]


# ---- preference: sharegpt pairs and chosen_messages ----------------------------------------

PAIR = {
    "prompt_roles": ["system", "user"],
    "prompt_contents": ["Answer in one word.", "The colour of a ripe lemon?"],
    "chosen": "Yellow.",
    "rejected": "Blue.",
}


def test_sharegpt_pairs_read_as_preference_in_either_message_form(tmp_path: Path) -> None:
    assert (
        rows_of(
            tmp_path,
            "preference",
            {  # LLaMA-Factory's sharegpt preference row
                "conversations": [spoke("human", "The colour of a ripe lemon?")],
                "system": "Answer in one word.",
                "chosen": spoke("gpt", "Yellow."),
                "rejected": spoke("gpt", "Blue."),
            },
            {
                "messages": [said("system", "Answer in one word."), said("user", "The colour of a ripe lemon?")],
                "chosen": said("assistant", "Yellow."),
                "rejected": said("assistant", "Blue."),
            },
        )
        == [PAIR] * 2
    )


def test_a_sharegpt_pair_whose_reply_is_not_the_assistants_is_refused(tmp_path: Path) -> None:
    row = {
        "conversations": [spoke("human", "The colour of a ripe lemon?")],
        "chosen": spoke("human", "Yellow."),
        "rejected": spoke("gpt", "Blue."),
    }
    assert refusals(tmp_path, "preference", row) == ["chosen: must be the assistant's turn, not 'user'"]


CONVERSATION_PAIR = {
    "chosen_messages": [
        said("system", "Answer in one word."),
        said("user", "The colour of a ripe lemon?"),
        said("assistant", "Yellow."),
    ],
    "rejected_messages": [
        said("system", "Answer in one word."),
        said("user", "The colour of a ripe lemon?"),
        said("assistant", "Blue."),
    ],
}


def test_chosen_messages_and_rejected_messages_read_as_a_pair_and_as_two_labelled_completions(tmp_path: Path) -> None:
    assert rows_of(tmp_path, "preference", CONVERSATION_PAIR) == [PAIR]
    assert rows_of(tmp_path, "unpaired", CONVERSATION_PAIR) == [
        {
            "prompt_roles": PAIR["prompt_roles"],
            "prompt_contents": PAIR["prompt_contents"],
            "completions": ["Yellow.", "Blue."],
            "labels": [True, False],
        }
    ]


def test_whole_conversations_that_differ_before_their_last_turn_are_refused(tmp_path: Path) -> None:
    row = {**CONVERSATION_PAIR, "rejected_messages": [said("user", "A lime's colour?"), said("assistant", "Blue.")]}
    assert refusals(tmp_path, "preference", row) == [
        "rejected_messages: must repeat every turn of chosen_messages but the last: the shared turns are the prompt"
    ]


def test_a_system_key_beside_whole_conversations_opens_their_prompt(tmp_path: Path) -> None:
    row = {key: turns[1:] for key, turns in CONVERSATION_PAIR.items()}
    assert rows_of(tmp_path, "preference", {**row, "system": "Answer in one word."}) == [PAIR]


# ---- unpaired: labelled conversations --------------------------------------------------------


def test_a_labelled_conversation_reads_as_its_prompt_and_last_reply(tmp_path: Path) -> None:
    assert rows_of(
        tmp_path,
        "unpaired",
        {  # LLaMA-Factory's KTO row, its kto_tag mapped to label
            "conversations": [spoke("human", "Is a tomato a fruit?"), spoke("gpt", "Botanically, yes.")],
            "system": "Be accurate.",
            "label": True,
        },
        {
            "messages": [
                said("user", "Is a tomato a fruit?"),
                said("assistant", "Yes."),
                said("user", "And a cucumber?"),
                said("assistant", "No, never."),
            ],
            "label": False,
        },
        {  # TRL's conversational unpaired row
            "prompt": [said("user", "Is a tomato a fruit?")],
            "completion": [said("assistant", "Botanically, yes.")],
            "label": True,
        },
    ) == [
        {
            "prompt_roles": ["system", "user"],
            "prompt_contents": ["Be accurate.", "Is a tomato a fruit?"],
            "completions": ["Botanically, yes."],
            "labels": [True],
        },
        {
            "prompt_roles": ["user", "assistant", "user"],
            "prompt_contents": ["Is a tomato a fruit?", "Yes.", "And a cucumber?"],
            "completions": ["No, never."],
            "labels": [False],
        },
        {
            "prompt_roles": ["user"],
            "prompt_contents": ["Is a tomato a fruit?"],
            "completions": ["Botanically, yes."],
            "labels": [True],
        },
    ]


@pytest.mark.parametrize(
    "row, refusal",
    [
        (
            {"messages": [said("user", "Is a tomato a fruit?")], "label": True},
            "messages: beside a label, must be a whole conversation ending in the assistant's reply, which the label "
            "judges",
        ),
        ({"messages": [said("user", "Q"), said("assistant", "A")]}, "label: required"),
        (
            {"messages": [said("user", "Q"), said("assistant", "A")], "label": "yes"},
            "label: must be true (desirable) or false (undesirable), not a string",
        ),
    ],
)
def test_a_labelled_conversation_without_a_reply_or_a_boolean_label_is_refused(
    tmp_path: Path, row: dict, refusal: str
) -> None:
    assert refusals(tmp_path, "unpaired", row) == [refusal]


# ---- tool calls: three dialects, one canonical row -------------------------------------------

MULTIPLY = {
    "name": "multiply",
    "description": "The product of two integers.",
    "parameters": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
}
OPENAI_TOOLS = [{"type": "function", "function": MULTIPLY}]
QUESTION, RESULT, ANSWER = "What is 3 times 4?", "12", "3 times 4 is 12."
TOOL_ROW = {
    "roles": ["system", "user", "assistant", "tool", "assistant"],
    "contents": ["Use the tools.", QUESTION, "", RESULT, ANSWER],
    "calls": ["", "", calls(("multiply", {"a": 3, "b": 4})), "", ""],
    "tools": json.dumps(OPENAI_TOOLS, ensure_ascii=False),
}


def openai_row(arguments: object = '{"a": 3, "b": 4}', **changes: object) -> dict:
    """OpenAI's chat fine-tuning row with one call: arguments as JSON text, the tool's result linked by id."""
    call = {"id": "call_1", "type": "function", "function": {"name": "multiply", "arguments": arguments}}
    return {
        "messages": [
            said("system", "Use the tools."),
            said("user", QUESTION),
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": RESULT},
            said("assistant", ANSWER),
        ],
        "tools": OPENAI_TOOLS,
        **changes,
    }


def test_tool_calls_in_every_dialect_read_as_one_canonical_row(tmp_path: Path) -> None:
    trl = {  # arguments as an object, the result named by its tool, null content where nothing is said
        "messages": [
            said("system", "Use the tools."),
            said("user", QUESTION),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "multiply", "arguments": {"a": 3, "b": 4}}}],
            },
            {"role": "tool", "name": "multiply", "content": RESULT},
            said("assistant", ANSWER),
        ],
        "tools": OPENAI_TOOLS,
    }
    llama_factory = {  # the call as JSON text in a function_call turn, tools as JSON text of bare definitions
        "conversations": [
            spoke("human", QUESTION),
            spoke("function_call", json.dumps({"name": "multiply", "arguments": {"a": 3, "b": 4}})),
            spoke("observation", RESULT),
            spoke("gpt", ANSWER),
        ],
        "system": "Use the tools.",
        "tools": json.dumps([MULTIPLY]),
    }
    assert rows_of(tmp_path, "conversations", openai_row(), trl, llama_factory) == [TOOL_ROW] * 3


def test_parallel_and_successive_calls_read_in_order(tmp_path: Path) -> None:
    row = {
        "conversations": [
            spoke("human", "Price of 2 pears and 3 plums, in €?"),
            spoke(
                "function_call",
                json.dumps([{"name": "price", "arguments": {"fruit": "pear"}}, {"name": "price", "arguments": {}}]),
            ),
            spoke("observation", "0.5"),
            spoke("observation", "0.25"),
            spoke("function_call", json.dumps({"name": "total", "arguments": json.dumps({"sum": "2*0.5+3*0.25"})})),
            spoke("observation", "1.75"),
            spoke("gpt", "1.75 €."),
        ]
    }
    (canonical,) = rows_of(tmp_path, "conversations", row)
    assert canonical == {
        "roles": ["user", "assistant", "tool", "tool", "assistant", "tool", "assistant"],
        "contents": ["Price of 2 pears and 3 plums, in €?", "", "0.5", "0.25", "", "1.75", "1.75 €."],
        "calls": [
            "",
            '[{"name": "price", "arguments": {"fruit": "pear"}}, {"name": "price", "arguments": {}}]',
            "",
            "",
            '[{"name": "total", "arguments": {"sum": "2*0.5+3*0.25"}}]',
            "",
            "",
        ],
        "tools": None,  # no tools key: a call may name any tool
    }


def test_text_beside_calls_is_kept_and_tools_defined_but_not_called_are_kept(tmp_path: Path) -> None:
    row = openai_row()
    row["messages"][2]["content"] = "Let me multiply."
    lone = {"messages": [said("user", "Hi"), said("assistant", "Hello.")], "tools": json.dumps(OPENAI_TOOLS)}
    assert rows_of(tmp_path, "conversations", row, lone) == [
        {**TOOL_ROW, "contents": ["Use the tools.", QUESTION, "Let me multiply.", RESULT, ANSWER]},
        {**plain(["user", "assistant"], ["Hi", "Hello."]), "tools": TOOL_ROW["tools"]},
    ]


def test_bare_definitions_are_wrapped_with_a_description_and_parameters(tmp_path: Path) -> None:
    tools = [{"name": "now"}, {"type": "function", "function": {"name": "today", "description": "The date."}}]
    row = {
        "messages": [said("user", "Time?"), {"role": "assistant", "tool_calls": [{"name": "now", "arguments": "{}"}]}]
        + [said("tool", "09:00"), said("assistant", "Nine o'clock.")],
        "tools": tools,
    }
    (canonical,) = rows_of(tmp_path, "conversations", row)
    no_arguments = {"type": "object", "properties": {}}
    assert json.loads(canonical["tools"]) == [
        {"type": "function", "function": {"name": "now", "description": "", "parameters": no_arguments}},
        {"type": "function", "function": {"name": "today", "description": "The date.", "parameters": no_arguments}},
    ]
    assert canonical["calls"][1] == '[{"name": "now", "arguments": {}}]'


@pytest.mark.parametrize(
    "row, refusal",
    [
        (
            openai_row("{a: 3}"),
            "messages[2].tool_calls[0].function.arguments: not valid JSON: Expecting property name enclosed in double "
            "quotes at column 2",
        ),
        (
            openai_row("[3, 4]"),
            "messages[2].tool_calls[0].function.arguments: must be a JSON object of named arguments, not a list",
        ),
        (
            openai_row(tools=[{"type": "function", "function": {"name": "add"}}, {"name": "divide"}]),
            "messages[2].tool_calls[0].function.name: calls 'multiply', which the row's tools do not define "
            "(they define add, divide)",
        ),
        (
            openai_row(tools=5),
            "tools: must be a list of tool definitions {type: function, function: {name, description, parameters}} "
            "(or bare {name, description, parameters}), or that list as JSON text, not a number",
        ),
        (
            openai_row(tools="[{name: 1}]"),
            "tools: not valid JSON: Expecting property name enclosed in double quotes at column 3",
        ),
        (openai_row(tools=[{"description": "nameless"}]), "tools[0].name: required"),
        (
            openai_row(tools=[{"type": "function", "function": {"name": 7}}]),
            "tools[0].function.name: must be a string, not a number",
        ),
        (openai_row(tools=[MULTIPLY, MULTIPLY]), "tools[1].name: defines 'multiply' a second time"),
        (
            {
                "conversations": [spoke("human", "Q"), spoke("function_call", "multiply(3, 4)")]
                + [spoke("observation", "12"), spoke("gpt", "12.")]
            },
            "conversations[1].value: not valid JSON: Expecting value at column 1",
        ),
        (
            {
                "conversations": [spoke("human", "Q"), spoke("function_call", '{"name": "multiply"}')]
                + [spoke("observation", "12"), spoke("gpt", "12.")]
            },
            "conversations[1].value.arguments: required",
        ),
        (
            {"messages": [{"role": "user", "content": "Q", "tool_calls": [{"name": "f", "arguments": {}}]}]},
            "messages[0].tool_calls: only an assistant message may call tools, not a 'user' one",
        ),
    ],
)
def test_a_malformed_call_or_tool_list_is_refused_by_its_key(tmp_path: Path, row: dict, refusal: str) -> None:
    assert refusals(tmp_path, "conversations", row) == [refusal]


def order(*turns: str) -> dict:
    """A tool conversation of the given turns: `call` is an assistant turn that only calls multiply."""
    multiply = {"type": "function", "function": {"name": "multiply", "arguments": {}}}
    call = {"role": "assistant", "tool_calls": [multiply]}
    return {"messages": [call if turn == "call" else said(turn, "x") for turn in turns]}


@pytest.mark.parametrize(
    "turns, refusals_expected",
    [
        (("user", "call"), [f"roles: {TOOL_ORDER}"]),
        (("user", "call", "user", "assistant"), [f"roles: {TOOL_ORDER}"]),
        (("user", "assistant", "tool", "assistant"), [f"roles: {TOOL_ORDER}"]),
        (("user", "tool", "assistant"), [f"roles: {TOOL_ORDER}"]),
        (("system", "call", "tool", "assistant"), [f"roles: {TOOL_ORDER}"]),
        (("user", "call", "tool"), [f"roles: {TOOL_ORDER}", "roles: the last turn must be the assistant's"]),
    ],
)
def test_tool_turns_out_of_order_are_refused_by_the_tool_order_rule(
    tmp_path: Path, turns: tuple[str, ...], refusals_expected: list[str]
) -> None:
    assert refusals(tmp_path, "conversations", order(*turns)) == refusals_expected


def test_tool_turns_in_order_are_accepted(tmp_path: Path) -> None:
    rows = [
        order("user", "call", "tool", "assistant"),
        order("system", "user", "call", "tool", "tool", "call", "tool", "assistant", "user", "assistant"),
    ]
    assert [row["roles"] for row in rows_of(tmp_path, "conversations", *rows)] == [
        ["user", "assistant", "tool", "assistant"],
        ["system", "user", "assistant", "tool", "tool", "assistant", "tool", "assistant", "user", "assistant"],
    ]


def test_only_an_assistant_turn_that_calls_may_say_nothing(tmp_path: Path) -> None:
    row = order("user", "call", "tool", "assistant")
    row["messages"][2]["content"] = " "
    assert refusals(tmp_path, "conversations", row) == ["contents: no message may have empty content"]
    row = order("user", "call", "tool", "assistant")
    row["messages"][3]["content"] = ""
    assert refusals(tmp_path, "conversations", row) == ["contents: no message may have empty content"]


def test_calls_that_do_not_line_up_with_the_messages_break_only_their_own_rule() -> None:
    frame = pl.DataFrame(
        {"roles": [["user", "assistant"]], "contents": [["Q", "A"]], "calls": [[""]], "tools": ["[]"]},
        schema={"roles": pl.List(pl.Utf8), "contents": pl.List(pl.Utf8), "calls": pl.List(pl.Utf8), "tools": pl.Utf8},
    )
    with pytest.raises(SchemaErrors) as err:
        SCHEMAS["conversations"].validate(frame, lazy=True)
    assert err.value.failure_cases["check"].to_list() == ['one entry per message ("" for a message that calls no tool)']


def test_an_empty_tool_list_is_no_tools(tmp_path: Path) -> None:
    chat = [said("user", "Hi"), said("assistant", "Hello.")]
    rows = [{"messages": chat, "tools": tools} for tools in (None, "", [], "[]")]
    assert rows_of(tmp_path, "conversations", *rows) == [plain(["user", "assistant"], ["Hi", "Hello."])] * 4


def test_tools_and_calls_outside_conversations_are_refused_not_dropped(tmp_path: Path) -> None:
    call = {"role": "assistant", "tool_calls": [{"name": "multiply", "arguments": {"a": 3}}]}
    prompt = [said("user", "Q"), call, said("tool", "3"), said("user", "Go on.")]
    assert refusals(tmp_path, "preference", {"prompt": prompt, "chosen": "a", "rejected": "b"}) == [
        "prompt[1]: calls tools, and tool calls are read only in the conversations format"
    ]
    assert refusals(tmp_path, "prompts", {"prompt": "Q", "tools": OPENAI_TOOLS}) == [
        "tools: are read only in the conversations format: this format's stages use no tools"
    ]


# ---- shapes that existed, as LLaMA-Factory and TRL document them ------------------------------


def test_alpaca_with_system_and_history_reads_as_llama_factory_documents_it(tmp_path: Path) -> None:
    row = {
        "instruction": "Translate to French",
        "input": "good night",
        "output": "bonne nuit",
        "system": "You are a translator.",
        "history": [["Translate to French: cat", "chat"], ["Translate to French: dog", "chien"]],
    }
    assert rows_of(tmp_path, "conversations", row) == [
        plain(
            ["system", "user", "assistant", "user", "assistant", "user", "assistant"],
            [
                "You are a translator.",
                "Translate to French: cat",
                "chat",
                "Translate to French: dog",
                "chien",
                "Translate to French\ngood night",
                "bonne nuit",
            ],
        )
    ]


def test_sharegpt_reads_as_llama_factory_documents_it(tmp_path: Path) -> None:
    row = {
        "conversations": [
            spoke("human", "Name a prime."),
            spoke("gpt", "7."),
            spoke("human", "A larger one?"),
            spoke("gpt", "11."),
        ],
        "system": "Reply with a number.",
        "tools": "",
    }
    assert rows_of(tmp_path, "conversations", row) == [
        plain(
            ["system", "user", "assistant", "user", "assistant"],
            ["Reply with a number.", "Name a prime.", "7.", "A larger one?", "11."],
        )
    ]


def test_prompt_only_rows_read_as_prompts(tmp_path: Path) -> None:
    assert rows_of(
        tmp_path,
        "prompts",
        {"prompt": "What is 6 times 7?", "answer": "42"},
        {"prompt": [said("system", "Think step by step."), said("user", "What is 6 times 7?")]},
        {"messages": [said("user", "What is 6 times 7?")], "answer": 42},
    ) == [
        {"prompt_roles": ["user"], "prompt_contents": ["What is 6 times 7?"], "answer": "42"},
        {
            "prompt_roles": ["system", "user"],
            "prompt_contents": ["Think step by step.", "What is 6 times 7?"],
            "answer": None,
        },
        {"prompt_roles": ["user"], "prompt_contents": ["What is 6 times 7?"], "answer": "42"},
    ]


def test_llama_factory_alpaca_pairs_take_their_prompt_as_alpaca_does(tmp_path: Path) -> None:
    row = {"instruction": "Add 2 and 3.", "input": "now", "chosen": "5", "rejected": "6", "history": [["hi", "yo"]]}
    assert rows_of(tmp_path, "preference", row) == [
        {
            "prompt_roles": ["user", "assistant", "user"],
            "prompt_contents": ["hi", "yo", "Add 2 and 3.\nnow"],
            "chosen": "5",
            "rejected": "6",
        }
    ]
    assert rows_of(tmp_path, "unpaired", row)[0]["labels"] == [True, False]


def test_a_null_column_is_an_absent_key_so_a_parquet_file_may_mix_shapes(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    turns = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    path = tmp_path / "mixed.parquet"
    rows = [{"messages": turns, "conversations": None}, {"messages": None, "conversations": turns}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert read_file(path, "conversations").frame["contents"].to_list() == [["Hi.", "Hello."]] * 2
