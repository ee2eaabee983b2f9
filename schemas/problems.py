"""What is wrong where in a data file: the Problem every reader and check reports, and the DataError that lists them.

Its own module because both the readers (schemas/readers.py) and the contracts (schemas/data.py) report problems, and
the contracts read through the readers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from schemas.errors import LifecycleError

SHOWN = 20  # problems printed before the rest are only counted


@dataclass(frozen=True)
class Problem:
    """What is wrong where: `line` is the row's position in its file, counted in `unit`s.

    A line-based file (JSON Lines, text) counts lines; a file of records (a JSON array, parquet, arrow, csv)
    counts rows from 1, and where the container has lines (a JSON array, csv) `starts_on` is the line the row
    starts on. 0 is the whole file. `stops`: the file cannot be read past this problem (a syntax error in a JSON
    array or csv), so skipping its row would silently lose every row after it."""

    file: Path
    line: int
    field: str
    rule: str
    excerpt: str = ""
    unit: Literal["line", "row"] = "line"
    starts_on: int | None = None
    stops: bool = False

    @property
    def where(self) -> str:
        if self.unit == "line" or self.line == 0:
            return f"{self.file}:{self.line}"
        return f"{self.file}: row {self.line}" + (f" (line {self.starts_on})" if self.starts_on else "")

    def __str__(self) -> str:
        tail = f"  [{self.excerpt}]" if self.excerpt else ""
        return f"{self.where}: {self.field}: {self.rule}{tail}"

    def record(self) -> dict[str, str | int | None]:
        """The problem as a JSON-ready mapping, for the rejected-rows artifact."""
        return {
            "file": str(self.file),
            "line": self.line,
            "unit": self.unit,
            "starts_on": self.starts_on,
            "field": self.field,
            "rule": self.rule,
            "excerpt": self.excerpt,
        }


class DataError(LifecycleError, ValueError):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = [str(p) for p in problems[:SHOWN]]
        if len(problems) > SHOWN:
            shown.append(f"... and {len(problems) - SHOWN} more problem(s)")
        files = len({p.file for p in problems})
        super().__init__(f"{len(problems)} problem(s) in {files} data file(s):\n" + "\n".join(shown))


def excerpt(value: object, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = text if len(text) <= width else text[: width - 3] + "..."
    # User bytes end up on a terminal: control characters are shown escaped, never interpreted.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
