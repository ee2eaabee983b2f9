"""What the rollout stages (grpo, ppo) share: prompts prepared, replies sampled from the policy as it trains (calling
the spec's tools on the way), scored by the spec's rewards, and the log-probs of what the policy wrote.

A reply is one or more turns of the policy. Where the stage has `tools`, a turn that ends calling them (the template's
tool calls, e.g. chatml's <tool_call> blocks) has each call run (stages/common/tools.Toolbox), the results appended as
a tool turn with the assistant header after it (stages/common/templates.after_calls), and the policy goes on from
there, up to `max_tool_turns` tool turns. The tokens the policy wrote are trained; the tool turns' are context only
(`Rollouts.trained`). The rewards score what the policy said: its turns' text joined, the tool results left out, so
a reply earns nothing by a tool's output it never read back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from torch import Tensor
from torch.utils.data import Sampler

from schemas.data import read_files
from schemas.rewards import AnswerReward
from schemas.spec import RolloutStage
from stages.common.contract import Prepared, StageInputs
from stages.common.generation import Sampling, decode, generate, stop_ids
from stages.common.progress import short_of_a_batch
from stages.common.recipe import adapt, load, make_trainer
from stages.common.reference import attach
from stages.common.reward_functions import (
    RewardError,
    RewardFunction,
    answer_matches,
    checked_rewards,
    reward_functions,
    weighted_total,
)
from stages.common.templates import IGNORE, after_calls, conversations, encode_prompt, end_of_turn_id
from stages.common.tools import Toolbox, read_calls
from stages.common.training import ObjectiveTrainer

NO_CALL = {"name": "invalid", "arguments": {}}


def toolbox(spec: RolloutStage) -> Toolbox | None:
    """The stage's tools, imported; None without any."""
    return Toolbox(spec.tools) if spec.tools else None


def prepare(spec: RolloutStage, tokenizer) -> Prepared:
    """Prompts through the template (the tools offered, the assistant header included), at most max_len -
    max_new_tokens tokens (longer ones dropped, counted)."""
    splits, rejected, counts = {}, [], {}
    needs_answer = any(isinstance(r, AnswerReward) for r in spec.rewards)
    tools = toolbox(spec)
    offered = tools.definitions if tools else None
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
        encoded = [encode_prompt(m, tokenizer, spec.template, offered) for m in messages]
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


def examples(spec: RolloutStage, tokenizer, n: int) -> list[tuple[list[int], list[int]]]:
    """The first n prompts as the policy sees them; nothing in them is trained (the replies are sampled)."""
    read = read_files(spec.data, "prompts", spec.on_invalid)
    tools = toolbox(spec)
    offered = tools.definitions if tools else None
    return [
        (ids, [IGNORE] * len(ids))
        for ids in (
            encode_prompt(m, tokenizer, spec.template, offered) for m in conversations(read.frame.head(n), "prompt_")
        )
    ]


class RepeatedBatches(Sampler[int]):
    """A seeded permutation of the prompts in blocks of one optimizer step's prompts, each block given `times` times in
    a row (μ updates on the same samples). A last block short of a full step is left out of that epoch."""

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


