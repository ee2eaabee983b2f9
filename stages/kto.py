"""The KTO stage: Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on completions labelled good or bad.

A row is a prompt, one completion and its label, desirable or undesirable; a preference pair arrives as two
rows, chosen desirable and rejected undesirable (the `unpaired` format, schemas/formats.py). The loss
(stages/common/losses.py) pushes a desirable completion's implied reward β·log π/π_ref above the reference point z₀
and an undesirable one's below it, weighted λ_D and λ_U.

z₀ is the paper's estimate of KL(π_θ ‖ π_ref): the mean log-ratio of mismatched pairs, each row's prompt with
a completion of another prompt, detached and clamped at 0. Each row's mismatched completion is drawn once,
when the data is prepared (as TRL's KTOTrainer fixes its KL pairs), so the reference's log-probs of both can
be precomputed like DPO's; a batch's z₀ averages its rows' mismatched pairs, scored by the policy without
gradients. So a training row is the DPO family's candidate layout (stages/common/candidates.py) with two candidates,
its completion and the mismatched one, scored [1, 0] when desirable and [0, 0] when not (the mismatched
candidate's score is unused); the reference is DPO's, a frozen copy, the adapters switched off, or
precomputed (stages/common/reference.py). A held-out row is its completion alone.

Per step it logs the implied rewards of desirable and undesirable completions, their margin, their log-probs
and z₀ (`reference_point`); on held-out rows, the model's mean per-token log-prob of desirable and of
undesirable completions and their gap, before and after.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import polars as pl
import torch
from datasets import Dataset

from schemas.data import DataError, Problem, read_files
from schemas.sources import files_of
from schemas.spec import KTOStage
from stages.common import candidates
from stages.common.candidates import (
    Listed,
    candidate_logps,
    candidates_trainer,
    encode,
    nth_candidate,
    on_heldout,
    scored,
)
from stages.common.contract import Prepared, StageInputs, StageResult
from stages.common.losses import kto_loss, kto_reference_point
from stages.common.recipe import adapt, fit, load, save
from stages.common.reference import ReferenceTrainer, attach
from stages.common.templates import conversations

__all__ = ["examples", "prepare", "run"]  # the TrainingStage protocol (stages/__init__.py)

MISMATCH_SEED = 0  # the draw of mismatched completions is part of the prepared data, not of a training run's seed
ADVISED_RATIO = (1.0, 4 / 3)  # the paper's range for λ_D·n_D / (λ_U·n_U)


def labelled(frame: pl.DataFrame) -> Listed:
    """One row per labelled completion, as (prompt messages, [completion], [1 if desirable else 0]): a pair's line gives
    two."""
    return [
        (prompt, [completion], [float(label)])
        for prompt, completions, labels in zip(
            conversations(frame, "prompt_"), frame["completions"].to_list(), frame["labels"].to_list()
        )
        for completion, label in zip(completions, labels)
    ]


def mismatched(prompts: list[list[dict]]) -> list[int]:
    """For each row, the row whose completion it is paired with to estimate z₀: the next row of a fixed shuffle whose
    prompt differs (the two rows of a pair share theirs, and a matched pair would bias z₀ toward the labelled data)."""
    keys = [json.dumps(prompt, sort_keys=True) for prompt in prompts]
    if len(set(keys)) < 2:
        raise ValueError("every row has the same prompt: KTO's reference point needs completions of other prompts")
    order = list(range(len(keys)))
    random.Random(MISMATCH_SEED).shuffle(order)
    partner = [0] * len(order)
    for at, row in enumerate(order):
        step = 1
        while keys[order[(at + step) % len(order)]] == keys[row]:
            step += 1
        partner[row] = order[(at + step) % len(order)]
    return partner


def with_mismatched(listed: Listed) -> Listed:
    """Each row's completion and, as its second candidate, the completion of its mismatched row."""
    partner = mismatched([prompt for prompt, _, _ in listed])
    return [
        (prompt, [*completion, listed[other][1][0]], [*score, 0.0])
        for (prompt, completion, score), other in zip(listed, partner)
    ]


def prepare(spec: KTOStage, tokenizer) -> Prepared:
    def listing(frame: pl.DataFrame, split: str) -> Listed:
        listed = labelled(frame)
        if split != "train":
            return listed
        try:
            return with_mismatched(listed)
        except ValueError as err:
            raise DataError([Problem(path, 0, "(file)", str(err)) for path in files_of(spec.data)]) from None

    return candidates.prepare(spec, tokenizer, listing)


