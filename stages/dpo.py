"""The DPO stage: preference pairs, one loss family, three ways to have the reference.

The policy is the input model (or LoRA adapters on it). The reference is the input model as
it came in: a frozen copy (full fine-tuning), the same weights with the adapters switched off
(LoRA: no second copy in memory), or log-probs computed once before training and kept beside
the prepared data, keyed by the input checkpoint's fingerprint (no reference forward per step).
ORPO and SimPO need no reference. Per step it logs the implicit rewards of chosen and rejected
replies, their margin and accuracy, and the policy's log-probs; on held-out pairs it measures
the model's own preference accuracy and margin before and after.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoTokenizer, set_seed

from schemas.spec import DPOStage
from stages import candidates
from stages.candidates import candidate_logps, scored, train
from stages.checkpoint import load_model
from stages.contract import StageInputs, StageResult
from stages.losses import dpo_loss, orpo_loss, simpo_loss
from stages.training import ObjectiveTrainer, use_bf16

REFERENCE_FILE = "reference_logps.safetensors"

# every candidate stage prepares its data, and shows it to `lifecycle inspect`, the shared way
prepare, examples = candidates.prepare, candidates.examples


class DPOTrainer(ObjectiveTrainer):
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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        spec = self.spec
        sums, counts = candidate_logps(model, inputs)
        means = sums / counts.clamp(min=1)
        if spec.loss == "orpo":
            losses, nll, log_odds_ratio = orpo_loss(sums[:, 0], counts[:, 0], sums[:, 1], counts[:, 1], spec.beta)
            self.record(nll_loss=nll, log_odds_ratio=log_odds_ratio)
        elif spec.loss == "simpo":
            losses = simpo_loss(means[:, 0], means[:, 1], spec.beta, spec.gamma)
        else:
            reference = self.reference_logps(model, inputs)
            policy = (means, reference / counts.clamp(min=1)) if spec.mean_logps() else (sums, reference)
            losses, chosen, rejected = dpo_loss(policy[0][:, 0], policy[0][:, 1], policy[1][:, 0], policy[1][:, 1],
                                                spec.beta, spec.loss, spec.label_smoothing)
            self.record(**{"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margin": chosen - rejected,
                           "rewards/accuracy": (chosen > rejected).float()})
        logps = means if spec.mean_logps() else sums
        self.record(**{"logps/chosen": logps[:, 0].detach(), "logps/rejected": logps[:, 1].detach()})
        return losses.mean()  # ORPO's is already a scalar: its NLL is a token-mean over the batch


def precomputed_reference(model, dataset, pad_id: int, folder: Path, autocast: bool) -> list[list[float]]:
    """The input model's summed log-probs of every training reply, computed once and kept in `folder`."""
    path = folder / REFERENCE_FILE
    if not path.exists():
        sums = torch.tensor(scored(model, dataset, pad_id, autocast=autocast, length_normalised=False))
        # written aside under this process's id, published by one rename: a kill never leaves a half-written
        # reference where the next run would read it, and two processes never write into the same folder
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        partial.mkdir(parents=True, exist_ok=True)
        save_file({"train": sums}, str(partial / REFERENCE_FILE))
        try:
            partial.rename(folder)
        except OSError:  # another process published the same reference first: the same numbers, keep theirs
            if not path.exists():
                raise
            shutil.rmtree(partial)
    return load_file(str(path))["train"].tolist()


def run(spec: DPOStage, inputs: StageInputs, workdir: Path) -> StageResult:
    tokenizer = AutoTokenizer.from_pretrained(inputs.tokenizer)
    set_seed(spec.train.seed)
    model = load_model(inputs.model, tokenizer)
    datasets = dict(inputs.datasets)
    strategy = spec.reference_strategy()
    reference_model = copy.deepcopy(model).eval().requires_grad_(False) if strategy == "frozen" else None
    if strategy == "precomputed":
        autocast = use_bf16(spec.train.precision)  # the precision the policy trains in
        reference = precomputed_reference(model, datasets["train"], tokenizer.pad_token_id, inputs.reference, autocast)
        datasets["train"] = datasets["train"].add_column("reference_logps", reference)
    return train(spec, inputs, workdir, model, datasets, DPOTrainer, reference_model=reference_model)
