"""Data contracts: every problem named by file, line, field and rule; the toy world is reproducible."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.generate import DATA_DIR, generate, render
from schemas.data import DataError, check_files, validate_file

CONVERSATION = '{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'


def test_bundled_data_is_exactly_what_the_generator_writes() -> None:
    for name, rows in generate().items():
        assert (DATA_DIR / name).read_text(encoding="utf-8") == render(rows), name


def test_bundled_data_passes_its_contracts() -> None:
    rows = check_files([(DATA_DIR / "pretrain.jsonl", "text"), (DATA_DIR / "sft.jsonl", "conversations")])
    assert rows == {str(DATA_DIR / "pretrain.jsonl"): 6000, str(DATA_DIR / "sft.jsonl"): 4000}


def test_bom_crlf_and_blank_lines_are_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + CONVERSATION.encode() + b"\r\n\r\n" + CONVERSATION.encode() + b"\n\n")
    frame = validate_file(path, "conversations")
    assert frame["line"].to_list() == [1, 3]
    assert frame["roles"].to_list() == [["user", "assistant"]] * 2


@pytest.mark.parametrize("line, field, rule", [
    ('{"conversations": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "roles", "alternating"),
    ('{"conversations": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}]}', "roles", "system/user/assistant"),
    ('{"conversations": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]}', "roles", "the last turn must be the assistant's"),
    ('{"conversations": [{"role": "user", "content": " "}, {"role": "assistant", "content": "b"}]}', "contents", "no message may have empty content"),
    ('{"conversations": [{"role": "user"}]}', "conversations[0]", "string role and content"),
    ('{"messages": 3}', "conversations", "non-empty list"),
    ('{"conversations": [', "(line)", "not valid JSON"),
    ('["a"]', "(line)", "must be a JSON object"),
])
def test_conversation_rules(tmp_path: Path, line: str, field: str, rule: str) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(CONVERSATION + "\n" + line + "\n")
    with pytest.raises(DataError) as err:
        validate_file(path, "conversations")
    problems = [p for p in err.value.problems if p.field == field]
    assert all((p.file, p.line) == (path, 2) for p in problems)
    assert any(rule in p.rule for p in problems)
    assert f"{path}:2: {field}:" in str(err.value)


def test_every_problem_in_every_file_is_reported_with_a_cap_on_display(tmp_path: Path) -> None:
    text = tmp_path / "text.jsonl"
    text.write_bytes(b'{"text": ""}\n{"text": 5}\n\xff\n' + b'{"text": ""}\n' * 30)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("not json\n")
    with pytest.raises(DataError) as err:
        check_files([(text, "text"), (chat, "conversations")])
    problems = err.value.problems
    assert len(problems) == 34
    assert {(p.line, p.rule) for p in problems if p.file == text} >= {(1, "must not be empty"), (2, "required, must be a string"),
                                                                       (3, "not valid UTF-8 at byte 0")}
    assert "34 problem(s) in 2 data file(s)" in str(err.value)
    assert "... and 14 more problem(s)" in str(err.value)


def test_an_empty_file_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="holds no rows"):
        validate_file(path, "text")
