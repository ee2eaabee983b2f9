"""The PRO stage: Preference Ranking Optimization (Song et al. 2023) on ranked lists.

Each prompt's candidates, sorted best first by score, are scored by the policy with their
length-normalised log-probs. The loss is PRO's listwise one, summed over k = 1..n−1 (the
best of the remaining candidates against all below it, each comparison weighted by the score
difference), plus an SFT term on the best candidate weighted by sft_weight·(n−1)², as in the
paper's released code (stages/common/losses.py).

A stage with `curriculum: [2, 3, 4]` is run as successive sub-stages, each a child run on
lists cut to their n best candidates and fed the previous one's checkpoint. The paper trains
one list length per run; growing it from run to run is ours. Each sub-stage here is one run
on one n: rows with fewer than n candidates are left out of it, and counted.
"""

from __future__ import annotations

from pathlib import Path

from schemas.spec import PROStage
from stages.common.candidates import (
    candidate_logps,
    candidates_trainer,
    examples,
    preference_measure,
    prepare,
    with_length,
)
from stages.common.contract import StageInputs, StageResult
from stages.common.losses import pro_loss, pro_sft_weight
from stages.common.recipe import adapt, fit, load, save
from stages.common.training import ObjectiveTrainer

__all__ = ["examples", "prepare", "run"]  # the TrainingStage protocol (stages/__init__.py)


class PROTrainer(ObjectiveTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sums, counts = candidate_logps(model, inputs)
        scores = sums / counts.clamp(min=1)
        ranking = pro_loss(scores, inputs["scores"], self.spec.reward_weighting).mean()
        sft = -sums[:, 0].mean()  # the best candidate's summed NLL, as the released code has it
        self.record(
            ranking_loss=ranking.detach(),
            sft_loss=sft.detach(),
            score_best=scores[:, 0].detach(),
            score_rest=scores[:, 1:].detach(),
        )
        return ranking + pro_sft_weight(self.spec.sft_weight, scores.shape[1]) * sft


def run(spec: PROStage, inputs: StageInputs, workdir: Path) -> StageResult:
    tokenizer, model = load(spec, inputs)
    model = adapt(spec, inputs, model)
    datasets, lists = with_length(inputs.datasets, spec.curriculum[-1] if spec.curriculum else None)
    trainer = candidates_trainer(spec, inputs, model, tokenizer, workdir, datasets, PROTrainer)
    metrics, resumed_from = fit(trainer, preference_measure(model, tokenizer, datasets))
    return save(spec, inputs, trainer, workdir, metrics, resumed_from, counts=lists)
