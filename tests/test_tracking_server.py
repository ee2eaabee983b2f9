"""Workers with homes of their own, sharing only an MLflow tracking server that proxies the artifacts: a second worker
reuses what the first finished, one takes over a stage another was killed in, and checkpoints move over HTTP. The
server runs MLflow's basic-auth app as a team's does (deployments/compose.yaml): the workers sign in and seal their
checkpoints with the team's key; an anonymous client is refused."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow import MlflowClient

from bench.transfer import tracking_server
from tasks import mirror

from .conftest import QUICK, cli_env, start_run
from .test_mirror import checkpoint, same

DATA = QUICK.parent / "data"

# a tokenizer, a short pretrain, an SFT stage long enough to be killed after its first in-stage checkpoint, and
# an eval whose report another machine reads
SPEC = f"""
name: shared
model: {{init: {{hidden_size: 64, layers: 2, heads: 2, max_seq_len: 256}}}}
tokenizer: {{train: {{vocab_size: 512, data: [{DATA}/pretrain.jsonl]}}}}
stages:
  - {{name: pretrain, kind: pretrain, data: {DATA}/pretrain.jsonl, packing: {{block_size: 128}},
      train: {{max_steps: 10, batch_size: 8}}}}
  - {{name: sft, kind: sft, data: {DATA}/sft.jsonl, max_len: 128,
      train: {{max_steps: 60, batch_size: 8, save_steps: 10, logging_steps: 10}}}}
  - {{name: eval, kind: eval, text: [{DATA}/pretrain_heldout.jsonl], limit: 20}}
"""


ADMIN_PASSWORD = "a team's admin password"
# what every worker of the team holds: the server's account and the key its checkpoints are sealed with
CREDENTIALS = {
    "MLFLOW_TRACKING_USERNAME": "admin",
    "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD,
    "LIFECYCLE_SIGNING_KEY": "the team's signing key",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` on a free 127.0.0.1 port: sqlite behind it, artifacts proxied (served over HTTP from a
    folder no worker is told of), job execution off, basic auth with no permission by default: its URL. This process
    signs in as the workers do."""
    with tracking_server(tmp_path_factory.mktemp("server"), admin_password=ADMIN_PASSWORD) as url:
        with pytest.MonkeyPatch.context() as env:
            for name, value in CREDENTIALS.items():
                env.setenv(name, value)
            yield url


def worker_env(root: Path, server: str, prefect_api: str) -> dict[str, str]:
    return cli_env(root, prefect_api) | {"MLFLOW_TRACKING_URI": server} | CREDENTIALS


def lifecycle(spec: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(spec)], env=env, capture_output=True, text=True, timeout=900
    )


def test_workers_share_a_tracking_server_resume_each_others_stages_and_never_redo_one(
    server, prefect_api, tmp_path
) -> None:
    spec = tmp_path / "shared.yaml"
    spec.write_text(SPEC)
    mirrored = {"LIFECYCLE_MIRROR_CHECKPOINTS": "1"}  # each in-stage checkpoint goes to the server as it is saved
    first = start_run(str(spec), worker_env(tmp_path / "a", server, prefect_api) | mirrored)
    mlflow = MlflowClient(server)
    try:
        dead = wait_for_mirror(mlflow, first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    killed_at = int(dead.data.tags["lifecycle.mirrored"])
    # the first worker's disk out of reach, as another machine's would be: only its mirrored checkpoint is left
    (tmp_path / "a" / "work").rename(tmp_path / "a-disk")

    # another worker, another home: takes the stage over from the checkpoint the dead one mirrored
    second = lifecycle(spec, worker_env(tmp_path / "b", server, prefect_api) | mirrored)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"that run {dead.info.run_id} mirrored" in second.stderr

    experiment = mlflow.get_experiment_by_name("shared").experiment_id

    def stage_runs() -> dict[str, object]:
        runs = mlflow.search_runs([experiment], max_results=1000)
        return {r.info.run_id: r for r in runs if r.data.tags.get("lifecycle.kind") != "pipeline"}

    runs = stage_runs()
    assert not list((tmp_path / "b" / "work").glob("*/*/trainer"))  # the worker that finished cleaned up
    finished = Counter(r.data.tags["lifecycle.fingerprint"] for r in runs.values() if r.info.status == "FINISHED")
    assert sorted(finished.values()) == [1, 1, 1, 1]  # tokenizer, pretrain, sft, eval: each finished once
    sft = sorted((r for r in runs.values() if r.info.run_name == "sft"), key=lambda r: r.info.start_time)
    assert [r.info.status for r in sft] == ["KILLED", "FINISHED"]
    assert "found dead" in sft[0].data.tags["lifecycle.killed"]
    assert int(sft[1].data.tags["lifecycle.resumed_from_step"]) >= killed_at >= 10
    assert sft[1].data.params["global_step"] == "60"
    # both workers mirrored their saves; the stage's logged checkpoint is the record now, the mirrors are gone
    assert all("lifecycle.mirrored" in r.data.tags and not mlflow.list_artifacts(r.info.run_id, "trainer") for r in sft)
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

    # status and report from a machine that ran nothing: the server is the record
    elsewhere = worker_env(tmp_path / "d", server, prefect_api)
    status = subprocess.run(
        [sys.executable, "-m", "flows.cli", "status", str(spec), "--json"],
        env=elsewhere,
        capture_output=True,
        text=True,
    )
    assert status.returncode == 0, status.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads(status.stdout)}
    assert {name: row["state"] for name, row in rows.items()} == dict.fromkeys(
        ("tokenizer", "pretrain", "sft", "eval"), "finished"
    )
    assert rows["sft"]["run_id"] == sft[1].info.run_id
    report = subprocess.run(
        [sys.executable, "-m", "flows.cli", "report", str(spec)], env=elsewhere, capture_output=True, text=True
    )
    assert report.returncode == 0, report.stderr[-3000:]
    table = report.stdout.splitlines()
    assert table[2].split()[0] == "checkpoint" and [line.split()[0] for line in table[4:6]] == ["pretrain", "sft"]


