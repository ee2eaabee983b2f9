"""Containers: every container and compression gives the same rows at the same positions; each problem names its
row (and the line it starts on) and the rule; a large JSON array is read at flat memory."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from schemas import readers
from schemas.data import DataError, Problem, read_file
from schemas.readers import CONTAINERS, container, read_rows

ROWS = [
    {
        "instruction": f"Add {i} and 2.",
        "output": f'It is {i + 2}.\nDone, "quoted", café {"∑" * i}',
        "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
        "score": [1.5, float(i)],
        "label": i % 2 == 0,
    }
    for i in range(5)
]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle, delimiter=delimiter)
        out.writerow(rows[0])
        for row in rows:
            out.writerow(
                json.dumps(v) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else v
                for v in row.values()
            )


def write_arrow(path: Path, rows: list[dict], stream: bool) -> None:
    table = pa.Table.from_pylist(rows)
    with (pa.ipc.new_stream if stream else pa.ipc.new_file)(str(path), table.schema) as writer:
        writer.write_table(table, max_chunksize=2)  # several batches


WRITERS = {
    "a.jsonl": write_jsonl,
    "pretty.json": lambda path, rows: path.write_text(json.dumps(rows, indent=2, ensure_ascii=False), "utf-8"),
    "minified.json": lambda path, rows: path.write_text(json.dumps(rows, separators=(",", ":")), "utf-8"),
    "lines.json": write_jsonl,  # JSON Lines saved as .json
    "a.parquet": lambda path, rows: pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2),
    "stream.arrow": lambda path, rows: write_arrow(path, rows, stream=True),
    "file.arrow": lambda path, rows: write_arrow(path, rows, stream=False),
    "a.csv": write_csv,
    "a.tsv": lambda path, rows: write_csv(path, rows, "\t"),
}
COMPRESS = {
    "": lambda data: data,
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".zst": lambda data: zstandard.ZstdCompressor().compress(data),
}


def compressed(path: Path, suffix: str) -> Path:
    if not suffix:
        return path
    target = path.with_name(path.name + suffix)
    target.write_bytes(COMPRESS[suffix](path.read_bytes()))
    path.unlink()
    return target


def pairs(path: Path, **options) -> list[tuple[int, dict | Problem]]:
    return list(read_rows(path, **options))


@pytest.mark.parametrize("suffix", COMPRESS)
@pytest.mark.parametrize("name", WRITERS)
def test_every_container_gives_the_same_rows_at_their_positions(tmp_path: Path, name: str, suffix: str) -> None:
    path = tmp_path / name
    WRITERS[name](path, ROWS)
    assert pairs(compressed(path, suffix)) == list(enumerate(ROWS, 1))


def test_compressed_parquet_is_read_through_a_temporary_file_removed_afterwards(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(readers.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = tmp_path / "a.parquet"
    WRITERS["a.parquet"](path, ROWS)
    rows = read_rows(compressed(path, ".zst"))
    assert next(rows) == (1, ROWS[0])
    assert len(list((tmp_path / "tmp").iterdir())) == 1  # held while it is read
    assert list(rows) == list(enumerate(ROWS, 1))[1:]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_datasets_save_to_disk_gives_lists_of_dicts(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "saved")
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    assert pairs(arrow) == list(enumerate(ROWS, 1))


def test_text_by_line_and_by_paragraph(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_bytes(b"\xef\xbb\xbfOne line.\r\nTwo  \n\n  \nThree\nand four.\n\n\nFive\n")
    assert pairs(path) == [(1, {"text": "One line."}), (2, {"text": "Two  "}), (5, {"text": "Three"}),
                           (6, {"text": "and four."}), (9, {"text": "Five"})]  # fmt: skip
    assert pairs(path, documents="paragraph") == [
        (1, {"text": "One line.\nTwo  "}),
        (5, {"text": "Three\nand four."}),
        (9, {"text": "Five"}),
    ]
    md = compressed(tmp_path / "notes.md", "") if (tmp_path / "notes.md").write_text("# Title\n\nBody\n") else None
    assert pairs(md, documents="paragraph") == [(1, {"text": "# Title"}), (3, {"text": "Body"})]


def test_text_problems_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_bytes(b"fine\n" + b"x" * 50 + b"\ncaf\xe9\nend\n\nA\nB\n\n" + b"0123456789\n" * 3)
    assert pairs(path, limit=20) == [
        (1, {"text": "fine"}),
        (2, Problem(path, 2, "(line)", "is 50 bytes, over the 20-byte limit for one row", "x" * 22)),
        (3, Problem(path, 3, "(line)", "not valid UTF-8 at byte 3", "caf\ufffd")),
        (4, {"text": "end"}),
        (6, {"text": "A"}),
        (7, {"text": "B"}),
        *[(line, {"text": "0123456789"}) for line in (9, 10, 11)],
    ]
    paragraphs = pairs(path, limit=20, documents="paragraph")
    assert [(position, row.rule if isinstance(row, Problem) else row) for position, row in paragraphs] == [
        (2, "is 50 bytes, over the 20-byte limit for one row"),  # a bad line drops its paragraph
        (6, {"text": "A\nB"}),
        (9, "is 30 bytes, over the 20-byte limit for one row"),
    ]


def test_a_json_array_names_the_row_and_the_line_it_starts_on(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([ROWS[0], ["not", "an", "object"], ROWS[1]], indent=2))
    found = pairs(path)
    assert [position for position, _ in found] == [1, 2, 3]
    problem = found[1][1]
    assert (problem.unit, problem.line, problem.starts_on) == ("row", 2, 21)
    assert (
        str(problem)
        == f'{path}: row 2 (line 21): (row): must be a JSON object  [[\\n    "not",\\n    "an",\\n    "object"\\n  ]]'
    )
    assert found[2] == (3, ROWS[1])


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64])
def test_a_json_array_read_in_any_chunks_gives_the_same_rows(tmp_path, monkeypatch, chunk: int) -> None:
    monkeypatch.setattr(readers, "CHUNK", chunk)
    awkward = [
        {"n": 12345678901234567890, "f": -1.5e-7, "t": True, "z": None, "u": "\\u00e9 \\ud83d\\ude00 \U0001f600 é"},
        {"nested": {"a": [[], {}, [1, [2, [3]]]]}, "esc": 'quote " backslash \\ tab \t', "s": "]},[{"},
    ]
    path = tmp_path / "awkward.json"
    for text in (json.dumps(awkward), json.dumps(awkward, indent=1, ensure_ascii=False)):
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert pairs(path) == [(1, awkward[0]), (2, awkward[1])]


@pytest.mark.parametrize(
    "text, position, rule",
    [
        (
            '[{"a": 1},\n {"a": 2,},\n {"a": 3}]',
            2,
            "Expecting property name enclosed in double quotes at line 2 column 10",
        ),
        ('[{"a": 1} {"a": 2}]', 2, "Expecting ',' delimiter at line 1 column 11"),
        ('[{"a": 1},]', 2, "Expecting value at line 1 column 11"),
        ('[{"a": 1},\n{"a": "cut', 2, "Unterminated string starting at line 2 column 7"),
        ('[{"a": 1},\n{"a": 2}\n', 3, "the file ends before the array's closing ] at line 3 column 1"),
    ],
)
def test_a_broken_json_array_is_read_up_to_the_break(tmp_path: Path, text: str, position: int, rule: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text(text)
    found = pairs(path)
    assert found[0] == (1, {"a": 1})
    assert len(found) == position
    problem = found[-1][1]
    assert (problem.line, problem.unit, problem.field) == (position, "row", "(row)")
    assert problem.rule == f"not valid JSON: {rule}; the rest of the file is not read"


def test_json_array_rows_over_the_limit_or_not_utf8_are_read_past(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(readers, "CHUNK", 16)
    path = tmp_path / "rows.json"
    big = json.dumps({"text": "x" * 100, "nested": [{"a": "]}"}]})
    path.write_bytes(
        b'[{"a": 1},\n' + big.encode() + b',\n{"a": "caf\xe9"}, {"a": 4},\n"' + b"y" * 70 + b'", {"a": 6}]'
    )
    found = pairs(path, limit=64)
    assert [(p, r if isinstance(r, dict) else (r.rule, r.starts_on)) for p, r in found] == [
        (1, {"a": 1}),
        (2, (f"is {len(big)} bytes, over the 64-byte limit for one row", 2)),
        (3, ("not valid UTF-8 at byte 10 of the row", 3)),
        (4, {"a": 4}),
        (5, ("is 72 bytes, over the 64-byte limit for one row", 4)),
        (6, {"a": 6}),
    ]


def test_text_after_a_json_array_is_a_problem_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "two.json"
    path.write_text('[{"a": 1}]\n[{"a": 2}]\n')
    assert pairs(path) == [
        (1, {"a": 1}),
        (0, Problem(path, 0, "(file)", "not valid JSON: text after the array's closing ] at line 2 column 1",
                    '[{"a": 2}]\\n')),
    ]  # fmt: skip


def test_csv_cells_json_booleans_empty_and_multiline(tmp_path: Path) -> None:
    path = tmp_path / "chat.csv"
    path.write_text(
        "prompt,messages,score,label,answer\n"
        '"Hi\nthere","[{""role"": ""user"", ""content"": ""a\\nb""}]","[1, 2]",true,\n'
        "\n"
        "[INST] no json,{},false,False,42\n"
        "short,row\n",
        encoding="utf-8",
    )
    rows = read_rows(path)
    first = next(rows)
    assert first == (1, {"prompt": "Hi\nthere", "messages": [{"role": "user", "content": "a\nb"}], "score": [1, 2],
                         "label": True, "answer": None})  # fmt: skip
    assert rows.starts_on == 2
    assert next(rows) == (2, {"prompt": "[INST] no json", "messages": {}, "score": False, "label": "False",
                              "answer": "42"})  # fmt: skip
    assert rows.starts_on == 5
    position, problem = next(rows)
    assert str(problem) == f"{path}: row 3 (line 6): (row): has 2 cells where the header has 5  [short,row]"


def test_csv_bad_bytes_are_a_problem_of_their_row(tmp_path: Path) -> None:
    path = tmp_path / "a.tsv"
    path.write_bytes(b"text\tn\ncaf\xe9\t1\nok\t2\n")
    assert [(p, r if isinstance(r, dict) else r.rule) for p, r in pairs(path)] == [
        (1, "not valid UTF-8 at byte 3 of the row"),
        (2, {"text": "ok", "n": "2"}),
    ]


def test_unknown_suffix_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        container(tmp_path / "rows.xlsx.gz")
    assert str(err.value.problems[0]) == (
        f"{tmp_path / 'rows.xlsx.gz'}:0: (file): is not a file this reads: the suffixes read are "
        f"{', '.join(CONTAINERS)}, each also compressed as .gz, .zst, .bz2"
    )
    assert container(Path("data-00000-of-00001.ARROW.ZST")) == "arrow"
    missing = tmp_path / "missing.parquet"
    assert pairs(missing) == [(0, Problem(missing, 0, "(file)", "cannot be read: No such file or directory"))]
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(b'{"a": 1}\n' * 1000)[:-20])
    assert pairs(cut)[-1][1].rule.startswith("cannot be read: Compressed file ended before the end-of-stream")
    not_parquet = tmp_path / "not.parquet"
    not_parquet.write_text("{}")
    assert pairs(not_parquet)[0][1].rule.startswith("cannot be read: ")


@pytest.mark.parametrize("name", ["a.jsonl", "pretty.json", "a.parquet", "file.arrow", "a.csv"])
def test_keep_leaves_out_the_positions_it_refuses(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    WRITERS[name](path, ROWS)
    assert pairs(path, keep=lambda position: position % 2 == 1) == [(1, ROWS[0]), (3, ROWS[2]), (5, ROWS[4])]


def test_keep_leaves_a_json_line_undecoded(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\nnot json\n{"a": 3}\n')
    assert pairs(path, keep=lambda position: position != 2) == [(1, {"a": 1}), (3, {"a": 3})]


def test_read_file_names_rows_of_a_record_container(tmp_path: Path) -> None:
    path = tmp_path / "sft.json"
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path.write_text(json.dumps([chat, {"messages": "hi"}, {"messages": [{"role": "user", "content": "q"}]}], indent=1))
    result = read_file(path, "conversations", "skip")
    assert result.frame["line"].to_list() == [1]
    assert [str(p).split("  [")[0] for p in result.rejected] == [
        f"{path}: row 2 (line 14): messages: must be a non-empty list of messages {{role, content}} or "
        "{from, value}, not a string",
        f"{path}: row 3 (line 17): roles: the last turn must be the assistant's",
    ]


def test_read_file_reads_text_by_paragraph(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt.gz"
    path.write_bytes(gzip.compress(b"A first\nparagraph.\n\nA second.\n"))
    assert read_file(path, "text", documents="paragraph").frame.to_dicts() == [
        {"line": 1, "text": "A first\nparagraph."},
        {"line": 4, "text": "A second."},
    ]


def test_a_large_json_array_is_read_at_flat_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    row = json.dumps({"instruction": "Say it " * 40, "input": "", "output": "x" * 400})
    count = 50_000_000 // (len(row) + 4)
    with open(path, "w") as handle:
        handle.write("[\n")
        for i in range(count):
            handle.write(("  " if i == 0 else ",\n  ") + row)
        handle.write("\n]\n")
    tracemalloc.start()
    try:
        rows = sum(1 for _ in read_rows(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows == count
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB for a {path.stat().st_size / 2**20:.0f} MiB array"


def test_streamed_slices_deal_out_the_rows_of_any_container(tmp_path: Path) -> None:
    from stages.common.streaming import Slice, check_corpus, checked_texts

    docs = [{"text": f"document {i}"} for i in range(7)]
    (tmp_path / "corpus.txt").write_text("".join(doc["text"] + "\n" for doc in docs))
    for name in ("pretty.json", "a.parquet", "a.csv"):
        WRITERS[name](tmp_path / name, docs)
    for path in sorted(tmp_path.iterdir()):
        parts = [list(checked_texts([Slice(path, part, 3)], "fail")) for part in range(3)]
        assert parts == [[docs[i]["text"] for i in range(part, 7, 3)] for part in range(3)], path.name
    check = check_corpus([tmp_path / "*"])
    assert (check.files, check.rows, check.invalid) == (4, 28, 0)
    (tmp_path / "bad.json").write_text('[{"text": "fine"}, {"text": ""}, {"body": 1}]')
    with pytest.raises(DataError) as err:
        check_corpus([tmp_path / "bad.json"])
    assert [str(p) for p in err.value.problems] == [
        f"{tmp_path / 'bad.json'}: row 2 (line 1): text: must not be empty",
        f'{tmp_path / "bad.json"}: row 3 (line 1): text: required  [{{"body": 1}}]',
    ]


def test_a_broken_array_fails_under_skip_too_since_the_rows_after_it_cannot_be_read(tmp_path: Path) -> None:
    from schemas.data import DataError, read_file

    path = tmp_path / "broken.json"
    path.write_text('[{"text": "one"},\n {"text": "two" oops},\n {"text": "three"}]')
    with pytest.raises(DataError) as err:
        read_file(path, "text", "skip")
    assert "the rest of the file is not read" in str(err.value)


def test_one_object_over_several_lines_in_a_json_file_is_one_clear_problem(tmp_path: Path) -> None:
    path = tmp_path / "export.json"
    path.write_text(json.dumps({"data": [{"text": "a"}, {"text": "b"}]}, indent=2))
    ((position, problem),) = list(read_rows(path))
    assert position == 0 and problem.rule.startswith("holds one JSON object over several lines")
