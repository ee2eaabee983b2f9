"""`lifecycle gc`: a home's work folders and cache entries judged against a real MLflow store, listed with sizes,
removed only where nothing will read them again."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.cli import main
from tasks import lineage
from tasks.home import Home

from .conftest import use_home
from .test_mirror import checkpoint
from .test_seals import stage_run

FINGERPRINT = "0123456789abcdef" * 4


def stage(mlflow: MlflowClient, experiment: str, name: str, fingerprint: str, status: str | None) -> str:
    tags = {"lifecycle.stage": name, "lifecycle.fingerprint": fingerprint} | lineage.process_tags()
    run_id = mlflow.create_run(experiment, run_name=name, tags=tags).info.run_id
    if status is not None:
        mlflow.set_terminated(run_id, status)
    return run_id


def work(home: Home, name: str, fingerprint: str) -> Path:
    folder = home.root / "work" / "toy" / f"{name}-{fingerprint[:16]}"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_bytes(os.urandom(50_000))
    return folder


def test_gc_removes_what_no_run_will_read_and_keeps_what_a_resume_or_a_live_stage_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    root = tmp_path / "home"
    use_home(monkeypatch, root)
    home = Home(root)
    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = mlflow.create_experiment("toy", artifact_location=(root / "artifacts").as_uri())

    finished = work(home, "sft", FINGERPRINT)
    checkpoint(finished / "trainer", 3)
    stage(mlflow, experiment, "sft", FINGERPRINT, "FINISHED")
    killed = work(home, "dpo-lora", "fedcba9876543210" * 4)  # a stage name with a dash
    for step in (3, 6):
        checkpoint(killed / "trainer", step)
    (killed / "trainer" / "checkpoint-9").mkdir()  # cut short by the kill: no state file
    stage(mlflow, experiment, "dpo-lora", "fedcba9876543210" * 4, "KILLED")
    live = work(home, "grpo", "00112233445566778899" * 3)
    stage(mlflow, experiment, "grpo", "00112233445566778899" * 3, None)  # RUNNING, by this live process

    kept_model, _ = stage_run(mlflow, experiment, tmp_path, "pretrain")  # a READY logged model
    model_id = mlflow.get_run(kept_model).data.tags["lifecycle.model_id"]
    for key in (model_id, "m-" + "9" * 32, "checkpoint.partial-999999999"):
        (root / "cache" / "checkpoint" / key).mkdir(parents=True)
        (root / "cache" / "checkpoint" / key / "model.safetensors").write_bytes(b"x" * 1000)
    (root / "cache" / "datasets" / "a1b2").mkdir(parents=True)

    assert main(["gc", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    table = [re.split(r"\s{2,}", line) for line in listed.splitlines()[2:] if line.startswith(("work", "cache"))]
    rows = {path: state for path, _, state, _ in table}
    assert rows == {
        f"work/toy/{finished.name}": "to remove",
        f"work/toy/{killed.name}/trainer/checkpoint-3": "to remove",
        f"work/toy/{killed.name}/trainer/checkpoint-6": "kept",  # where a re-run resumes
        f"work/toy/{killed.name}/trainer/checkpoint-9": "to remove",  # cut short by the kill
        f"work/toy/{live.name}": "kept",
        "cache/checkpoint/checkpoint.partial-999999999": "to remove",
        f"cache/checkpoint/m-{'9' * 32}": "to remove",  # its model is gone from the store; the live one's stays
        "cache/datasets/a1b2": "kept",
    }, listed
    assert finished.exists() and "run without --dry-run to remove it" in listed

    assert main(["gc"]) == 0
    said = capsys.readouterr().out
    assert not finished.exists() and not (killed / "trainer" / "checkpoint-3").exists()
    assert (killed / "trainer" / "checkpoint-6" / "trainer_state.json").exists() and live.exists()
    assert (root / "cache" / "checkpoint" / model_id).exists() and not (
        root / "cache" / "checkpoint" / f"m-{'9' * 32}"
    ).exists()
    assert said.strip().splitlines()[-1].endswith(f"removed from {root}")

    assert main(["gc", "--unfinished"]) == 0
    assert not killed.exists() and live.exists()  # the live stage's folder, never