def examples(spec: KTOStage, tokenizer, n: int) -> list[tuple[list[int], list[int]]]:
    """The first n labelled completions as the stage encodes them: (input_ids, labels)."""
    listed = labelled(read_files(spec.data, spec.data_format, spec.on_invalid).frame.head(n))[:n]
    dataset, _ = encode(listed, tokenizer, spec.max_len, spec.template)
    return [(row["input_ids"][0], row["labels"][0]) for row in dataset]


class KTOTrainer(ReferenceTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        spec = self.spec
        completion, other = nth_candidate(inputs, 0), nth_candidate(inputs, 1)
        policy = candidate_logps(model, completion)[0][:, 0]
        with torch.no_grad():  # z₀ is a baseline the policy cannot move: its pairs need no gradient
            policy_mismatched = candidate_logps(model, other)[0][:, 0]
        reference = self.reference_logps(model, inputs)
        z0 = kto_reference_point(policy_mismatched, reference[:, 1])
        desirable = inputs["scores"][:, 0] > 0
        losses, rewards = kto_loss(
            policy, reference[:, 0], desirable, z0, spec.beta, spec.desirable_weight, spec.undesirable_weight
        )
        figures = {"reference_point": z0}
        for side, rows in (("desirable", desirable), ("undesirable", ~desirable)):
            if rows.any():
                figures |= {f"rewards/{side}": rewards[rows], f"logps/{side}": policy[rows].detach()}
        if desirable.any() and not desirable.all():
            figures["rewards/margin"] = rewards[desirable].mean() - rewards[~desirable].mean()
        self.record(**figures)
        return losses.mean()


def heldout_metrics(model, rows: Dataset, pad_id: int) -> dict[str, float]:
    """The model's mean per-token log-prob of desirable and of undesirable completions, and the gap between them."""
    scores = torch.tensor([row[0] for row in scored(model, rows, pad_id)])
    desirable = torch.tensor([row[0] > 0 for row in rows["scores"]])
    found = {
        f"{side}_logps": float(scores[kept].mean())
        for side, kept in (("desirable", desirable), ("undesirable", ~desirable))
        if kept.any()
    }
    if len(found) == 2:
        found["desirable_margin"] = found["desirable_logps"] - found["undesirable_logps"]
    return found


def weight_ratio(spec: KTOStage, dataset: Dataset) -> dict[str, float]:
    """λ_D·n_D / (λ_U·n_U) of the training rows, with a warning where it leaves the paper's advised [1, 4/3]."""
    n_desirable = sum(row[0] > 0 for row in dataset["scores"])
    n_undesirable = len(dataset) - n_desirable
    found = {"train_desirable_rows": float(n_desirable), "train_undesirable_rows": float(n_undesirable)}
    if not (n_desirable and n_undesirable):
        return found
    ratio = spec.desirable_weight * n_desirable / (spec.undesirable_weight * n_undesirable)
    low, high = ADVISED_RATIO
    if not low <= ratio <= high:
        advised = spec.undesirable_weight * n_undesirable / n_desirable
        logging.getLogger(__name__).warning(
            "stage %s: desirable_weight · %d desirable / (undesirable_weight · %d undesirable) is %.3g, outside the "
            "[1, 4/3] the KTO paper advises; with undesirable_weight %g, a desirable_weight in [%.3g, %.3g] is",
            spec.name,
            n_desirable,
            n_undesirable,
            ratio,
            spec.undesirable_weight,
            advised * low,
            advised * high,
        )
    return found | {"desirable_weight_ratio": ratio}


def run(spec: KTOStage, inputs: StageInputs, workdir: Path) -> StageResult:
    tokenizer, model = load(spec, inputs)
    reference = attach(spec, inputs, model, tokenizer)
    model = adapt(spec, inputs, model)
    datasets = reference.datasets
    balance = weight_ratio(spec, datasets["train"])
    trainer = candidates_trainer(
        spec, inputs, model, tokenizer, workdir, datasets, KTOTrainer, reference_model=reference.model
    )
    measure = on_heldout(datasets, lambda rows: heldout_metrics(model, rows, tokenizer.pad_token_id))
    metrics, resumed_from = fit(trainer, measure)
    return save(spec, inputs, trainer, workdir, metrics, resumed_from, counts=balance)
