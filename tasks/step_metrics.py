"""Trainer callbacks that write into a stage's MLflow run: the per-step logs, and (when mirroring is on) each in-stage
checkpoint as it is saved (`tasks.mirror`)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric
from transformers import TrainerCallback

from stages.common.progress import say, transfer
from tasks import mirror


def recorders(mlflow: MlflowClient, run_id: str) -> tuple[TrainerCallback, ...]:
    """The callbacks a stage's Trainer is given on the process that records to run `run_id` (rank 0)."""
    return (StepMetrics(mlflow, run_id),) + ((MirrorCheckpoints(mlflow, run_id),) if mirror.enabled() else ())


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


class MirrorCheckpoints(TrainerCallback):
    """Mirrors each in-stage checkpoint the Trainer saves to a run, from the main process only, one upload at a time
    in a thread of its own. A mirror that fails (after MLflow's retries) is said and training goes on: the local
    checkpoint is whole, and the next save tries again."""

    def __init__(self, mlflow: MlflowClient, run_id: str):
        self.mlflow, self.run_id = mlflow, run_id
        self.uploading: threading.Thread | None = None

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.wait()  # the previous upload first: the Trainer may rotate away the folder it reads
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.uploading = threading.Thread(target=self._mirror, args=(checkpoint,), name=f"mirror-{self.run_id}")
        self.uploading.start()

    def on_train_end(self, args, state, control, **kwargs):
        self.wait()

    def wait(self) -> None:
        if self.uploading is not None:
            self.uploading.join()
            self.uploading = None

    def _mirror(self, checkpoint: Path) -> None:
        try:
            with transfer(f"{checkpoint.name} mirrored to run {self.run_id}", "uploaded", checkpoint):
                mirror.upload(self.mlflow, self.run_id, checkpoint)
        except Exception as err:  # whatever the store answered: the stage goes on, its local checkpoint is whole
            say(f"{checkpoint.name} was not mirrored to run {self.run_id} ({type(err).__name__}: {err})")
