"""Containers: a data file turned into rows (plain dicts) in file order, one row in memory at a time.

The container is known by the file's suffix, after any compression suffix (`.gz`, `.zst`, `.bz2`, each
decompressed as it is read):

- `.jsonl`: one JSON object per line (UTF-8; a BOM, CRLF and blank lines tolerated; a line over the size limit
  reported and read past, never held).
- `.json`: a JSON array of objects, read element by element however it is laid out (pretty-printed or all on one
  line); a file whose first character is not `[` is read as JSON Lines. A syntax error cannot be read past: it is
  reported for the row it stops and the rest of the file is not read.
- `.parquet` and `.arrow` (Arrow IPC, stream or file format: what `datasets` saves, `data-00000-of-00001.arrow`):
  read batch by batch; nested lists and structs come as lists and dicts, and a row has every column, a missing
  value as None. Their readers need to seek, so a compressed one is first decompressed into a temporary file,
  removed when the reading ends.
- `.csv` and `.tsv`: the first row names the columns. A cell is text, except that a cell holding a JSON array or
  object (e.g. a `messages` column written as JSON) is read as that value, `true` and `false` as true and false,
  and an empty cell as None (null). Quoted cells may span lines. A row with more or fewer cells than the header is
  a problem.
- `.txt` and `.md`: pretrain text, as rows `{"text": ...}`: one document per line, or with
  documents="paragraph" one per paragraph (lines up to a blank line, their line breaks kept).

A row's position is its line number in a line-based container (JSON Lines, text: a paragraph's first line), and
its number counted from 1 in a container of records (a JSON array, parquet, arrow, csv); where records have lines
(a JSON array, csv) a problem also names the line the row starts on.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from itertools import chain
from pathlib import Path
from typing import BinaryIO, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from schemas.jsonarray import ESCAPED, JsonArray
from schemas.problems import DataError, Problem, excerpt

CONTAINERS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "text",
    ".md": "text",
}
COMPRESSIONS = (".gz", ".zst", ".bz2")
RECORDS = ("json", "parquet", "arrow", "csv", "tsv")  # positions count rows, not lines
Documents = Literal["line", "paragraph"]
Keep = Callable[[int], bool]
# One chat or preference row this large is almost surely a broken file (a JSON array on one line,
# lost newlines); a pretrain document may be a whole book, hence its own limit.
MAX_LINE_BYTES = 1 << 20
MAX_TEXT_LINE_BYTES = 64 << 20
SKIP_CHUNK = 1 << 16
BOM = b"\xef\xbb\xbf"
CHUNK = 1 << 16  # bytes read at a time from a JSON array or a decompressor: more costs memory and gains no speed
# A parquet column is read through a buffer of this size: peak RSS over a 112 MB file +49 MB at 1 MiB, +63 at 64 KiB,
# +97 unbuffered (a row group's column whole), +71 at 4 MiB (python -m bench.readers measures it at 1 GB).
PARQUET_BUFFER = 1 << 20
BATCH_ROWS = 1024  # parquet and arrow rows made Python objects at a time
UNREADABLE = (OSError, EOFError, zlib.error, zstandard.ZstdError, pa.ArrowException)
UTF16_HINT = " (the file looks UTF-16: save it as UTF-8)"


def container(path: Path) -> str:
    """The container `path` is in, by its suffix after any compression suffix; DataError for any other suffix."""
    name = _uncompressed(Path(path).name.lower())
    found = CONTAINERS.get(Path(name).suffix)
    if found is None:
        rule = f"is not a file this reads: the suffixes read are {', '.join(CONTAINERS)}"
        raise DataError(
            [Problem(Path(path), 0, "(file)", f"{rule}, each also compressed as {', '.join(COMPRESSIONS)}")]
        )
    return found


def _uncompressed(name: str) -> str:
    return next((name.removesuffix(s) for s in COMPRESSIONS if name.endswith(s)), name)


class Rows(Iterator[tuple[int, "dict | Problem"]]):
    """read_rows' iterator: (position, row or Problem) pairs, and where the last pair was found: `unit`, and
    `starts_on`, the line the row starts on where its container has lines (a JSON array, csv), else None."""

    def __init__(self, path: Path, limit: int, documents: Documents, keep: Keep | None):
        if documents not in ("line", "paragraph"):
            raise ValueError(f"documents must be 'line' or 'paragraph', not {documents!r}")
        self.path = Path(path)
        self.container = "" if self.path.is_dir() else container(self.path)  # a folder has no suffix to go by
        self.unit: Literal["line", "row"] = "row" if self.container in RECORDS else "line"
        self.starts_on: int | None = None
        self._pairs = self._read(limit, documents, keep)

    def __next__(self) -> tuple[int, dict | Problem]:
        return next(self._pairs)

    def close(self) -> None:
        """Close the file now rather than when the iterator is collected."""
        self._pairs.close()

    def problem(
        self, position: int, rule: str, shown: str = "", starts_on: int | None = None, stops: bool = False
    ) -> Problem:
        """A problem of one row of a container of records; `stops` when the file cannot be read past it."""
        return Problem(self.path, position, "(row)", rule, excerpt(shown.strip()), "row", starts_on, stops)

    def _read(self, limit: int, documents: Documents, keep: Keep | None) -> Iterator[tuple[int, dict | Problem]]:
        if not self.container:
            yield 0, Problem(self.path, 0, "(file)", "cannot be read: Is a directory")
            return
        try:
            if self.container in ("parquet", "arrow"):
                with _seekable(self.path) as plain:
                    yield from (_parquet if self.container == "parquet" else _arrow)(plain, keep)
            elif self.container == "json":
                yield from _json(self, limit, keep)
            else:
                with opened(self.path) as handle:
                    if self.container == "jsonl":
                        yield from _jsonl(self.path, handle, limit, keep)
                    elif self.container == "text":
                        yield from (_lines if documents == "line" else _paragraphs)(self.path, handle, limit, keep)
                    else:
                        yield from _csv(self, handle, "\t" if self.container == "tsv" else ",", limit, keep)
        except UNREADABLE as err:
            yield 0, Problem(self.path, 0, "(file)", f"cannot be read: {getattr(err, 'strerror', None) or err}")


def read_rows(
    path: Path,
    *,
    limit: int = MAX_LINE_BYTES,
    documents: Documents = "line",
    keep: Keep | None = None,
) -> Rows:
    """(position, row) or (position, Problem) for each row of `path` in file order, at flat memory for any size.

    `limit` is the most bytes one row may take; `documents` splits a text file by line or by paragraph;
    `keep(position)` False leaves that row out (JSON Lines and text leave its line undecoded). A blank line
    yields nothing; a file that cannot be opened yields one Problem at position 0. Raises DataError for a suffix
    no reader knows."""
    return Rows(path, limit, documents, keep)


# ---- bytes, compressed or not ------------------------------------------------------------


def opened(path: Path) -> BinaryIO:
    suffix = Path(path.name.lower()).suffix
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".zst":
        # read_across_frames: `cat a.zst b.zst` is a valid zstd file, as with gzip
        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True)
        return io.BufferedReader(reader, CHUNK)
    return open(path, "rb")


@contextmanager
def _seekable(path: Path) -> Iterator[Path]:
    """The file itself, or a compressed one decompressed into a temporary file, removed on leaving."""
    if _uncompressed(path.name.lower()) == path.name.lower():
        open(path, "rb").close()  # so a missing file is said as for every other container
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="lifecycle-read-") as folder:
        plain = Path(folder) / _uncompressed(path.name)
        with opened(path) as source, open(plain, "wb") as target:
            shutil.copyfileobj(source, target, CHUNK)
        yield plain


# ---- JSON Lines and text -------------------------------------------------------------------


def numbered_lines(handle: BinaryIO, limit: int) -> Iterator[tuple[int, bytes, int]]:
    """(number, bytes, oversize) per line; a line of more than `limit` bytes (its end of line aside)
    yields only its head and its size as `oversize` (0 for every other line), the rest read past
    in chunks so it is never held whole."""
    number = 0
    while raw := handle.readline(limit + 2):  # room for the limit and a CRLF
        number += 1
        if len(raw.rstrip(b"\r\n")) <= limit:
            yield number, raw, 0
            continue
        head, size = raw[:200], len(raw)
        while raw and not raw.endswith(b"\n"):
            raw = handle.readline(SKIP_CHUNK)
            size += len(raw)
        yield number, head, size - (len(raw) - len(raw.rstrip(b"\r\n")))


def decode_line(path: Path, number: int, raw: bytes, oversize: int, limit: int) -> str | Problem:
    """One line's text, its end of line and any BOM removed, or the Problem that it is too long or not UTF-8."""

    def problem(rule: str, shown: str) -> Problem:
        return Problem(path, number, "(line)", rule, excerpt(shown.strip()))

    if oversize:
        return problem(
            f"is {oversize:,} bytes, over the {limit:,}-byte limit for one row", raw.decode("utf-8", "replace")
        )
    raw = raw.removeprefix(BOM)  # anywhere: files joined with `cat` keep each one's BOM
    try:
        return raw.decode("utf-8").rstrip("\r\n")  # so JSON errors point at columns of the line itself
    except UnicodeDecodeError as err:
        hint = UTF16_HINT if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else ""
        return problem(f"not valid UTF-8 at byte {err.start}{hint}", raw.decode("utf-8", "replace"))


