"""Data contracts: every data file is checked whole, before any model loads.

A file is read row by row in whichever container it comes (schemas/readers.py: JSON Lines, a JSON array,
parquet, arrow, csv, text, compressed or not; a row over the size limit reported and read past, never held),
each row flattened into its format's canonical columns, whichever accepted shape it came in (schemas/formats.py). A
pandera schema (polars backend) then checks the rules on those columns with lazy validation, so
one pass reports every failure. Each problem names the file, the line, the field and the rule,
with a short excerpt: a shape problem names the user's own key, a rule problem the canonical
column, since the rule holds for every shape alike.

`read_file` returns the valid rows in canonical form (ranked candidates sorted best first),
the problems of rows it set aside under on_invalid="skip", and notes that are not errors;
`read_files` reads a stage's sources (schemas/sources.py), each with its column mapping, and mixes them
(schemas/mixing.py), counting each source's rows.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import pandera.polars as pa
import polars as pl
import pyarrow
from pandera.errors import SchemaErrors

from schemas.columnar import canonical
from schemas.formats import Format, Shape, flatten, shape_of
from schemas.mixing import mixed
from schemas.problems import DataError, Problem, excerpt
from schemas.readers import MAX_LINE_BYTES, MAX_TEXT_LINE_BYTES, Documents, container, read_rows
from schemas.sources import Source, Unmapped
from schemas.spec import Mix

OnInvalid = Literal["fail", "skip"]
ROLES = ("system", "user", "assistant")
COLUMNAR = ("csv", "tsv", "parquet", "arrow")  # containers whose rows all have the file's columns
TIE_NOTE = "tied scores: tied candidates weigh zero against each other in PRO"


@dataclass(frozen=True)
class Validated:
    """The valid rows of one file in canonical form, with what was set aside and what is only worth knowing."""

    frame: pl.DataFrame
    rejected: list[Problem]  # every problem of every dropped row under on_invalid="skip"; "fail" raises instead
    notes: list[Problem]  # not errors: e.g. tied scores in a ranked list
    counts: dict[str, float] = field(default_factory=dict)  # per source: rows read, rejected, used (read_files)

    @property
    def rejected_rows(self) -> int:
        return len({p.line for p in self.rejected})


# ---- the rules, as pandera checks on canonical columns --------------------------------------


def _rule(name: str, test: Callable[[pl.Expr], pl.Expr]) -> pa.Check:
    """A check of `test` on the column; a missing result (an empty list's last turn) counts as failed."""
    return pa.Check(lambda data: data.lazyframe.select(test(pl.col(data.key)).fill_null(False)), name=name)


def _alternating(roles: pl.Expr) -> pl.Expr:
    """An optional system turn, then user and assistant in turn from user: any other role fails it too."""
    body = pl.when(roles.list.first() == "system").then(roles.list.slice(1)).otherwise(roles)
    expected = body.list.eval(
        pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.lit("user")).otherwise(pl.lit("assistant"))
    )
    return (body.list.len() >= 1) & (body == expected)


def _nonempty(text: pl.Expr) -> pl.Expr:
    return text.str.strip_chars().str.len_chars() > 0


def _each_nonempty(texts: pl.Expr) -> pl.Expr:
    return texts.list.eval(_nonempty(pl.element())).list.all()


# A conversation's turns as one letter each, so their order with tool calls is one regular expression: s system,
# u user, a assistant, c an assistant turn that calls tools, t tool; x anything else (an unknown role, or a call
# made outside an assistant turn).
TURN_ROLES = ("system", "user", "assistant", "tool")
TURN_LETTERS = "sxuxactxxx"  # at 2 * the role's place in TURN_ROLES (4 for any other role), + 1 when it calls
TOOL_TURNS = r"^s?(?:u(?:ct+)*a)+$"  # each user turn answered by calls and their results, as often as needed, then text