def wait_for_mirror(mlflow: MlflowClient, process: subprocess.Popen, timeout: float = 600):
    """The SFT run of a worker, once it has mirrored an in-stage checkpoint to the server."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        experiment = mlflow.get_experiment_by_name("shared")
        if experiment is not None:
            query = "tags.`lifecycle.stage` = 'sft' and tags.`lifecycle.mirrored` != ''"
            if found := mlflow.search_runs([experiment.experiment_id], query, max_results=1):
                return found[0]
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.5)
    raise AssertionError("no in-stage checkpoint was mirrored in time")


class FlakyProxy(ThreadingHTTPServer):
    """A proxy on 127.0.0.1 in front of the tracking server that answers every third request 503 (after reading its
    body, as a busy gateway would): what a checkpoint transfer meets on a loaded server."""

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _Relay)
        self.upstream = urllib.parse.urlsplit(upstream)
        self.lock = threading.Lock()
        self.requests, self.refused = 0, 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def refuse(self) -> bool:
        with self.lock:
            self.requests += 1
            refused = self.requests % 3 == 0
            self.refused += refused
            return refused


class _Relay(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as MLflow's client pools its connections

    def relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.server.refuse():
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        upstream = http.client.HTTPConnection(self.server.upstream.hostname, self.server.upstream.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        upstream.request(self.command, self.path, body=body, headers=headers)
        answer = upstream.getresponse()
        content = answer.read()
        upstream.close()
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = relay

    def log_message(self, *args) -> None:
        pass  # the test counts the requests; a line per request says nothing more


def test_mirrored_checkpoints_go_up_and_come_down_through_transient_server_errors(
    server, tmp_path, monkeypatch
) -> None:
    # MLflow's client retries 429 and 5xx answers and dropped connections with a backoff (MLFLOW_HTTP_REQUEST_*):
    # the configuration is the client's own; only the wait between tries is cut here
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    proxy = FlakyProxy(server)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        mlflow = MlflowClient(proxy.url)
        run_id = mlflow.create_run(mlflow.create_experiment("flaky")).info.run_id
        saved = checkpoint(tmp_path / "trainer", 10)
        mirror.upload(mlflow, run_id, saved)
        assert mirror.fetch(mlflow, [mlflow.get_run(run_id)], tmp_path / "back")[1] == 10
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert same(tmp_path / "back" / "checkpoint-10", saved)
    assert proxy.refused >= 4  # every file's upload among them: each went up again, whole


def test_an_anonymous_or_wrong_client_is_refused_a_write_and_the_command_says_so_in_one_line(
    server, tmp_path, monkeypatch
) -> None:
    from mlflow.exceptions import MlflowException

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name)
    with pytest.raises(MlflowException) as refused:
        MlflowClient(server).create_experiment("anonymous")
    assert refused.value.error_code == "UNAUTHENTICATED"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "admin")  # a guessed password fares no better
    with pytest.raises(MlflowException, match="401"):
        MlflowClient(server).create_experiment("guessed")

    spec = tmp_path / "shared.yaml"
    spec.write_text(SPEC)
    env = worker_env(tmp_path / "e", server, None) | {"MLFLOW_TRACKING_PASSWORD": "wrong"}
    status = subprocess.run(
        [sys.executable, "-m", "flows.cli", "status", str(spec)], env=env, capture_output=True, text=True, timeout=120
    )
    assert status.returncode == 2 and "Traceback" not in status.stderr
    assert status.stderr.strip().splitlines()[-1] == (
        f"error: the tracking server at {server} refused these credentials (unauthenticated): set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account with access "
        "to the experiment"
    )
