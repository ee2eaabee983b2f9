"""What every stage receives and returns: the contract between the flow and the work."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.data import Problem
from schemas.spec import LlamaInit

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import TrainerCallback


@dataclass(frozen=True)
class Prepared:
    datasets: DatasetDict  # "train" and, when the stage has held-out data, "heldout"
    rejected: list[Problem] = field(default_factory=list)  # rows dropped under on_invalid: skip, with their reasons
    counts: dict[str, float] = field(default_factory=dict)  # what preparation cut or dropped, e.g. over-long examples


@dataclass(frozen=True)
class StageInputs:
    model: Path | LlamaInit  # the upstream checkpoint folder, or a config to build fresh weights from
    tokenizer: Path  # a Hugging Face tokenizer folder, chat template included
    datasets: DatasetDict  # "train" and, when the stage has held-out data, "heldout"
    callbacks: tuple[TrainerCallback, ...] = ()  # e.g. the recorder of per-step metrics


@dataclass(frozen=True)
class StageResult:
    checkpoint: Path  # a save_pretrained folder (safetensors) with its tokenizer
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from_step: int = 0  # the in-stage checkpoint training resumed from; 0 for a fresh start
