"""GRPO on a tiny model: sampling, rewards, the update, and what a failing reward says."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from examples.generate import DATA_DIR
from schemas.rewards import AnswerReward, LengthReward, PythonReward, RegexReward
from schemas.spec import GRPOStage, TrainSpec
from stages import grpo
from stages.common.contract import StageInputs
from stages.common.reward_functions import RewardError, checked_rewards, reward_functions
from stages.common.rollouts import RepeatedBatches
from stages.common.tools import FunctionError

from .conftest import FAST, stage_run


def grpo_stage(**fields) -> GRPOStage:
    train = TrainSpec(
        **FAST
        | {"max_steps": 12, "batch_size": 4, "lr": 2e-3, "logging_steps": 2, "save_steps": 1000}
        | fields.pop("train", {})
    )
    fields = dict(template="chatml", max_len=96, max_new_tokens=12, group_size=4, eval_samples=32) | fields
    return GRPOStage(
        name="grpo",
        kind="grpo",
        data=[DATA_DIR / "rl_prompts.jsonl"],
        heldout=[DATA_DIR / "rl_prompts_heldout.jsonl"],
        train=train,
        **fields,
    )


def trained(spec: GRPOStage, model: Path, tokenizer: Path, workdir: Path):
    datasets = grpo.prepare(spec, AutoTokenizer.from_pretrained(tokenizer)).datasets
    return grpo.run(spec, StageInputs(model, tokenizer, datasets), workdir)


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"advantage": "rloo"},  # RLOO's leave-one-out baseline, unscaled
        # GSPO, with its paper's clip; two updates per batch, so the sequence ratio leaves 1 and is clipped
        {"ratio": "sequence", "epsilon_low": 3e-4, "epsilon_high": 4e-4, "iterations": 2},
    ],
    ids=["grpo", "rloo", "gspo"],
)
def test_grpo_raises_the_heldout_reward_of_an_easy_verifiable_task(
    chat_model, trained_tokenizer, tmp_path, variant
) -> None:
    """Reward: a reply of one word. The SFT model answers in sentences as often as not, so groups differ and GRPO
    learns it, with each of its baselines and ratios."""
    spec = grpo_stage(rewards=[{"kind": "regex", "pattern": r"^\S+$"}], **variant)
    result = trained(spec, chat_model, trained_tokenizer, tmp_path)
    metrics = result.metrics
    print({k: round(v, 3) for k, v in metrics.items() if k.startswith("heldout")})
    assert metrics["heldout_reward"] > metrics["heldout_reward_before"] + 0.1
    kept = result.tables[grpo.SAMPLES_TABLE]  # every log_samples steps, a batch's completions with their rewards
    assert {"step", "prompt", "completion", "reward", "regex"} <= set(kept) and kept["step"][0] == 0
    assert len(set(map(len, kept.values()))) == 1 and len(kept["step"]) == 2 * 4 * 4  # steps 0 and 10: 4 prompts x 4
    assert (result.checkpoint / "model.safetensors").exists()
    # the sanity pass before training sampled the first step's groups from the input model: some differed
    assert 0 < metrics["first_informative_groups"] <= 1


def test_prompts_no_sample_is_rewarded_on_are_said_to_teach_nothing_before_training(
    chat_model, trained_tokenizer, tmp_path, caplog
) -> None:
    """A reward no reply of this model earns: every group of the sanity pass is all zeros, and the stage says so up
    front, naming itself and what to change."""
    spec = grpo_stage(rewards=[{"kind": "regex", "pattern": "^NEVER SAID$"}], train={"max_steps": 1})
    with caplog.at_level("WARNING", logger="stages.grpo"):
        metrics = trained(spec, chat_model, trained_tokenizer, tmp_path).metrics
    assert metrics["first_informative_groups"] == 0 and metrics["first_mean_reward"] == 0
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "stages.grpo"]
    assert "stage grpo: every group of the first 32 prompts got equal rewards" in warning
    assert "raise the temperature" in warning


def test_more_updates_per_sample_and_a_kl_to_a_frozen_reference_train_and_are_logged(
    chat_model, trained_tokenizer, tmp_path
) -> None:
    from tasks.step_metrics import StepMetrics

    spec = grpo_stage(
        iterations=2,
        beta=0.05,
        aggregation="dapo",
        epsilon_high=0.28,
        eval_samples=0,
        train={"max_steps": 6, "logging_steps": 1},
    )
    mlflow, run_id = stage_run(tmp_path, "g")
    datasets = grpo.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer)).datasets
    grpo.run(
        spec,
        StageInputs(chat_model, trained_tokenizer, datasets, callbacks=(StepMetrics(mlflow, run_id),)),
        tmp_path / "w",
    )
    history = {
        name: [m.value for m in sorted(mlflow.get_metric_history(run_id, name), key=lambda m: m.step)]
        for name in ("kl", "clip_fraction", "reward", "generation_seconds")
    }
    assert len(history["kl"]) == 6 and all(v >= -1e-6 for v in history["kl"])  # k3 is >= 0 up to rounding
    assert history["kl"][0] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference before its first update
    assert history["kl"][-1] > 0  # and moves away from it
    # each batch of samples is trained on twice: the second update's ratio is no longer 1, so the clip can act
    assert all(0 <= v <= 1 for v in history["clip_fraction"])


def test_the_sampler_gives_each_steps_prompts_mu_times_in_a_row_and_a_new_order_each_epoch() -> None:
    sampler = RepeatedBatches(rows=10, block=4, times=3, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) == 2 * 4 * 3  # the last 2 prompts fill no block
    blocks = [order[i : i + 4] for i in range(0, len(order), 4)]
    assert blocks[0] == blocks[1] == blocks[2] and blocks[3] == blocks[4] == blocks[5] and blocks[0] != blocks[3]
    assert len(set(blocks[0] + blocks[3])) == 8
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_built_in_rewards_by_hand() -> None:
    answer, exact, numeric, regex, length = reward_functions(
        [
            AnswerReward(kind="answer"),
            AnswerReward(kind="answer", match="exact"),
            AnswerReward(kind="answer", match="numeric", tolerance=0.01),
            RegexReward(kind="regex", pattern=r"^\d+$"),
            LengthReward(kind="length", limit=20, soft=10),
        ]
    )
    replies = ["It is 31.", "31", "30.8", "310"]
    answers = ["31"] * 4
    assert answer.score([""] * 4, replies, answers, [0] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert exact.score([""] * 4, replies, answers, [0] * 4) == [0.0, 1.0, 0.0, 0.0]
    assert numeric.score([""] * 4, replies, answers, [0] * 4) == [1.0, 1.0, 1.0, 0.0]  # |30.8 - 31| <= 0.01 * 31
    assert regex.score([""] * 4, replies, answers, [0] * 4) == [0.0, 1.0, 0.0, 1.0]
    # DAPO's soft overlong penalty
    assert length.score([""] * 4, replies, answers, [10, 15, 20, 40]) == [
        0.0,
        -0.5,
        -1.0,
        -1.0,
    ]


def raising_reward(prompts, completions, answers):
    raise KeyError("score")


def short_reward(prompts, completions, answers):
    return [1.0]


def nan_reward(prompts, completions, answers):
    return [float("nan") if "capital" in p else 0.0 for p in prompts]


@pytest.mark.parametrize(
    "function, message",
    [
        (
            "raising_reward",
            r"reward tests.test_grpo:raising_reward failed on the batch whose first prompt is '.+': KeyError: 'score'",
        ),
        (
            "short_reward",
            r"reward tests.test_grpo:short_reward returned 1 values for 4 completions .* one per completion",
        ),
        (
            "nan_reward",
            r"reward tests.test_grpo:nan_reward returned nan for a completion of the prompt '.*capital.*': rewards "
            r"must be finite",
        ),
    ],
)
def test_a_bad_reward_function_stops_the_stage_before_any_update_naming_itself_and_the_prompt(
    function, message, chat_model, trained_tokenizer, tmp_path
) -> None:
    spec = grpo_stage(rewards=[{"kind": "python", "function": f"tests.test_grpo:{function}"}])
    with pytest.raises(RewardError, match=message):
        trained(spec, chat_model, trained_tokenizer, tmp_path)
    assert not (tmp_path / "trainer").exists() and not (tmp_path / "model").exists()


def test_reward_functions_refuse_what_cannot_be_imported_and_the_spec_what_cannot_run() -> None:
    with pytest.raises(FunctionError, match=r"reward tests.test_grpo:missing: cannot import it"):
        reward_functions([PythonReward(kind="python", function="tests.test_grpo:missing")])
    with pytest.raises(ValueError, match="not a regular expression"):
        grpo_stage(rewards=[{"kind": "regex", "pattern": "(unclosed"}])
    with pytest.raises(ValueError, match="reference adapter-off needs a lora block"):
        grpo_stage(beta=0.1, reference="adapter-off")
    with pytest.raises(ValueError, match="used only with beta > 0"):
        grpo_stage(reference="frozen")
    assert checked_rewards(
        reward_functions([AnswerReward(kind="answer")]),
        [[{"role": "user", "content": "q"}]],
        ["the answer is 4"],
        ["4"],
        [5],
    ) == [[1.0]]
