"""The GRPO stage: sample a group of completions per prompt, score them, train on group-relative advantages.

Each optimizer step takes `train.batch_size` prompts and, for each, samples `group_size`
completions from the current policy through the stage's chat template (temperature, top-p,
max_new_tokens; a completion ends at the end of its turn). The rewards declared in the spec
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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from torch import Tensor
from torch.utils.data import Sampler

from schemas.data import read_files
from schemas.rewards import AnswerReward
from schemas.spec import GRPOStage
from stages.common.contract import Prepared, StageInputs, StageResult, columns_of
from stages.common.generation import Sampling, decode, generate, stop_ids
from stages.common.losses import group_advantages, grpo_loss
from stages.common.progress import say, short_of_a_batch
from stages.common.recipe import adapt, fit, load, make_trainer, save
from stages.common.reference import attach
from stages.common.reward_functions import (
    RewardError,
    RewardFunction,
    answer_matches,
    checked_rewards,
    reward_functions,
    weighted_total,
)
from stages.common.templates import IGNORE, conversations, encode_prompt, end_of_turn_id
from stages.common.training import ObjectiveTrainer

__all__ = ["examples", "prepare", "run"]  # the TrainingStage protocol (stages/__init__.py)

SAMPLES_TABLE = "grpo_samples.json"


def prepare(spec: GRPOStage, tokenizer) -> Prepared:
    """Prompts through the template (the assistant header included), at most max_len - max_new_tokens tokens (longer
    ones dropped, counted)."""
    splits, rejected, counts = {}, [], {}
    needs_answer = any(isinstance(r, AnswerReward) for r in spec.rewards)
    for split, files in (("train", spec.data), ("heldout", spec.heldout)):
        if not files:
            continue
        read = read_files(files, "prompts", spec.on_invalid, spec.mix if split == "train" else None)
        counts |= {f"{split}_{name}": float(value) for name, value in read.counts.items()}
        messages, answers = conversations(read.frame, "prompt_"), read.frame["answer"].to_list()
        if needs_answer and (missing := next((m for m, a in zip(messages, answers) if a is None), None)):
            raise RewardError(
                f"stage {spec.name}: the answer reward needs an `answer` on every prompt, and "
                f"{', '.join(source.name for source in files)} has none for {missing[-1]['content']!r}"
            )
        encoded = [encode_prompt(m, tokenizer, spec.template) for m in messages]
        keep = [i for i, ids in enumerate(encoded) if len(ids) + spec.max_new_tokens <= spec.max_len]
        counts[f"{split}_dropped"] = float(len(encoded) - len(keep))
        splits[split] = Dataset.from_dict(
            {
                "prompt_ids": [encoded[i] for i in keep],
                "messages": [messages[i] for i in keep],
                "answer": [answers[i] for i in keep],
                "row": list(range(len(keep))),
            }
        )
        rejected += read.rejected
    prepared = Prepared(DatasetDict(splits), rejected, counts)
    short_of_a_batch(spec.name, prepared, spec.train.batch_size)
    return prepared


def examples(spec: GRPOStage, tokenizer, n: int) -> list[tuple[list[int], list[int]]]:
    """The first n prompts as the policy sees them; nothing in them is trained (the completions are sampled)."""
    read = read_files(spec.data, "prompts", spec.on_invalid)
    return [
        (ids, [IGNORE] * len(ids))
        for ids in (encode_prompt(m, tokenizer, spec.template) for m in conversations(read.frame.head(n), "prompt_"))
    ]


class RepeatedBatches(Sampler[int]):
    """A seeded permutation of the prompts in blocks of one optimizer step's prompts, each block given `times` times in
    a row
    (GRPO's μ updates on the same samples). A last block short of a full step is left out of that epoch."""

    def __init__(self, rows: int, block: int, times: int, seed: int):
        self.rows, self.block, self.times, self.seed, self.epoch = rows, block, times, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.rows, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        for start in range(0, self.rows - self.block + 1, self.block):
            for _ in range(self.times):
                yield from order[start : start + self.block]

    def __len__(self) -> int:
        return self.rows // self.block * self.block * self.times


@dataclass(frozen=True)
class PromptCollator:
    pad_id: int

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["prompt_ids"]) for f in features)
        return {
            "input_ids": torch.tensor(
                [[self.pad_id] * (width - len(f["prompt_ids"])) + f["prompt_ids"] for f in features]
            ),
            "attention_mask": torch.tensor(
                [[0] * (width - len(f["prompt_ids"])) + [1] * len(f["prompt_ids"]) for f in features]
            ),
            "row": torch.tensor([f["row"] for f in features]),
            "messages": [f["messages"] for f in features],
            "answer": [f["answer"] for f in features],
        }


@dataclass
class Samples:
    """One batch's sampled completions, scored: what μ updates train on."""

    sequences: Tensor  # [N, W + T]: left-padded prompt, completion, right padding
    attention_mask: Tensor  # [N, W + T]
    completion_mask: Tensor  # [N, T]: 1 on the completion's tokens, its stop token included
    advantages: Tensor  # [N]
    old_logps: Tensor | None  # [N, T]: the sampling policy's, for μ > 1
    uses_left: int


