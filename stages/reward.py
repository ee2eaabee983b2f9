"""The reward stage: a scalar head on the input model, trained on preference pairs (Bradley-Terry).

The model is the input checkpoint as a sequence classifier with one output: the reward of a
prompt and reply is the head's value at the reply's last token. Pairs are scored in one
forward and the loss is −log σ(r_chosen − r_rejected). It reports the held-out accuracy
(chosen rewarded above rejected) before and after. The output loads with
`AutoModelForSequenceClassification` and scores replies through `rewards`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from torch import Tensor
from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

from schemas.spec import RewardStage
from stages.candidates import CandidatesCollator, encode, examples, prepare, train
from stages.checkpoint import load_model
from stages.contract import StageInputs, StageResult
from stages.losses import bradley_terry_loss
from stages.metrics import preference
from stages.training import ObjectiveTrainer

__all__ = ["examples", "prepare", "run"]  # the TrainingStage protocol (stages/__init__.py)


def pair_rewards(model, batch: dict[str, Tensor]) -> Tensor:
    """The reward of every candidate of every row: [rows, candidates]."""
    rows, candidates = batch["scores"].shape
    return (
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        .logits.float()
        .view(rows, candidates)
    )


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


@torch.no_grad()
def candidate_rewards(model, dataset: Dataset, pad_id: int, batch_size: int = 32) -> Tensor:
    """Rewards of every candidate of every row of a dataset (rows of equal length): [rows, candidates]."""
    was_training = model.training
    model.eval()
    collate = CandidatesCollator(pad_id)
    rewards = [
        pair_rewards(model, collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]))
        for start in range(0, len(dataset), batch_size)
    ]
    model.train(was_training)
    return torch.cat(rewards)


def rewards(model, tokenizer, prompts: list[list[dict]], replies: list[str], template: str) -> list[float]:
    """The reward model's score of each reply to its prompt, rendered through the template it was trained with."""
    listed = [(prompt, [reply], [0.0]) for prompt, reply in zip(prompts, replies)]
    dataset, _ = encode(listed, tokenizer, tokenizer.model_max_length, template)
    return candidate_rewards(model, dataset, tokenizer.pad_token_id)[:, 0].tolist()


def run(spec: RewardStage, inputs: StageInputs, workdir: Path) -> StageResult:
    set_seed(spec.train.seed)
    model = load_model(
        inputs.model, AutoTokenizer.from_pretrained(inputs.tokenizer), AutoModelForSequenceClassification, num_labels=1
    )

    def measure(model, rows: Dataset) -> dict[str, float]:
        pairs = candidate_rewards(model, rows, model.config.pad_token_id)
        return {f"reward_{k}": v for k, v in preference(pairs[:, 0], pairs[:, 1]).items()}

    return train(spec, inputs, workdir, model, dict(inputs.datasets), RewardTrainer, measure, task_type="SEQ_CLS")
