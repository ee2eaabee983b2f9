"""The stages: one module per spec kind, named as the kind (stage name = file = task = MLflow run name); what the
kinds share is in stages/common/.

Every training kind's module is a `TrainingStage`: it prepares its data, shows prepared examples to `lifecycle
inspect`, and trains. `training_stage` is the one place that maps a kind to its module; it imports the module on
first use, since torch and transformers take seconds to load and a re-run that reuses every stage needs neither.
The tokenizer and eval stages have signatures of their own and are called by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from stages.common.contract import Prepared, StageInputs, StageResult

# kind -> module; tests/test_stages.py checks it against the spec's stage union
TRAINING_STAGES = {
    "pretrain": "stages.pretrain",
    "sft": "stages.sft",
    "distill": "stages.distill",
    "dpo": "stages.dpo",
    "kto": "stages.kto",
    "pro": "stages.pro",
    "tuna": "stages.tuna",
    "reward": "stages.reward",
    "grpo": "stages.grpo",
    "ppo": "stages.ppo",
}


class TrainingStage(Protocol):
    def prepare(self, spec, tokenizer) -> Prepared:
        """The stage's data tokenized as it trains on it: "train" and, with held-out data, "heldout"."""

    def examples(self, spec, tokenizer, n: int) -> Sequence[tuple[list[int], list[int]]]:
        """The first n prepared examples as (input ids, labels), for `lifecycle inspect`."""

    def run(self, spec, inputs: StageInputs, workdir: Path) -> StageResult:
        """Train on the prepared data from the input model; the checkpoint and metrics."""


def training_stage(kind: str) -> TrainingStage:
    """The module that trains stages of `kind`."""
    return importlib.import_module(TRAINING_STAGES[kind])