def completion_logps(model, samples: Samples, temperature: float) -> Tensor:
    """log π(o_t | q, o_<t) of every completion token, [N, T], π being the policy the completions were sampled from:
    the model's logits divided by the sampling temperature. Positions count from each prompt's first real token."""
    width = samples.sequences.shape[1] - samples.completion_mask.shape[1]
    positions = (samples.attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = (
        model(
            input_ids=samples.sequences, attention_mask=samples.attention_mask, position_ids=positions, use_cache=False
        )
        .logits[:, width - 1 : -1]
        .float()
        / temperature
    )
    targets = samples.sequences[:, width:]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


class GRPOTrainer(ObjectiveTrainer):
    def __init__(self, *args, rewards: list[RewardFunction], reference_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rewards = rewards
        self.reference_model = reference_model.to(self.args.device) if reference_model is not None else None
        self.stops = stop_ids(self.processing_class, end_of_turn_id(self.processing_class, self.spec.template))
        self.buffer: dict[tuple[int, ...], Samples] = {}
        self.kept: list[dict] = []  # completions and rewards every log_samples steps

    def _get_train_sampler(self, train_dataset=None) -> Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        block = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return RepeatedBatches(len(dataset), block, self.spec.iterations, self.args.seed)

    @torch.no_grad()
    def sample(self, model, inputs: dict) -> Samples:
        spec, tokenizer, group = self.spec, self.processing_class, self.spec.group_size
        policy = self.accelerator.unwrap_model(model)
        started = time.perf_counter()
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        groups = sample_groups(
            policy, tokenizer, self.stops, prompts, inputs["messages"], inputs["answer"], spec, self.rewards
        )
        policy.train()
        sampled, scores, grouped = groups.sampled, groups.scores, groups.grouped
        generating = time.perf_counter() - started
        width = max(map(len, sampled))
        completions = torch.tensor(
            [ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in sampled], device=self.args.device
        )
        completion_mask = torch.tensor(
            [[1] * len(ids) + [0] * (width - len(ids)) for ids in sampled], device=self.args.device
        )
        total = grouped.view(-1)
        samples = Samples(
            sequences=torch.cat([inputs["input_ids"].repeat_interleave(group, 0), completions], 1),
            attention_mask=torch.cat([inputs["attention_mask"].repeat_interleave(group, 0), completion_mask], 1),
            completion_mask=completion_mask,
            advantages=group_advantages(grouped, spec.scale, baseline=spec.advantage).view(-1).to(self.args.device),
            old_logps=None,
            uses_left=spec.iterations - 1,
        )
        if spec.iterations > 1:
            samples.old_logps = completion_logps(model, samples, spec.temperature)
        lengths = completion_mask.sum(1).float()
        self.record(
            reward=total.mean(),
            reward_std=total.std(),
            advantage_abs=samples.advantages.abs().mean(),
            completion_length=lengths.mean(),
            completions_stopped=torch.tensor([ids[-1] in self.stops for ids in sampled]).float(),
            zero_variance_groups=(grouped.std(1) == 0).float(),
            generation_seconds=generating,
            **{f"reward/{f.name}": s.mean() for f, s in zip(self.rewards, scores)},
        )
        if self.state.global_step % spec.log_samples == 0:
            self.kept += [
                {
                    "step": self.state.global_step,
                    "prompt": m[-1]["content"],
                    "completion": t,
                    "reward": float(r),
                    **{f.name: float(s[i]) for f, s in zip(self.rewards, scores)},
                }
                for i, (m, t, r) in enumerate(zip(groups.asked, groups.texts, total))
            ]
        return samples

    def samples_for(self, model, inputs: dict) -> Samples:
        """New samples for new prompts; the buffered ones while they have updates left (μ > 1)."""
        key = tuple(inputs["row"].tolist())
        samples = self.buffer.pop(key, None) or self.sample(model, inputs)
        if samples.uses_left:
            self.buffer[key] = Samples(**{**samples.__dict__, "uses_left": samples.uses_left - 1})
        return samples

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        spec = self.spec
        samples = self.samples_for(model, inputs)
        logps = completion_logps(model, samples, spec.temperature)
        reference = None
        if spec.beta > 0:
            with torch.no_grad():
                if self.reference_model is not None:
                    reference = completion_logps(self.reference_model, samples, spec.temperature)
                else:
                    with self.accelerator.unwrap_model(model).disable_adapter():
                        reference = completion_logps(model, samples, spec.temperature)
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


@dataclass(frozen=True)
class Groups:
    """`group_size` completions of each prompt, sampled and scored."""

    sampled: list[list[int]]  # token ids of each completion, its stop token included
    texts: list[str]
    asked: list[list[dict]]  # each completion's prompt messages
    scores: Tensor  # [rewards, N]: each reward function's score of each completion
    grouped: Tensor  # [prompts, group_size]: their weighted total


def sample_groups(
    policy,
    tokenizer,
    stops: list[int],
    prompts: list[list[int]],
    messages: list,
    answers: list,
    spec: GRPOStage,
    rewards,
) -> Groups:
    """Sample `group_size` completions of each prompt (one batch, as a training step generates them), each ending at
    its first of `stops`, and score them with every reward function."""
    group = spec.group_size
    sampled = generate(
        policy,
        [p for p in prompts for _ in range(group)],
        stops,
        tokenizer.pad_token_id,
        Sampling(spec.temperature, spec.top_p, spec.max_new_tokens),
        batch_size=len(prompts) * group,
    )
    texts = [decode(tokenizer, ids, stops).text for ids in sampled]
    asked = [m for m in messages for _ in range(group)]
    repeated = [a for a in answers for _ in range(group)]
    scores = torch.tensor(checked_rewards(rewards, asked, texts, repeated, [len(ids) for ids in sampled]))
    return Groups(sampled, texts, asked, scores, weighted_total(rewards, scores).view(len(prompts), group))


def first_groups(model, tokenizer, rows: Dataset, spec: GRPOStage, rewards: list[RewardFunction]) -> dict[str, float]:
    """A cheap sanity pass before any update: the groups of the first prompts, sampled from the input policy and scored.

    GRPO learns only from a group whose rewards differ (an all-equal group has zero advantage everywhere). Prompts
    the policy never answers right at this temperature give all-zero groups, and the whole run would then change
    nothing: that is said here, with what to change, rather than found out after the run. Sampled with a generator of
    its own, so the training's draws are those of a run without this pass."""
    was_training = model.training
    stops = stop_ids(tokenizer, end_of_turn_id(tokenizer, spec.template))
    step = spec.train.batch_size  # sampled a step's prompts at a time, as training does
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.train.seed)
        grouped = torch.cat(
            [
                sample_groups(
                    model,
                    tokenizer,
                    stops,
                    rows["prompt_ids"][start : start + step],
                    rows["messages"][start : start + step],
                    rows["answer"][start : start + step],
                    spec,
                    rewards,
                ).grouped
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


def heldout_metrics(
    model, tokenizer, rows: Dataset, spec: GRPOStage, rewards: list[RewardFunction]
) -> dict[str, float]:
    """Greedy replies to the first eval_samples held-out prompts: the share giving the reference answer, and the mean
    reward."""
    rows = rows.select(range(min(spec.eval_samples, len(rows))))
    if not len(rows):
        return {}
    stops = stop_ids(tokenizer, end_of_turn_id(tokenizer, spec.template))
    was_training = model.training
    replies = generate(
        model, rows["prompt_ids"], stops, tokenizer.pad_token_id, Sampling(max_new_tokens=spec.max_new_tokens)
    )
    model.train(was_training)
    texts = [decode(tokenizer, ids, stops).text for ids in replies]
    scores = torch.tensor(
        checked_rewards(rewards, rows["messages"], texts, rows["answer"], [len(ids) for ids in replies])
    )
    found = {"reward": float(weighted_total(rewards, scores).mean())}
    answered = [(t, a) for t, a in zip(texts, rows["answer"]) if a is not None]
    if answered:
        found["task_accuracy"] = sum(answer_matches(t, a) for t, a in answered) / len(answered)
    return found


def run(spec: GRPOStage, inputs: StageInputs, workdir: Path) -> StageResult:
    tokenizer, model = load(spec, inputs)
    reference = attach(spec, inputs, model, tokenizer)
    model = adapt(spec, inputs, model)
    rewards = reward_functions(spec.rewards, inputs.stage_models)
    datasets = reference.datasets
    # a dry run of every reward function on the first prompts, before any model time is spent
    first = datasets["train"].select(range(min(len(datasets["train"]), spec.train.batch_size)))
    checked_rewards(rewards, first["messages"], [""] * len(first), first["answer"], [0] * len(first))

    heldout = datasets.pop("heldout", None)  # measured by generation here, never by the Trainer's evaluate

    def measure() -> dict[str, float]:
        if heldout is None or not spec.eval_samples:
            return {}
        return {f"heldout_{k}": v for k, v in heldout_metrics(model, tokenizer, heldout, spec, rewards).items()}

    collator = PromptCollator(tokenizer.pad_token_id)
    trainer = make_trainer(
        spec,
        model,
        tokenizer,
        workdir,
        datasets,
        collator,
        inputs.callbacks,
        GRPOTrainer,
        spec=spec,
        rewards=rewards,
        reference_model=reference.model,
    )
    # a step's prompts or 32, whichever is more: a few prompts can all be answered alike where most are not
    sanity = datasets["train"].select(range(min(len(datasets["train"]), max(spec.train.batch_size, 32))))
    reach = first_groups(model, tokenizer, sanity, spec, rewards)  # on the Trainer's device
    metrics, resumed_from = fit(trainer, measure)
    return save(
        spec, inputs, trainer, workdir, metrics | reach, resumed_from, {SAMPLES_TABLE: columns_of(trainer.kept)}
    )