def _calling(calls: pl.Expr, like: pl.Expr) -> pl.Expr:
    """1 where a message calls tools, else 0, per message of `like`; calls that do not line up with it (which the
    calls column's own rule reports) count as none, so the other rules can still read the row."""
    nothing = like.list.eval(pl.element().str.head(0))
    aligned = pl.when(calls.list.len() == like.list.len()).then(calls).otherwise(nothing)
    return aligned.list.eval((pl.element() != "").cast(pl.Int64))


def _uses_tools(roles: pl.Expr) -> pl.Expr:
    return (_calling(pl.col("calls"), roles).list.sum() > 0) | roles.list.contains("tool")


def _tool_turns(roles: pl.Expr) -> pl.Expr:
    place = roles.list.eval(pl.element().replace_strict(TURN_ROLES, range(4), default=4, return_dtype=pl.Int64))
    letters = (place * 2 + _calling(pl.col("calls"), roles)).list.eval(
        pl.element().replace_strict(range(len(TURN_LETTERS)), list(TURN_LETTERS))
    )
    return letters.list.join("").str.contains(TOOL_TURNS)


def _each_said_or_calling(contents: pl.Expr) -> pl.Expr:
    """Every message has content, but an assistant turn made only of tool calls (the role rules keep calls there)."""
    said = contents.list.eval(_nonempty(pl.element()).cast(pl.Int64))
    return (said + _calling(pl.col("calls"), contents)).list.eval(pl.element() > 0).list.all()


TEXT = pl.Utf8
TEXTS = pl.List(pl.Utf8)
ROLE_ORDER = (
    f"roles must be {'/'.join(ROLES)}: an optional system turn, then user and assistant alternating, user first"
)
NONEMPTY = _rule("must not be empty", _nonempty)
NONEMPTY_MESSAGES = _rule("no message may have empty content", _each_nonempty)
TOOL_ORDER = (
    "with tool calls, roles must be system/user/assistant/tool: an optional system turn, then user; after user, "
    "assistant; an assistant turn that calls tools is followed by one or more tool turns, then assistant; one that "
    "does not, by user; the last turn is the assistant's, calling nothing"
)
PROMPT_COLUMNS = {
    "prompt_roles": pa.Column(
        TEXTS,
        checks=[
            _rule(ROLE_ORDER, _alternating),
            _rule("the prompt's last turn must be the user's", lambda roles: roles.list.last() == "user"),
        ],
    ),
    "prompt_contents": pa.Column(TEXTS, checks=[NONEMPTY_MESSAGES]),
}

SCHEMAS: dict[Format, pa.DataFrameSchema] = {
    "text": pa.DataFrameSchema({"text": pa.Column(TEXT, checks=[NONEMPTY])}, name="text"),
    "conversations": pa.DataFrameSchema(
        {
            "roles": pa.Column(
                TEXTS,
                checks=[
                    # a conversation without tools keeps the plain rule and its sentence; one with tools has its own
                    _rule(ROLE_ORDER, lambda roles: _uses_tools(roles) | _alternating(roles)),
                    _rule(TOOL_ORDER, lambda roles: ~_uses_tools(roles) | _tool_turns(roles)),
                    _rule("the last turn must be the assistant's", lambda roles: roles.list.last() == "assistant"),
                ],
            ),
            "contents": pa.Column(TEXTS, checks=[_rule("no message may have empty content", _each_said_or_calling)]),
            "calls": pa.Column(
                TEXTS,
                checks=[
                    _rule(
                        'one entry per message ("" for a message that calls no tool)',
                        lambda calls: calls.list.len() == pl.col("roles").list.len(),
                    )
                ],
            ),
            "tools": pa.Column(TEXT, nullable=True),
        },
        name="conversations",
    ),
    "preference": pa.DataFrameSchema(
        {
            **PROMPT_COLUMNS,
            "chosen": pa.Column(TEXT, checks=[NONEMPTY]),
            "rejected": pa.Column(
                TEXT,
                checks=[
                    NONEMPTY,
                    _rule(
                        "must differ from chosen",
                        lambda rejected: rejected.str.strip_chars() != pl.col("chosen").str.strip_chars(),
                    ),
                ],
            ),
        },
        name="preference",
    ),
    "ranked": pa.DataFrameSchema(
        {
            **PROMPT_COLUMNS,
            "completions": pa.Column(
                TEXTS,
                checks=[
                    _rule("at least 2 candidates are needed to rank", lambda c: c.list.len() >= 2),
                    _rule("no candidate may be empty", _each_nonempty),
                ],
            ),
            "scores": pa.Column(
                pl.List(pl.Float64),
                checks=[
                    _rule(
                        "one score per candidate", lambda scores: scores.list.len() == pl.col("completions").list.len()
                    ),
                    _rule(
                        "scores must be finite numbers",
                        lambda scores: scores.list.eval(pl.element().is_finite()).list.all(),
                    ),
                ],
            ),
        },
        name="ranked",
    ),
    "prompts": pa.DataFrameSchema(
        {
            **PROMPT_COLUMNS,
            "answer": pa.Column(
                TEXT,
                nullable=True,
                checks=[_rule("must not be empty when given", lambda a: a.is_null() | _nonempty(a))],
            ),
        },
        name="prompts",
    ),
    "unpaired": pa.DataFrameSchema(
        {
            **PROMPT_COLUMNS,
            "completions": pa.Column(
                TEXTS,
                checks=[
                    _rule("no completion may be empty", _each_nonempty),
                    _rule(
                        "a pair's rejected must differ from its chosen",
                        lambda c: c.list.eval(pl.element().str.strip_chars()).list.n_unique() == c.list.len(),
                    ),
                ],
            ),
            "labels": pa.Column(pl.List(pl.Boolean)),
        },
        name="unpaired",
    ),
}


