"""Data contracts: every accepted shape normalises to one canonical row; every problem is named by
file, line, field and rule; the toy world is reproducible."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from examples.generate import DATA_DIR, generate, render
from schemas.data import MAX_LINE_BYTES, DataError, Problem, check_files, read_file

CONVERSATION = '{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
ROLE_ORDER = (
    "roles must be system/user/assistant: an optional system turn, then user and assistant alternating, user first"
)


def write(tmp_path: Path, *lines: str | dict, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines), encoding="utf-8"
    )
    return path


def canonical_rows(path: Path, fmt: str) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "line"} for row in read_file(path, fmt).frame.to_dicts()]


def msgs(*pairs: tuple[str, str], keys: tuple[str, str] = ("role", "content")) -> list[dict]:
    return [{keys[0]: role, keys[1]: content} for role, content in pairs]


def test_bundled_data_is_exactly_what_the_generator_writes() -> None:
    for name, rows in generate().items():
        assert (DATA_DIR / name).read_text(encoding="utf-8") == render(rows), name


def test_bundled_data_passes_its_contracts() -> None:
    results = check_files(
        [
            (DATA_DIR / "pretrain.jsonl", "text", "fail"),
            (DATA_DIR / "sft.jsonl", "conversations", "fail"),
            (DATA_DIR / "preference.jsonl", "preference", "fail"),
            (DATA_DIR / "ranked.jsonl", "ranked", "fail"),
            (DATA_DIR / "rl_prompts.jsonl", "prompts", "fail"),
        ]
    )
    assert [len(r.frame) for r in results.values()] == [6000, 4000, 2000, 1500, 1000]


# ---- every accepted shape gives the same canonical row ------------------------------------

SYSTEM, QUESTION = "Be brief.", "Add 2 and 3."
DIALOGUE = [("system", SYSTEM), ("user", "Hi"), ("assistant", "Hello"), ("user", QUESTION), ("assistant", "5")]
SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}

SHAPES = {
    "conversations": (
        {"roles": [r for r, _ in DIALOGUE], "contents": [c for _, c in DIALOGUE], "calls": [""] * 5, "tools": None},
        [
            {"conversations": msgs(*DIALOGUE)},
            {"messages": msgs(*DIALOGUE)},
            {"messages": msgs(*DIALOGUE[1:]), "system": SYSTEM},
            {
                "messages": msgs(
                    *DIALOGUE[:3],
                    ("user", [{"type": "text", "text": "Add 2 "}, {"type": "text", "text": "and 3."}]),
                    DIALOGUE[4],
                )
            },
            {"conversations": msgs(*[(SHAREGPT_NAMES[r], c) for r, c in DIALOGUE], keys=("from", "value"))},
            {"conversations": msgs(*DIALOGUE[1:], keys=("from", "value")), "system": SYSTEM},
            {"instruction": QUESTION, "input": "", "output": "5", "system": SYSTEM, "history": [["Hi", "Hello"]]},
        ],
    ),
    "preference": (
        {"prompt_roles": ["system", "user"], "prompt_contents": [SYSTEM, QUESTION], "chosen": "5", "rejected": "6"},
        [
            {"system": SYSTEM, "prompt": QUESTION, "chosen": "5", "rejected": "6"},
            {"system": SYSTEM, "question": QUESTION, "chosen": "5", "rejected": "6"},
            {
                "prompt": msgs(("system", SYSTEM), ("user", QUESTION)),
                "chosen": msgs(("assistant", "5")),
                "rejected": msgs(("assistant", "6")),
            },
            {"prompt": msgs(("system", SYSTEM), ("user", QUESTION)), "chosen": "5", "rejected": "6"},
            {
                "chosen": msgs(("system", SYSTEM), ("user", QUESTION), ("assistant", "5")),
                "rejected": msgs(("system", SYSTEM), ("user", QUESTION), ("assistant", "6")),
            },
            {
                "prompt": QUESTION,
                "chosen": msgs(("system", SYSTEM), ("user", QUESTION), ("assistant", "5")),
                "rejected": msgs(("system", SYSTEM), ("user", QUESTION), ("assistant", "6")),
            },
        ],
    ),
    "ranked": (
        {
            "prompt_roles": ["user", "assistant", "user"],
            "prompt_contents": ["Hi", "Hello", QUESTION],
            "completions": ["5", "4", "6"],
            "scores": [1.0, 0.5, 0.0],
        },
        [
            {
                "instruction": QUESTION,
                "input": "",
                "output": ["4", "5", "6"],
                "score": [0.5, 1, 0],
                "history": [["Hi", "Hello"]],
            },
            {
                "prefix": [["<|prompter|>Hi", "<|assistant|>Hello", f"<|prompter|>{QUESTION}", "<|assistant|>"]] * 3,
                "suffix": ["6", "5", "4"],
                "reward": [0.0, 1.0, 0.5],
                "sft_index": 0,
                "meta": {"source": "hh"},
            },
            {
                "prefix": [f"<|prompter|>Hi<|assistant|>Hello<|prompter|>{QUESTION}<|assistant|>"] * 3,
                "suffix": ["5", "4", "6"],
                "reward": [1, 0.5, 0],
            },
        ],
    ),
    "prompts": (
        {"prompt_roles": ["system", "user"], "prompt_contents": [SYSTEM, QUESTION], "answer": "5"},
        [
            {"system": SYSTEM, "prompt": QUESTION, "answer": "5"},
            {"prompt": msgs(("system", SYSTEM), ("user", QUESTION)), "answer": "5"},
            {"messages": msgs(("system", SYSTEM), ("user", QUESTION)), "answer": 5},
            {"messages": msgs(("user", QUESTION)), "system": SYSTEM, "answer": "5", "id": 17},
        ],
    ),
    "text": (
        {"text": "Paris is in France."},
        [
            {"text": "Paris is in France."},
            {"text": "Paris is in France.", "meta": {"source": "wiki"}},
        ],
    ),
}


@pytest.mark.parametrize("fmt", SHAPES)
def test_every_accepted_shape_normalises_to_one_canonical_row(tmp_path: Path, fmt: str) -> None:
    expected, shapes = SHAPES[fmt]
    path = write(tmp_path, *shapes)  # one file mixing every shape: detection is per row
    assert canonical_rows(path, fmt) == [expected] * len(shapes)
    assert read_file(path, fmt).frame["line"].to_list() == list(range(1, len(shapes) + 1))


def test_alpaca_input_joins_the_instruction_and_an_empty_system_means_none(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {"instruction": "Translate", "input": "chat", "output": "cat", "system": ""},
        {"instruction": "Translate chat", "input": None, "output": "cat"},
    )
    assert canonical_rows(path, "conversations") == [
        {"roles": ["user", "assistant"], "contents": ["Translate\nchat", "cat"], "calls": ["", ""], "tools": None},
        {"roles": ["user", "assistant"], "contents": ["Translate chat", "cat"], "calls": ["", ""], "tools": None},
    ]


def test_pro_summaries_take_the_prompt_string_as_one_user_turn(tmp_path: Path) -> None:
    prompt = "POST: my cat ate my homework\nTL;DR:"
    path = write(
        tmp_path,
        {"prefix": [prompt, prompt], "suffix": [" cat ate it", " homework"], "reward": [-1.5, 2.0], "sft_index": 0},
    )
    assert canonical_rows(path, "ranked") == [
        {
            "prompt_roles": ["user"],
            "prompt_contents": [prompt],
            "completions": [" homework", " cat ate it"],
            "scores": [2.0, -1.5],
        }
    ]


def test_a_prompt_without_answer_has_a_null_answer(tmp_path: Path) -> None:
    path = write(tmp_path, {"prompt": "Hi"}, {"prompt": "Hi", "answer": None})
    assert read_file(path, "prompts").frame["answer"].to_list() == [None, None]


def test_ranked_candidates_are_sorted_best_first_and_ties_are_notes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {"instruction": "Q", "output": ["a", "b", "c", "d"], "score": [0.2, 1.0, 0.2, 0.5]},
        {"instruction": "Q", "output": ["a", "b"], "score": [3, -1]},
    )
    result = read_file(path, "ranked")
    assert result.frame["completions"].to_list() == [["b", "d", "a", "c"], ["a", "b"]]  # ties keep the file's order
    assert result.frame["scores"].to_list() == [[1.0, 0.5, 0.2, 0.2], [3.0, -1.0]]
    assert result.rejected == []
    assert [str(note) for note in result.notes] == [
        f"{path}:1: scores: tied scores: tied candidates weigh zero against each other in PRO  [[0.2, 1.0, 0.2, 0.5]]"
    ]


# ---- every rule, by its exact message -----------------------------------------------------

RULES = [
    ("text", {"text": " "}, "text: must not be empty"),
    ("text", {"text": 5}, "text: must be a string, not a number"),
    ("text", {"body": "a"}, "text: required"),
    ("conversations", msgs(("user", "a"), ("user", "b")), f"roles: {ROLE_ORDER}"),
    ("conversations", msgs(("bot", "a"), ("assistant", "b")), f"roles: {ROLE_ORDER}"),
    ("conversations", msgs(("user", "a"), ("system", "s"), ("assistant", "b")), f"roles: {ROLE_ORDER}"),
    ("conversations", msgs(("system", "s"), ("user", "a")), "roles: the last turn must be the assistant's"),
    ("conversations", msgs(("user", " "), ("assistant", "b")), "contents: no message may have empty content"),
    (
        "conversations",
        {"conversations": msgs(("human", "a"), ("bot", "b"), keys=("from", "value"))},
        f"roles: {ROLE_ORDER}",
    ),
    ("conversations", {"conversations": [{"role": "user"}]}, "conversations[0].content: required"),
    (
        "conversations",
        {"conversations": [{"from": "human", "value": None}]},
        "conversations[0].value: must be a string, not null",
    ),
    (
        "conversations",
        {"conversations": [None]},
        "conversations[0]: must be an object with string role and content (or from and value), not null",
    ),
    (
        "conversations",
        {"messages": 3},
        "messages: must be a non-empty list of messages {role, content} or {from, value}, not a number",
    ),
    (
        "conversations",
        {"messages": []},
        "messages: must be a non-empty list of messages {role, content} or {from, value}, not an empty list",
    ),
    (
        "conversations",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
        "messages[0].content[0]: is a part of type 'image_url', and this stage is text-only: only text parts "
        "{type: text, text} are read",
    ),
    (
        "conversations",
        {"messages": msgs(("system", "s"), ("user", "a"), ("assistant", "b")), "system": "t"},
        "system: is given twice: as a key and as the first message",
    ),
    ("conversations", {"instruction": "Q", "output": ["a", "b"]}, "output: must be a string, not a list"),
    (
        "conversations",
        {"instruction": "Q", "output": "a", "history": [["only one"]]},
        "history[0]: must be a pair [user, assistant] of strings",
    ),
    (
        "conversations",
        {"text": "a"},
        "conversations: required: a list of messages {role, content} (or messages, sharegpt {from, value}, "
        "or alpaca instruction/input/output)",
    ),
    ("preference", {"prompt": "Q", "chosen": "a", "rejected": " a "}, "rejected: must differ from chosen"),
    ("preference", {"prompt": "Q", "chosen": "", "rejected": "b"}, "chosen: must not be empty"),
    (
        "preference",
        {"prompt": "", "chosen": "a", "rejected": "b"},
        "prompt_contents: no message may have empty content",
    ),
    (
        "preference",
        {"prompt": msgs(("user", "Q"), ("assistant", "A")), "chosen": "a", "rejected": "b"},
        "prompt_roles: the prompt's last turn must be the user's",
    ),
    (
        "preference",
        {"chosen": "a", "rejected": "b"},
        "prompt: required when chosen and rejected are strings (or give both as whole conversations)",
    ),
    ("preference", {"prompt": "Q", "chosen": "a"}, "rejected: required"),
    (
        "preference",
        {"prompt": "Q", "chosen": msgs(("user", "a")), "rejected": "b"},
        "chosen: beside a prompt, must be a string or a list of one assistant message",
    ),
    (
        "preference",
        {"chosen": msgs(("user", "Q"), ("assistant", "a")), "rejected": msgs(("user", "R"), ("assistant", "b"))},
        "rejected: must repeat every turn of chosen but the last: the shared turns are the prompt",
    ),
    (
        "preference",
        {
            "chosen": msgs(("user", "Q"), ("assistant", "a"), ("user", "b")),
            "rejected": msgs(("user", "Q"), ("assistant", "a"), ("user", "c")),
        },
        "chosen: the last turn must be the assistant's, not 'user'",
    ),
    (
        "preference",
        {"chosen": msgs(("assistant", "a")), "rejected": msgs(("assistant", "b"))},
        "chosen: without a prompt key, must be a whole conversation: the prompt's turns, then the reply",
    ),
    (
        "ranked",
        {"instruction": "Q", "output": ["a"], "score": [1]},
        "completions: at least 2 candidates are needed to rank",
    ),
    ("ranked", {"instruction": "Q", "output": ["a", " "], "score": [1, 2]}, "completions: no candidate may be empty"),
    ("ranked", {"instruction": "Q", "output": ["a", "b", "c"], "score": [1, 2]}, "scores: one score per candidate"),
    (
        "ranked",
        '{"instruction": "Q", "output": ["a", "b"], "score": [1, NaN]}',
        "scores: scores must be finite numbers",
    ),
    (
        "ranked",
        '{"instruction": "Q", "output": ["a", "b"], "score": [-Infinity, 1e400]}',
        "scores: scores must be finite numbers",
    ),
    (
        "ranked",
        {"instruction": "Q", "output": ["a", "b"], "score": [1, "2"]},
        "score[1]: must be a number, not a string",
    ),
    (
        "ranked",
        {"instruction": "Q", "output": ["a", "b"], "score": [True, 2]},
        "score[0]: must be a number, not true/false",
    ),
    (
        "ranked",
        '{"instruction": "Q", "output": ["a", "b"], "score": [1, 1' + "0" * 400 + "]}",
        "score[1]: is too large for a float",
    ),
    (
        "ranked",
        {"prefix": ["Q", "R"], "suffix": ["a", "b"], "reward": [1, 2]},
        "prefix: every candidate must share one prompt",
    ),
    (
        "ranked",
        {"prefix": ["Q"], "suffix": ["a", "b"], "reward": [1, 2]},
        "prefix: holds 1 prompt(s) for 2 suffix(es); PRO repeats the prompt once per suffix",
    ),
    (
        "ranked",
        {"prefix": ["Q: <|prompter|>a"] * 2, "suffix": ["a", "b"], "reward": [1, 2]},
        "prefix[0]: has text before its first <|prompter|> or <|assistant|> marker",
    ),
    ("ranked", {"prefix": ["Q", "Q"], "suffix": ["a", "b"], "reward": [1]}, "scores: one score per candidate"),
    (
        "ranked",
        {"output": ["a", "b"], "score": [1, 2]},
        "instruction: required: a ranked list is {instruction, input, output: [...], score: [...]} or PRO's {prefix, "
        "suffix, reward}",
    ),
    ("prompts", {"prompt": "Q", "answer": ""}, "answer: must not be empty when given"),
    ("prompts", {"prompt": "Q", "answer": ["5"]}, "answer: must be a string, not a list"),
    (
        "prompts",
        {"messages": msgs(("user", "Q"), ("assistant", "A"))},
        "prompt_roles: the prompt's last turn must be the user's",
    ),
    ("prompts", {"prompt": 3}, "prompt: must be a string or a list of messages, not a number"),
    ("prompts", '{"prompt": "Q", "answer": NaN}', "answer: must be a string or a finite number, not nan"),
    (
        "ranked",
        {"prefix": [], "suffix": [], "reward": []},
        "prefix: must be a list holding the prompt once per suffix, not an empty list",
    ),
    ("prompts", {"question": "Q"}, "prompt: required: a string or a list of messages (or messages)"),
    (
        "prompts",
        '{"prompt": "\\ud800 Q"}',
        "prompt: holds an unpaired surrogate escape (\\ud800-\\udfff), which is not valid Unicode",
    ),
]
VALID_ROW = {
    "text": {"text": "a"},
    "conversations": json.loads(CONVERSATION),
    "preference": {"prompt": "Q", "chosen": "a", "rejected": "b"},
    "ranked": {"instruction": "Q", "output": ["a", "b"], "score": [1, 2]},
    "prompts": {"prompt": "Q"},
}


@pytest.mark.parametrize(
    "fmt, line, message", RULES, ids=[f"{fmt}-{message.split(':')[0]}-{i}" for i, (fmt, _, message) in enumerate(RULES)]
)
def test_every_rule_names_file_line_field_and_rule(
    tmp_path: Path, fmt: str, line: str | dict | list, message: str
) -> None:
    bad = {"conversations": line} if isinstance(line, list) else line
    path = write(tmp_path, VALID_ROW[fmt], bad, VALID_ROW[fmt])
    with pytest.raises(DataError) as err:
        read_file(path, fmt)
    assert f"{path}:2: {message}" in [f"{p.file}:{p.line}: {p.field}: {p.rule}" for p in err.value.problems]
    assert {p.line for p in err.value.problems} == {2}
    assert f"{path}:2: {message}" in str(err.value)


@pytest.mark.parametrize(
    "raw, rule",
    [
        (b'{"conversations": [', "not valid JSON: Expecting value at column 20"),
        (b'["a"]', "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b'{"conversations": "caf\xe9"}', "not valid UTF-8 at byte 22"),
        (b"\xff\xfe{\x00}\x00", "not valid UTF-8 at byte 0 (the file looks UTF-16: save it as UTF-8)"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not readable: JSON nested too deeply"),
        (
            b'{"a": 1' + b"0" * 5000 + b"}",
            "not valid JSON: Exceeds the limit (4300 digits) for integer string conversion",
        ),
    ],
)
def test_unreadable_lines_are_problems_of_the_line(tmp_path: Path, raw: bytes, rule: str) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_bytes(CONVERSATION.encode() + b"\n" + raw + b"\n" + CONVERSATION.encode() + b"\n")
    with pytest.raises(DataError) as err:
        read_file(path, "conversations")
    assert [(p.line, p.field, p.rule) for p in err.value.problems] == [(2, "(line)", rule)]


def test_a_huge_line_is_reported_and_read_past_without_being_parsed(tmp_path: Path) -> None:
    huge = json.dumps({"conversations": [{"role": "user", "content": "x" * MAX_LINE_BYTES}]}).encode()
    path = tmp_path / "chat.jsonl"
    path.write_bytes(CONVERSATION.encode() + b"\n" + huge + b"\n" + CONVERSATION.encode())
    result = read_file(path, "conversations", "skip")
    assert result.frame["line"].to_list() == [1, 3]
    assert [str(p) for p in result.rejected] == [
        f"{path}:2: (line): is {len(huge):,} bytes, over the {MAX_LINE_BYTES:,}-byte limit for one row  "
        '[{"conversations": [{"role": "user", "content": "xxxxxxxxx...]'
    ]


def test_a_row_of_exactly_the_limit_is_read_and_one_byte_more_is_not(tmp_path: Path) -> None:
    def row(size: int) -> bytes:
        head, tail = b'{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "', b'"}]}'
        return head + b"a" * (size - len(head) - len(tail)) + tail

    path = tmp_path / "chat.jsonl"
    path.write_bytes(row(MAX_LINE_BYTES) + b"\r\n" + row(MAX_LINE_BYTES + 1))
    result = read_file(path, "conversations", "skip")
    assert result.frame["line"].to_list() == [1]
    assert [(p.line, p.rule) for p in result.rejected] == [
        (2, f"is {MAX_LINE_BYTES + 1:,} bytes, over the {MAX_LINE_BYTES:,}-byte limit for one row")
    ]


def test_bom_crlf_and_blank_lines_are_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    bom = b"\xef\xbb\xbf"  # also mid-file, where `cat a.jsonl b.jsonl` leaves the second file's
    path.write_bytes(bom + CONVERSATION.encode() + b"\r\n\r\n  \t\n" + bom + CONVERSATION.encode() + b"\n\n")
    frame = read_file(path, "conversations").frame
    assert frame["line"].to_list() == [1, 4]
    assert frame["roles"].to_list() == [["user", "assistant"]] * 2


def test_excerpts_show_control_characters_escaped(tmp_path: Path) -> None:
    path = write(tmp_path, '{"text": "\\u001b[31mred"')
    with pytest.raises(DataError) as err:
        read_file(path, "text")
    assert err.value.problems[0].excerpt == '{"text": "\\u001b[31mred"'
    path.write_bytes(b'{"text": "\x1b[31mred\t"}\n')
    with pytest.raises(DataError) as err:
        read_file(path, "text")
    assert err.value.problems[0].excerpt == '{"text": "\\x1b[31mred\\t"}'


def test_an_unreadable_file_is_a_problem_of_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        read_file(tmp_path / "missing.jsonl", "text")
    assert [str(p) for p in err.value.problems] == [
        f"{tmp_path / 'missing.jsonl'}:0: (file): cannot be read: No such file or directory"
    ]
    with pytest.raises(DataError, match="cannot be read: Is a directory"):
        read_file(tmp_path, "text", "skip")


def test_every_problem_in_every_file_is_reported_with_a_cap_on_display(tmp_path: Path) -> None:
    text = tmp_path / "text.jsonl"
    text.write_bytes(b'{"text": ""}\n{"text": 5}\n\xff\n' + b'{"text": ""}\n' * 30)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("not json\n")
    with pytest.raises(DataError) as err:
        check_files([(text, "text", "fail"), (chat, "conversations", "fail")])
    problems = err.value.problems
    assert len(problems) == 34
    assert {(p.line, p.rule) for p in problems if p.file == text} >= {
        (1, "must not be empty"),
        (2, "must be a string, not a number"),
        (3, "not valid UTF-8 at byte 0"),
    }
    assert "34 problem(s) in 2 data file(s)" in str(err.value)
    assert "... and 14 more problem(s)" in str(err.value)


def test_skip_files_pass_the_check_with_their_rejected_rows(tmp_path: Path) -> None:
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "kept"}\n{"text": ""}\n')
    (result,) = check_files([(text, "text", "skip")]).values()
    assert result.frame["text"].to_list() == ["kept"] and [(p.line, p.field) for p in result.rejected] == [(2, "text")]


def test_an_empty_file_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="holds no rows"):
        read_file(path, "text")
    with pytest.raises(DataError, match="holds no rows"):
        read_file(path, "text", "skip")


# ---- the error policy ----------------------------------------------------------------------


def test_skip_drops_invalid_rows_and_returns_their_reasons(tmp_path: Path) -> None:
    good = {"instruction": "Q", "output": ["a", "b"], "score": [1, 1]}
    path = write(
        tmp_path,
        good,
        {"instruction": "Q", "output": ["a"], "score": [1]},
        "{broken",
        good,
        {"instruction": "Q", "output": ["a", ""], "score": [1, math.inf]},
    )
    with pytest.raises(DataError) as err:
        read_file(path, "ranked", "fail")
    assert [p.line for p in err.value.problems] == [2, 3, 5, 5]
    result = read_file(path, "ranked", "skip")
    assert result.frame["line"].to_list() == [1, 4]
    assert [(p.line, p.field, p.rule) for p in result.rejected] == [
        (2, "completions", "at least 2 candidates are needed to rank"),
        (3, "(line)", "not valid JSON: Expecting property name enclosed in double quotes at column 2"),
        (5, "completions", "no candidate may be empty"),
        (5, "scores", "scores must be finite numbers"),
    ]
    assert result.rejected_rows == 3
    assert [note.line for note in result.notes] == [1, 4]
    assert json.loads(json.dumps([p.record() for p in result.rejected]))[0] == {
        "file": str(path),
        "line": 2,
        "unit": "line",
        "starts_on": None,
        "field": "completions",
        "rule": "at least 2 candidates are needed to rank",
        "excerpt": '["a"]',
    }


def test_skip_still_fails_a_file_with_no_valid_row(tmp_path: Path) -> None:
    path = write(tmp_path, {"text": ""}, {"text": 1})
    with pytest.raises(DataError) as err:
        read_file(path, "text", "skip")
    assert [str(p) for p in err.value.problems][0] == f"{path}:0: (file): holds no valid rows: all 2 were rejected"
    assert len(err.value.problems) == 3


def test_fail_returns_no_rejected_rows(tmp_path: Path) -> None:
    result = read_file(write(tmp_path, {"text": "a"}), "text")
    assert (result.frame["text"].to_list(), result.rejected, result.notes) == (["a"], [], [])


def test_problem_prints_as_file_line_field_rule_excerpt() -> None:
    assert (
        str(Problem(Path("d.jsonl"), 3, "chosen", "must not be empty", '""'))
        == 'd.jsonl:3: chosen: must not be empty  [""]'
    )
