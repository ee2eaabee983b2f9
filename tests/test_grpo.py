"""GRPO on a tiny model: sampling, rewards, the update, and what a failing reward says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from examples.generate import DATA_DIR
from schemas.spec import GRPOStage, TrainSpec
from stages import grpo
from stages.contract import StageInputs
from stages.rewards import RewardError, checked_rewards, reward_functions

from .conftest import FAST


def grpo_stage(**fields) -> GRPOStage:
    train = TrainSpec(**FAST | {"max_steps": 12, "batch_size": 4, "lr": 2e-3, "logging_steps": 2, "save_steps": 1000} | fields.pop("train", {}))
    return GRPOStage(name="grpo", kind="grpo", data=[DATA_DIR / "rl_prompts.jsonl"], heldout=[DATA_DIR / "rl_prompts_heldout.jsonl"],
                     template="chatml", max_len=96, max_new_tokens=12, group_size=4, eval_samples=32, train=train, **fields)


def trained(spec: GRPOStage, model: Path, tokenizer: Path, workdir: Path):
    datasets = grpo.prepare(spec, AutoTokenizer.from_pretrained(tokenizer)).datasets
    return grpo.run(spec, StageInputs(model, tokenizer, datasets), workdir)


def test_grpo_raises_the_heldout_reward_of_an_easy_verifiable_task(chat_model, trained_tokenizer, tmp_path) -> None:
    """Reward: a reply of one word. The SFT model answers in sentences as often as not, so groups differ and GRPO learns it."""
    spec = grpo_stage(rewards=[{"kind": "regex", "pattern": r"^\S+$"}])
    result = trained(spec, chat_model, trained_tokenizer, tmp_path)
    metrics = result.metrics
    print({k: round(v, 3) for k, v in metrics.items() if k.startswith("heldout")})
    assert metrics["heldout_reward"] > metrics["heldout_reward_before"] + 0.1
    kept = [json.loads(line) for line in (tmp_path / grpo.SAMPLES_FILE).read_text().splitlines()]
    assert kept and {"step", "prompt", "completion", "reward", "regex"} <= set(kept[0])
    assert (result.checkpoint / "model.safetensors").exists()
