"""Distillation (stages/distill.py): a smaller fresh student takes the tiny chat model's distributions, off- and
on-policy, and a teacher that cannot teach is refused before anything trains. Through the flow: tests/test_align.py."""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from examples.generate import DATA_DIR
from schemas.load import SpecError, load_spec
from schemas.spec import DistillStage, ModelInit, TokenizerTrain, TrainSpec
from stages import distill
from stages.common.contract import ModelError, StageInputs

from .conftest import FAST, QUICK

SMALL = ModelInit(hidden_size=32, layers=1, heads=2, max_seq_len=256)


def distill_stage(**fields) -> DistillStage:
    defaults = dict(
        teacher="sft",
        data=[DATA_DIR / "sft.jsonl"],
        heldout=[DATA_DIR / "sft_heldout.jsonl"],
        max_len=256,
        template="chatml",
        eval_samples=0,
        student=SMALL,
        train=TrainSpec(**FAST | {"max_steps": 60, "lr": 1e-2}),
    )
    return DistillStage(name="distill", kind="distill", **defaults | fields)


def test_a_smaller_student_comes_closer_to_its_teacher(chat_model, trained_tokenizer, tmp_path) -> None:
    """Forward KL (the JSD and reverse KL differ only in `distillation_loss`, worked by hand in test_losses; the JSD
    took the same student from 0.598 to 0.148 when tried)."""
    spec = distill_stage(divergence="forward_kl")
    datasets = distill.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer)).datasets
    inputs = StageInputs(SMALL, trained_tokenizer, datasets, stage_models={"sft": chat_model})
    result = distill.run(spec, inputs, tmp_path)
    metrics = result.metrics
    print({k: round(v, 4) for k, v in metrics.items() if "divergence" in k})
    # a fresh student is far from the teacher; 60 steps take it at least a third of the way
    assert metrics["heldout_divergence"] < 0.67 * metrics["heldout_divergence_before"]
    assert result.counts["student_parameters"] < result.counts["teacher_parameters"] / 2
    assert (result.checkpoint / "model.safetensors").exists()


def test_on_policy_steps_learn_the_teacher_on_the_students_own_replies(
    chat_model, trained_tokenizer, tmp_path, train_seed
) -> None:
    """GKD's lambda 0.5: about half the steps are the student's own replies (the share logged as `on_policy`), the
    tokens it wrote labelled and nothing of its prompts; the student still comes closer to the teacher."""
    from tasks.step_metrics import StepMetrics

    from .conftest import stage_run

    train = TrainSpec(**FAST | {"max_steps": 30, "lr": 1e-2, "seed": train_seed})
    spec = distill_stage(on_policy=0.5, max_new_tokens=16, train=train)
    prepared = distill.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer))
    assert prepared.counts["prompts"] == len(prepared.datasets["prompts"]) > 0
    mlflow, run_id = stage_run(tmp_path, "d")
    inputs = StageInputs(
        SMALL,
        trained_tokenizer,
        prepared.datasets,
        stage_models={"sft": chat_model},
        callbacks=(StepMetrics(mlflow, run_id),),
    )
    metrics = distill.run(spec, inputs, tmp_path / "w").metrics
    assert metrics["heldout_divergence"] < 0.8 * metrics["heldout_divergence_before"]
    shares = [m.value for m in mlflow.get_metric_history(run_id, "on_policy")]
    assert shares and 0.2 < sum(shares) / len(shares) < 0.8
    assert all(m.value > 0 for m in mlflow.get_metric_history(run_id, "own_reply_length"))


def test_a_teacher_with_another_tokenizer_is_refused_naming_both(chat_model, trained_tokenizer, tmp_path) -> None:
    from stages import tokenizer

    other = tokenizer.run(
        TokenizerTrain(vocab_size=300),
        ["another corpus altogether"] * 50,
        "chatml",
        tmp_path / "other",
    ).checkpoint
    spec = distill_stage(teacher=str(chat_model))
    datasets = distill.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer)).datasets
    with pytest.raises(ModelError, match=r"has a tokenizer of \d+ tokens that is not the pipeline's"):
        distill.run(spec, StageInputs(SMALL, other, datasets), tmp_path / "w")


DISTILL_SPEC = """
name: d
model: {{init: {{hidden_size: 64, layers: 2, heads: 2, max_seq_len: 512}}}}
stages:
  - {{name: pretrain, kind: pretrain, data: {data}/pretrain.jsonl}}
  - {{name: reward, kind: reward, data: {data}/preference.jsonl}}
  - {{name: distill, kind: distill, from: pretrain, data: {data}/sft.jsonl, teacher: {teacher}}}
"""


@pytest.mark.parametrize(
    "teacher, said",
    [
        ("sft", "learns from teacher 'sft', which is not an earlier language-model stage"),
        ("reward", "learns from teacher 'reward', which is not an earlier language-model stage"),
        ("./nowhere", "stages[2].teacher: nowhere is not a folder"),
        ("{model}", "the pipeline trains a tokenizer of its own, which no outside model shares"),
    ],
)
def test_a_teacher_that_cannot_teach_is_refused_when_the_spec_loads(tmp_path, chat_model, teacher, said) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(DISTILL_SPEC.format(data=QUICK.parent / "data", teacher=teacher.format(model=chat_model)))
    with pytest.raises((SpecError, ValueError), match=re.escape(said)):
        load_spec(path)
