"""Plain, valid data read by columns: a file in a common shape made its format's canonical columns by Arrow and
polars, with no Python object per row.

The row path (schemas/readers.py, then schemas/formats.py a row at a time) reads every shape and names each bad row,
but a dict per row flattened in Python is most of read_file's time (bench/RESULTS.md, "Containers"). `canonical`
reads plain files into exactly the frame the row path builds (the same columns, types, values, order and `line`),
or gives None as soon as anything is unusual: read_file (schemas/data.py) then reads the file row by row, as it
does when pandera finds any problem in this frame, so every problem is still named at its own row.

Read by columns, after the source's column renames (never with `tags`):
    text           {text}
    conversations  {conversations | messages: [{role, content}] or sharegpt [{from, value}], system?};
                   alpaca {instruction, input?, output, history?: [[user, assistant]], system?}
    preference     {prompt | question, chosen, rejected, system?}, all strings
    prompts        {prompt, answer?: a string or an integer, system?}
    unpaired       {prompt, completion, label: true|false, system?}
A column no shape reads is ignored, as the row path ignores it; a null column is an absent one, as in `flatten`.
Any other column, type or nesting, a null where a value is required, and ranked lists go row by row.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

from schemas.formats import SHAREGPT_ROLES, Format
from schemas.problems import DataError
from schemas.readers import BOM, COMPRESSIONS, MAX_LINE_BYTES, MAX_TEXT_LINE_BYTES, UNREADABLE, container, opened
from schemas.sources import OPTIONAL_KEYS, Source

CHUNK = 16 << 20  # bytes of JSON Lines parsed at a time: the file is never held whole; each keeps Arrow busy
GROUP = 1 << 16  # parquet and arrow rows flattened at a time: their tables freed as the next is read
# Every key a shape reads (schemas/formats.py): a column of any other name is ignored by every shape, so it may sit
# beside a plain shape; one of these outside the shape is left to the row path.
KNOWN = frozenset(
    {"text", "conversations", "messages", "instruction", "input", "output", "history", "system", "tools",
     "prompt", "question", "chosen", "rejected", "chosen_messages", "rejected_messages", "completion", "label",
     "answer", "score", "prefix", "suffix", "reward", "images", "videos", "audios"}
)  # fmt: skip
NESTING = 32  # an ignored column nested deeper goes row by row, where Python's json refuses ~1,000 levels
# Arrow's JSON parser recurses per level and overflows its stack near 20,000 levels (a crash, not an error): a line
# with more openings than this (its nesting can be no deeper) is left to the row path.
OPENINGS = 1000
NEWLINE, CR, OPEN, CLOSE, ZERO = b"\n\r{}0"
TEXT, TEXTS = pl.String, pl.List(pl.String)

Kind = Callable[[pa.DataType], bool]
Build = Callable[[set[str]], dict[str, pl.Expr]]


def _string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _list_of(item: Kind) -> Kind:
    return lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t)) and item(t.value_type)


def _messages(role: str, content: str) -> Kind:
    """Messages of exactly these two string keys (any other key, e.g. tool_calls, goes row by row)."""
    return _list_of(
        lambda t: (
            pa.types.is_struct(t)
            and sorted(t.field(i).name for i in range(t.num_fields)) == sorted((role, content))
            and all(_string(t.field(i).type) for i in range(t.num_fields))
        )
    )


def _depth(t: pa.DataType) -> int:
    return 1 + max((_depth(t.field(i).type) for i in range(t.num_fields)), default=0)


# ---- each plain shape's canonical columns, as polars expressions -----------------------------------


def _listed(*parts: pl.Expr) -> pl.Expr:
    """Each row's parts as one list, through a fixed-width array: ~4x faster than concat_list on strings."""
    return pl.concat_arr(*parts).arr.to_list()


def _given_system() -> pl.Expr:
    return pl.col("system").fill_null("") != ""  # exports write "" for 'no system prompt'


