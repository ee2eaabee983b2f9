"""A trained reward model's scores: of candidates as the reward stage trains them, and of replies to prompts as GRPO
and the eval stage ask for them. The reward stage (stages/reward.py) trains the model; this scores with one."""

from __future__ import annotations

import torch
from datasets import Dataset
from torch import Tensor

from stages.common.candidates import CandidatesCollator, encode


def pair_rewards(model, batch: dict[str, Tensor]) -> Tensor:
    """The reward of every candidate of every row: [rows, candidates]."""
    rows, candidates = batch["scores"].shape
    return (
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        .logits.float()
        .view(rows, candidates)
    )


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


def scores(model, tokenizer, prompts: list[list[dict]], replies: list[str], template: str) -> list[float]:
    """The reward model's score of each reply to its prompt, rendered through the template it was trained with."""
    listed = [(prompt, [reply], [0.0]) for prompt, reply in zip(prompts, replies)]
    dataset, _ = encode(listed, tokenizer, tokenizer.model_max_length, template)
    return candidate_rewards(model, dataset, tokenizer.pad_token_id)[:, 0].tolist()