# ---- reading --------------------------------------------------------------------------------


def _frame(columns: dict[str, list], dtypes: dict[str, pl.DataType]) -> pl.DataFrame:
    """The columns as a frame, built through Arrow: pyarrow converts Python lists of lists several times faster than
    polars (1.1 s against 3.9 s for 200,000 conversations' roles, contents and calls; bench/readers.py)."""
    arrays = {
        name: pyarrow.array(values, pl.Series(dtype=dtypes[name]).to_arrow().type) for name, values in columns.items()
    }
    return pl.from_arrow(pyarrow.table(arrays))


def read_rows_of(
    path: Path, fmt: Format, documents: Documents = "line", mapped: Callable[[dict], dict] | None = None
) -> tuple[pl.DataFrame, list[Problem], Callable[[Problem], Problem]]:
    """Parse a file of any container into canonical columns plus `line` (the row's position), each row's columns
    renamed by `mapped` first; problems of shape are returned, not raised, with a function that gives a later
    problem of a row where that row was found."""
    schema = SCHEMAS[fmt]
    dtypes = {"line": pl.Int64, **{name: column.dtype.type for name, column in schema.columns.items()}}
    columns: dict[str, list] = {name: [] for name in dtypes}
    problems: list[Problem] = []
    starts: dict[int, int] = {}  # the line each row starts on, in containers of records that have lines
    rows = read_rows(path, limit=MAX_TEXT_LINE_BYTES if fmt == "text" else MAX_LINE_BYTES, documents=documents)
    for position, row in rows:
        if isinstance(row, Problem):
            problems.append(row)
            continue
        try:
            flat = flatten(fmt, mapped(row) if mapped else row)
        except Unmapped as err:
            if container(path) in COLUMNAR:  # every row has the file's columns: one problem, not one a row
                rows.close()
                rule = err.rule.replace("this row", "this file").replace("the row has", "the file has")
                return _frame({name: [] for name in dtypes}, dtypes), [Problem(path, 0, err.field, rule)], lambda p: p
            problems.append(Problem(path, position, err.field, err.rule, "", rows.unit, rows.starts_on))
            continue
        except Shape as err:
            shown = excerpt(json.dumps(row, ensure_ascii=False, default=str))
            problems.append(Problem(path, position, err.field, err.rule, shown, rows.unit, rows.starts_on))
            continue
        if rows.starts_on is not None:
            starts[position] = rows.starts_on
        columns["line"].append(position)
        for name, value in flat.items():
            columns[name].append(value)

    def located(problem: Problem) -> Problem:
        if problem.line == 0 or rows.unit == "line":
            return problem
        return replace(problem, unit=rows.unit, starts_on=starts.get(problem.line))

    return _frame(columns, dtypes), problems, located


