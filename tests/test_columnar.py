"""The columnar fast path: every plain shape in every container it reads gives exactly the row path's frame, and
everything unusual is declined (None), so read_file still names each bad row exactly as the row path does."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from schemas import columnar
from schemas.columnar import canonical
from schemas.data import DataError, read_file, read_rows_of
from schemas.sources import Source


def msgs(*turns: tuple[str, str], keys: tuple[str, str] = ("role", "content")) -> list[dict]:
    return [{keys[0]: role, keys[1]: content} for role, content in turns]


CHAT = msgs(("user", "Hi"), ("assistant", "Hello"))
SHAREGPT = msgs(("system", "Be brief."), ("human", "Add 2 and 3."), ("gpt", "5"), keys=("from", "value"))
# Each shape's rows, written by every container: system turns ("", null, given), empty inputs, history, sharegpt's
# speaker names, an unknown speaker kept as written, ignored columns, non-ASCII text.
SHAPES: dict[str, tuple[str, list[dict]]] = {
    "text": ("text", [{"text": "Quellon is the capital.", "id": 1}, {"text": "café ∑ 😀", "id": 2}]),
    "messages": (
        "conversations",
        [
            {"messages": CHAT, "system": "Be brief."},
            {"messages": CHAT, "system": ""},
            {"messages": msgs(("system", "S"), *[(r, c) for r, c in (("user", "a"), ("assistant", "b"))])},
        ],
    ),
    "sharegpt": (
        "conversations",
        [
            {"conversations": SHAREGPT, "source": "x"},
            {"conversations": msgs(("human", "q"), ("bot", "a"), keys=("from", "value")), "source": "y"},
            {"conversations": msgs(("user", "q"), ("observation", "{}"), ("assistant", "a"), keys=("from", "value"))},
        ],
    ),
    "alpaca": (
        "conversations",
        [
            {"instruction": "Add 2 and 3.", "input": "", "output": "5", "history": [], "system": "Be brief."},
            {"instruction": "Translate", "input": "chat", "output": "cat", "history": [["Hi", "Hello"]], "system": ""},
            {"instruction": "", "input": "only input", "output": "ok", "history": None, "system": None},
            {"instruction": "Go", "input": None, "output": "ok", "history": [["a", "b"], ["c", "d"]], "system": "S"},
        ],
    ),
    "alpaca plain": ("conversations", [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}] * 3),
    "preference": (
        "preference",
        [{"prompt": "Q", "chosen": "good", "rejected": "bad", "system": s} for s in ("Be brief.", "", None)],
    ),
    "preference question": ("preference", [{"question": "Q", "chosen": "good", "rejected": "bad"}] * 2),
    "prompts": ("prompts", [{"prompt": "2+3?", "answer": "5"}, {"prompt": "1+1?", "answer": None}]),
    "prompts integer answer": ("prompts", [{"prompt": "2+3?", "answer": 5}, {"prompt": "big", "answer": -(2**62)}]),
    "unpaired": (
        "unpaired",
        [{"prompt": "Q", "completion": "A", "label": True}, {"prompt": "Q", "completion": "B", "label": False}],
    ),
}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")


def write_arrow(path: Path, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_stream(str(path), table.schema) as writer:
        writer.write_table(table, max_chunksize=2)  # several batches, as datasets writes them


WRITERS = {
    "a.jsonl": write_jsonl,
    "a.jsonl.gz": write_jsonl,
    "a.parquet": lambda path, rows: pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2),
    "a.arrow": write_arrow,
}


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """A few rows a piece, so each file is read in several, and `line` must carry on across them."""
    monkeypatch.setattr(columnar, "CHUNK", 40)
    monkeypatch.setattr(columnar, "GROUP", 2)


def row_path(path: Path, fmt: str, source: Source | None = None):
    return read_rows_of(path, fmt, mapped=source.mapped if source and source.columns else None)[0]


@pytest.mark.parametrize("name", WRITERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_a_plain_shape_read_by_columns_is_the_row_paths_frame(tmp_path: Path, shape: str, name: str) -> None:
    fmt, rows = SHAPES[shape]
    path = tmp_path / name
    WRITERS[name](path, rows * 3)
    fast = canonical(path, fmt, None)
    assert fast is not None
    assert_frame_equal(fast, row_path(path, fmt))


@pytest.mark.parametrize("name", ["a.jsonl", "a.parquet"])
def test_renamed_columns_and_null_columns_read_as_the_row_path_reads_them(tmp_path: Path, name: str) -> None:
    rows = [{"q": "2+3?", "good": "5", "bad": "6", "system": None, "messages": None, "meta": {"n": [1]}}] * 3
    path = tmp_path / name
    WRITERS[name](path, rows)
    source = Source(path=path, columns={"prompt": "q", "chosen": "good", "rejected": "bad", "history": "h"})
    fast = canonical(path, "preference", source)
    assert fast is not None
    assert_frame_equal(fast, row_path(path, "preference", source))
    assert fast["prompt_contents"].to_list() == [["2+3?"]] * 3


def test_a_bom_crlf_and_no_last_line_end_read_as_the_row_path_reads_them(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(row) for row in SHAPES["alpaca"][1]).encode())
    fast = canonical(path, "conversations", None)
    assert fast is not None
    assert_frame_equal(fast, row_path(path, "conversations"))


def declines(tmp_path: Path, rows: list[dict | str], fmt: str = "conversations", name: str = "a.jsonl", **source):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        lines = (row if isinstance(row, str) else json.dumps(row) for row in rows)
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    else:
        WRITERS[name](path, rows)
    return canonical(path, fmt, Source(path=path, **source) if source else None) is None


@pytest.mark.parametrize(
    "rows",
    [
        [{"messages": CHAT, "tools": "[]"}],  # tools: the row path reads them
        [{"messages": [{**CHAT[0], "name": "x"}, CHAT[1]]}],  # a message key no plain shape has
        [{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, CHAT[1]]}],  # content parts
        [{"messages": CHAT, "images": ["a.png"]}],
        [{"messages": CHAT}, {"messages": []}],
        [{"messages": CHAT}, {"messages": [None, CHAT[1]]}],
        [{"messages": CHAT}, {"messages": [{"role": None, "content": "x"}, CHAT[1]]}],
        [{"messages": CHAT}, {"text": "no messages"}],  # null where a value is required
        [{"messages": [{"role": "system", "content": "S"}, *CHAT], "system": "S"}],  # given twice
        [{"conversations": msgs(("human", "q"), ("function_call", "{}"), keys=("from", "value"))}],
        [{"instruction": "q", "output": "a", "history": [["only one"]]}],
        [{"instruction": "q", "output": "a", "history": [["a", None]]}],
        [{"instruction": "q", "output": 5}],
        [{"messages": CHAT, "label": True}],  # a key a shape reads, outside this one
        [{"messages": CHAT, "deep": json.loads("[" * 40 + "]" * 40)}],  # nested deeper than an ignored column may be
    ],
)
@pytest.mark.parametrize("name", ["a.jsonl", "a.parquet"])
def test_rows_no_plain_shape_covers_go_row_by_row(tmp_path: Path, rows: list[dict], name: str) -> None:
    try:
        assert declines(tmp_path, rows, name=name)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # rows parquet cannot hold: JSON Lines only
        assert name == "a.parquet"


@pytest.mark.parametrize(
    "fmt, lines",
    [
        ("conversations", [json.dumps({"messages": CHAT}), "", json.dumps({"messages": CHAT})]),  # a blank line
        ("conversations", [json.dumps({"messages": CHAT}) * 2, "  "]),  # two on a line, and a blank one
        ("conversations", ['{"messages":', json.dumps(CHAT) + "}"]),  # one object over two lines
        ("conversations", [json.dumps({"messages": CHAT}) + " "]),
        ("text", ['{"text": "a\\ud800b"}']),  # half a surrogate pair
        ("text", ['{"text": "ok", "id": ' + "[" * 5000 + "]" * 5000 + "}"]),  # would overflow Arrow's parser
        ("text", ['{"text": "ok", "id": ' + "7" * 5000 + "}"]),  # more digits than Python's json converts
        ("text", ['{"text": "ok", "id": -NaN}']),
        ("conversations", ['{"messages": "' + "x" * (1 << 20) + '"}']),  # over the row limit
    ],
)
def test_jsonl_the_row_path_could_read_otherwise_is_declined(tmp_path: Path, fmt: str, lines: list[str]) -> None:
    assert declines(tmp_path, lines, fmt)


def test_what_the_fast_path_leaves_alone(tmp_path: Path) -> None:
    ranked = [{"instruction": "q", "output": ["a", "b"], "score": [1, 2]}]
    assert declines(tmp_path, ranked, "ranked")
    assert declines(tmp_path, [{"conversations": SHAREGPT}], tags={"role_tag": "from"})
    assert declines(tmp_path, [{"q": "Q", "chosen": "a", "rejected": "b"}], "preference", columns={"prompt": "x"})
    (tmp_path / "a.csv").write_text("text\nhello\n")
    assert canonical(tmp_path / "a.csv", "text", None) is None
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "a.parquet")
    (tmp_path / "a.parquet.gz").write_bytes(gzip.compress((tmp_path / "a.parquet").read_bytes()))
    assert canonical(tmp_path / "a.parquet.gz", "text", None) is None
    bad = pa.array([b"ok", b"\xff"], pa.binary()).view(pa.string())  # not UTF-8
    pq.write_table(pa.table({"text": bad}), tmp_path / "bad.parquet")
    assert canonical(tmp_path / "bad.parquet", "text", None) is None


def test_a_bad_row_anywhere_is_still_named_by_the_row_path(tmp_path: Path) -> None:
    """The fast frame holds the bad row (its shape is plain), pandera finds it, and the row path names it."""
    rows = [{"messages": CHAT}] * 4 + [{"messages": msgs(("assistant", "x"), ("user", "y"))}] + [{"messages": CHAT}]
    path = tmp_path / "a.jsonl"
    write_jsonl(path, rows)
    assert canonical(path, "conversations", None) is not None
    with pytest.raises(DataError) as err:
        read_file(path, "conversations")
    assert [(p.line, p.field) for p in err.value.problems] == [(5, "roles"), (5, "roles")]
    skipped = read_file(path, "conversations", "skip")
    assert skipped.frame["line"].to_list() == [1, 2, 3, 4, 6]
    path.write_text(path.read_text().replace("\n", "\n\n", 1))  # a blank line: the row path, whose lines shift
    assert [p.line for p in read_file(path, "conversations", "skip").rejected] == [6, 6]


def test_read_file_takes_the_fast_frame_of_valid_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.parquet"
    WRITERS["a.parquet"](path, SHAPES["alpaca"][1])
    expected = row_path(path, "conversations")
    monkeypatch.setattr("schemas.data.read_rows_of", lambda *args: pytest.fail("read row by row"))
    assert_frame_equal(read_file(path, "conversations").frame, expected)