def _turns(present: set[str], roles: list[str], contents: list[pl.Expr]) -> dict[str, pl.Expr]:
    """A fixed run of turns, after a system turn where the row gives one (formats._with_system)."""
    plain_roles, plain_contents = pl.lit(roles, dtype=TEXTS), _listed(*contents)
    if "system" not in present:
        return {"roles": plain_roles, "contents": plain_contents}
    return {
        "roles": pl.when(_given_system()).then(pl.lit(["system", *roles], dtype=TEXTS)).otherwise(plain_roles),
        "contents": pl.when(_given_system()).then(_listed(pl.col("system"), *contents)).otherwise(plain_contents),
    }


def _system_first(present: set[str], roles: pl.Expr, contents: pl.Expr) -> dict[str, pl.Expr]:
    """Lists of turns of any length, after a system turn where the row gives one (formats._with_system)."""
    if "system" not in present:
        return {"roles": roles, "contents": contents}
    return {
        "roles": pl.when(_given_system()).then(pl.concat_list(pl.lit("system"), roles)).otherwise(roles),
        "contents": pl.when(_given_system()).then(pl.concat_list(pl.col("system"), contents)).otherwise(contents),
    }


def _no_calls(turns: dict[str, pl.Expr]) -> dict[str, pl.Expr]:
    return {**turns, "calls": pl.lit("").repeat_by(turns["roles"].list.len()), "tools": pl.lit(None, dtype=TEXT)}


def _prompt(present: set[str], key: str) -> dict[str, pl.Expr]:
    turns = _turns(present, ["user"], [pl.col(key)])
    return {"prompt_roles": turns["roles"], "prompt_contents": turns["contents"]}


def _chat(key: str, role: str, content: str) -> Build:
    def build(present: set[str]) -> dict[str, pl.Expr]:
        speaker = pl.element().struct.field(role)
        roles = pl.col(key).list.eval(speaker.replace(SHAREGPT_ROLES) if role == "from" else speaker)
        contents = pl.col(key).list.eval(pl.element().struct.field(content))
        return _no_calls(_system_first(present, roles, contents))

    return build


def _alpaca(present: set[str]) -> dict[str, pl.Expr]:
    """history's pairs, instruction and input as one user turn ("\\n"-joined, empty parts left out), then output."""
    instruction = pl.col("instruction")
    extra = pl.col("input").fill_null("") if "input" in present else pl.lit("")
    asked = (
        pl.when(extra == "")
        .then(instruction)
        .when(instruction == "")
        .then(extra)
        .otherwise(pl.concat_str(instruction, pl.lit("\n"), extra))
    )
    if "history" not in present:
        return _no_calls(_turns(present, ["user", "assistant"], [asked, pl.col("output")]))
    said = pl.col("history").list.eval(pl.element().explode()).fill_null(pl.lit([], dtype=TEXTS))
    asking = said.list.eval(
        pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.lit("user")).otherwise(pl.lit("assistant"))
    )
    roles = pl.concat_list(asking, pl.lit(["user", "assistant"], dtype=TEXTS))
    return _no_calls(_system_first(present, roles, pl.concat_list(said, asked, pl.col("output"))))


def _pair(key: str) -> Build:
    return lambda present: {**_prompt(present, key), "chosen": pl.col("chosen"), "rejected": pl.col("rejected")}


def _prompts(present: set[str]) -> dict[str, pl.Expr]:
    answer = pl.col("answer").cast(TEXT) if "answer" in present else pl.lit(None, dtype=TEXT)  # 42 read as "42"
    return {**_prompt(present, "prompt"), "answer": answer}


def _unpaired(present: set[str]) -> dict[str, pl.Expr]:
    listed = {"completions": _listed(pl.col("completion")), "labels": _listed(pl.col("label"))}
    return {**_prompt(present, "prompt"), **listed}


# ---- what must hold beyond the types, or the row path would refuse (or read otherwise) a row -----------


