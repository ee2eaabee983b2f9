"""In-stage Trainer checkpoints mirrored to the stage run's artifacts, so that a stage killed on one worker resumes on
another from its last save, not from step 0. On with `LIFECYCLE_MIRROR_CHECKPOINTS=1`, a setting of the worker (where
its work folder is and what its network costs), not of the model: off by default, since on one machine, or with homes
on a shared file system, the work folder itself is reachable and a takeover copies from it.

At each save the Trainer's new `checkpoint-N` folder goes up under the run's artifact path `trainer/checkpoint-N`, from
a thread, so training goes on while it uploads; one upload at a time: a save that finds the last one still going waits
for it. `trainer_state.json` goes up last, so a mirror is complete by the rule a folder on disk is
(`stages.common.training`: the Trainer writes that file last), and a worker killed mid-upload leaves an incomplete
mirror that nothing reads. Once a newer mirror is complete the older ones of the run are deleted, so the store holds one
checkpoint per run; when the stage finishes, the mirrors of all its runs go. The transfers are MLflow's own (its HTTP
client retries 429 and 5xx answers and dropped connections, `MLFLOW_HTTP_REQUEST_MAX_RETRIES`); nothing here retries on
its own."""

from __future__ import annotations

import hmac
import os
import shutil
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run, RunTag
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from stages.common.contract import TRAINER_STATE
from stages.common.folders import partial_folder
from stages.common.progress import say, transfer
from tasks import seals

MIRRORS = "trainer"  # the artifact folder of a run's mirrored in-stage checkpoints
MIRRORED = "lifecycle.mirrored"  # tag of a run that has mirrored a checkpoint: the last step mirrored
SWITCH = "LIFECYCLE_MIRROR_CHECKPOINTS"


def enabled() -> bool:
    return os.environ.get(SWITCH, "").strip().lower() in ("1", "true", "yes", "on")


def upload(mlflow: MlflowClient, run_id: str, checkpoint: Path) -> None:
    """One in-stage checkpoint folder to `trainer/<its name>` of the run, its state file last; then the run's other
    mirrors are deleted."""
    target, step = f"{MIRRORS}/{checkpoint.name}", int(checkpoint.name.split("-")[1])
    digest = seals.checkpoint_digest(checkpoint)  # what a worker taking the stage over checks before it loads it
    files = sorted(path for path in checkpoint.rglob("*") if path.is_file() and path.name != TRAINER_STATE)
    for path in [*files, checkpoint / TRAINER_STATE]:
        folder = path.parent.relative_to(checkpoint).as_posix()
        mlflow.log_artifact(run_id, str(path), target if folder == "." else f"{target}/{folder}")
    tags = [RunTag(MIRRORED, str(step)), RunTag(seals.MIRROR_DIGEST, digest)]
    if (seal := seals.mirror_seal(run_id, step, digest)) is not None:
        tags.append(RunTag(seals.MIRROR_SEAL, seal))
    mlflow.log_batch(run_id, tags=tags)
    for entry in mlflow.list_artifacts(run_id, MIRRORS):  # older mirrors, and any a failed upload left incomplete
        if entry.path != target:
            _delete(mlflow, run_id, entry.path)


def complete(mlflow: MlflowClient, run_id: str) -> list[tuple[int, str]]:
    """The run's complete mirrors (their state file is there), newest first: (step, artifact path)."""
    mirrors = []
    for entry in mlflow.list_artifacts(run_id, MIRRORS):
        name = entry.path.rsplit("/", 1)[-1]
        if entry.is_dir and name.startswith("checkpoint-") and name.split("-")[1].isdigit():
            if any(f.path.endswith(f"/{TRAINER_STATE}") for f in mlflow.list_artifacts(run_id, entry.path)):
                mirrors.append((int(name.split("-")[1]), entry.path))
    return sorted(mirrors, reverse=True)


def fetch(mlflow: MlflowClient, runs: list[Run], trainer_dir: Path) -> tuple[Run, int] | None:
    """The newest complete mirror of the first of `runs` (newest first) that has one, downloaded into `trainer_dir` as
    the checkpoint folder the Trainer resumes from: (that run, its step), or None when no run mirrored one.

    The Trainer's resume state is pickled (the optimizer's, DeepSpeed's): a mirror is moved into place only when its
    files are the ones the run recorded (`tasks.seals`), sealed with the team's key when one is set."""
    for run in runs:
        if MIRRORED not in run.data.tags:
            continue
        if mirrors := complete(mlflow, run.info.run_id):
            step, path = mirrors[0]
            target = trainer_dir / path.rsplit("/", 1)[-1]
            partial = partial_folder(target)
            partial.mkdir(parents=True, exist_ok=True)
            with transfer(f"mirrored {path} of run {run.info.run_id}", "downloaded", target):
                local = Path(mlflow.download_artifacts(run.info.run_id, path, str(partial)))
            try:
                _check(run, step, local)
            except seals.Refused:
                shutil.rmtree(partial)
                raise
            local.rename(target)
            shutil.rmtree(partial)
            return run, step
    return None


def _check(run: Run, step: int, folder: Path) -> None:
    """The downloaded mirror is the one the run recorded at its last mirrored step, and, with a key, sealed so."""
    tags, what = run.data.tags, f"the checkpoint of step {step} that run {run.info.run_id} mirrored"
    if tags.get(MIRRORED) != str(step):
        raise seals.Refused(f"{what}: the run records step {tags.get(MIRRORED)} as its last mirror; not loaded")
    seals.check_folder(folder, tags.get(seals.MIRROR_DIGEST), what)
    expected = seals.mirror_seal(run.info.run_id, step, tags.get(seals.MIRROR_DIGEST, ""))
    if expected is not None and not hmac.compare_digest(tags.get(seals.MIRROR_SEAL, ""), expected):
        raise seals.Refused(f"{what} is not sealed with this team's key; its pickled resume state is not loaded")


def drop(mlflow: MlflowClient, runs: list[Run]) -> None:
    """Delete the mirrors of these runs (a finished stage's, whose logged checkpoint is the record now)."""
    for run in runs:
        if MIRRORED in run.data.tags:
            try:
                _delete(mlflow, run.info.run_id, MIRRORS)
            except Exception as err:  # the stage has finished and is recorded: a mirror left behind only takes space
                say(f"the mirrored checkpoints of run {run.info.run_id} were not deleted ({type(err).__name__}: {err})")


def _delete(mlflow: MlflowClient, run_id: str, path: str) -> None:
    # MlflowClient has no call that deletes an artifact; the run's artifact repository does (the server's DELETE)
    repository = get_artifact_repository(mlflow.get_run(run_id).info.artifact_uri, tracking_uri=mlflow.tracking_uri)
    repository.delete_artifacts(path)
