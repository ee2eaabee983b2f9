"""PPO on a tiny model: its direction, its value model (from the policy or a reward stage), the value model saved with
every in-stage checkpoint and resumed from it, and the advantages over a reply that called a tool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from examples.generate import DATA_DIR
from schemas.spec import PPOStage, RewardStage, TrainSpec
from stages import ppo, reward
from stages.common.contract import StageInputs
from stages.common.losses import gae, masked_whiten, ppo_rewards

from .conftest import FAST


def ppo_stage(**fields) -> PPOStage:
    train = TrainSpec(
        **FAST
        | {"max_steps": 12, "batch_size": 16, "lr": 2e-3, "logging_steps": 2, "save_steps": 1000}
        | fields.pop("train", {})
    )
    fields = (
        dict(template="chatml", max_len=96, max_new_tokens=12, eval_samples=32, iterations=2, value_lr=5e-3) | fields
    )
    return PPOStage(
        name="ppo",
        kind="ppo",
        data=[DATA_DIR / "rl_prompts.jsonl"],
        heldout=[DATA_DIR / "rl_prompts_heldout.jsonl"],
        train=train,
        **fields,
    )


def trained(spec: PPOStage, model: Path, tokenizer: Path, workdir: Path, stage_models: dict | None = None):
    datasets = ppo.prepare(spec, AutoTokenizer.from_pretrained(tokenizer)).datasets
    return ppo.run(spec, StageInputs(model, tokenizer, datasets, stage_models=stage_models or {}), workdir)


def test_ppo_raises_the_heldout_reward_of_an_easy_verifiable_task(
    chat_model, trained_tokenizer, tmp_path, train_seed
) -> None:
    """Reward: a reply of one word (as GRPO's direction test). One reply per prompt, the value model learning the
    baseline: the held-out reward rises, the replies are kept with their rewards, and the value model trained."""
    spec = ppo_stage(rewards=[{"kind": "regex", "pattern": r"^\S+$"}], log_samples=5, train={"seed": train_seed})
    result = trained(spec, chat_model, trained_tokenizer, tmp_path)
    metrics = result.metrics
    print({k: round(v, 3) for k, v in metrics.items() if k.startswith("heldout")})
    assert metrics["heldout_reward"] > metrics["heldout_reward_before"] + 0.1
    kept = result.tables[ppo.SAMPLES_TABLE]
    assert {"step", "prompt", "completion", "reward", "regex"} <= set(kept) and sorted(set(kept["step"])) == [
        0,
        10,
    ]  # sampled every 2nd step (mu 2)
    assert result.counts["value_parameters"] > 0 and (result.checkpoint / "model.safetensors").exists()


def test_the_value_model_is_saved_with_each_checkpoint_and_a_resumed_stage_goes_on_with_it(
    chat_model, trained_tokenizer, tmp_path
) -> None:
    """A stage stopped at step 2 (its checkpoint holds the value model and its optimizer) and run again to step 3
    starts from the saved value model, not a fresh head; a value model from a reward stage starts with its head."""
    pairs = RewardStage(
        name="reward",
        kind="reward",
        data=[DATA_DIR / "preference.jsonl"],
        max_len=96,
        template="chatml",
        train=TrainSpec(**FAST | {"max_steps": 2, "batch_size": 8, "save_steps": 1000}),
    )
    from stages.common import candidates

    prepared = candidates.prepare(pairs, AutoTokenizer.from_pretrained(trained_tokenizer)).datasets
    scorer = reward.run(pairs, StageInputs(chat_model, trained_tokenizer, prepared), tmp_path / "reward").checkpoint
    head = load_file(scorer / "model.safetensors")["score.weight"]

    spec = ppo_stage(value_model="reward", eval_samples=0, train={"max_steps": 2, "batch_size": 4, "save_steps": 2})
    trained(spec, chat_model, trained_tokenizer, tmp_path / "w", {"reward": scorer})
    saved = tmp_path / "w" / "trainer" / "checkpoint-2"
    values = load_file(saved / ppo.VALUE_WEIGHTS)
    assert (saved / ppo.VALUE_OPTIMIZER).exists() and "score.weight" in values
    assert not torch.equal(values["score.weight"], head)  # trained from the reward model's head
    assert torch.allclose(values["score.weight"], head, atol=0.05)  # ... two small steps away from it

    # the same work folder, one step further: the value model and its optimizer come back from checkpoint-2
    more = spec.model_copy(update={"train": spec.train.model_copy(update={"max_steps": 3, "save_steps": 3})})
    tokenizer = AutoTokenizer.from_pretrained(trained_tokenizer)
    datasets = ppo.prepare(more, tokenizer).datasets
    loaded = {}

    class Watch(ppo.PPOTrainer):
        def _load_optimizer_and_scheduler(self, checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
            loaded.update({n: p.detach().clone() for n, p in self.value.named_parameters() if p.requires_grad})

    original, ppo.PPOTrainer = ppo.PPOTrainer, Watch
    try:
        result = ppo.run(
            more, StageInputs(chat_model, trained_tokenizer, datasets, stage_models={"reward": scorer}), tmp_path / "w"
        )
    finally:
        ppo.PPOTrainer = original
    assert result.resumed_from_step == 2
    assert loaded.keys() == values.keys() and all(torch.equal(loaded[n], values[n]) for n in values)


def test_advantages_skip_tool_turns_and_equal_gae_over_the_policys_own_tokens() -> None:
    """A reply of policy tokens, a tool turn (mask 0) and more policy tokens: its advantages and returns are GAE over
    the policy tokens alone, the tool turn's positions 0, so the turn before the tool bootstraps from the value where
    the policy goes on."""
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
    logps, ref, values = (torch.randn(2, 8) for _ in range(3))
    scores = torch.tensor([1.0, -0.5])
    spec = ppo_stage(beta=0.1, gamma=0.9, lam=0.8)
    advantages, returns = ppo.advantages_and_returns(scores, logps, ref, values, mask, spec)
    # by hand: the first row's policy tokens are positions 0, 1, 5, 6; the second's 0, 1, 2
    steps = [[0, 1, 5, 6], [0, 1, 2]]
    width = 4
    packed = torch.zeros(2, width, dtype=torch.long)
    packed_mask = torch.zeros(2, width, dtype=torch.long)
    for row, taken in enumerate(steps):
        packed[row, : len(taken)] = torch.tensor(taken)
        packed_mask[row, : len(taken)] = 1

    def take(x: torch.Tensor) -> torch.Tensor:
        return x.gather(1, packed) * packed_mask

    rewards = ppo_rewards(scores, take(logps), take(ref), packed_mask, 0.1)
    expected_adv, expected_ret = gae(rewards, take(values), packed_mask, 0.9, 0.8)
    expected_adv = masked_whiten(expected_adv, packed_mask)
    for row, taken in enumerate(steps):
        assert torch.allclose(advantages[row, taken], expected_adv[row, : len(taken)], atol=1e-6)
        assert torch.allclose(returns[row, taken], expected_ret[row, : len(taken)], atol=1e-6)
        others = [t for t in range(8) if t not in taken]
        assert (advantages[row, others] == 0).all() and (returns[row, others] == 0).all()


def test_a_value_model_that_names_no_reward_stage_is_refused_when_the_spec_loads(tmp_path) -> None:
    from schemas.load import SpecError, load_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        json.dumps(
            {
                "name": "p",
                "model": {"init": {"hidden_size": 64, "layers": 2, "heads": 2, "max_seq_len": 128}},
                "stages": [
                    {"name": "pretrain", "kind": "pretrain", "data": str(DATA_DIR / "pretrain.jsonl")},
                    {"name": "ppo", "kind": "ppo", "data": str(DATA_DIR / "rl_prompts.jsonl"), "value_model": "sft"},
                ],
            }
        )
    )
    with pytest.raises(SpecError, match=r"value_model names 'sft', which is not an earlier reward stage"):
        load_spec(spec)


def test_with_lora_the_value_model_gets_adapters_of_its_own_and_the_reference_is_the_adapters_switched_off(
    chat_model, trained_tokenizer, tmp_path
) -> None:
    """The policy's LoRA adapters switched off are its reference (no second copy): the KL starts at 0; the value
    model trains its own adapters and its head, nothing else."""
    from tasks.step_metrics import StepMetrics

    from .conftest import stage_run

    spec = ppo_stage(lora={"r": 4, "alpha": 8}, eval_samples=0, train={"max_steps": 2, "logging_steps": 1})
    assert spec.reference_strategy() == "adapter-off"
    mlflow, run_id = stage_run(tmp_path, "p")
    datasets = ppo.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer)).datasets
    watched = {}

    class Watch(ppo.PPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            watched["trained"] = [n for n, p in self.value.named_parameters() if p.requires_grad]
            watched["reference"] = self.reference_model

    original, ppo.PPOTrainer = ppo.PPOTrainer, Watch
    try:
        ppo.run(
            spec,
            StageInputs(chat_model, trained_tokenizer, datasets, callbacks=(StepMetrics(mlflow, run_id),)),
            tmp_path / "w",
        )
    finally:
        ppo.PPOTrainer = original
    assert watched["reference"] is None  # no frozen copy
    assert watched["trained"] and all("lora_" in n or "score" in n for n in watched["trained"])
    kl = [m.value for m in sorted(mlflow.get_metric_history(run_id, "kl"), key=lambda m: m.step)]
    assert kl[0] == pytest.approx(0.0, abs=1e-5)  # the first replies come from the policy that is its reference
