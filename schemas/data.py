"""Data contracts: every jsonl file is checked whole, before any model loads.

A file is read line by line (UTF-8, a BOM and CRLF tolerated, blank lines skipped), each
line parsed as a JSON object and flattened into typed columns; a pandera schema (polars
backend) then checks the rules with lazy validation, so one pass reports every failure.
Each problem names the file, the line, the field and the rule, with a short excerpt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandera.polars as pa
import polars as pl
from pandera.errors import SchemaErrors

Format = Literal["text", "conversations"]
ROLES = ("system", "user", "assistant")
SHOWN = 20  # problems printed before the rest are only counted


@dataclass(frozen=True)
class Problem:
    file: Path
    line: int
    field: str
    rule: str
    excerpt: str = ""

    def __str__(self) -> str:
        tail = f"  [{self.excerpt}]" if self.excerpt else ""
        return f"{self.file}:{self.line}: {self.field}: {self.rule}{tail}"


class DataError(ValueError):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = [str(p) for p in problems[:SHOWN]]
        if len(problems) > SHOWN:
            shown.append(f"... and {len(problems) - SHOWN} more problem(s)")
        files = len({p.file for p in problems})
        super().__init__(f"{len(problems)} problem(s) in {files} data file(s):\n" + "\n".join(shown))


def _excerpt(value: object, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def _nonempty(column: str) -> pa.Check:
    return pa.Check(lambda data: data.lazyframe.select(pl.col(data.key).str.strip_chars().str.len_chars() > 0),
                    name="must not be empty", element_wise=False)


TEXT_SCHEMA = pa.DataFrameSchema({"text": pa.Column(pl.Utf8, checks=_nonempty("text"), nullable=False)}, name="text")


def _roles_rule(data: pa.PolarsData) -> pl.LazyFrame:
    """Known roles; an optional system turn first; then user and assistant alternate, user first."""
    roles = pl.col(data.key)
    body = pl.when(roles.list.first() == "system").then(roles.list.slice(1)).otherwise(roles)
    expected = body.list.eval(pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.lit("user")).otherwise(pl.lit("assistant")))
    return data.lazyframe.select((body.list.len() >= 2) & (body == expected))


def _last_assistant(data: pa.PolarsData) -> pl.LazyFrame:
    return data.lazyframe.select(pl.col(data.key).list.last() == "assistant")


def _contents_nonempty(data: pa.PolarsData) -> pl.LazyFrame:
    return data.lazyframe.select(pl.col(data.key).list.eval(pl.element().str.strip_chars().str.len_chars() > 0).list.all())


CONVERSATION_SCHEMA = pa.DataFrameSchema(
    {
        "roles": pa.Column(pl.List(pl.Utf8), nullable=False, checks=[
            pa.Check(_roles_rule, name=f"roles must be {'/'.join(ROLES)}: an optional system turn, then user and assistant alternating, user first"),
            pa.Check(_last_assistant, name="the last turn must be the assistant's"),
        ]),
        "contents": pa.Column(pl.List(pl.Utf8), nullable=False, checks=[
            pa.Check(_contents_nonempty, name="no message may have empty content"),
        ]),
    },
    name="conversations",
)


def _flatten(fmt: Format, row: dict) -> dict | str:
    """The row as typed columns, or the reason it has not the format's shape."""
    if fmt == "text":
        if not isinstance(row.get("text"), str):
            return "text: required, must be a string"
        return {"text": row["text"]}
    messages = row.get("conversations", row.get("messages"))
    if not isinstance(messages, list) or not messages:
        return "conversations: required, must be a non-empty list of {role, content}"
    roles, contents = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            return f"conversations[{i}]: must be an object with string role and content"
        roles.append(message["role"])
        contents.append(message["content"])
    return {"roles": roles, "contents": contents}


def read_jsonl(path: Path, fmt: Format) -> tuple[pl.DataFrame, list[Problem]]:
    """Parse a file into typed columns plus `line`; shape problems are returned, not raised."""
    rows: list[dict] = []
    problems: list[Problem] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problems.append(Problem(path, number, "(line)", f"not valid UTF-8 at byte {err.start}"))
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                problems.append(Problem(path, number, "(line)", f"not valid JSON: {err.msg} at column {err.colno}", _excerpt(text.strip())))
                continue
            if not isinstance(row, dict):
                problems.append(Problem(path, number, "(line)", "must be a JSON object", _excerpt(text.strip())))
                continue
            flat = _flatten(fmt, row)
            if isinstance(flat, str):
                field, rule = flat.split(": ", 1)
                problems.append(Problem(path, number, field, rule, _excerpt(row)))
                continue
            rows.append({"line": number, **flat})
    if not rows and not problems:
        problems.append(Problem(path, 0, "(file)", "holds no rows"))
    schema = TEXT_SCHEMA if fmt == "text" else CONVERSATION_SCHEMA
    columns = {"line": pl.Int64, **{name: column.dtype.type for name, column in schema.columns.items()}}
    return pl.DataFrame(rows, schema=columns), problems


def validate_file(path: Path, fmt: Format) -> pl.DataFrame:
    """Every valid row of `path`; raise DataError naming every problem if there is one."""
    frame, problems = read_jsonl(path, fmt)
    schema = TEXT_SCHEMA if fmt == "text" else CONVERSATION_SCHEMA
    try:
        schema.validate(frame, lazy=True)
    except SchemaErrors as err:
        cases = err.failure_cases
        for case in cases.iter_rows(named=True):
            index = case.get("index")
            line = int(frame["line"][index]) if index is not None else 0
            value = frame[case["column"]][index] if index is not None else case["failure_case"]
            problems.append(Problem(path, line, case["column"], case["check"], _excerpt(value.to_list() if isinstance(value, pl.Series) else value)))
    if problems:
        raise DataError(sorted(problems, key=lambda p: (str(p.file), p.line)))
    return frame


def check_files(files: list[tuple[Path, Format]]) -> dict[str, int]:
    """Rows per file; raise one DataError with every problem of every file."""
    rows: dict[str, int] = {}
    problems: list[Problem] = []
    for path, fmt in files:
        try:
            rows[str(path)] = len(validate_file(path, fmt))
        except DataError as err:
            problems += err.problems
    if problems:
        raise DataError(problems)
    return rows