def parse_json_line(path: Path, number: int, raw: bytes, oversize: int, limit: int) -> dict | Problem | None:
    """One line as a JSON object, None for a blank line, or the Problem that stops it being read."""
    text = decode_line(path, number, raw, oversize, limit)
    if isinstance(text, Problem):
        return text
    if not text.strip():
        return None

    def problem(rule: str) -> Problem:
        return Problem(path, number, "(line)", rule, excerpt(text.strip()))

    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        return problem(f"not valid JSON: {err.msg} at column {err.colno}")
    except RecursionError:
        return problem("not readable: JSON nested too deeply")
    except ValueError as err:  # an integer literal of more digits than Python converts; its advice is for programmers
        return problem(f"not valid JSON: {str(err).split(':')[0]}")
    if not isinstance(row, dict):
        return problem("must be a JSON object")
    return row


def _jsonl(path: Path, handle: BinaryIO, limit: int, keep: Keep | None) -> Iterator[tuple[int, dict | Problem]]:
    for number, raw, oversize in numbered_lines(handle, limit):
        if keep is None or keep(number):  # another reader's line is not even decoded here
            row = parse_json_line(path, number, raw, oversize, limit)
            if row is not None:
                yield number, row


def _lines(path: Path, handle: BinaryIO, limit: int, keep: Keep | None) -> Iterator[tuple[int, dict | Problem]]:
    for number, raw, oversize in numbered_lines(handle, limit):
        if keep is None or keep(number):
            text = decode_line(path, number, raw, oversize, limit)
            if isinstance(text, Problem):
                yield number, text
            elif text.strip():
                yield number, {"text": text}


