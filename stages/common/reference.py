"""The reference of the DPO family: the input model as it came in, had one of three ways.

A frozen copy (full fine-tuning); the same weights with the LoRA adapters switched off (no second
copy in memory); or the reference's log-probs of every training candidate, computed once before
training and kept beside the prepared data, keyed by the input checkpoint's fingerprint (no
reference forward per step). DPO and KTO score the same candidate layout (stages/common/candidates.py),
so one trainer base serves both: `reference_logps` gives the reference's summed log-prob of every
candidate of a batch, [rows, candidates], whichever way the stage has it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import PreTrainedModel

from schemas.spec import GRPOStage, ReferenceStage
from stages.common.candidates import candidate_logps, scored
from stages.common.contract import StageInputs
from stages.common.folders import partial_folder, publish
from stages.common.training import ObjectiveTrainer, use_bf16

REFERENCE_FILE = "reference_logps.safetensors"


class ReferenceTrainer(ObjectiveTrainer):
    """An objective that compares the policy with the reference (the stage's spec says how it is had)."""

    def __init__(self, *args, reference_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference_model = reference_model.to(self.args.device) if reference_model is not None else None

    @torch.no_grad()
    def reference_logps(self, model, batch: dict[str, Tensor]) -> Tensor:
        match self.spec.reference_strategy():
            case "precomputed":
                return batch["reference_logps"]
            case "frozen":
                return candidate_logps(self.reference_model, batch)[0]
            case "adapter-off":
                with self.accelerator.unwrap_model(model).disable_adapter():
                    return candidate_logps(model, batch)[0]


def precomputed_reference(model, dataset: Dataset, pad_id: int, folder: Path, autocast: bool) -> list[list[float]]:
    """The input model's summed log-probs of every training candidate, computed once and kept in `folder`."""
    path = folder / REFERENCE_FILE
    if not path.exists():
        sums = torch.tensor(scored(model, dataset, pad_id, autocast=autocast, length_normalised=False))
        partial = partial_folder(folder)
        save_file({"train": sums}, str(partial / REFERENCE_FILE))
        publish(partial, folder)
    return load_file(str(path))["train"].tolist()


@dataclass(frozen=True)
class Reference:
    """The reference as the stage's ReferenceTrainer reads it: the training rows (with the reference's log-probs as a
    column when they are precomputed) and a frozen copy of the input model when the reference is frozen."""

    datasets: dict
    model: PreTrainedModel | None


def attach(spec: ReferenceStage | GRPOStage, inputs: StageInputs, model: PreTrainedModel, tokenizer) -> Reference:
    """The reference of the input model as it came in (call it before `adapt`): a frozen copy when the reference is
    frozen; when it is precomputed, the reference's log-probs as a column of the training rows; nothing more when the
    adapters are switched off for it (or the loss needs none)."""
    datasets = dict(inputs.datasets)
    strategy = spec.reference_strategy()
    if strategy == "precomputed":
        autocast = use_bf16(spec.train.precision)  # the precision the policy trains in
        reference = precomputed_reference(model, datasets["train"], tokenizer.pad_token_id, inputs.reference, autocast)
        datasets["train"] = datasets["train"].add_column("reference_logps", reference)
    frozen = copy.deepcopy(model).eval().requires_grad_(False) if strategy == "frozen" else None
    return Reference(datasets, frozen)
