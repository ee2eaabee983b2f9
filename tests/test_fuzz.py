"""Fuzz: hundreds of mutated files, each accepted or refused with a DataError that names its line, never a traceback.

Every mutation is generated deterministically (seeded) from a valid row of one of the accepted
shapes, and comes with the outcome the contract owes it: `accepts` spells out the contract's
leniencies (optional keys, ignored keys, PRO's generation cue, a numeric answer); every other
mutation must be refused. So the test asserts which outcome is right, not only that nothing crashed.
Each file holds a valid row of the format, the mutated row on line 2, and the valid row again.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from schemas.data import MAX_LINE_BYTES, DataError, read_file

SEED = 20240611
OPTIONAL = {"system", "input", "answer"}  # top-level keys a row may leave out, null or (but answer) empty
IGNORED = {"meta", "sft_index", "id"}  # keys the anchors write and no stage reads
PRO_CUE = "<|assistant|>"

KeyPath = tuple[str | int, ...]


def m(*turns: tuple[str, str], keys: tuple[str, str] = ("role", "content")) -> list[dict]:
    return [{keys[0]: role, keys[1]: content} for role, content in turns]


SEEDS: list[tuple[str, dict]] = [
    ("text", {"text": "The capital of Zorbia is Quellon.", "id": 3}),
    ("conversations", {"conversations": m(("system", "Be brief."), ("user", "Add 2 and 3."), ("assistant", "5"))}),
    (
        "conversations",
        {"messages": m(("user", "Hi"), ("assistant", "Hello"), ("user", "Add 2 and 3."), ("assistant", "5"))},
    ),
    (
        "conversations",
        {"conversations": m(("human", "Add 2 and 3."), ("gpt", "5"), keys=("from", "value")), "system": "Be brief."},
    ),
    (
        "conversations",
        {"instruction": "Add", "input": "2 and 3.", "output": "5", "system": "Be brief.", "history": [["Hi", "Hello"]]},
    ),
    ("preference", {"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "6"}),
    ("preference", {"system": "Be brief.", "question": "Add 2 and 3.", "chosen": "5", "rejected": "6"}),
    (
        "preference",
        {"prompt": m(("user", "Add 2 and 3.")), "chosen": m(("assistant", "5")), "rejected": m(("assistant", "6"))},
    ),
    (
        "preference",
        {
            "chosen": m(("user", "Add 2 and 3."), ("assistant", "5")),
            "rejected": m(("user", "Add 2 and 3."), ("assistant", "6")),
        },
    ),
    ("ranked", {"instruction": "Add 2 and 3.", "input": "", "output": ["6", "5", "4"], "score": [0.2, 1.0, 0.5]}),
    (
        "ranked",
        {
            "prefix": [["<|prompter|>Hi", "<|assistant|>Hello", "<|prompter|>Add 2 and 3.", PRO_CUE]] * 3,
            "suffix": ["5", "6", "4"],
            "reward": [1.0, 0.2, 0.5],
            "sft_index": 0,
            "meta": {"source": "hh"},
        },
    ),
    ("ranked", {"prefix": ["POST: Add 2 and 3.\nTL;DR:"] * 2, "suffix": [" 5", " 6"], "reward": [2, -1]}),
    ("prompts", {"prompt": "Add 2 and 3.", "answer": "5"}),
    ("prompts", {"messages": m(("system", "Be brief."), ("user", "Add 2 and 3.")), "answer": 5}),
]


@dataclass(frozen=True)
class Case:
    fmt: str
    kind: str
    line: bytes  # what stands on line 2 (a mutation may add a blank line or a BOM of its own)
    valid: bool
    tie: bool = False


# ---- what the contract owes each mutation --------------------------------------------------


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip()) and "\ud800" not in value


def accepts(row: dict, path: KeyPath, value: object) -> bool:
    """Whether the leaf at `path` of a valid `row` may be replaced by `value` and the row stay valid."""
    key = path[0]
    if key in IGNORED:
        return True
    if path in (("system",), ("input",)):
        return value is None or value == ""
    if path == ("answer",):
        if isinstance(value, float):
            return math.isfinite(value)
        return value is None or (isinstance(value, int) and not isinstance(value, bool)) or _is_text(value)
    if path == ("instruction",) and value == "" and row.get("input"):
        return True  # the input alone is the user's turn then
    if key == "prefix" and get(row, path) == PRO_CUE and value == "":
        return True  # the cue only ends the prompt; without it the prompt reads the same
    if len(path) == 2 and key == "prefix" and value == [get(row, path)]:
        return True  # PRO joins a prefix given as a list of strings: one string listed alone reads the same
    return False


# ---- rows as trees of leaves ---------------------------------------------------------------


def leaves(value: object, path: KeyPath = ()) -> Iterator[tuple[KeyPath, object]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from leaves(item, (*path, i))
    else:
        yield path, value


def get(row: object, path: KeyPath) -> object:
    for step in path:
        row = row[step]  # type: ignore[index]
    return row


def replaced(row: dict, path: KeyPath, value: object) -> dict:
    out = copy.deepcopy(row)
    get(out, path[:-1])[path[-1]] = value  # type: ignore[index]
    return out


def dumps(row: object) -> bytes:
    return json.dumps(row).encode()  # ASCII, with \uXXXX escapes: surrogates and NaN survive as JSON text


def with_literal(row: dict, path: KeyPath, literal: str) -> bytes:
    """The row with raw JSON text at `path`: numbers JSON can write and Python cannot (5000 digits, 1e400)."""
    return dumps(replaced(row, path, "@@literal@@")).replace(b'"@@literal@@"', literal.encode())


# ---- the mutations: each gives (kind, line, valid) or nothing where it does not apply --------

Mutation = Callable[[random.Random, str, dict], tuple[str, bytes, bool] | None]


def _pick(rng: random.Random, row: dict, keep: Callable[[KeyPath, object], bool]) -> KeyPath | None:
    paths = [path for path, value in leaves(row) if keep(path, value)]
    return rng.choice(paths) if paths else None


def _leaf(kind: str, choose: Callable[[random.Random], object], keep: Callable[[KeyPath, object], bool]) -> Mutation:
    def mutate(rng: random.Random, fmt: str, row: dict) -> tuple[str, bytes, bool] | None:
        path = _pick(rng, row, keep)
        if path is None:
            return None
        value = choose(rng)
        return kind, dumps(replaced(row, path, value)), accepts(row, path, value)

    return mutate


def _literal(
    kind: str, literals: list[str], keep: Callable[[KeyPath, object], bool], valid: Callable[[KeyPath, str], bool]
) -> Mutation:
    def mutate(rng: random.Random, fmt: str, row: dict) -> tuple[str, bytes, bool] | None:
        path = _pick(rng, row, keep)
        if path is None:
            return None
        literal = rng.choice(literals)
        return kind, with_literal(row, path, literal), valid(path, literal)

    return mutate


def is_string(path: KeyPath, value: object) -> bool:
    return isinstance(value, str)


def is_number(path: KeyPath, value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_role(path: KeyPath, value: object) -> bool:
    return path[-1] in ("role", "from")


def is_reply(path: KeyPath, value: object) -> bool:
    """Strings whose text may change freely: no other field has to repeat them."""
    return isinstance(value, str) and (
        path[-1] in ("text", "chosen", "rejected", "prompt", "question", "answer")
        or (len(path) == 2 and path[0] in ("output", "suffix"))
    )


def truncated(rng: random.Random, fmt: str, row: dict) -> tuple[str, bytes, bool]:
    text = dumps(row)
    return "truncated JSON", text[: rng.randrange(1, len(text))], False


def invalid_utf8(rng: random.Random, fmt: str, row: dict) -> tuple[str, bytes, bool]:
    text = dumps(row)
    at = rng.randrange(0, len(text) + 1)
    bad = rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80", b"\xe2\x82", b"\xfe\xff"])
    return "invalid UTF-8", text[:at] + bad + text[at:], False


def non_object(rng: random.Random, fmt: str, row: dict) -> tuple[str, bytes, bool]:
    return (
        "non-object line",
        rng.choice([b"[1, 2]", b"null", b"42", b'"text"', b"true", b"[]", b"[{}]", b"-0.5e3"]),
        False,
    )


def deep_nesting(rng: random.Random, fmt: str, row: dict) -> tuple[str, bytes, bool] | None:
    path = _pick(rng, row, lambda path, value: True)
    depth = rng.choice([20_000, 200_000])
    return "deep nesting", with_literal(row, path, "[" * depth + "]" * depth), False


def shallow_nesting(rng: random.Random, fmt: str, row: dict) -> tuple[str, bytes, bool] | None:
    path = _pick(rng, row, lambda path, value: True)
    value = get(row, path)
    for _ in range(rng.randrange(1, 30)):
        value = [value]
    return "nested lists", dumps(replaced(row, path, value)), accepts(row, path, value)


def huge_line(rng: random.Random, fmt: str, row: dict) -> tuple[str, bytes, bool] | None:
    path = _pick(rng, row, is_string)
    if path is None:
        return None
    # A pretrain document may be a whole book: only structured rows have the 1 MiB limit.
    return "huge line", dumps(replaced(row, path, "x" * (MAX_LINE_BYTES + rng.randrange(1, 4096)))), fmt == "text"


def too_many_digits(rng: random.Random, fmt: str, row: dict) -> tuple[str, bytes, bool] | None:
    path = _pick(rng, row, lambda path, value: True)
    return "integer of 5000 digits", with_literal(row, path, "1" * 5000), False


def bom(rng: random.Random, fmt: str, row: dict) -> tuple[str, bytes, bool]:
    return "BOM mid-file", b"\xef\xbb\xbf" + dumps(row), True


def crlf_and_blank_lines(rng: random.Random, fmt: str, row: dict) -> tuple[str, bytes, bool]:
    return "CRLF and blank lines", b"\r\n  \t\r\n" + dumps(row) + b"\r", True


def unknown_key(rng: random.Random, fmt: str, row: dict) -> tuple[str, bytes, bool]:
    return "unknown key", dumps({**row, "zz_extra": [1, {"a": None}]}), True


def empty_object(rng: random.Random, fmt: str, row: dict) -> tuple[str, bytes, bool]:
    return "empty object", b"{}", False


def missing_key(rng: random.Random, fmt: str, row: dict) -> tuple[str, bytes, bool]:
    """A top-level key, or a key of a message or other object inside the row."""
    inner = [path for path, _ in leaves(row) if len(path) >= 2 and isinstance(get(row, path[:-1]), dict)]
    path = rng.choice([(key,) for key in row] + inner)
    out = copy.deepcopy(row)
    del get(out, path[:-1])[path[-1]]  # type: ignore[union-attr]
    return "missing key", dumps(out), path[0] in IGNORED or (len(path) == 1 and path[0] in OPTIONAL | {"history"})


def nested_null(rng: random.Random, fmt: str, row: dict) -> tuple[str, bytes, bool] | None:
    items = [
        (key, i)
        for key, value in row.items()
        if isinstance(value, list) and key not in IGNORED
        for i in range(len(value))
    ]
    if not items:
        return None
    return "null inside a list", dumps(replaced(row, rng.choice(items), None)), False


def control_characters(rng: random.Random, fmt: str, row: dict) -> tuple[str, bytes, bool] | None:
    path = _pick(rng, row, is_reply)
    if path is None:
        return None
    return (
        "control characters",
        dumps(replaced(row, path, get(row, path) + rng.choice(["\x1b[31m", "\t\x00", "\u2028", "\r"]))),
        True,
    )


def reversed_turns(rng: random.Random, fmt: str, row: dict) -> tuple[str, bytes, bool] | None:
    key = next(
        (k for k in ("conversations", "messages", "prompt") if isinstance(row.get(k), list) and len(row[k]) > 1), None
    )
    if key is None:
        return None
    return "turns reversed", dumps({**row, key: row[key][::-1]}), False


def chosen_is_rejected(rng: random.Random, fmt: str, row: dict) -> tuple[str, bytes, bool] | None:
    if fmt != "preference":
        return None
    return "chosen equals rejected", dumps({**row, "rejected": copy.deepcopy(row["chosen"])}), False


def ranked_lists(rng: random.Random, fmt: str, row: dict) -> list[tuple[str, bytes, bool, bool]]:
    if fmt != "ranked":
        return []
    texts, scores = ("output", "score") if "output" in row else ("suffix", "reward")
    single = {
        **row,
        texts: row[texts][:1],
        scores: row[scores][:1],
        **({"prefix": row["prefix"][:1]} if "prefix" in row else {}),
    }
    return [
        ("one candidate", dumps(single), False, False),
        ("a score short", dumps({**row, scores: row[scores][:-1]}), False, False),
        ("tied scores", dumps({**row, scores: [0.5] * len(row[scores])}), True, True),
    ]


LEAF_MUTATIONS: list[Mutation] = [
    _leaf("null leaf", lambda rng: None, lambda path, value: True),
    _leaf(
        "wrong type",
        lambda rng: rng.choice([True, False, {}, {"text": "a"}, [None], [["x"]]]),
        lambda path, value: True,
    ),
    _leaf("string as number", lambda rng: rng.choice([7, 0, -1.5]), is_string),
    _leaf("empty string", lambda rng: "", is_string),
    _leaf("unpaired surrogate", lambda rng: rng.choice(["\ud800", "a\udfffb"]), is_string),
    _leaf(
        "unknown role", lambda rng: rng.choice(["bot", "tool", "Human", "ASSISTANT", " user", "function_call"]), is_role
    ),
    _leaf("number as string", lambda rng: rng.choice(["1.0", "5", "NaN"]), is_number),
    _leaf("huge integer", lambda rng: 10**400, is_number),
    _literal(
        "non-finite number",
        ["NaN", "Infinity", "-Infinity", "1e400"],
        is_number,
        lambda path, literal: path[0] in IGNORED,
    ),
]
ROW_MUTATIONS: list[Mutation] = [
    truncated,
    invalid_utf8,
    non_object,
    deep_nesting,
    shallow_nesting,
    huge_line,
    too_many_digits,
    bom,
    crlf_and_blank_lines,
    unknown_key,
    empty_object,
    missing_key,
    nested_null,
    control_characters,
    reversed_turns,
    chosen_is_rejected,
]


def fuzz_cases() -> list[Case]:
    rng = random.Random(SEED)
    cases: list[Case] = []
    for fmt, row in SEEDS:
        for mutate in LEAF_MUTATIONS + ROW_MUTATIONS:
            for _ in range(2 if mutate in LEAF_MUTATIONS else 1):  # leaves are many: two draws each
                made = mutate(rng, fmt, row)
                if made is not None:
                    cases.append(Case(fmt, *made))
        cases += [Case(fmt, kind, line, valid, tie) for kind, line, valid, tie in ranked_lists(rng, fmt, row)]
    return cases


CASES = fuzz_cases()


def test_there_are_at_least_200_cases_of_both_outcomes() -> None:
    assert len(CASES) >= 200
    assert sum(case.valid for case in CASES) >= 20 and sum(not case.valid for case in CASES) >= 180


@pytest.mark.parametrize("case", CASES, ids=[f"{i:03d}-{case.fmt}-{case.kind}" for i, case in enumerate(CASES)])
def test_a_mutated_file_is_accepted_or_refused_by_its_line_never_with_a_traceback(tmp_path: Path, case: Case) -> None:
    seed = next(row for fmt, row in SEEDS if fmt == case.fmt)  # any valid row of the format will do around it
    path = tmp_path / f"{case.fmt}.jsonl"
    path.write_bytes(dumps(seed) + b"\n" + case.line + b"\n" + dumps(seed) + b"\n")
    if case.valid:
        result = read_file(path, case.fmt)  # type: ignore[arg-type]
        assert len(result.frame) == 3 and result.rejected == []
        assert any(note.line == 2 for note in result.notes) == case.tie
        return
    with pytest.raises(DataError) as err:
        read_file(path, case.fmt)  # type: ignore[arg-type]
    message = str(err.value)
    message.encode("utf-8")  # printable as it is: no surrogate or stray byte of the data leaks into it
    assert message.startswith(f"{len(err.value.problems)} problem(s) in 1 data file(s):\n{path}:2: ")
    assert all(p.line == 2 and p.field and p.rule and p.excerpt.isprintable() for p in err.value.problems)


@pytest.mark.parametrize("fmt", sorted({fmt for fmt, _ in SEEDS}))
def test_skip_sets_aside_exactly_the_refused_rows_of_a_file_of_every_mutation(tmp_path: Path, fmt: str) -> None:
    cases = [case for case in CASES if case.fmt == fmt]
    path = tmp_path / f"{fmt}.jsonl"
    path.write_bytes(b"\n".join(case.line for case in cases) + b"\n")
    # a mutated row ends its bytes
    ends = [line for line in itertools.accumulate(case.line.count(b"\n") + 1 for case in cases)]
    result = read_file(path, fmt, "skip")  # type: ignore[arg-type]
    assert result.frame["line"].to_list() == [end for end, case in zip(ends, cases) if case.valid]
    assert sorted({p.line for p in result.rejected}) == [end for end, case in zip(ends, cases) if not case.valid]
    assert [note.line for note in result.notes] == [end for end, case in zip(ends, cases) if case.tie]