@dataclass(frozen=True)
class Rollouts:
    """Replies to prompts, sampled and scored: `copies` of each prompt's, in the prompts' order."""

    completions: list[list[int]]  # each reply's tokens after its prompt: the policy's turns and the tool turns
    trained: list[list[int]]  # 1 on a token the policy wrote, 0 on a tool turn's
    texts: list[str]  # what the policy said (its turns' text), as the rewards read it
    shown: list[str]  # the whole reply, tool turns included, as a person reads it
    tool_calls: list[int]  # calls each reply made
    stopped: list[bool]  # whether the reply ended its turn (not cut by max_new_tokens or max_len)
    asked: list[list[dict]]  # each reply's prompt messages
    scores: Tensor  # [rewards, N]: each reward function's score of each reply
    total: Tensor  # [N]: their weighted sum

    def padded(self, pad_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """The replies right-padded to one width: their tokens, the attention mask (every real token) and the
        trained mask (the policy's tokens), each [N, T]."""
        width = max(map(len, self.completions))
        ids = [c + [pad_id] * (width - len(c)) for c in self.completions]
        real = [[1] * len(c) + [0] * (width - len(c)) for c in self.completions]
        trained = [t + [0] * (width - len(t)) for t in self.trained]
        return (torch.tensor(x, device=device) for x in (ids, real, trained))


def rollout(
    policy,
    tokenizer,
    prompts: list[list[int]],
    messages: list[list[dict]],
    answers: list,
    spec: RolloutStage,
    rewards: list[RewardFunction],
    tools: Toolbox | None,
    sampling: Sampling,
    copies: int = 1,
) -> Rollouts:
    """`copies` replies to each prompt, generated as one batch per turn, each turn ending at the template's end of
    turn; with tools, a turn that calls them gets their results and the policy goes on (see the module's
    docstring). Every reply is then scored by every reward function."""
    stops = stop_ids(tokenizer, end_of_turn_id(tokenizer, spec.template))
    prompts = [p for p in prompts for _ in range(copies)]
    asked = [m for m in messages for _ in range(copies)]
    n = len(prompts)
    completions: list[list[int]] = [[] for _ in range(n)]
    trained: list[list[int]] = [[] for _ in range(n)]
    said: list[list[str]] = [[] for _ in range(n)]
    shown: list[list[str]] = [[] for _ in range(n)]
    calls_made, stopped = [0] * n, [False] * n
    active, turn = list(range(n)), 0
    while active:
        written = generate(
            policy,
            [prompts[i] + completions[i] for i in active],
            stops,
            tokenizer.pad_token_id,
            sampling,
            batch_size=len(active),
        )
        going_on = []
        for i, ids in zip(active, written):
            completions[i] += ids
            trained[i] += [1] * len(ids)
            reply = decode(tokenizer, ids, stops)
            said[i].append(reply.text)
            shown[i].append(reply.text)
            stopped[i] = reply.stopped
            calls = read_calls(reply.text) if tools is not None and reply.stopped else []
            if not calls or turn == spec.max_tool_turns:
                continue
            results = [tools.run(call) for call in calls]
            # as the template writes a call (a missing or malformed one as no call of any tool): the text after it
            rendered = [{"name": c["name"], "arguments": c.get("arguments", {})} if c else NO_CALL for c in calls]
            following = after_calls(asked[i], rendered, results, tokenizer, spec.template, tools.definitions)
            calls_made[i] += len(calls)
            if len(prompts[i]) + len(completions[i]) + len(following) + spec.max_new_tokens > spec.max_len:
                stopped[i] = False  # no room left to read the results: the reply ends at its calls
                continue
            completions[i] += following
            trained[i] += [0] * len(following)
            shown[i] += [f"[tool] {result}" for result in results]
            going_on.append(i)
        active, turn = going_on, turn + 1
    texts = ["\n".join(parts) for parts in said]
    repeated = [a for a in answers for _ in range(copies)]
    lengths = [sum(t) for t in trained]
    scores = torch.tensor(checked_rewards(rewards, asked, texts, repeated, lengths))
    return Rollouts(
        completions,
        trained,
        texts,
        ["\n".join(parts) for parts in shown],
        calls_made,
        stopped,
        asked,
        scores,
        weighted_total(rewards, scores),
    )


def completion_logps(model, sequences: Tensor, attention_mask: Tensor, width: int, temperature: float) -> Tensor:
    """log π(o_t | q, o_<t) of every token after the first `width` (the left-padded prompts), [N, T], π being the
    policy the replies were sampled from: the model's logits divided by the sampling temperature. Positions count
    from each prompt's first real token."""
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = (
        model(input_ids=sequences, attention_mask=attention_mask, position_ids=positions, use_cache=False)
        .logits[:, width - 1 : -1]
        .float()
        / temperature
    )
    targets = sequences[:, width:]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def heldout_metrics(
    model, tokenizer, rows: Dataset, spec: RolloutStage, rewards: list[RewardFunction], tools: Toolbox | None
) -> dict[str, float]:
    """Greedy replies (calling the tools as training does) to the first eval_samples held-out prompts: the share
    giving the reference answer, and the mean reward."""
    rows = rows.select(range(min(spec.eval_samples, len(rows))))
    if not len(rows):
        return {}
    was_training = model.training
    replies = rollout(
        model,
        tokenizer,
        rows["prompt_ids"],
        rows["messages"],
        rows["answer"],
        spec,
        rewards,
        tools,
        Sampling(max_new_tokens=spec.max_new_tokens),
    )
    model.train(was_training)
    found = {"reward": float(replies.total.mean())}
    answered = [(t, a) for t, a in zip(replies.texts, rows["answer"]) if a is not None]
    if answered:
        found["task_accuracy"] = sum(answer_matches(t, a) for t, a in answered) / len(answered)
    if tools is not None:
        found["tool_calls"] = sum(replies.tool_calls) / len(rows)
    return found


@dataclass(frozen=True)
class Samples:
    """One batch's replies as tensors, with what the stage's updates train on (μ of them on the same samples)."""

    sequences: Tensor  # [N, W + T]: left-padded prompt, reply, right padding
    attention_mask: Tensor  # [N, W + T]
    completion_mask: Tensor  # [N, T]: 1 on the tokens the policy wrote (its stop tokens included), 0 on tool turns
    advantages: Tensor  # [N] (GRPO: one per reply) or [N, T] (PPO: one per token)
    old_logps: Tensor | None  # [N, T]: the sampling policy's, where the update needs them
    uses_left: int  # updates still to come on these samples
    returns: Tensor | None = None  # [N, T]: PPO's value targets
    old_values: Tensor | None = None  # [N, T]: PPO's value estimates at sampling

    def logps(self, model, temperature: float) -> Tensor:
        """log π of every reply token under `model`, [N, T] (`completion_logps`)."""
        width = self.sequences.shape[1] - self.completion_mask.shape[1]
        return completion_logps(model, self.sequences, self.attention_mask, width, temperature)


@contextmanager
def as_sampled(*models) -> Iterator[None]:
    """No-grad forwards of the models as the replies were sampled: in eval mode (no dropout), as `generate` runs
    the policy, so the log-probs an update's ratio and KL are taken against are the sampling policy's own; each model
    back in its mode after."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


def kept_samples(step: int, replies: Rollouts, rewards: list[RewardFunction]) -> list[dict]:
    """A batch's replies as rows of the samples table: the prompt, the whole reply, its reward and each function's."""
    return [
        {
            "step": step,
            "prompt": m[-1]["content"],
            "completion": shown,
            "reward": float(r),
            **{f.name: float(s[i]) for f, s in zip(rewards, replies.scores)},
        }
        for i, (m, shown, r) in enumerate(zip(replies.asked, replies.shown, replies.total))
    ]


class RolloutTrainer(ObjectiveTrainer):
    """The Trainer of a rollout stage: each new batch of prompts is answered by the policy (`replies`), the kind's
    `samples` turns the replies into what it trains on, and the same samples serve `iterations` updates (the sampler
    hands each step's prompts back μ times in a row; they are buffered by their rows). Every `log_samples` steps a
    batch's replies and rewards are kept for the stage's samples table."""

    copies = 1  # replies sampled per prompt

    def __init__(
        self,
        *args,
        rewards: list[RewardFunction],
        tools: Toolbox | None,
        reference_model=None,
        heldout: Dataset | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.rewards, self.tools, self.heldout = rewards, tools, heldout
        self.reference_model = reference_model.to(self.args.device) if reference_model is not None else None
        self.buffer: dict[tuple[int, ...], Samples] = {}
        self.kept: list[dict] = []

    def _get_train_sampler(self, train_dataset=None) -> Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        block = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return RepeatedBatches(len(dataset), block, self.spec.iterations, self.args.seed)

    @torch.no_grad()
    def replies(self, model, inputs: dict) -> tuple[Rollouts, Tensor, Tensor, Tensor]:
        """`copies` replies to each prompt of the batch, from the policy as it is now, and the batch as tensors: the
        prompts and replies, their attention mask, and the trained mask. Records the rewards, lengths, calls and
        generation time; keeps the replies every `log_samples` steps."""
        spec, tokenizer, copies = self.spec, self.processing_class, self.copies
        policy = self.accelerator.unwrap_model(model)
        started = time.perf_counter()
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        sampling = Sampling(spec.temperature, spec.top_p, spec.max_new_tokens)
        replies = rollout(
            policy,
            tokenizer,
            prompts,
            inputs["messages"],
            inputs["answer"],
            spec,
            self.rewards,
            self.tools,
            sampling,
            copies,
        )
        policy.train()
        completions, real, trained = replies.padded(tokenizer.pad_token_id, self.args.device)
        sequences = torch.cat([inputs["input_ids"].repeat_interleave(copies, 0), completions], 1)
        attention_mask = torch.cat([inputs["attention_mask"].repeat_interleave(copies, 0), real], 1)
        self.record(
            reward=replies.total.mean(),
            reward_std=replies.total.std() if len(replies.total) > 1 else 0.0,
            completion_length=trained.sum(1).float().mean(),
            completions_stopped=torch.tensor(replies.stopped).float(),
            generation_seconds=time.perf_counter() - started,
            **({"tool_calls": torch.tensor(replies.tool_calls).float()} if self.tools is not None else {}),
            **{f"reward/{f.name}": s.mean() for f, s in zip(self.rewards, replies.scores)},
        )
        if self.state.global_step % spec.log_samples == 0:
            self.kept += kept_samples(self.state.global_step, replies, self.rewards)
        return replies, sequences, attention_mask, trained

    def measure(self) -> dict[str, float]:
        """The held-out measures `fit` takes before and after training (`heldout_metrics`, named heldout_*)."""
        if self.heldout is None or not self.spec.eval_samples:
            return {}
        found = heldout_metrics(self.model, self.processing_class, self.heldout, self.spec, self.rewards, self.tools)
        return {f"heldout_{name}": value for name, value in found.items()}

    def samples(self, model, inputs: dict) -> Samples:
        """The kind's samples of a new batch of prompts."""
        raise NotImplementedError

    def samples_for(self, model, inputs: dict) -> Samples:
        """New samples for new prompts; the buffered ones while they have updates left (μ > 1)."""
        key = tuple(inputs["row"].tolist())
        samples = self.buffer.pop(key, None) or self.samples(model, inputs)
        if samples.uses_left:
            self.buffer[key] = replace(samples, uses_left=samples.uses_left - 1)
            # one step's micro-batches at most: a resume inside a block of μ leaves a block's samples unused
            while len(self.buffer) > self.args.gradient_accumulation_steps:
                self.buffer.pop(next(iter(self.buffer)))
        return samples

    @torch.no_grad()
    def reference_logps(self, model, samples: Samples) -> Tensor | None:
        """The reference's log-probs of the samples' reply tokens: the frozen copy's, or the policy's with its
        adapters off; None without a KL term (beta 0)."""
        if self.spec.beta == 0:
            return None
        if self.reference_model is not None:
            return samples.logps(self.reference_model, self.spec.temperature)
        with self.accelerator.unwrap_model(model).disable_adapter():
            return samples.logps(model, self.spec.temperature)


def rollout_trainer(
    spec: RolloutStage, inputs: StageInputs, workdir: Path, trainer_class: type[RolloutTrainer], **extra
) -> RolloutTrainer:
    """A rollout stage's steps up to its Trainer: the policy loaded, its reference attached, the adapters added; the
    rewards and tools made, and every reward function tried once on the first prompts before any model time is
    spent; the held-out prompts kept out of the Trainer's evaluate (they are measured by generation: its `measure`).
    `extra`: the kind's own Trainer arguments."""
    tokenizer, model = load(spec, inputs)
    reference = attach(spec, inputs, model, tokenizer)
    model = adapt(spec, inputs, model)
    rewards = reward_functions(spec.rewards, inputs.stage_models)
    tools = toolbox(spec)
    datasets = reference.datasets
    first = datasets["train"].select(range(min(len(datasets["train"]), spec.train.batch_size)))
    checked_rewards(rewards, first["messages"], [""] * len(first), first["answer"], [0] * len(first))
    heldout = datasets.pop("heldout", None)
    return make_trainer(
        spec,
        model,
        tokenizer,
        workdir,
        datasets,
        PromptCollator(tokenizer.pad_token_id),
        inputs.callbacks,
        trainer_class,
        spec=spec,
        rewards=rewards,
        tools=tools,
        reference_model=reference.model,
        heldout=heldout,
        **extra,
    )