def _chat_holds(key: str, role: str, content: str) -> Callable[[set[str]], list[pl.Expr]]:
    def holds(present: set[str]) -> list[pl.Expr]:
        messages = pl.col(key).explode()
        rules = [
            pl.col(key).list.len().min() > 0,
            messages.is_not_null().all(),
            messages.struct.field(role).is_not_null().all(),
            messages.struct.field(content).is_not_null().all(),
            ~messages.struct.field(role).eq("function_call").any(),  # LLaMA-Factory's turn of tool calls
        ]
        if "system" in present:  # a system key beside a first system message is refused as given twice
            rules.append(~(_given_system() & (pl.col(key).list.first().struct.field(role) == "system")).any())
        return rules

    return holds


def _alpaca_holds(present: set[str]) -> list[pl.Expr]:
    if "history" not in present:
        return []
    pairs = pl.col("history").explode()  # null where a row has no history, which all() passes over
    return [
        (pl.col("history").list.drop_nulls().list.len() == pl.col("history").list.len()).all(),
        ((pairs.list.len() == 2) & (pairs.list.drop_nulls().list.len() == 2)).all(),
    ]


class Layout(NamedTuple):
    """One plain shape: its columns' Arrow types (required and optional), its canonical columns, and what must hold
    of its values beyond their types."""

    fmt: Format
    required: dict[str, Kind]
    optional: dict[str, Kind]
    build: Build
    holds: Callable[[set[str]], list[pl.Expr]] = lambda present: []


SYSTEM: dict[str, Kind] = {"system": _string}
LAYOUTS = [
    Layout("text", {"text": _string}, {}, lambda present: {"text": pl.col("text")}),
    *(
        Layout(
            "conversations", {key: _messages(role, text)}, SYSTEM, _chat(key, role, text), _chat_holds(key, role, text)
        )
        for key in ("conversations", "messages")
        for role, text in (("role", "content"), ("from", "value"))
    ),
    Layout(
        "conversations",
        {"instruction": _string, "output": _string},
        {"input": _string, "history": _list_of(_list_of(_string)), **SYSTEM},
        _alpaca,
        _alpaca_holds,
    ),
    *(
        Layout("preference", {key: _string, "chosen": _string, "rejected": _string}, SYSTEM, _pair(key))
        for key in ("prompt", "question")
    ),
    Layout(
        "prompts", {"prompt": _string}, {"answer": lambda t: _string(t) or pa.types.is_integer(t), **SYSTEM}, _prompts
    ),
    Layout("unpaired", {"prompt": _string, "completion": _string, "label": pa.types.is_boolean}, SYSTEM, _unpaired),
]
# Arrow's JSON reader infers types block by block and fails where blocks disagree (a history of [] in one, of pairs
# in the next): these keys' types are given instead, and a value of another type still fails the read.
JSON_TYPES = {
    **dict.fromkeys(("text", "instruction", "input", "output", "system", "prompt", "question", "chosen", "rejected",
                     "completion"), pa.string()),
    "history": pa.list_(pa.list_(pa.string())),
    "label": pa.bool_(),
}  # fmt: skip


# ---- from a table to canonical columns ---------------------------------------------------------------


def canonical(path: Path, fmt: Format, source: Source | None) -> pl.DataFrame | None:
    """The rows of `path` as `fmt`'s canonical columns plus `line`, exactly as read_rows_of gives them, when the
    file is JSON Lines (compressed or not), parquet or arrow in a plain shape; else None."""
    path = Path(path)
    if fmt == "ranked" or (source is not None and source.tags) or not path.is_file():
        return None
    try:
        kind = container(path)
    except DataError:
        return None
    columns = source.columns if source is not None else {}
    if kind == "jsonl":
        tables = _json_lines(path, MAX_TEXT_LINE_BYTES if fmt == "text" else MAX_LINE_BYTES, columns)
    elif kind in ("parquet", "arrow") and path.suffix.lower() not in COMPRESSIONS:  # theirs compress inside
        tables = _records(path, kind)
    else:
        return None
    frames, read = [], 0
    try:
        for table, checked in tables:
            frame = None if table is None else _flattened(fmt, _renamed(table, columns), checked)
            if frame is None:
                return None
            frames.append(
                frame.select(pl.int_range(read + 1, read + len(frame) + 1, dtype=pl.Int64).alias("line"), pl.all())
            )
            read += len(frame)
    except (*UNREADABLE, UnicodeDecodeError, pl.exceptions.ComputeError):  # ComputeError: a string not UTF-8
        return None
    return pl.concat(frames) if frames else None


