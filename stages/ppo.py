"""The PPO stage: one reply per prompt, a learned value model, GAE advantages, clipped policy and value losses.

Each micro-batch takes `train.batch_size` prompts (an optimizer step `grad_accum` micro-batches) and samples one reply
to each from the current policy (calling the spec's tools on the way: stages/common/rollouts.py). Then, once per
micro-batch, with no gradient:

    log π_old, log π_ref   the sampling policy's and the reference's log-probs of every token the policy wrote
    V_old                  the value model's estimate before each of those tokens (its scalar head on every position)
    r_t                    −β (log π_old − log π_ref) on each token, plus the reply's reward on its last one
    Â, R                   GAE over the policy's tokens (tool turns are not the policy's steps: they are skipped, so
                           a turn after a tool result bootstraps from the value where the policy goes on), whitened
                           over the micro-batch's policy tokens

and `iterations` updates train on them: the clipped policy loss and the clipped value loss, weighted by
`value_weight` (stages/common/losses.ppo_loss, checked against TRL's within 1e-6 in tests/test_losses.py).

The value model is the input model as a sequence classifier with a fresh scalar head (`value_model: policy`) or an
earlier reward stage's model (its head included); with `lora` it gets adapters of its own. It is trained beside the
policy by an optimizer of its own (`value_lr`), stepped where the Trainer steps the policy's, and saved with every
in-stage checkpoint (`value.safetensors`, its optimizer's state beside it) before the Trainer's state file, so a
resumed stage goes on with the value model it stopped with. The stage's output is the policy.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    TrainerCallback,
    set_seed,
)

from schemas.spec import PPOStage
from stages.common.checkpoint import load_model
from stages.common.contract import StageInputs, StageResult, columns_of
from stages.common.losses import gae, masked_whiten, ppo_loss, ppo_rewards
from stages.common.recipe import adapt, fit, save
from stages.common.rollouts import RolloutTrainer, Samples, as_sampled, examples, prepare, rollout_trainer
from stages.common.training import unwrapped

__all__ = ["examples", "prepare", "run"]  # the TrainingStage protocol (stages/__init__.py)

SAMPLES_TABLE = "ppo_samples.json"
VALUE_WEIGHTS, VALUE_OPTIMIZER = "value.safetensors", "value_optimizer.pt"


def value_model(spec: PPOStage, inputs: StageInputs) -> PreTrainedModel:
    """The value model the stage starts with: the input model or the named reward stage's, as a sequence classifier
    with one output (a fresh head on the input model), with adapters of its own under `lora`."""
    tokenizer = AutoTokenizer.from_pretrained(inputs.tokenizer)
    set_seed(spec.train.seed)  # a fresh head and fresh adapters as the stage's seed draws them
    folder = inputs.model if spec.value_model == "policy" else inputs.stage_models[spec.value_model]
    model = load_model(folder, tokenizer, AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return adapt(spec, inputs, model, task_type="SEQ_CLS")


def token_values(model, sequences: Tensor, attention_mask: Tensor, width: int) -> Tensor:
    """The value model's estimate before each reply token, [N, T]: its head on the hidden state of the position that
    predicts the token (as the log-probs are taken), not only on the last one as a reward is."""
    classifier = unwrapped(model)
    backbone = getattr(classifier, classifier.base_model_prefix)
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    hidden = backbone(
        input_ids=sequences, attention_mask=attention_mask, position_ids=positions, use_cache=False
    ).last_hidden_state
    return classifier.score(hidden[:, width - 1 : -1]).squeeze(-1).float()


def policy_steps(mask: Tensor) -> Tensor:
    """For each row, the positions of its trained tokens first (in order) and the rest after: `gather` with it puts a
    reply's policy steps side by side, skipping tool turns; `scatter` with it puts them back."""
    return torch.sort((mask == 0).int(), dim=1, stable=True).indices


def advantages_and_returns(
    scores: Tensor, logps: Tensor, ref_logps: Tensor, values: Tensor, mask: Tensor, spec: PPOStage
) -> tuple[Tensor, Tensor]:
    """Whitened GAE advantages and the value targets of a batch of replies, [N, T], over the policy's own tokens
    (`policy_steps`); 0 elsewhere."""
    order = policy_steps(mask)
    steps = mask.gather(1, order)
    rewards = ppo_rewards(scores, logps.gather(1, order), ref_logps.gather(1, order), steps, spec.beta)
    advantages, returns = gae(rewards, values.gather(1, order), steps, spec.gamma, spec.lam)
    if steps.sum() > 1:  # whitened over the batch's policy tokens (a lone token has no spread to divide by)
        advantages = masked_whiten(advantages, steps) * steps
    return (torch.zeros_like(values).scatter(1, order, x) for x in (advantages, returns))


