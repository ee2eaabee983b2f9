"""Trainer callbacks that write into a stage's MLflow run: the per-step logs, and (when mirroring is on) each in-stage
checkpoint as it is saved (`tasks.mirror`)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric
from transformers import TrainerCallback

from schemas.errors import LifecycleError
from stages.common.progress import say, transfer
from tasks import mirror


def recorders(mlflow: MlflowClient, run_id: str) -> tuple[TrainerCallback, ...]:
    """The callbacks a stage's Trainer is given on the process that records to run `run_id` (rank 0)."""
    return (StepMetrics(mlflow, run_id),) + ((MirrorCheckpoints(mlflow, run_id),) if mirror.enabled() else ())


class StepMetrics(TrainerCallback):
    """Sends the Trainer's logs to one MLflow run, by id, from the main process only.

    A tracking server that does not answer (after MLflow's own retries) does not stop training: the steps' metrics
    are kept and sent with the next log, in order. When training ends with some still unsent, the stage fails with
    one line saying so: its in-stage checkpoints are on disk, and a run once the server answers resumes it."""

    BATCH = 1000  # MLflow takes at most this many metrics in one log_batch

    def __init__(self, mlflow: MlflowClient, run_id: str):
        self.mlflow = mlflow
        self.run_id = run_id
        self.pending: list[Metric] = []
        self.failing: str | None = None  # the store's last refusal, said once until it answers again

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = int(time.time() * 1000)
        self.pending += [
            Metric(k, float(v), now, state.global_step)
            for k, v in logs.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        self.send(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.pending and not self.send(state.global_step):
            raise StoreUnreachable(
                f"stage {args.run_name}: the tracking server at {self.mlflow.tracking_uri} took no step metrics since "
                f"step {self.pending[0].step} ({self.failing}); {len(self.pending)} are unsent. Training finished and "
                "its in-stage checkpoints are on disk: run again once the server answers, and the stage resumes"
            )

    def send(self, step: int) -> bool:
        """Send what is pending, oldest first; False (and the metrics kept) when the store does not take them."""
        try:
            while self.pending:
                self.mlflow.log_batch(self.run_id, metrics=self.pending[: self.BATCH])
                del self.pending[: self.BATCH]
        except Exception as err:  # the store's answer, whatever it is: training goes on, the metrics wait
            if self.failing is None:
                say(
                    f"step {step}: the tracking server did not take the step metrics ({type(err).__name__}: {err}); "
                    "they are kept and sent once it answers"
                )
            self.failing = f"{type(err).__name__}: {err}"
            return False
        if self.failing is not None:
            say(f"step {step}: the tracking server answers again; the kept step metrics are sent")
            self.failing = None
        return True


class StoreUnreachable(LifecycleError):
    """The tracking server stopped taking a stage's records for longer than training lasted."""


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
