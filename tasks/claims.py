"""Who runs a stage: the claim a process takes on it, the runs found dead and closed, a dead run's work taken over,
and the state `lifecycle status` shows for each stage. A run is alive while its process is (on this host) or its lease
runs (anywhere): `tasks/lineage.py` keeps the lease and the heartbeat that renews it."""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run

from stages.common.folders import partial_folder
from tasks import mirror
from tasks.home import Home, host
from tasks.lineage import TAG, StageBusy, alive, busy, experiment_id, lease_until, owner, runs_of
from tasks.plan import PlannedStage


def state(run: Run | None) -> str:
    """pending, running, finished or failed; a RUNNING run whose process died (kill -9) counts as failed."""
    if run is None:
        return "pending"
    status = run.info.status
    if status == "FINISHED":
        return "finished"
    if status == "RUNNING" and alive(run):
        return "running"
    return "failed"


def close_dead(mlflow: MlflowClient, experiment: str) -> list[str]:
    """Mark every run of the experiment left RUNNING by a process that died (kill -9, a lost machine) as KILLED,
    with a tag that says why, so the UI shows what `status` shows; the ids of the runs closed."""
    closed = []
    for run in mlflow.search_runs([experiment], "attributes.status = 'RUNNING'", max_results=1000):
        if not alive(run):
            _close_dead_run(mlflow, run)
            closed.append(run.info.run_id)
    return closed


def _close_dead_run(mlflow: MlflowClient, run: Run) -> None:
    if run.data.tags.get(f"{TAG}host") == host():
        how = f"its process ({owner(run)}) was found dead"
    else:
        expired = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease_until(run)))
        how = f"its lease ran out at {expired}, so its process ({owner(run)}) was found dead"
    mlflow.set_tag(
        run.info.run_id,
        f"{TAG}killed",
        f"{how} at {time.strftime('%Y-%m-%d %H:%M:%S')} by pid {os.getpid()} on {host()}",
    )
    mlflow.set_terminated(run.info.run_id, status="KILLED")


@contextmanager
def claim(mlflow: MlflowClient, home: Home, experiment: str, stage: PlannedStage) -> Iterator[str | None]:
    """Run a stage as its only runner: a second process of this home, or a live run elsewhere, is refused with a
    message naming who has it. In a home the claim is a lock on a file, so a process that dies (kill -9) lets go of it
    at once; across homes that share only the store, `start_stage_run` settles it. Runs of this stage left RUNNING by
    a dead process are closed as KILLED, and the work of the last one that did not finish is taken over: yields a
    sentence on where the stage resumes from when that work is another home's (None when it is this home's)."""
    path = home.claim_file(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            live = [run for run in runs_of(mlflow, experiment, stage, "RUNNING") if alive(run)]
            raise StageBusy(
                f"stage {stage.name} is being run right now by {owner(live[0]) if live else 'another process'}; "
                "wait for it to finish (`lifecycle status SPEC` shows it) or stop that process, "
                "then run again"
            ) from None
        for run in runs_of(mlflow, experiment, stage, "RUNNING"):
            if alive(run):  # on another host, or in another home, that shares the store
                raise busy(stage, run)
            _close_dead_run(mlflow, run)
        yield _take_over(mlflow, home, experiment, stage)


def holder(mlflow: MlflowClient, home: Home, experiment: str, stage: PlannedStage) -> str | None:
    """Who is running the stage right now, in words (a process of this home, or a live run elsewhere); None when
    nobody is, so a claim would be granted. Takes no claim."""
    path = home.claim_file(stage)
    if path.exists():
        with open(path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                live = [run for run in runs_of(mlflow, experiment, stage, "RUNNING") if alive(run)]
                return owner(live[0]) if live else "another process of this home"
    live = [run for run in runs_of(mlflow, experiment, stage, "RUNNING") if alive(run)]
    return owner(live[0]) if live else None


def _take_over(mlflow: MlflowClient, home: Home, experiment: str, stage: PlannedStage) -> str | None:
    """Bring the in-stage checkpoints of the last unfinished run of the stage into this home's work folder when they
    are another home's: copied from its folder when that can be read from here (a shared file system, or this
    machine), else downloaded from the checkpoint it mirrored to the store (`tasks.mirror`); what was done, in words.
    Containers see the same paths on every machine, so a folder that has the dead run's path but nothing in it is
    taken as out of reach too."""
    runs = runs_of(mlflow, experiment, stage)
    if not runs or runs[0].info.status == "FINISHED" or f"{TAG}workdir" not in runs[0].data.tags:
        return None
    previous, ours = Path(runs[0].data.tags[f"{TAG}workdir"]) / "trainer", home.work(stage) / "trainer"
    if list(ours.glob("checkpoint-*")):
        return None  # this home's own work: the stage resumes from it as it always does
    # the tag is the store's word and what it names is loaded (pickled resume state): only a work folder of this very
    # stage (<home>/work/<pipeline>/<stage>-<fingerprint>, this home's or another's on a shared file system) is read
    wanted = ("work", *stage.folder.split("/"), "trainer")
    inside = previous.is_absolute() and previous.resolve().parts[-len(wanted) :] == wanted
    if previous != ours and inside and list(previous.glob("checkpoint-*")):
        partial = partial_folder(ours)
        shutil.copytree(previous, partial, dirs_exist_ok=True)
        partial.rename(ours)
        return f"stage {stage.name} takes over the in-stage checkpoints of run {runs[0].info.run_id} at {previous}"
    unfinished = [run for run in runs if run.info.status != "FINISHED"]
    if (mirrored := mirror.fetch(mlflow, unfinished, ours)) is not None:
        run, step = mirrored
        return f"stage {stage.name} takes over the checkpoint of step {step} that run {run.info.run_id} mirrored"
    if previous == ours:
        return None  # this home's own run, killed before its first save: the stage starts as it always does
    where = "are not reachable from here" if inside else "are not a work folder of this stage, so not read"
    return (
        f"stage {stage.name} restarts from step 0: the in-stage checkpoints of its unfinished run "
        f"{runs[0].info.run_id} ({owner(runs[0])}) at {previous} {where}, and none was mirrored "
        f"to the store (set {mirror.SWITCH}=1 on the workers for that)"
    )


@dataclass(frozen=True)
class StageStatus:
    name: str
    kind: str
    fingerprint: str
    state: str
    run_id: str | None
    metrics: dict[str, float]


def stage_statuses(mlflow: MlflowClient, home: Home, spec_name: str, stages: list[PlannedStage]) -> list[StageStatus]:
    """One row per stage, as the store has it; runs left RUNNING by dead processes are closed first, as a run would."""
    experiment = experiment_id(mlflow, home, spec_name, create=False)
    if experiment:
        close_dead(mlflow, experiment)
    rows = []
    for stage in stages:
        runs = runs_of(mlflow, experiment, stage) if experiment else []
        run = next((r for r in runs if r.info.status == "FINISHED"), runs[0] if runs else None)
        rows.append(
            StageStatus(
                stage.name,
                stage.kind,
                stage.fingerprint,
                state(run),
                run.info.run_id if run else None,
                dict(run.data.metrics) if run else {},
            )
        )
    return rows
