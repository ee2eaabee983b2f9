"""A first spec for a user's own model folder and data files: each file's format detected, a stage per format.

The spec is written as text, with a comment on every choice a user may want to change, and it passes `lifecycle
validate` as written: the stages are those the data can feed (pretrain on text, LoRA-SFT on conversations, DPO on
preference pairs, KTO on labelled replies, PRO on ranked lists, GRPO on prompts with reference answers), in that
order, each starting from the one before, then an eval of every trained stage. A file whose name says it is held
out (heldout, eval, test, valid, dev) is the held-out file of the stage its format feeds.

Nothing is guessed silently: a file's format is told from every row, and a file whose rows fit different formats is
refused with the rows that differ; a model that is neither a folder nor a Hub id in the local cache is refused; and
a first run on a few rows gets a batch and a number of steps those rows can fill.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from schemas.architectures import POSITION_FIELDS
from schemas.formats import Shape, flatten
from schemas.load import SpecError, folder_or_snapshot
from schemas.problems import DataError, Problem
from schemas.readers import read_rows

# the order formats are tried in: a preference pair is also an unpaired row, so the narrower format goes first
DETECTION_ORDER = ("ranked", "preference", "unpaired", "conversations", "prompts", "text")
SHOWN_ROWS = 5  # rows named in a refusal; the rest are counted
HELDOUT = re.compile(r"(^|[^a-z])(heldout|held_out|eval|test|valid|validation|dev)([^a-z]|$)")
MAX_LEN = 512  # tokens per example unless the model has fewer positions
# A first run: long enough to see the loss move, short enough to look at soon; on a few rows, a few passes over them
# (more would learn them by heart), in batches no larger than the rows.
FIRST_STEPS = 200
FIRST_BATCH = 8
FIRST_PASSES = 3


@dataclass(frozen=True)
class Stage:
    kind: str
    fmt: str
    comment: str
    settings: str  # YAML flow-mapping entries beyond name, kind and data


# what each format feeds, in pipeline order
STAGES = (
    Stage("pretrain", "text", "continued pretraining of the whole model on raw text", ""),
    Stage(
        "sft",
        "conversations",
        "LoRA-SFT: adapters on every linear layer, merged into the weights when the stage ends",
        "lora: {r: 16, alpha: 32, targets: all-linear, merge: true}",
    ),
    Stage(
        "dpo",
        "preference",
        "DPO on the SFT weights; with LoRA the reference is the same weights, adapters off",
        "lora: {r: 16, alpha: 32, merge: true}",
    ),
    Stage(
        "kto",
        "unpaired",
        "KTO: desirable and undesirable replies, no pairs needed",
        "lora: {r: 16, alpha: 32, merge: true}",
    ),
    Stage("pro", "ranked", "PRO: each prompt's replies ranked best first", "lora: {r: 16, alpha: 32, merge: true}"),
    Stage(
        "grpo",
        "prompts",
        "GRPO: sampled replies scored by whether they contain the reference answer",
        "lora: {r: 16, alpha: 32, merge: true}",
    ),
)
LR_LORA, LR_FULL = "2.0e-4", "2.0e-5"  # adapters train at a higher rate than every weight of the model


class Detected(NamedTuple):
    """A file's format, and its rows: what a first run's batch and steps are sized by."""

    format: str
    rows: int


@dataclass
class _Rows:
    """Some of a file's rows: how many, and the first few as problems (a format's refusal: its field and rule)."""

    count: int = 0
    first: list[Problem] = field(default_factory=list)

    def add(self, problem: Problem) -> None:
        self.count += 1
        if len(self.first) < SHOWN_ROWS:
            self.first.append(problem)

    def named(self) -> str:
        """`line 5`, or `lines 5, 9, 14, 20, 31 and 3 more (8 rows)`: a few, then a count."""
        unit, numbers = self.first[0].unit, ", ".join(str(p.line) for p in self.first)
        if self.count == 1:
            return f"{unit} {numbers}"
        more = f" and {self.count - len(self.first)} more" if self.count > len(self.first) else ""
        return f"{unit}s {numbers}{more} ({self.count} rows)"


def detect_format(path: Path) -> Detected:
    """The file's format and its number of rows, read from every row (streamed).

    A row's own format is the first of DETECTION_ORDER that reads it, and the file's is the one most rows have.
    Every other row raises DataError: one no format reads by its line, field and rule; rows of another format by
    their lines, a few then a count, and the format they have. Rows of a broader format would lose what the file's
    rows have (a pair without its rejected reply is a prompt: one such row once made a preference file GRPO's), and
    rows of a narrower one what they have beyond it."""
    rows = read_rows(path)
    own: dict[str | None, _Rows] = {}  # the rows of each own format (None: rows no format reads)
    refused: dict[tuple[str, str | None], _Rows] = {}  # (format, own format) -> the rows of it that format refuses
    for number, row in rows:
        if isinstance(row, Problem):
            rows.close()
            raise DataError([row])
        shapes: dict[str, Shape] = {}
        for fmt in DETECTION_ORDER:
            try:
                flatten(fmt, row)
            except Shape as err:
                shapes[fmt] = err
        fits = next((fmt for fmt in DETECTION_ORDER if fmt not in shapes), None)
        own.setdefault(fits, _Rows()).add(Problem(path, number, "(row)", "", "", rows.unit, rows.starts_on))
        for fmt, err in shapes.items():
            refusal = Problem(path, number, err.field, err.rule, "", rows.unit, rows.starts_on)
            refused.setdefault((fmt, fits), _Rows()).add(refusal)
    total = sum(these.count for these in own.values())
    if not total:
        raise DataError([Problem(path, 0, "(file)", "holds no rows")])
    # a tie goes to the narrower format; where no row has a format, the first tried names the rows' problems
    chosen = max(DETECTION_ORDER, key=lambda fmt: own[fmt].count if fmt in own else 0)
    share = (
        f"{chosen} like {own[chosen].count} of the file's {total} rows"
        if chosen in own
        else f"{chosen}, the first format tried: no format reads any of its rows"
    )
    problems = []
    for fits, these in sorted(own.items(), key=lambda item: item[1].first[0].line):
        if fits == chosen:
            continue
        why = refused.get((chosen, fits))  # the first of them the chosen format refuses, with the field it lacks
        if fits is None:
            problems += [replace(p, rule=f"{p.rule} (read as {share})") for p in why.first]
            if why.count > len(why.first):
                more = why.count - len(why.first)
                problems.append(Problem(path, 0, "(file)", f"{more} more row(s) fit no format (read as {share})"))
            continue
        first = why.first[0] if why else these.first[0]
        rule = (
            f"{f'{first.rule}; ' if why else ''}{these.named()} read{'s' if these.count == 1 else ''} as {fits}, not "
            f"as {share}: give every row of a file one format, or split the file by format"
        )
        problems.append(replace(first, rule=rule))
    if problems:
        raise DataError(problems)
    return Detected(chosen, total)


def _positions(model: Path) -> int | None:
    try:
        config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    text = config.get("text_config") or config
    return next((text[key] for key in POSITION_FIELDS if isinstance(text.get(key), int)), None)


def _has_chat_template(folder: Path) -> bool:
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    return bool(config.get("chat_template")) or (folder / "chat_template.jinja").exists()


def starter_spec(name: str, model: Path, files: list[Path], spec_dir: Path) -> str:
    """The text of a commented spec for `model` trained on `files`, paths written relative to `spec_dir`; `model` is a
    folder, or a Hub id in the local Hugging Face cache (written as the id). SpecError when it is neither, DataError
    for a file that is not one format, before anything is written."""

    def rel(path: Path) -> str:
        return os.path.relpath(path.resolve(), spec_dir.resolve())

    missing: list[str] = []
    # as `validate` will read it: a folder here, or a Hub id's snapshot in the cache (then `commit` is its commit)
    folder, commit = folder_or_snapshot(model, Path.cwd(), "model", missing)
    if missing:
        raise SpecError("\n".join(missing))
    shown = str(model) if commit else rel(folder)
    found: dict[str, dict[str, list[Path]]] = {}
    rows: dict[str, int] = {}  # training rows per format
    for path in files:
        split = "heldout" if HELDOUT.search(path.stem.lower()) else "data"
        detected = detect_format(path)
        found.setdefault(detected.format, {}).setdefault(split, []).append(path)
        if split == "data":
            rows[detected.format] = rows.get(detected.format, 0) + detected.rows
    orphans = [fmt for fmt, splits in found.items() if "data" not in splits]
    if orphans:
        raise DataError(
            [
                Problem(path, 0, "(file)", f"is held-out {fmt} data, and no training file of that format was given")
                for fmt in orphans
                for path in found[fmt]["heldout"]
            ]
        )
    positions = _positions(folder)
    max_len = min(MAX_LEN, positions) if positions else MAX_LEN
    own_template = _has_chat_template(folder)
    where = (
        f"a Hub model, read from the local Hugging Face cache (commit {commit[:12]}), never downloaded"
        if commit
        else "a local Hugging Face folder, never downloaded"
    )
    lines = [
        f"# A first spec for {shown}, written by `lifecycle new`. Check it with `lifecycle validate`, see what",
        "# each stage trains with `lifecycle inspect SPEC --stage NAME`, then `lifecycle run`.",
        "# Every field a spec can have, and what it does: `lifecycle spec-doc`.",
        "# Formats detected:",
        *(f"#   {rel(p)}: {fmt}" for fmt, splits in found.items() for paths in splits.values() for p in paths),
        f"name: {name}",
        f"model: {{path: {shown}}}  # {where}",
        f"tokenizer: {{path: {shown}}}  # the model's own tokenizer; tokens a template needs are added if missing",
        (
            "template: tokenizer  # the tokenizer's own chat template decides what each reply's trained span is"
            if own_template
            else "template: chatml  # the tokenizer has no chat template of its own: replies are rendered as ChatML"
        ),
        "stages:",
    ]
    length = f"tokens per example{f'; the model has {positions} positions' if positions else ''}"
    trained: list[str] = []
    for stage in STAGES:
        if stage.fmt not in found:
            continue
        splits = found[stage.fmt]
        lines += [f"  # {stage.comment}", f"  - name: {stage.kind}", f"    kind: {stage.kind}"]
        lines.append(f"    data: {_paths(splits['data'], rel)}")
        if "heldout" in splits:
            lines.append(f"    heldout: {_paths(splits['heldout'], rel)}")
        if stage.kind == "pretrain":
            lines.append(f"    packing: {{block_size: {max_len}}}  # {length}")
        else:
            lines.append(f"    max_len: {max_len}  # {length}")
        if stage.settings:
            lines.append(f"    {stage.settings}")
        lines += _train(rows[stage.fmt], LR_FULL if stage.kind == "pretrain" else LR_LORA)
        trained.append(stage.kind)
    if not trained:
        raise DataError([Problem(files[0], 0, "(file)", "no training file was given")])
    if any("heldout" in splits for splits in found.values()):
        lines.append("  # every trained stage scored side by side on the held-out files above, 200 rows of each")
        lines.append(f"  - {{name: eval, kind: eval, checkpoints: [{', '.join(trained)}], limit: 200}}")
    else:
        lines.append(
            "  # no held-out file was given: add one (heldout: FILE) to a stage, and an eval stage, to compare"
        )
        lines.append("  # the stages on data they did not train on")
    return "\n".join(lines) + "\n"


def _train(rows: int, lr: str) -> list[str]:
    """A first run's `train` for a stage of `rows` training rows, with the comment that says how it was sized."""
    batch = min(FIRST_BATCH, rows)
    steps = min(FIRST_STEPS, FIRST_PASSES * math.ceil(rows / batch))
    logging, save = max(1, min(10, steps // 10)), min(50, steps)
    train = (
        f"    train: {{max_steps: {steps}, batch_size: {batch}, lr: {lr}, logging_steps: {logging}, "
        f"save_steps: {save}}}"
    )
    if steps == FIRST_STEPS:
        return [
            "    # a first run: raise max_steps once `lifecycle report` shows the stage doing what it should",
            train,
        ]
    return [
        f"    # a first run on {rows} row(s): {FIRST_PASSES} passes in batches of {batch}; more steps need more rows, "
        "or it learns these by heart",
        train,
    ]


def _paths(paths: list[Path], rel) -> str:
    return rel(paths[0]) if len(paths) == 1 else f"[{', '.join(rel(p) for p in paths)}]"
