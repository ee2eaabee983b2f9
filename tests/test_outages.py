"""A tracking server that stops answering while a stage trains (tasks/step_metrics.py): a real MLflow store whose
client refuses for a while, as one past its retries does."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from transformers import TrainerState

from tasks.step_metrics import StepMetrics, StoreUnreachable


def losses(mlflow: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in mlflow.get_metric_history(run_id, "loss")]


def test_step_metrics_are_kept_through_an_outage_and_sent_in_order_when_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    mlflow = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = mlflow.create_run(mlflow.create_experiment("outage")).info.run_id
    recorder, state, args = StepMetrics(mlflow, run_id), TrainerState(), SimpleNamespace(run_name="sft")
    send = mlflow.log_batch

    def down(*args, **kwargs):
        raise MlflowException("API request failed after 7 retries: Connection refused")

    for step in range(1, 7):
        state.global_step = step
        monkeypatch.setattr(mlflow, "log_batch", down if 2 <= step <= 4 else send)  # out for three log steps
        recorder.on_log(args, state, None, logs={"loss": 1.0 / step})
        if step == 3:
            assert losses(mlflow, run_id) == [(1, 1.0)]  # training goes on, the metrics wait
    said = capsys.readouterr().err
    assert said.count("did not take the step metrics") == 1 and "step 5: the tracking server answers again" in said
    assert losses(mlflow, run_id) == [(step, 1.0 / step) for step in range(1, 7)]

    monkeypatch.setattr(mlflow, "log_batch", down)  # down again, and still down when training ends
    state.global_step = 7
    recorder.on_log(args, state, None, logs={"loss": 0.1})
    with pytest.raises(StoreUnreachable, match="took no step metrics since step 7 .*1 are unsent.*the stage resumes"):
        recorder.on_train_end(args, state, None)
