"""A first spec for a user's own model folder and data files: each file's format detected, a stage per format.

The spec is written as text, with a comment on every choice a user may want to change, and it passes `lifecycle
validate` as written: the stages are those the data can feed (pretrain on text, LoRA-SFT on conversations, DPO on
preference pairs, KTO on labelled replies, PRO on ranked lists, GRPO on prompts with reference answers), in that
order, each starting from the one before, then an eval of every trained stage. A file whose name says it is held
out (heldout, eval, test, valid, dev) is the held-out file of the stage its format feeds.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from schemas.formats import Shape, flatten
from schemas.models import POSITION_FIELDS
from schemas.problems import DataError, Problem
from schemas.readers import read_rows

# the order formats are tried in: a preference pair is also an unpaired row, so the narrower format goes first
DETECTION_ORDER = ("ranked", "preference", "unpaired", "conversations", "prompts", "text")
SAMPLE_ROWS = 200  # rows read to tell a file's format; `validate` then checks every row
HELDOUT = re.compile(r"(^|[^a-z])(heldout|held_out|eval|test|valid|validation|dev)([^a-z]|$)")
MAX_LEN = 512  # tokens per example unless the model has fewer positions


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
TRAIN = "train: {max_steps: 200, batch_size: 8, lr: 2.0e-4, logging_steps: 10, save_steps: 50}"
TRAIN_FULL = "train: {max_steps: 200, batch_size: 8, lr: 2.0e-5, logging_steps: 10, save_steps: 50}"


def detect_format(path: Path) -> str:
    """The first format of DETECTION_ORDER that reads the file's first SAMPLE_ROWS rows; DataError naming the line,
    field and rule that stopped the closest format otherwise."""
    rows: list[tuple[int, dict]] = []
    for number, row in read_rows(path):
        if isinstance(row, Problem):
            raise DataError([row])
        rows.append((number, row))
        if len(rows) == SAMPLE_ROWS:
            break
    if not rows:
        raise DataError([Problem(path, 0, "(file)", "holds no rows")])
    closest: tuple[int, str, Problem] | None = None
    for fmt in DETECTION_ORDER:
        for read, (number, row) in enumerate(rows):
            try:
                flatten(fmt, row)
            except Shape as err:
                if closest is None or read > closest[0]:
                    rule = f"{err.rule} (read as {fmt}, the format its first rows come closest to)"
                    closest = (read, fmt, Problem(path, number, err.field, rule))
                break
        else:
            return fmt
    raise DataError([closest[2]])


def _positions(model: Path) -> int | None:
    try:
        config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    text = config.get("text_config") or config
    return next((text[field] for field in POSITION_FIELDS if isinstance(text.get(field), int)), None)


def _has_chat_template(folder: Path) -> bool:
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    return bool(config.get("chat_template")) or (folder / "chat_template.jinja").exists()


def starter_spec(name: str, model: Path, files: list[Path], spec_dir: Path) -> str:
    """The text of a commented spec for `model` trained on `files`, paths written relative to `spec_dir`."""

    def rel(path: Path) -> str:
        return os.path.relpath(path.resolve(), spec_dir.resolve())

    found: dict[str, dict[str, list[Path]]] = {}
    for path in files:
        split = "heldout" if HELDOUT.search(path.stem.lower()) else "data"
        found.setdefault(detect_format(path), {}).setdefault(split, []).append(path)
    orphans = [fmt for fmt, splits in found.items() if "data" not in splits]
    if orphans:
        raise DataError(
            [
                Problem(path, 0, "(file)", f"is held-out {fmt} data, and no training file of that format was given")
                for fmt in orphans
                for path in found[fmt]["heldout"]
            ]
        )
    positions = _positions(model)
    max_len = min(MAX_LEN, positions) if positions else MAX_LEN
    own_template = _has_chat_template(model)
    lines = [
        f"# A first spec for {rel(model)}, written by `lifecycle new`. Check it with `lifecycle validate`, see what",
        "# each stage trains with `lifecycle inspect SPEC --stage NAME`, then `lifecycle run`. Fields: docs/spec.md.",
        "# Formats detected:",
        *(f"#   {rel(p)}: {fmt}" for fmt, splits in found.items() for paths in splits.values() for p in paths),
        f"name: {name}",
        f"model: {{path: {rel(model)}}}  # a local Hugging Face folder, never downloaded",
        f"tokenizer: {{path: {rel(model)}}}  # the model's own tokenizer; tokens a template needs are added if missing",
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
        lines.append("    # a first run: raise max_steps once `lifecycle report` shows the stage doing what it should")
        lines.append(f"    {TRAIN_FULL if stage.kind == 'pretrain' else TRAIN}")
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


def _paths(paths: list[Path], rel) -> str:
    return rel(paths[0]) if len(paths) == 1 else f"[{', '.join(rel(p) for p in paths)}]"
