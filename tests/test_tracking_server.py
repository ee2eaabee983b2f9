"""Workers with homes of their own, sharing only an MLflow tracking server that proxies the artifacts: a second worker
reuses what the first finished, one takes over a stage another was killed in, and checkpoints move over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from .conftest import QUICK, cli_env
from .test_failures import wait_for

DATA = QUICK.parent / "data"

# a tokenizer, a short pretrain and an SFT stage long enough to be killed after its first in-stage checkpoint
SPEC = f"""
name: shared
model: {{init: {{hidden_size: 64, layers: 2, heads: 2, max_seq_len: 256}}}}
tokenizer: {{train: {{vocab_size: 512, data: [{DATA}/pretrain.jsonl]}}}}
stages:
  - {{name: pretrain, kind: pretrain, data: {DATA}/pretrain.jsonl, packing: {{block_size: 128}},
      train: {{max_steps: 10, batch_size: 8}}}}
  - {{name: sft, kind: sft, data: {DATA}/sft.jsonl, max_len: 128,
      train: {{max_steps: 120, batch_size: 8, save_steps: 10, logging_steps: 10}}}}
"""


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` on a free 127.0.0.1 port: sqlite behind it, artifacts proxied (served over HTTP from a
    folder no worker is told of), job execution off: its URL."""
    folder = tmp_path_factory.mktemp("server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--serve-artifacts"]
    command += ["--artifacts-destination", str(folder / "artifacts")]
    with open(folder / "server.log", "w") as log:
        process = subprocess.Popen(
            command,
            env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _healthy(url):
            assert process.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def worker_env(root: Path, server: str, prefect_api: str) -> dict[str, str]:
    return cli_env(root, prefect_api) | {"MLFLOW_TRACKING_URI": server}


def lifecycle(spec: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(spec)], env=env, capture_output=True, text=True, timeout=900
    )


def test_workers_share_a_tracking_server_resume_each_others_stages_and_never_redo_one(
    server, prefect_api, tmp_path
) -> None:
    spec = tmp_path / "shared.yaml"
    spec.write_text(SPEC)
    first = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(spec)],
        env=worker_env(tmp_path / "a", server, prefect_api),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        checkpoint = wait_for("work/shared/sft-*/trainer/checkpoint-*/trainer_state.json", tmp_path / "a", first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    killed_at = int(checkpoint.parent.name.split("-")[1])

    # another worker, another home: takes the stage over from the dead one's checkpoint (on this machine, reachable)
    second = lifecycle(spec, worker_env(tmp_path / "b", server, prefect_api))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "takes over the in-stage checkpoints of run" in second.stderr

    mlflow = MlflowClient(server)
    experiment = mlflow.get_experiment_by_name("shared").experiment_id

    def stage_runs() -> dict[str, object]:
        runs = mlflow.search_runs([experiment], max_results=1000)
        return {r.info.run_id: r for r in runs if r.data.tags.get("lifecycle.kind") != "pipeline"}

    runs = stage_runs()
    assert not list((tmp_path / "b" / "work").glob("*/*/trainer"))  # the worker that finished cleaned up
    finished = Counter(r.data.tags["lifecycle.fingerprint"] for r in runs.values() if r.info.status == "FINISHED")
    assert sorted(finished.values()) == [1, 1, 1]  # tokenizer, pretrain, sft: each finished once
    sft = sorted((r for r in runs.values() if r.info.run_name == "sft"), key=lambda r: r.info.start_time)
    assert [r.info.status for r in sft] == ["KILLED", "FINISHED"]
    assert "found dead" in sft[0].data.tags["lifecycle.killed"]
    assert int(sft[1].data.tags["lifecycle.resumed_from_step"]) >= killed_at >= 10
    assert sft[1].data.metrics["global_step"] == 120
    # the tokenizer and pretrain were trained by the first worker and reused by the second
    assert {r.data.tags["lifecycle.workdir"].startswith(str(tmp_path / "a")) for r in runs.values()} == {True, False}

    # a third worker reuses every stage: no stage run is opened, the checkpoint comes down over HTTP
    third = lifecycle(spec, worker_env(tmp_path / "c", server, prefect_api))
    assert third.returncode == 0, third.stderr[-3000:]
    assert stage_runs().keys() == runs.keys()
    pipeline = mlflow.search_runs([experiment], "tags.`lifecycle.kind` = 'pipeline'", max_results=1)[0]
    assert pipeline.info.status == "FINISHED"
    assert all(pipeline.data.tags[f"lifecycle.stage.{name}"].endswith("(reused)") for name in ("pretrain", "sft"))
    assert not (tmp_path / "c" / "artifacts").exists() and not (tmp_path / "c" / "mlflow.db").exists()


def test_checkpoint_throughput_through_the_server_and_the_local_store(server, tmp_path) -> None:
    """Figures for a checkpoint-sized folder (64 MB in two files) up and down: the tracking server against the local
    sqlite and file store. Printed, not asserted: what is asserted is that the bytes come back whole."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    for name, size in (("model.safetensors", 60 << 20), ("optimizer.pt", 4 << 20)):
        (folder / name).write_bytes(os.urandom(size))
    total = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    local = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for label, uri, location in (("server", server, None), ("local", local, (tmp_path / "artifacts").as_uri())):
        mlflow = MlflowClient(uri)
        experiment = mlflow.create_experiment(f"throughput-{label}", artifact_location=location)
        run_id = mlflow.create_run(experiment).info.run_id
        started = time.monotonic()
        mlflow.log_artifacts(run_id, str(folder), "checkpoint")
        up = time.monotonic() - started
        started = time.monotonic()
        back = Path(mlflow.download_artifacts(run_id, "checkpoint", str(tmp_path / f"back-{label}")))
        down = time.monotonic() - started
        for file in folder.iterdir():
            assert (back / file.name).read_bytes() == file.read_bytes()
        rates = f"up at {total / up:.0f} MB/s ({up:.2f}s), down at {total / down:.0f} MB/s ({down:.2f}s)"
        print(f"checkpoint of {total:.0f} MB, {label} store: {rates}")