def _paragraphs(path: Path, handle: BinaryIO, limit: int, keep: Keep | None) -> Iterator[tuple[int, dict | Problem]]:
    """Paragraphs at their first line. A bad line drops its paragraph, reported at that line; a paragraph over
    `limit` bytes is reported at its first line and read past."""
    start, lines, size, dropped = 0, [], 0, False  # dropped: a bad line's paragraph, or one `keep` refuses
    for number, raw, oversize in chain(numbered_lines(handle, limit), [(0, b"", 0)]):  # 0: the end, as a blank line
        blank = number == 0 or (not oversize and not raw.strip(b" \t\r\n"))
        if blank:
            if start and not dropped:
                text = "\n".join(lines)
                if size > limit:
                    rule = f"is {size:,} bytes, over the {limit:,}-byte limit for one row"
                    yield start, Problem(path, start, "(line)", rule, excerpt(text[:200]))
                else:
                    yield start, {"text": text}
            start, lines, size, dropped = 0, [], 0, False  # dropped: a bad line's paragraph, or one `keep` refuses
            continue
        if not start:
            start, dropped = number, keep is not None and not keep(number)
        size += oversize or len(raw.rstrip(b"\r\n"))
        if dropped:
            continue
        text = decode_line(path, number, raw, oversize, limit)
        if isinstance(text, Problem):
            yield number, text
            dropped = True
        elif size <= limit:  # past the limit only the size is counted, so an endless paragraph is never held
            lines.append(text)


# ---- a JSON array or JSON Lines ------------------------------------------------------------


def _json(rows: Rows, limit: int, keep: Keep | None) -> Iterator[tuple[int, dict | Problem]]:
    """A JSON array when the file's first character is `[`, else JSON Lines."""
    with opened(rows.path) as handle:
        chunks = iter(partial(handle.read, CHUNK), b"")
        head = b""
        for chunk in chunks:
            head += chunk
            if head.removeprefix(BOM).lstrip(b" \t\r\n") and not BOM.startswith(head):  # not a BOM's first bytes
                break
        if head.removeprefix(BOM).lstrip(b" \t\r\n").startswith(b"["):
            array = JsonArray(rows.path, chain([head.removeprefix(BOM)], chunks), limit)
            for row, value in array.rows(keep):
                rows.starts_on = array.starts_on
                yield row, value
            return
    rows.unit = "line"
    with opened(rows.path) as handle:  # read again from its start: a decompressor cannot seek back
        lines = _jsonl(rows.path, handle, limit, keep)
        first = next(lines, None)
        opening = head.removeprefix(BOM).lstrip(b" \t\r\n").split(b"\n", 1)[0].strip()
        if first is not None and isinstance(first[1], Problem) and opening == b"{":
            # `{` alone on the first line: one object written over many lines, not a row a line
            rule = "holds one JSON object over several lines; a .json data file is an array of rows, or a row a line"
            yield 0, Problem(rows.path, 0, "(file)", rule)
            return
        if first is not None:
            yield first
        yield from lines