def _flattened(fmt: Format, table: pa.Table | None, checked: bool) -> pl.DataFrame | None:
    """One table's rows as canonical columns, or None when they are not all in one plain shape of `fmt`. `checked`:
    its strings are known to be UTF-8; else they are checked here, as the row path refuses any other."""
    if table is None:
        return None
    present = {name: table[name] for name in table.column_names if table[name].null_count < len(table)}
    ignored = pa.table({name: column for name, column in present.items() if name not in KNOWN})
    if any(_depth(kind) > NESTING for kind in ignored.schema.types):
        return None
    if not checked:
        ignored.validate(full=True)  # ArrowInvalid where not UTF-8
    known = {name: column for name, column in present.items() if name in KNOWN}
    layout = next((layout for layout in LAYOUTS if _fits(layout, fmt, known)), None)
    if layout is None or any(known[name].null_count for name in layout.required):
        return None
    rows = pl.from_arrow(pa.table(known))
    if not checked:  # polars takes Arrow's strings on trust: as bytes and back they are checked (~3x Arrow's validate)
        rows = rows.cast({name: _as_bytes(dtype) for name, dtype in rows.schema.items()}).cast(rows.schema)
    rules = layout.holds(set(known))
    if rules and rows.select(pl.all_horizontal(rules)).item() is not True:
        return None
    return rows.select(**layout.build(set(known)))


def _fits(layout: Layout, fmt: Format, known: dict[str, pa.ChunkedArray]) -> bool:
    kinds = layout.required | layout.optional
    return (
        layout.fmt == fmt
        and layout.required.keys() <= known.keys() <= kinds.keys()
        and all(kinds[name](column.type) for name, column in known.items())
    )


def _as_bytes(dtype: pl.DataType) -> pl.DataType:
    if dtype == pl.String:
        return pl.Binary
    if isinstance(dtype, pl.List):
        return pl.List(_as_bytes(dtype.inner))
    if isinstance(dtype, pl.Struct):
        return pl.Struct({field.name: _as_bytes(field.dtype) for field in dtype.fields})
    return dtype


def _renamed(table: pa.Table, columns: dict[str, str]) -> pa.Table | None:
    """The columns renamed as Source.mapped renames a row's keys; None where a row could read otherwise: a mapped
    column missing, or null in a row (absent from it, in JSON Lines), or one of our keys both mapped and the file's."""
    names, theirs = table.column_names, set(columns.values())
    for ours, their in columns.items():
        if their not in names and ours not in OPTIONAL_KEYS:
            return None
        if their in names and ((ours not in OPTIONAL_KEYS and table[their].null_count) or ours in set(names) - theirs):
            return None
    kept = {name: table[name] for name in names if name not in theirs}
    return pa.table(kept | {ours: table[their] for ours, their in columns.items() if their in names})


# ---- reading ------------------------------------------------------------------------------------------

Tables = Iterator[tuple[pa.Table | None, bool]]  # each table, and whether its strings are known to be UTF-8


def _records(path: Path, kind: str) -> Tables:
    """A parquet or arrow file's rows, about GROUP at a time."""
    if kind == "parquet":
        file, groups = pq.ParquetFile(path), []
        for group in range(file.num_row_groups):  # whole row groups, read on Arrow's threads
            groups.append(group)
            if sum(file.metadata.row_group(g).num_rows for g in groups) >= GROUP or group == file.num_row_groups - 1:
                yield file.read_row_groups(groups), False
                groups = []
        return
    with pa.memory_map(str(path)) as source:  # its buffers keep the mapping alive after it is closed
        if source.read(6) == b"ARROW1":  # the IPC file format's magic; the stream format has none
            table = pa.ipc.open_file(source).read_all()
        else:
            source.seek(0)
            table = pa.ipc.open_stream(source).read_all()
    for offset in range(0, len(table), GROUP):
        yield table.slice(offset, GROUP), False


