"""examples/align.yaml through the real flow: PPO with a reward stage's value model, GRPO with RLOO's baseline and a
tool in its rollouts, and on-policy distillation into a fresh student, chained, recorded and reused as every stage
is."""

from __future__ import annotations

from mlflow import MlflowClient

from flows.lifecycle import lifecycle

from .conftest import ROOT, use_home

ALIGN = ROOT / "examples" / "align.yaml"


def test_the_align_example_runs_ppo_grpo_with_a_tool_and_on_policy_distillation_end_to_end(
    prefect_harness, tmp_path, monkeypatch
) -> None:
    use_home(monkeypatch, tmp_path)
    runs = lifecycle(str(ALIGN))
    mlflow = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    ppo = mlflow.get_run(runs["ppo"])
    assert ppo.data.tags["lifecycle.input_run"] == runs["sft"]
    assert {"reward", "kl", "value", "policy_loss", "value_loss", "value_clip_fraction", "heldout_reward"} <= set(
        ppo.data.metrics
    )
    assert int(ppo.data.params["value_parameters"]) > 0
    assert "ppo_samples.json" in [a.path for a in mlflow.list_artifacts(runs["ppo"])]
    # its model inputs: the policy it starts from and the reward stage's model (value model and reward both)
    inputs = {model.model_id for model in ppo.inputs.model_inputs}
    expected = {mlflow.get_run(runs[name]).data.tags["lifecycle.model_id"] for name in ("sft", "reward")}
    assert inputs == expected

    grpo = mlflow.get_run(runs["grpo-tools"])
    assert {"tool_calls", "heldout_tool_calls_before", "heldout_tool_calls"} <= set(grpo.data.metrics)

    # a fresh student a quarter of its teacher's size: the teacher's model among its inputs, and no input stage
    distill = mlflow.get_run(runs["distill"])
    assert {"on_policy", "own_reply_length"} <= set(distill.data.metrics)
    assert 0 < distill.data.metrics["on_policy"] <= 1
    assert distill.data.metrics["heldout_divergence"] < distill.data.metrics["heldout_divergence_before"]
    params = distill.data.params
    assert float(params["student_parameters"]) < float(params["teacher_parameters"]) / 2
    teacher = mlflow.get_run(runs["sft"]).data.tags["lifecycle.model_id"]
    assert {m.model_id for m in distill.inputs.model_inputs} == {teacher}
    assert "lifecycle.input_run" not in distill.data.tags

    # nothing changed: every stage is reused
    assert lifecycle(str(ALIGN)) == runs