# ---- csv and tsv --------------------------------------------------------------------------------


def _csv(
    rows: Rows, handle: BinaryIO, delimiter: str, limit: int, keep: Keep | None
) -> Iterator[tuple[int, dict | Problem]]:
    """Rows keyed by the header's names, each cell as `cell` reads it."""
    # csv holds a field to 128 KiB unless told otherwise, process-wide; a row may take `limit`, so a field may too
    csv.field_size_limit(max(csv.field_size_limit(), limit))
    # newline="": quoted cells keep their own line breaks, as the csv module asks; surrogateescape: see JsonArray
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="")
    lines = csv.reader(text, delimiter=delimiter)
    header: list[str] | None = None
    row = 0
    while True:
        starts_on = lines.line_num + 1
        try:
            cells = next(lines)
        except StopIteration:
            return
        except csv.Error as err:  # past it the csv module has lost its place in the file
            rule = f"not valid {rows.container}: {err}; the rest of the file is not read"
            yield row + 1, rows.problem(row + 1, rule, "", starts_on, stops=True)
            return
        if not cells:  # a blank line
            continue
        shown = delimiter.join(cells)
        escaped = not shown.isascii() and ESCAPED.search(shown)
        if header is None:
            if escaped or len(set(cells)) < len(cells):
                hint = UTF16_HINT if "\x00" in shown else ""
                twice = next((name for name in cells if cells.count(name) > 1), "")
                rule = f"the header is not valid UTF-8{hint}" if escaped else f"the header names {twice!r} twice"
                yield 0, Problem(rows.path, 0, "(file)", rule, excerpt(shown))
                return
            header = cells
            continue
        row += 1
        rows.starts_on = starts_on
        if keep is not None and not keep(row):
            continue
        size = len(shown) if shown.isascii() else len(shown.encode("utf-8", "surrogateescape"))
        if escaped:
            at = len(shown[: escaped.start()].encode("utf-8", "surrogateescape"))
            yield row, rows.problem(row, f"not valid UTF-8 at byte {at} of the row", shown, starts_on)
        elif size > limit:
            rule = f"is {size:,} bytes, over the {limit:,}-byte limit for one row"
            yield row, rows.problem(row, rule, shown[:200], starts_on)
        elif len(cells) != len(header):
            rule = f"has {len(cells)} cells where the header has {len(header)}"
            yield row, rows.problem(row, rule, shown, starts_on)
        else:
            yield row, dict(zip(header, map(cell, cells)))


def cell(text: str) -> object:
    """A csv cell's value: a JSON array or object, true, false, None when empty, else the text itself."""
    if not text:
        return None
    if text[0] in "[{":
        try:
            return json.loads(text)
        except (ValueError, RecursionError):  # text that only starts like JSON stays text
            return text
    return {"true": True, "false": False}.get(text, text)


# ---- parquet and arrow ------------------------------------------------------------------------------


def _parquet(path: Path, keep: Keep | None) -> Iterator[tuple[int, dict | Problem]]:
    # Read buffered page by page (buffer_size), not a row group's columns whole (pre_buffer), so memory stays flat
    # however large the row groups are.
    file = pq.ParquetFile(path, buffer_size=PARQUET_BUFFER, pre_buffer=False)
    yield from _batches(file.iter_batches(batch_size=BATCH_ROWS, use_threads=False), keep)


def _arrow(path: Path, keep: Keep | None) -> Iterator[tuple[int, dict | Problem]]:
    with pa.memory_map(str(path)) as source:
        if source.read(6) == b"ARROW1":  # the IPC file format's magic; the stream format has none
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            source.seek(0)
            batches = pa.ipc.open_stream(source)
        yield from _batches(batches, keep)


def _batches(batches: Iterable[pa.RecordBatch], keep: Keep | None) -> Iterator[tuple[int, dict | Problem]]:
    """Rows of record batches, BATCH_ROWS at a time made Python objects; only kept rows are converted."""
    position = 0
    for batch in batches:
        for offset in range(0, batch.num_rows, BATCH_ROWS):
            part = batch.slice(offset, BATCH_ROWS)
            first = position + 1
            position += part.num_rows
            wanted = range(first, position + 1)
            if keep is not None:
                wanted = [p for p in wanted if keep(p)]
                part = part.take(pa.array([p - first for p in wanted], pa.int64()))
            yield from zip(wanted, part.to_pylist())
