"""What every stage receives and returns: the contract between the flow and the work."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.data import Problem
from schemas.errors import LifecycleError
from schemas.spec import ModelInit

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import TrainerCallback


# the Trainer writes it last into an in-stage checkpoint: a checkpoint whose state file parses is complete
TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class Prepared:
    datasets: DatasetDict  # "train" and, when the stage has held-out data, "heldout"
    rejected: list[Problem] = field(default_factory=list)  # rows dropped under on_invalid: skip, with their reasons
    counts: dict[str, float] = field(default_factory=dict)  # what preparation cut or dropped, e.g. over-long examples


@dataclass(frozen=True)
class StageInputs:
    model: Path | ModelInit  # the input stage's checkpoint folder, or a config to build fresh weights from
    tokenizer: Path  # a Hugging Face tokenizer folder, chat template included
    datasets: DatasetDict  # "train" and, when the stage has held-out data, "heldout"
    callbacks: tuple[TrainerCallback, ...] = ()  # e.g. the recorder of per-step metrics
    reference: Path | None = None  # where reference log-probs of this input model on these datasets are kept
    # stage name -> its checkpoint, for each stage this one loads besides its input (a reward model, a teacher)
    stage_models: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class StageResult:
    # a save_pretrained folder (safetensors) with its tokenizer; a LoRA stage's adapter unless merged;
    checkpoint: Path | None
    # None: an eval stage's (nothing to log), or a stage whose checkpoint is source_run's
    adapter: Path | None = None  # a merged LoRA stage's adapter, logged beside the merged checkpoint
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from_step: int = 0  # the in-stage checkpoint training resumed from; 0 for a fresh start
    source_run: str | None = (
        None  # the run whose logged checkpoint this is (a curriculum's last part): not logged again
    )
    tables: dict[str, dict[str, list]] = field(default_factory=dict)  # file name -> columns, logged with the run as
    # MLflow tables (the UI shows them as tables), e.g. sampled completions and their rewards
    tags: dict[str, str] = field(default_factory=dict)  # what the stage chose on this machine (its attention
    # kernel, its precision), logged as the run's lifecycle.<name> tags
    counts: dict[str, float] = field(default_factory=dict)  # what the stage counted (rows trained on, steps taken,
    # parameters): logged as the run's params, beside its settings, not as one-point charts


def columns_of(rows: list[dict]) -> dict[str, list]:
    """Rows that share their keys, as one list per key (in the first row's key order): the shape
    `MlflowClient.log_table` takes."""
    return {key: [row[key] for row in rows] for key in (rows[0] if rows else {})}


class ModelError(LifecycleError, ValueError):
    """A stage's model cannot do what the spec asks of it (a LoRA target it lacks, a base that is gone or changed)."""


# A LoRA stage's checkpoint is a PEFT adapter folder; this file in it names the base folder it applies to.
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).exists()


def adapter_base(folder: Path) -> Path:
    return Path(json.loads((Path(folder) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"])


# In the tokenizer stage's folder: the tokens it added to a user's tokenizer ({token: id}); their rows are new in the
# model.
ADDED_TOKENS = "lifecycle_added_tokens.json"


def added_token_ids(tokenizer_folder: Path) -> list[int]:
    path = Path(tokenizer_folder) / ADDED_TOKENS
    return sorted(json.loads(path.read_text()).values()) if path.exists() else []


def point_adapter_at(folder: Path, base: Path) -> None:
    """Make an adapter name `base` as the folder it applies to (the folder it was trained on may be on another
    machine)."""
    path = Path(folder) / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(base)
    path.write_text(json.dumps(config, indent=2))