def _rule_problems(path: Path, frame: pl.DataFrame, schema: pa.DataFrameSchema) -> list[Problem]:
    try:
        schema.validate(frame, lazy=True)
    except SchemaErrors as err:
        problems = []
        for case in err.failure_cases.iter_rows(named=True):
            index, column = case.get("index"), case.get("column")
            if index is None or column not in frame.columns:
                problems.append(Problem(path, 0, column or "(file)", case["check"], excerpt(str(case["failure_case"]))))
            else:
                row = frame.row(index, named=True)
                problems.append(Problem(path, row["line"], column, case["check"], excerpt(row[column])))
        return problems
    return []


def _rank(path: Path, frame: pl.DataFrame) -> tuple[pl.DataFrame, list[Problem]]:
    """Candidates sorted best first (ties keep the file's order), and a note for each list with ties."""
    tied = frame.filter(pl.col("scores").list.n_unique() < pl.col("scores").list.len())
    notes = [
        Problem(path, line, "scores", TIE_NOTE, excerpt(scores))
        for line, scores in tied.select("line", "scores").iter_rows()
    ]
    best_first = pl.col("scores").list.eval(
        pl.int_range(pl.len()).sort_by(pl.element(), descending=True, maintain_order=True)
    )
    return frame.with_columns(
        pl.col("completions").list.gather(best_first), pl.col("scores").list.gather(best_first)
    ), notes


def read_file(
    path: Path,
    fmt: Format,
    on_invalid: OnInvalid = "fail",
    *,
    documents: Documents | None = None,
    source: Source | None = None,
) -> Validated:
    """The valid rows of `path` in canonical form, read as `source` says (its column mapping, and how a text file
    splits into documents unless `documents` says: by line or by paragraph).

    "fail" raises DataError naming every problem if there is one; "skip" drops the invalid rows
    and returns their problems as `rejected`, but still raises when the file itself is unusable
    (unreadable, or no valid row left), since training on nothing is never what was meant.
    """
    path = Path(path)
    documents = documents or (source.documents if source else "line")
    mapped = source.mapped if source is not None and (source.columns or source.tags) else None
    fast = canonical(path, fmt, source)  # plain data by columns, kept only when valid (schemas/columnar.py)
    if fast is not None and not _rule_problems(path, fast, SCHEMAS[fmt]):
        frame, problems, located = fast, [], lambda problem: problem
    else:  # row by row, so each problem is named at its own row
        frame, problems, located = read_rows_of(path, fmt, documents, mapped)
        problems += map(located, _rule_problems(path, frame, SCHEMAS[fmt]))
    problems.sort(key=lambda p: p.line)
    rejected_lines = {p.line for p in problems}
    valid = frame.filter(~pl.col("line").is_in(rejected_lines))
    notes: list[Problem] = []
    if fmt == "ranked":
        valid, notes = _rank(path, valid)
        notes = [located(note) for note in notes]
    if valid.is_empty() and 0 not in rejected_lines:
        if not problems:
            problems.append(Problem(path, 0, "(file)", "holds no rows"))
        elif on_invalid == "skip":
            problems.insert(
                0, Problem(path, 0, "(file)", f"holds no valid rows: all {len(rejected_lines)} were rejected")
            )
    # a problem the file cannot be read past fails it under skip too: the rows after it would be lost unsaid
    if problems and (on_invalid == "fail" or problems[0].line == 0 or any(p.stops for p in problems)):
        raise DataError(problems)
    return Validated(frame=valid, rejected=problems, notes=notes)


def _concatenated(parts: list[Validated], counts: dict[str, float] | None = None) -> Validated:
    return Validated(
        frame=pl.concat([p.frame for p in parts]),
        rejected=[r for p in parts for r in p.rejected],
        notes=[n for p in parts for n in p.notes],
        counts=counts or {},
    )


