"""A JSON array of rows read element by element, at flat memory however large, pretty-printed or on one line.

The decoded text is held from the current element on, and each element parsed by the json module's C scanner
(`JSONDecoder.raw_decode`), so parsing runs at json.loads' speed; more is read while an element is cut off at the end
of what is held, up to the row size limit. Past that limit, or when an element cannot be parsed for its depth or an
integer's length, the element is stepped over unparsed (strings and brackets tracked, a chunk at a time). A syntax
error cannot be read past, since where the next element starts is then unknown: it is the last thing reported.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from schemas.problems import Problem, excerpt

WHITESPACE = re.compile(r"[ \t\n\r]*")
STRUCTURE = re.compile(r'["\[\]{},]')  # what moves an unparsed value's end, outside strings
STRING_END = re.compile(r'["\\]')
NUMBER = ".eE+-0123456789"
NEAR_END = 16  # a parse error this close to the buffer's end may be a value cut off there (`tru`, `\u00`)
ESCAPED = re.compile(r"[\udc80-\udcff]")  # undecodable bytes, as the surrogateescape error handler leaves them


class JsonArray:
    """One array's reading: the text held from `pos` on, and the line and column of what is read."""

    def __init__(self, path: Path, chunks: Iterable[bytes], limit: int):
        self.path, self.chunks, self.limit = path, iter(chunks), limit
        self.starts_on = 0  # the line the row last given starts on
        # surrogateescape: an invalid byte stays in the text as one marked character, so the row holding it is named
        self.decode = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode
        self.decoder = json.JSONDecoder()
        self.text, self.pos, self.ended = "", 0, False
        self.line, self.counted, self.line_start = 1, 0, 0  # the line of text[counted], and where that line starts

    def read(self) -> bool:
        """One more chunk onto the text, dropping what is behind `pos`; False at the end of the file."""
        if self.ended:
            return False
        self.line_at(self.pos)
        self.text = self.text[self.pos :]
        self.counted -= self.pos
        self.line_start -= self.pos
        self.pos = 0
        chunk = next(self.chunks, b"")
        self.ended = not chunk
        self.text += self.decode(chunk, final=self.ended)
        return True

    def line_at(self, index: int) -> int:
        """The line of text[index], counting newlines on from the last index asked for (they only grow)."""
        if index > self.counted:
            newlines = self.text.count("\n", self.counted, index)
            if newlines:
                self.line += newlines
                self.line_start = self.text.rfind("\n", self.counted, index) + 1
            self.counted = index
        return self.line

    def skip_space(self) -> str:
        """The next character that is not whitespace, reading on as needed; "" at the end of the file."""
        while True:
            self.pos = WHITESPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.read():
                return ""

    def rows(self, keep: Callable[[int], bool] | None) -> Iterator[tuple[int, dict | Problem]]:
        self.skip_space()
        self.pos += 1  # the "[" the file was sniffed by
        row = 0
        char = self.skip_space()
        while char != "]":
            row += 1
            if row > 1:
                if char != ",":
                    rule = "Expecting ',' delimiter" if char else "the file ends before the array's closing ]"
                    yield row, self.syntax(row, rule, self.pos, self.line_at(self.pos))
                    return
                self.pos += 1
                self.skip_space()
            starts_on = self.starts_on = self.line_at(self.pos)
            value, fatal = self.element(row, starts_on)
            if keep is None or keep(row) or fatal:
                yield row, value
            if fatal:
                return
            char = self.skip_space()
        self.pos += 1
        if self.skip_space():
            line, column = self.line_at(self.pos), self.pos - self.line_start + 1
            rule = f"not valid JSON: text after the array's closing ] at line {line} column {column}"
            yield 0, Problem(self.path, 0, "(file)", rule, excerpt(self.text[self.pos : self.pos + 60]))

    def element(self, row: int, starts_on: int) -> tuple[dict | Problem, bool]:
        """The element at `pos` and whether reading must stop there; `pos` moves past it."""
        start = self.pos
        while True:
            try:
                value, end = self.decoder.raw_decode(self.text, start)
                if self.ended or end < len(self.text) and not self.number_goes_on(value, end):
                    break
            except json.JSONDecodeError as err:
                cut = err.msg.startswith("Unterminated string") or err.pos >= len(self.text) - NEAR_END
                if self.ended or not cut:
                    return self.syntax(row, err.msg, err.pos, starts_on), True
            except (RecursionError, ValueError) as err:  # too deep, or an integer of more digits than Python converts
                shown = self.text[start : start + 200]
                too_deep = isinstance(err, RecursionError)
                rule = (
                    "not readable: JSON nested too deeply" if too_deep else f"not valid JSON: {str(err).split(':')[0]}"
                )
                return self.problem(row, rule, shown, starts_on), not self.skip_value()
            if len(self.text) - start > self.limit:  # more characters than the limit has bytes, and not yet whole
                shown = self.text[start : start + 200]
                size = self.skip_value()
                return self.problem(row, self.over(size), shown, starts_on), not size
            wanted = 2 * (len(self.text) - start)  # read on geometrically, so a long element is parsed a few times
            while len(self.text) - self.pos < wanted and self.read():
                pass
            start = self.pos
        self.pos = end
        text = self.text[start:end]
        size = end - start
        if not text.isascii():
            if ESCAPED.search(text):
                at = len(text[: ESCAPED.search(text).start()].encode("utf-8", "surrogateescape"))
                return self.problem(row, f"not valid UTF-8 at byte {at} of the row", text, starts_on), False
            if size > self.limit // 4:  # a character takes 4 bytes at most
                size = len(text.encode())
        if size > self.limit:
            return self.problem(row, self.over(size), text[:200], starts_on), False
        if not isinstance(value, dict):
            return self.problem(row, "must be a JSON object", text, starts_on), False
        return value, False

    def problem(self, row: int, rule: str, shown: str, starts_on: int, stops: bool = False) -> Problem:
        return Problem(self.path, row, "(row)", rule, excerpt(shown.strip()), "row", starts_on, stops)

    def number_goes_on(self, value: object, end: int) -> bool:
        """Whether a number parsed up to the end of what is held (`12` of `12.5`) may go on in the next chunk."""
        return type(value) in (int, float) and not self.text[end:].lstrip(NUMBER)

    def over(self, size: int) -> str:
        if not size:
            return f"is over the {self.limit:,}-byte limit for one row, and the file ends inside it"
        return f"is {size:,} bytes, over the {self.limit:,}-byte limit for one row"

    def skip_value(self) -> int:
        """Move past the value at `pos` without parsing it, holding a chunk at a time: its size in bytes, 0 when the
        file ends inside it."""
        depth, in_string, size, index = 0, False, 0, self.pos
        while True:
            match = (STRING_END if in_string else STRUCTURE).search(self.text, index)
            if match is None or (match.group() == "\\" and match.end() >= len(self.text)):
                # what is held ends inside the value, or between a backslash and what it escapes: read on
                index = len(self.text) if match is None else match.start()
                size += len(self.text[self.pos : index].encode("utf-8", "surrogateescape"))
                self.pos = index
                if not self.read():
                    return 0
                index = self.pos
                continue
            char, index = match.group(), match.end()
            if in_string:
                if char == "\\":
                    index += 1  # the escaped character, whatever it is
                    continue
                in_string = False
                if depth == 0:  # a string value
                    break
            elif char == '"':
                in_string = True
            elif char in "[{":
                depth += 1
            elif char in "]}":
                depth -= 1
                if depth == 0:
                    break
                if depth < 0:  # a scalar value, then the array's end
                    index = match.start()
                    break
            elif depth == 0:  # a scalar value, then the comma after it
                index = match.start()
                break
        size += len(self.text[self.pos : index].encode("utf-8", "surrogateescape"))
        self.pos = index
        return size

    def syntax(self, row: int, message: str, index: int, starts_on: int) -> Problem:
        """A problem the array cannot be read past: the rest of the file is not read."""
        index = min(index, len(self.text))
        line = self.line_at(index)
        column = index - self.line_start + 1
        message = message.removesuffix(" at")  # "Unterminated string starting at"
        rule = f"not valid JSON: {message} at line {line} column {column}; the rest of the file is not read"
        return self.problem(row, rule, self.text[max(index - 40, 0) : index + 20], starts_on, stops=True)
