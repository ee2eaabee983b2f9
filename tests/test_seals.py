"""Checkpoints verified before they load, and tags that are data, never paths (tasks/seals.py): a real MLflow store
(sqlite and a local artifact folder), real folders logged as models, each attack tried as a writer of the store would
try it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from schemas.errors import LifecycleError
from schemas.load import load_spec
from stages.common.contract import StageResult
from tasks import claims, mirror, seals
from tasks.home import Home
from tasks.plan import plan
from tasks.registry import ARTIFACT, MODEL_ID, fetch_checkpoint, fetch_model, log_checkpoints

from .conftest import QUICK
from .test_mirror import checkpoint


def store(root: Path) -> tuple[MlflowClient, str]:
    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow, mlflow.create_experiment("seals", artifact_location=(root / "artifacts").as_uri())


def stage_run(mlflow: MlflowClient, experiment: str, root: Path, name: str) -> tuple[str, Path]:
    """A finished stage run whose checkpoint (a small folder of its own bytes) is logged as its model."""
    folder = root / "saved" / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"stage": name}))
    (folder / "model.safetensors").write_bytes(name.encode() * 1000)
    tags = {"lifecycle.stage": name, "lifecycle.kind": "sft", "lifecycle.fingerprint": f"{name}-fingerprint"}
    run_id = mlflow.create_run(experiment, run_name=name, tags=tags | {MLFLOW_RUN_NOTE: name}).info.run_id
    log_checkpoints(mlflow, run_id, StageResult(checkpoint=folder))
    mlflow.set_terminated(run_id, "FINISHED")
    return run_id, folder


def cached(home: Home) -> list[str]:
    return sorted(p.name for p in (home.root / "cache").rglob("*") if p.is_dir() and p.parent.name == "checkpoint")


@pytest.fixture
def two_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(seals.KEY, raising=False)
    mlflow, experiment = store(tmp_path)
    pretrain, _ = stage_run(mlflow, experiment, tmp_path, "pretrain")
    sft, folder = stage_run(mlflow, experiment, tmp_path, "sft")
    return mlflow, experiment, Home(tmp_path / "home"), pretrain, sft, folder


def test_a_checkpoint_loads_as_logged_and_its_digest_is_recorded(two_stages) -> None:
    mlflow, _, home, _, sft, folder = two_stages
    model = mlflow.get_logged_model(mlflow.get_run(sft).data.tags[MODEL_ID])
    assert model.tags[seals.DIGEST] == seals.checkpoint_digest(folder)
    fetched = fetch_checkpoint(mlflow, home, mlflow.get_run(sft))
    assert (fetched / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert fetch_checkpoint(mlflow, home, mlflow.get_run(sft)) == fetched  # the cache entry, checked again
    # a local store's files are linked into the cache, not copied: one copy of the weights on the disk
    stored = Path(model.artifact_location.removeprefix("file://")) / "model.safetensors"
    assert (fetched / "model.safetensors").stat().st_ino == stored.stat().st_ino


def test_a_model_tag_moved_to_another_checkpoint_is_refused(two_stages) -> None:
    mlflow, _, home, pretrain, sft, _ = two_stages
    # the attack tried on the team set-up: one set_tag, and the next stage trained on the pretrain weights
    mlflow.set_tag(sft, MODEL_ID, mlflow.get_run(pretrain).data.tags[MODEL_ID])
    with pytest.raises(seals.Refused, match=f"stage sft \\(run {sft}\\) names model m-.*which run {pretrain} logged"):
        fetch_checkpoint(mlflow, home, mlflow.get_run(sft))
    assert cached(home) == []


def test_an_artifact_changed_in_the_store_or_the_cache_is_refused_naming_both_digests(two_stages) -> None:
    mlflow, _, home, _, sft, folder = two_stages
    model = mlflow.get_logged_model(mlflow.get_run(sft).data.tags[MODEL_ID])
    stored = Path(model.artifact_location.removeprefix("file://")) / "model.safetensors"
    stored.write_bytes(b"other weights")
    recorded = seals.checkpoint_digest(folder)
    with pytest.raises(seals.Refused, match=f"the record says {recorded[:16]}"):
        fetch_checkpoint(mlflow, home, mlflow.get_run(sft))
    assert cached(home) == [] and not list((home.root / "cache" / "checkpoint").glob("*partial*"))

    stored.write_bytes((folder / "model.safetensors").read_bytes())
    fetched = fetch_checkpoint(mlflow, home, mlflow.get_run(sft))
    (fetched / "model.safetensors").write_bytes(b"changed on disk")  # a cache entry is checked on every read
    with pytest.raises(seals.Refused, match="in the cache: its files hold sha256"):
        fetch_model(mlflow, home, model.model_id)


@pytest.mark.parametrize("kind", ["../../escaped", "/tmp/absolute", "checkpoint/../../x"])
def test_a_tag_naming_a_folder_is_checked_never_joined_into_a_path(two_stages, kind: str) -> None:
    mlflow, _, home, _, sft, _ = two_stages
    model_id = mlflow.get_run(sft).data.tags[MODEL_ID]
    mlflow.set_logged_model_tags(model_id, {ARTIFACT: kind})
    with pytest.raises(seals.Refused, match="not a folder kind"):
        fetch_model(mlflow, home, model_id)
    mlflow.set_tag(sft, MODEL_ID, kind)
    with pytest.raises(seals.Refused, match="not a logged model's id"):
        fetch_checkpoint(mlflow, home, mlflow.get_run(sft))
    for key in (kind, "..", ""):
        with pytest.raises(LifecycleError, match="not a name the home's cache takes"):
            home.cache("checkpoint", key)
    assert not (home.root.parent / "escaped").exists() and not Path("/tmp/absolute").exists()


def test_with_the_team_key_a_forged_run_a_changed_record_or_an_unsealed_model_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(seals.KEY, "the team's secret")
    mlflow, experiment = store(tmp_path)
    home = Home(tmp_path / "home")
    sft, _ = stage_run(mlflow, experiment, tmp_path, "sft")
    model_id = mlflow.get_run(sft).data.tags[MODEL_ID]
    assert fetch_model(mlflow, home, model_id).is_dir()  # sealed by this key: loads

    # a FINISHED run forged with the stage's fingerprint, naming its real model: not the model's run, and no seal
    forged = mlflow.create_run(experiment, tags=mlflow.get_run(sft).data.tags | {seals.SEAL: "0" * 64}).info.run_id
    with pytest.raises(seals.Refused, match=f"which run {sft} logged"):
        fetch_checkpoint(mlflow, home, mlflow.get_run(forged))
    # the record changed after the stage made it: the digest tag rewritten to match other weights
    mlflow.set_logged_model_tags(model_id, {seals.DIGEST: "f" * 64})
    with pytest.raises(seals.Refused, match=f"stage sft \\(run {sft}\\): its seal does not match"):
        fetch_model(mlflow, home, model_id)

    # a model recorded by a worker without the key (or another key) is refused where the key is set
    monkeypatch.delenv(seals.KEY)
    unsealed, _ = stage_run(mlflow, experiment, tmp_path, "dpo")
    monkeypatch.setenv(seals.KEY_FILE, str(tmp_path / "key"))
    (tmp_path / "key").write_text("the team's secret\n")  # a mounted secret, its newline ignored
    with pytest.raises(seals.Refused, match=f"stage dpo \\(run {unsealed}\\) has no seal"):
        fetch_checkpoint(mlflow, home, mlflow.get_run(unsealed))
    assert sorted(cached(home)) == [model_id]


def test_a_mirror_is_loaded_only_as_recorded_and_sealed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(seals.KEY, "the team's secret")
    mlflow, experiment = store(tmp_path)
    run = mlflow.create_run(experiment).info.run_id
    saved = checkpoint(tmp_path / "trainer", 10)
    mirror.upload(mlflow, run, saved)
    stored = Path(mlflow.get_run(run).info.artifact_uri.removeprefix("file://")) / "trainer/checkpoint-10/optimizer.pt"
    stored.write_bytes(b"a pickle that runs code when loaded")
    with pytest.raises(seals.Refused, match="its files hold sha256"):
        mirror.fetch(mlflow, [mlflow.get_run(run)], tmp_path / "ours")
    assert not (tmp_path / "ours" / "checkpoint-10").exists()

    stored.write_bytes((saved / "optimizer.pt").read_bytes())
    monkeypatch.setenv(seals.KEY, "another team's secret")
    with pytest.raises(seals.Refused, match="not sealed with this team's key"):
        mirror.fetch(mlflow, [mlflow.get_run(run)], tmp_path / "ours")
    monkeypatch.setenv(seals.KEY, "the team's secret")
    assert mirror.fetch(mlflow, [mlflow.get_run(run)], tmp_path / "ours")[1] == 10


@pytest.mark.parametrize("workdir", ["{tmp}/a/work/../../x", "/etc", "{tmp}/a/work/other/sft-0123456789abcdef"])
def test_a_work_folder_tag_that_is_not_this_stage_s_is_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workdir: str
) -> None:
    monkeypatch.setenv("LIFECYCLE_HOST", "worker-b")
    mlflow, experiment = store(tmp_path)
    stage = plan(load_spec(QUICK))[1]
    workdir = Path(workdir.format(tmp=tmp_path))
    if workdir.resolve().is_relative_to(tmp_path):
        checkpoint(workdir.resolve() / "trainer", 10)  # something there to copy, had the tag been trusted
    tags = {"lifecycle.fingerprint": stage.fingerprint, "lifecycle.workdir": str(workdir)}
    tags |= {"lifecycle.host": "worker-a", "lifecycle.pid": "1", "lifecycle.lease_until": f"{time.time() - 1}"}
    dead = mlflow.create_run(experiment, tags=tags).info.run_id
    mlflow.set_terminated(dead, status="KILLED")
    home = Home(tmp_path / "b")
    with claims.claim(mlflow, home, experiment, stage) as taken_over:
        assert taken_over.startswith(f"stage {stage.name} restarts from step 0") and "not a work folder" in taken_over
    assert not (home.work(stage) / "trainer").exists()
