"""The Tuna stage (Li et al. 2023): a margin ranking loss over ranked lists, plus MLE on every candidate.

Candidates are sorted best first and scored by their length-normalised log-probs. Every pair
at rank distance i must keep the better one ahead by margin·i (stages/common/losses.py), and the
token-mean NLL over all candidates, weighted by mle_weight, keeps the model fluent on all
of them, as in the paper's released code. Lists shorter than the longest are left out, and counted.
"""

from __future__ import annotations

from pathlib import Path

from schemas.spec import TunaStage
from stages.common.candidates import (
    candidate_logps,
    candidates_trainer,
    examples,
    preference_measure,
    prepare,
    with_length,
)
from stages.common.contract import StageInputs, StageResult
from stages.common.losses import tuna_loss
from stages.common.recipe import adapt, fit, load, save
from stages.common.training import ObjectiveTrainer

__all__ = ["examples", "prepare", "run"]  # the TrainingStage protocol (stages/__init__.py)


class TunaTrainer(ObjectiveTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sums, counts = candidate_logps(model, inputs)
        ranking = tuna_loss(sums / counts.clamp(min=1), self.spec.margin)
        mle = -sums.sum() / counts.sum()
        self.record(ranking_loss=ranking.detach(), mle_loss=mle.detach())
        return ranking + self.spec.mle_weight * mle


def run(spec: TunaStage, inputs: StageInputs, workdir: Path) -> StageResult:
    tokenizer, model = load(spec, inputs)
    model = adapt(spec, inputs, model)
    datasets, lists = with_length(inputs.datasets, None)
    trainer = candidates_trainer(spec, inputs, model, tokenizer, workdir, datasets, TunaTrainer)
    metrics, resumed_from = fit(trainer, preference_measure(model, tokenizer, datasets))
    return save(spec, inputs, trainer, workdir, metrics, resumed_from, counts=lists)
