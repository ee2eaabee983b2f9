"""In-stage checkpoints mirrored to the store (tasks/mirror.py) and the takeover that reads them: a real MLflow store
(sqlite and a local artifact folder), real checkpoint folders, no training."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from mlflow import MlflowClient

from schemas.load import load_spec
from stages.common.contract import TRAINER_STATE
from tasks import claims, mirror
from tasks.home import Home
from tasks.plan import plan

from .conftest import QUICK


def checkpoint(folder: Path, step: int) -> Path:
    """An in-stage checkpoint as the Trainer leaves it, a DeepSpeed-like subfolder included."""
    path = folder / f"checkpoint-{step}"
    (path / f"global_step{step}").mkdir(parents=True)
    (path / "model.safetensors").write_bytes(os.urandom(300_000))
    (path / "optimizer.pt").write_bytes(os.urandom(600_000))
    (path / f"global_step{step}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(1000))
    (path / TRAINER_STATE).write_text(json.dumps({"global_step": step}))
    return path


def same(left: Path, right: Path) -> bool:
    files = sorted(p.relative_to(left) for p in left.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(right) for p in right.rglob("*") if p.is_file()) and all(
        (left / f).read_bytes() == (right / f).read_bytes() for f in files
    )


def store(tmp_path: Path) -> tuple[MlflowClient, str]:
    mlflow = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow, mlflow.create_experiment("mirror", artifact_location=(tmp_path / "artifacts").as_uri())


def test_a_run_keeps_its_newest_complete_mirror_only(tmp_path) -> None:
    mlflow, experiment = store(tmp_path)
    run_id = mlflow.create_run(experiment).info.run_id
    mirror.upload(mlflow, run_id, checkpoint(tmp_path / "trainer", 10))
    assert mirror.complete(mlflow, run_id) == [(10, "trainer/checkpoint-10")]
    # an upload killed before the state file went up: never read as a checkpoint
    mlflow.log_artifact(run_id, str(tmp_path / "trainer/checkpoint-10/model.safetensors"), "trainer/checkpoint-15")
    assert mirror.complete(mlflow, run_id) == [(10, "trainer/checkpoint-10")]

    mirror.upload(mlflow, run_id, checkpoint(tmp_path / "trainer", 20))
    assert [f.path for f in mlflow.list_artifacts(run_id, "trainer")] == ["trainer/checkpoint-20"]
    assert mlflow.get_run(run_id).data.tags[mirror.MIRRORED] == "20"

    mirror.drop(mlflow, [mlflow.get_run(run_id)])
    assert mlflow.list_artifacts(run_id, "trainer") == []


def test_a_takeover_copies_a_reachable_folder_else_downloads_a_mirror_else_says_the_stage_restarts(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("LIFECYCLE_HOST", "worker-b")  # the dead runs were opened on another host
    mlflow, experiment = store(tmp_path)
    stage = plan(load_spec(QUICK))[1]
    home = Home(tmp_path / "b")
    elsewhere = tmp_path / "a" / "work" / stage.folder
    saved = checkpoint(elsewhere / "trainer", 10)

    def dead_run(started: int) -> str:
        tags = {"lifecycle.fingerprint": stage.fingerprint, "lifecycle.workdir": str(elsewhere)}
        tags |= {"lifecycle.host": "worker-a", "lifecycle.pid": "1", "lifecycle.lease_until": f"{time.time() - 1}"}
        run_id = mlflow.create_run(experiment, start_time=started, tags=tags).info.run_id
        mlflow.set_terminated(run_id, status="KILLED")
        return run_id

    def take_over() -> str | None:
        with claims.claim(mlflow, home, experiment, stage) as taken_over:
            return taken_over

    first = dead_run(1_000)
    ours = home.work(stage) / "trainer" / "checkpoint-10"
    assert "takes over the in-stage checkpoints of run" in take_over()  # the folder is readable from here
    assert same(ours, saved)

    # the folder out of reach (another machine), the checkpoint mirrored by the run that saved it
    mirror.upload(mlflow, first, saved)
    (elsewhere / "trainer").rename(tmp_path / "gone")
    shutil.rmtree(ours.parent)
    dead_run(2_000)  # a later run of the stage, killed before its first save: the first run's mirror still counts
    assert take_over() == f"stage {stage.name} takes over the checkpoint of step 10 that run {first} mirrored"
    assert same(ours, tmp_path / "gone" / "checkpoint-10")
    assert list(ours.parent.iterdir()) == [ours]  # no partial folder left beside it

    mirror.drop(mlflow, mlflow.search_runs([experiment]))
    shutil.rmtree(ours.parent)
    said = take_over()
    assert said.startswith(f"stage {stage.name} restarts from step 0") and mirror.SWITCH in said