class ValueStep(TrainerCallback):
    """Steps the value model's optimizer where the Trainer steps the policy's (its gradients came from the same
    backward, so accumulation and scaling are the Trainer's), its gradient clipped to the same norm."""

    def __init__(self, trainer: PPOTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        if args.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(trainer.value_parameters, args.max_grad_norm)
            trainer.record(value_grad_norm=norm)
        trainer.value_optimizer.step()
        trainer.value_optimizer.zero_grad(set_to_none=True)


class PPOTrainer(RolloutTrainer):
    def __init__(self, *args, value_model: PreTrainedModel, **kwargs):
        super().__init__(*args, **kwargs)
        spec = self.spec
        self.value = value_model.to(self.args.device).train()
        self.value_parameters = [p for p in self.value.parameters() if p.requires_grad]
        self.value_optimizer = torch.optim.AdamW(
            self.value_parameters, lr=spec.value_lr or spec.train.lr, weight_decay=spec.train.weight_decay
        )
        self.add_callback(ValueStep(self))

    def values(self, samples: Samples) -> Tensor:
        width = samples.sequences.shape[1] - samples.completion_mask.shape[1]
        return token_values(self.value, samples.sequences, samples.attention_mask, width)

    def samples(self, model, inputs: dict) -> Samples:
        spec = self.spec
        replies, sequences, attention_mask, trained = self.replies(model, inputs)
        samples = Samples(sequences, attention_mask, trained, torch.empty(0), None, spec.iterations - 1)
        with as_sampled(model, self.value):
            logps = samples.logps(model, spec.temperature)
            reference = self.reference_logps(model, samples)
            values = self.values(samples)
        scores = replies.total.to(self.args.device)
        advantages, returns = advantages_and_returns(
            scores, logps, logps if reference is None else reference, values, trained, spec
        )
        mask = trained.bool()
        kl = torch.where(mask, logps - reference, 0).sum(1) if reference is not None else torch.zeros(len(scores))
        self.record(kl=kl.mean(), value=values[mask].mean(), score=scores.mean())
        return replace(samples, advantages=advantages, old_logps=logps, returns=returns, old_values=values)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        spec = self.spec
        samples = self.samples_for(model, inputs)
        loss, figures = ppo_loss(
            samples.logps(model, spec.temperature),
            samples.old_logps,
            samples.advantages,
            self.values(samples),
            samples.old_values,
            samples.returns,
            samples.completion_mask,
            spec.epsilon,
            spec.value_clip,
            spec.value_weight,
        )
        self.record(**figures)
        return loss

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # before the Trainer's state file, which marks the checkpoint complete (stages.common.training.complete)
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            trained = {n: p.detach().contiguous() for n, p in self.value.named_parameters() if p.requires_grad}
            save_file(trained, Path(output_dir) / VALUE_WEIGHTS)
            torch.save(self.value_optimizer.state_dict(), Path(output_dir) / VALUE_OPTIMIZER)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        saved = load_file(Path(checkpoint) / VALUE_WEIGHTS, device=str(self.args.device))
        trained = {n for n, p in self.value.named_parameters() if p.requires_grad}
        if set(saved) != trained:
            raise ValueError(
                f"{checkpoint}/{VALUE_WEIGHTS} holds another value model's weights than this stage trains; remove "
                "the stage's work folder to start it over"
            )
        self.value.load_state_dict(saved, strict=False)
        self.value_optimizer.load_state_dict(
            torch.load(Path(checkpoint) / VALUE_OPTIMIZER, map_location=self.args.device, weights_only=True)
        )


def run(spec: PPOStage, inputs: StageInputs, workdir: Path) -> StageResult:
    trainer = rollout_trainer(spec, inputs, workdir, PPOTrainer, value_model=value_model(spec, inputs))
    metrics, resumed_from = fit(trainer, trainer.measure)
    counts = {"value_parameters": float(sum(p.numel() for p in trainer.value_parameters))}
    return save(
        spec, inputs, trainer, workdir, metrics, resumed_from, {SAMPLES_TABLE: columns_of(trainer.kept)}, counts
    )
