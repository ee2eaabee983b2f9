"""Per-step Trainer logs into a stage's MLflow run."""

from __future__ import annotations

import time

from mlflow import MlflowClient
from mlflow.entities import Metric
from transformers import TrainerCallback


class StepMetrics(TrainerCallback):
    """Sends the Trainer's logs to one MLflow run, by id, from the main process only."""

    def __init__(self, mlflow: MlflowClient, run_id: str):
        self.mlflow = mlflow
        self.run_id = run_id

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, state.global_step)
            for k, v in logs.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if metrics:
            self.mlflow.log_batch(self.run_id, metrics=metrics)
