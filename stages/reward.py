"""The reward stage: a scalar head on the input model, trained on preference pairs (Bradley-Terry).

The model is the input checkpoint as a sequence classifier with one output: the reward of a
prompt and reply is the head's value at the reply's last token. Pairs are scored in one
forward and the loss is −log σ(r_chosen − r_rejected). It reports the held-out accuracy
(chosen rewarded above rejected) before and after. The output loads with
`AutoModelForSequenceClassification` and scores replies through `stages.common.reward_model.scores`.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForSequenceClassification

from schemas.spec import RewardStage
from stages.common.candidates import candidates_trainer, examples, on_heldout, prepare
from stages.common.contract import StageInputs, StageResult
from stages.common.losses import bradley_terry_loss
from stages.common.metrics import preference
from stages.common.recipe import adapt, fit, load, save
from stages.common.reward_model import candidate_rewards, pair_rewards
from stages.common.training import ObjectiveTrainer

__all__ = ["examples", "prepare", "run"]  # the TrainingStage protocol (stages/__init__.py)


class RewardTrainer(ObjectiveTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rewards = pair_rewards(model, inputs)
        chosen, rejected = rewards[:, 0], rewards[:, 1]
        self.record(
            **{
                "rewards/chosen": chosen.detach(),
                "rewards/rejected": rejected.detach(),
                "rewards/margin": (chosen - rejected).detach(),
                "rewards/accuracy": (chosen > rejected).float(),
            }
        )
        return bradley_terry_loss(chosen, rejected).mean()


def run(spec: RewardStage, inputs: StageInputs, workdir: Path) -> StageResult:
    tokenizer, model = load(spec, inputs, AutoModelForSequenceClassification, num_labels=1)
    model = adapt(spec, inputs, model, task_type="SEQ_CLS")
    datasets = inputs.datasets
    trainer = candidates_trainer(spec, inputs, model, tokenizer, workdir, datasets, RewardTrainer)

    def measure(rows: Dataset) -> dict[str, float]:
        pairs = candidate_rewards(model, rows, model.config.pad_token_id)
        return {f"reward_{k}": v for k, v in preference(pairs[:, 0], pairs[:, 1]).items()}

    metrics, resumed_from = fit(trainer, on_heldout(datasets, measure))
    return save(spec, inputs, trainer, workdir, metrics, resumed_from)
