"""The GRPO stage: sample a group of completions per prompt, score them, train on group-relative advantages.

Each optimizer step takes `train.batch_size` prompts and, for each, samples `group_size`
completions from the current policy through the stage's chat template (temperature, top-p,
max_new_tokens; a completion ends at the end of its turn, or calls the spec's tools and goes on:
stages/common/rollouts.py). The rewards declared in the spec
score every completion (stages/common/reward_functions.py); a completion's advantage is its reward against its
group's (stages/common/losses.group_advantages), and the loss is GRPO's clipped surrogate with an
optional k3 KL to the reference (stages/common/losses.grpo_loss). With `iterations` μ > 1 the same
samples are trained on μ times: the sampler hands the same prompts back μ times in a row, and
the importance ratio is taken against the log-probs the policy gave when it sampled them.

Three small steps in the Trainer's `compute_loss`: sample (or take the buffered samples), score,
update. Per step the run logs the reward (overall and per function), its spread, the clip
fraction, the KL, completion lengths and the share of groups whose rewards were all equal (they
teach nothing); every `log_samples` steps a batch's completions and rewards are kept, and logged
with the run as the table `grpo_samples.json`. On held-out prompts the stage answers greedily before and
after training: task accuracy (the reference answer in the reply) and the mean reward.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from datasets import Dataset

from schemas.spec import GRPOStage
from stages.common.contract import StageInputs, StageResult, columns_of
from stages.common.generation import Sampling
from stages.common.losses import group_advantages, grpo_loss
from stages.common.progress import say
from stages.common.recipe import fit, save
from stages.common.reward_functions import RewardFunction
from stages.common.rollouts import (
    RolloutTrainer,
    Samples,
    as_sampled,
    examples,
    prepare,
    rollout,
    rollout_trainer,
)
from stages.common.tools import Toolbox

__all__ = ["examples", "prepare", "run"]  # the TrainingStage protocol (stages/__init__.py)

SAMPLES_TABLE = "grpo_samples.json"


class GRPOTrainer(RolloutTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.copies = self.spec.group_size

    def samples(self, model, inputs: dict) -> Samples:
        spec = self.spec
        replies, sequences, attention_mask, trained = self.replies(model, inputs)
        grouped = replies.total.view(-1, spec.group_size)
        advantages = group_advantages(grouped, spec.scale, baseline=spec.advantage).view(-1).to(self.args.device)
        self.record(advantage_abs=advantages.abs().mean(), zero_variance_groups=(grouped.std(1) == 0).float())
        samples = Samples(sequences, attention_mask, trained, advantages, None, spec.iterations - 1)
        if spec.iterations > 1:  # the ratio of the later updates is taken against the policy that sampled
            with as_sampled(model):
                samples = replace(samples, old_logps=samples.logps(model, spec.temperature))
        return samples

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        spec = self.spec
        samples = self.samples_for(model, inputs)
        logps = samples.logps(model, spec.temperature)
        reference = self.reference_logps(model, samples)
        old = samples.old_logps if samples.old_logps is not None else logps.detach()
        loss, figures = grpo_loss(
            logps,
            old,
            samples.advantages,
            samples.completion_mask,
            spec.epsilon_low,
            spec.epsilon_high,
            spec.beta,
            reference,
            spec.aggregation,
            spec.max_new_tokens,
            spec.ratio,
        )
        self.record(**figures)
        return loss


def first_groups(
    model, tokenizer, rows: Dataset, spec: GRPOStage, rewards: list[RewardFunction], tools: Toolbox | None
) -> dict[str, float]:
    """A cheap sanity pass before any update: the groups of the first prompts, sampled from the input policy and scored.

    GRPO learns only from a group whose rewards differ (an all-equal group has zero advantage everywhere). Prompts
    the policy never answers right at this temperature give all-zero groups, and the whole run would then change
    nothing: that is said here, with what to change, rather than found out after the run. Sampled with a generator of
    its own, so the training's draws are those of a run without this pass."""
    was_training = model.training
    step = spec.train.batch_size  # sampled a step's prompts at a time, as training does
    sampling = Sampling(spec.temperature, spec.top_p, spec.max_new_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.train.seed)
        grouped = torch.cat(
            [
                rollout(
                    model,
                    tokenizer,
                    rows["prompt_ids"][start : start + step],
                    rows["messages"][start : start + step],
                    rows["answer"][start : start + step],
                    spec,
                    rewards,
                    tools,
                    sampling,
                    copies=spec.group_size,
                ).total.view(-1, spec.group_size)
                for start in range(0, len(rows), step)
            ]
        )
    model.train(was_training)
    informative = int((grouped.std(1) > 0).sum())
    say(
        f"{spec.name}  first {len(rows)} prompts x {spec.group_size} completions at temperature {spec.temperature:g}: "
        f"mean reward {float(grouped.mean()):.3g}, {informative} of {len(rows)} groups with rewards that differ"
    )
    if not informative:
        logging.getLogger(__name__).warning(
            "stage %s: every group of the first %d prompts got equal rewards from the input model, so those prompts "
            "teach GRPO nothing; if most of the data is like them the run will not move: raise the temperature, "
            "give prompts the model sometimes answers right, or add a reward that tells near misses apart",
            spec.name,
            len(rows),
        )
    return {"first_mean_reward": float(grouped.mean()), "first_informative_groups": informative / len(rows)}


def run(spec: GRPOStage, inputs: StageInputs, workdir: Path) -> StageResult:
    trainer = rollout_trainer(spec, inputs, workdir, GRPOTrainer)
    # a step's prompts or 32, whichever is more: a few prompts can all be answered alike where most are not
    train = trainer.train_dataset
    sanity = train.select(range(min(len(train), max(spec.train.batch_size, 32))))
    # on the Trainer's device
    reach = first_groups(trainer.model, trainer.processing_class, sanity, spec, trainer.rewards, trainer.tools)
    metrics, resumed_from = fit(trainer, trainer.measure)
    return save(
        spec, inputs, trainer, workdir, metrics | reach, resumed_from, {SAMPLES_TABLE: columns_of(trainer.kept)}
    )