def _json_lines(path: Path, limit: int, columns: dict[str, str]) -> Tables:
    """JSON Lines a chunk of whole lines at a time, each parsed by Arrow; None for a chunk the row path could read
    otherwise: not UTF-8, a line over `limit` bytes, rows that are not exactly its lines (`line` counts rows), or
    a number Python's json refuses."""
    types = pa.schema({columns.get(ours, ours): kind for ours, kind in JSON_TYPES.items()})
    options = pj.ParseOptions(explicit_schema=types, unexpected_field_behavior="infer")
    with opened(path) as handle:
        for chunk in _whole_lines(handle, limit):
            lines = _object_lines(chunk, limit) if chunk is not None and _utf8(chunk) else None
            table = None if lines is None else pj.read_json(pa.py_buffer(chunk), parse_options=options)
            if (
                table is None
                or table.num_rows != lines
                or (any(map(_floating, table.schema.types)) and _unpythonic_numbers(chunk))
            ):
                yield None, True
                return
            yield table, True


def _whole_lines(handle: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """CHUNK bytes at a time and the rest of their last line, the file's BOM left out; None for a line over `limit`."""
    first = True
    while chunk := handle.read(CHUNK):
        if not chunk.endswith(b"\n"):
            rest = handle.readline(limit + 3)  # short of a line end only at the file's end
            if len(rest) == limit + 3:
                yield None
                return
            chunk += rest
        if first:
            chunk, first = chunk.removeprefix(BOM), False
        yield chunk


def _utf8(chunk: bytes) -> bool:
    """Whether the bytes are UTF-8 (polars checks with SIMD, ~4x Arrow's validate): Arrow's JSON reader passes any
    bytes through, and the row path refuses a line that is not UTF-8."""
    try:
        pl.Series([chunk], dtype=pl.Binary).cast(TEXT)
    except pl.exceptions.ComputeError:
        return False
    return True


def _object_lines(chunk: bytes, limit: int) -> int | None:
    """How many lines `chunk` holds when each starts with { and ends with } (a CR aside), none is over `limit` bytes
    and none opens over OPENINGS objects or lists; else None.

    Arrow reads objects wherever they are (two on a line, none on a blank one), while the row path names rows by
    line. A line from { to } begins an object and holds no part of another (in valid JSON, } then { never falls
    inside one object), so when Arrow finds as many rows as there are lines, each line is one row."""
    data = np.frombuffer(chunk, np.uint8)
    if not len(data):  # a file of a BOM alone
        return None
    ends = np.flatnonzero(data == NEWLINE)
    if len(ends) == 0 or ends[-1] != len(data) - 1:  # the file's last line may have no line end
        ends = np.append(ends, len(data))
    starts = np.concatenate(([0], ends[:-1] + 1))
    last = data[ends - 1]
    last = np.where((last == CR) & (ends - starts >= 2), data[np.maximum(ends - 2, 0)], last)
    if ((ends - starts) > limit).any() or (ends == starts).any():
        return None
    openings = np.searchsorted(np.flatnonzero((data | 0x20) == OPEN), ends)  # [ is 0x5b, { is 0x7b
    if np.diff(openings, prepend=0).max() > OPENINGS:
        return None
    return len(ends) if (data[starts] == OPEN).all() and (last == CLOSE).all() else None


def _floating(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or any(_floating(t.field(i).type) for i in range(t.num_fields))


def _unpythonic_numbers(chunk: bytes) -> bool:
    """Whether the chunk may hold a number Python's json refuses and Arrow reads as a float (so asked only where a
    float was read): -NaN, or an integer of more digits than Python converts (a run that long covers an aligned
    block of half as many digits). In a column no shape reads, the row path still refuses its row."""
    if b"-NaN" in chunk:
        return True
    if not (block := sys.get_int_max_str_digits() // 2):  # 0: no limit
        return False
    data = np.frombuffer(chunk, np.uint8)
    digits = (data[: len(data) // block * block] - ZERO) < 10
    return bool(digits.reshape(-1, block).all(axis=1).any())
