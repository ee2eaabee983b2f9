"""Leases that cannot split (tasks/lineage.py): a stalled owner stops before it records a stage twice, a lease outlasts
MLflow's retries, and no process judges the pids of another pid namespace. A real MLflow store, no training."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tasks import lineage
from tasks.home import lease_seconds, mlflow_retry_seconds

ROOT = Path(__file__).resolve().parent.parent


def store(root: Path) -> tuple[MlflowClient, str]:
    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow, mlflow.create_experiment("leases", artifact_location=(root / "artifacts").as_uri())


def test_a_stalled_owner_whose_run_was_closed_by_another_stops_before_recording_it(tmp_path: Path) -> None:
    mlflow, experiment = store(tmp_path)
    ours = mlflow.create_run(experiment, run_name="sft", tags=lineage.process_tags()).info.run_id
    lineage.still_held(mlflow, ours)  # held: finishing goes on

    # this process stalled past its lease; another worker found the run dead, closed it and took the stage over
    mlflow.set_tag(ours, "lifecycle.killed", "its lease ran out at 12:00:00, so its process was found dead")
    mlflow.set_terminated(ours, status="KILLED")
    with pytest.raises(lineage.LeaseLost, match=f"run {ours} is no longer this process's .its lease ran out"):
        lineage.still_held(mlflow, ours)

    # a run another process opened is not this one's to finish either
    theirs = mlflow.create_run(experiment, tags=lineage.process_tags() | {"lifecycle.pid": "1"}).info.run_id
    with pytest.raises(lineage.LeaseLost):
        lineage.still_held(mlflow, theirs)


def test_the_default_lease_outlasts_a_renewal_that_mlflow_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIFECYCLE_LEASE_SECONDS", raising=False)
    for name in ("MAX_RETRIES", "BACKOFF_FACTOR", "BACKOFF_JITTER"):
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}", raising=False)
    # MLflow's defaults: 7 retries after 2, 4, ..., 120 s (urllib3's cap), each plus up to 1 s of jitter
    assert mlflow_retry_seconds() == 2 + 4 + 8 + 16 + 32 + 64 + 120 + 7
    # renewed every quarter lease, one renewal retried to the end: the lease has not run out when it lands
    assert lease_seconds() / 4 + mlflow_retry_seconds() <= lease_seconds()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert lease_seconds() == 60
    monkeypatch.setenv("LIFECYCLE_LEASE_SECONDS", "6")
    assert lease_seconds() == 6


def test_a_pid_is_judged_only_in_its_own_pid_namespace(tmp_path: Path) -> None:
    mlflow, experiment = store(tmp_path)
    expired = lineage.process_tags() | {lineage.LEASE: f"{time.time() - 1}"}
    here = mlflow.create_run(experiment, tags=expired).info.run_id
    assert lineage.alive(mlflow.get_run(here))  # this host, this namespace: our live pid says so, lease or not

    # another container given the same host name, whose pid happens to be live here too: its lease decides
    other = expired | {"lifecycle.pid_namespace": "pid:[1]", "lifecycle.pid": str(os.getpid())}
    there = mlflow.create_run(experiment, tags=other).info.run_id
    assert not lineage.alive(mlflow.get_run(there))


def test_no_worker_replica_is_given_a_fixed_host_name() -> None:
    compose = yaml.safe_load((ROOT / "deployments" / "compose.yaml").read_text())
    fixed = {
        name: service["environment"]["LIFECYCLE_HOST"]
        for name, service in compose["services"].items()
        if isinstance(service.get("environment"), dict) and "LIFECYCLE_HOST" in service["environment"]
    }
    assert fixed == {}, "replicas of a service would share one host name and judge each other's pids"


def test_two_first_runs_of_a_spec_share_the_experiment_the_other_made(tmp_path: Path, monkeypatch) -> None:
    from tasks.home import Home

    mlflow, _ = store(tmp_path)
    made = mlflow.create_experiment("new-spec")  # by the other run, just after this one looked and found none
    looks = iter([None])
    real = mlflow.get_experiment_by_name
    monkeypatch.setattr(mlflow, "get_experiment_by_name", lambda name: next(looks, None) or real(name))
    assert lineage.experiment_id(mlflow, Home(tmp_path), "new-spec") == made
