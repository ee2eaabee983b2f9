"""The DPO stage: preference pairs, one loss family, three ways to have the reference.

The policy is the input model (or LoRA adapters on it). The reference is the input model as
it came in: a frozen copy (full fine-tuning), the same weights with the adapters switched off
(LoRA: no second copy in memory), or log-probs computed once before training and kept beside
the prepared data, keyed by the input checkpoint's fingerprint (no reference forward per step).
ORPO and SimPO need no reference. Per step it logs the implicit rewards of chosen and rejected
replies, their margin and accuracy, and the policy's log-probs; on held-out pairs it measures
the model's own preference accuracy and margin before and after. The reference machinery is
shared with KTO (stages/common/reference.py).
"""

from __future__ import annotations

from pathlib import Path

from schemas.spec import DPOStage
from stages.common.candidates import candidate_logps, candidates_trainer, examples, preference_measure, prepare
from stages.common.contract import StageInputs, StageResult
from stages.common.losses import dpo_loss, orpo_loss, simpo_loss
from stages.common.recipe import adapt, fit, load, save
from stages.common.reference import ReferenceTrainer, attach

__all__ = ["examples", "prepare", "run"]  # the TrainingStage protocol (stages/__init__.py)


class DPOTrainer(ReferenceTrainer):
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
            losses, chosen, rejected = dpo_loss(
                policy[0][:, 0],
                policy[0][:, 1],
                policy[1][:, 0],
                policy[1][:, 1],
                spec.beta,
                spec.loss,
                spec.label_smoothing,
            )
            self.record(
                **{
                    "rewards/chosen": chosen,
                    "rewards/rejected": rejected,
                    "rewards/margin": chosen - rejected,
                    "rewards/accuracy": (chosen > rejected).float(),
                }
            )
        logps = means if spec.mean_logps() else sums
        self.record(**{"logps/chosen": logps[:, 0].detach(), "logps/rejected": logps[:, 1].detach()})
        return losses.mean()  # ORPO's is already a scalar: its NLL is a token-mean over the batch


def run(spec: DPOStage, inputs: StageInputs, workdir: Path) -> StageResult:
    tokenizer, model = load(spec, inputs)
    reference = attach(spec, inputs, model, tokenizer)
    model = adapt(spec, inputs, model)
    datasets = reference.datasets
    trainer = candidates_trainer(
        spec, inputs, model, tokenizer, workdir, datasets, DPOTrainer, reference_model=reference.model
    )
    metrics, resumed_from = fit(trainer, preference_measure(model, tokenizer, datasets))
    return save(spec, inputs, trainer, workdir, metrics, resumed_from)