def read_source(source: Source | Path, fmt: Format, on_invalid: OnInvalid = "fail") -> Validated:
    """Every file of a source as one frame (file order kept), every file's problems together."""
    if not isinstance(source, Source):  # a file named in code, read as it is
        source = Source(path=Path(source), files=[Path(source)])
    parts, problems = [], []
    for path in source.files:
        try:
            parts.append(read_file(path, fmt, on_invalid, source=source))
        except DataError as err:
            problems += err.problems
    if problems:
        raise DataError(problems)
    if not parts:
        raise DataError([Problem(source.path or Path(source.name), 0, "(source)", "names no data file")])
    return _concatenated(parts)


def read_files(
    sources: list[Source | Path], fmt: Format, on_invalid: OnInvalid = "fail", mix: Mix | None = None
) -> Validated:
    """Several sources of one format as one frame, mixed as `mix` says (default: concatenated in order), every
    source's problems together. `counts` holds each source's rows read, rejected and used, by its name."""
    parts, problems = [], []
    for source in sources:
        try:
            parts.append(read_source(source, fmt, on_invalid))
        except DataError as err:
            problems += err.problems
    if problems:
        raise DataError(problems)
    given = [source if isinstance(source, Source) else None for source in sources]
    frame, used = mixed([p.frame for p in parts], [s.weight if s else None for s in given], mix or Mix())
    counts: dict[str, float] = {}
    for i, (source, part, n) in enumerate(zip(sources, parts, used)):
        name = _metric_name(source.name if isinstance(source, Source) else Path(source).name)
        key = f"source/{name}" if len(sources) == 1 else f"source/{i}-{name}"
        counts |= {f"{key}/rows": len(part.frame) + part.rejected_rows, f"{key}/rejected": part.rejected_rows}
        counts[f"{key}/used"] = n
    return replace(_concatenated(parts, counts), frame=frame)


def _metric_name(name: str) -> str:
    """A source's name as MLflow takes it in a metric key: letters, digits and _ - . / : and spaces."""
    return re.sub(r"[^\w\-./: ]", "_", name)


def check_files(files: list[tuple[Source, Format, OnInvalid]]) -> dict[Source, Validated]:
    """Each source read under its policy; one DataError with every problem of every source that must not fail."""
    results: dict[Source, Validated] = {}
    problems: list[Problem] = []
    for source, fmt, on_invalid in files:
        try:
            results[source] = read_source(source, fmt, on_invalid)
        except DataError as err:
            problems += err.problems
    if problems:
        raise DataError(problems)
    return results


SHAPE_SAMPLE = 200  # rows of each file whose shapes `describe` names


def describe(source: Source, fmt: Format, on_invalid: OnInvalid) -> str:
    """One line on how a source is read: its files' containers, the shapes its first rows came in (after its
    column mapping), and the rows it gives; for `lifecycle inspect`."""
    shapes: dict[str, int] = {}
    for path in source.files:
        rows = read_rows(path, documents=source.documents)
        for _, row in itertools.islice(rows, SHAPE_SAMPLE):
            if not isinstance(row, Problem):
                try:
                    shape = shape_of(source.mapped(row))
                except Shape:
                    shape = "unmapped"
                shapes[shape] = shapes.get(shape, 0) + 1
        rows.close()
    read = read_source(source, fmt, on_invalid)
    containers = ", ".join(sorted({container(path) for path in source.files}))
    seen = ", ".join(f"{shape} ({n})" for shape, n in sorted(shapes.items(), key=lambda item: -item[1]))
    files = f"{len(source.files)} files, " if len(source.files) > 1 else ""
    if len(source.files) == 1 and source.files[0].name != source.name:
        files = f"{source.files[0].name}, "
    return (
        f"{source.name} ({files}{containers}), read as {fmt}; {len(read.frame)} rows"
        + (f", {read.rejected_rows} rejected" if read.rejected_rows else "")
        + f"; shapes of the first rows: {seen or 'none'}"
    )
