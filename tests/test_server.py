"""The home's Prefect server: the first `lifecycle run` starts it, the next one reuses it, `lifecycle stop` stops it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flows import server
from tasks.home import Home, running

from .conftest import QUICK, cli_env, start_run

# the tokenizer and two pretrain steps: enough for a flow run that records a finished stage
SPEC = """
name: tiny
model: {{init: {{hidden_size: 32, layers: 1, heads: 2, max_seq_len: 64}}}}
tokenizer: {{train: {{vocab_size: 300}}}}
stages:
  - {{name: pretrain, kind: pretrain, data: {data}/pretrain_heldout.jsonl, packing: {{block_size: 32}},
      train: {{max_steps: 2, batch_size: 2}}}}
"""


def lifecycle(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True, timeout=900
    )


def test_first_run_starts_the_home_server_the_next_reuses_it_and_stop_stops_it(tmp_path: Path) -> None:
    """The home's server, asking for an auth string as a team's does (PREFECT_SERVER_API_AUTH_STRING): the runs that
    give it are served, a client without it is refused, and the command says so in one line."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(SPEC.format(data=QUICK.parent / "data"))
    secret = "lifecycle:a team's auth string"
    env = cli_env(tmp_path / "home")  # no PREFECT_API_URL: the home's own server
    env |= {"PREFECT_SERVER_API_AUTH_STRING": secret, "PREFECT_API_AUTH_STRING": secret}
    try:
        first = lifecycle("run", str(spec), env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        assert "starting this home's Prefect server" in first.stderr
        # the stage lines, not Prefect's bookkeeping, nor a link to a UI this server does not serve
        said = first.stdout + first.stderr
        assert "stage pretrain: finished as run" in said
        assert "Finished in state Completed" not in said and "View at " not in said
        # piped, as a log file is: no progress bar redrawn with carriage returns or escape codes
        assert "\r" not in said and "\x1b[" not in said and "Loading weights" not in said
        state = json.loads((tmp_path / "home" / "prefect" / "server.json").read_text())
        with urllib.request.urlopen(f"{state['url']}/health", timeout=10) as response:
            assert response.status == 200
        anonymous = urllib.request.Request(f"{state['url']}/flow_runs/filter", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(anonymous, timeout=10)
        assert refused.value.code == 401

        second = lifecycle("run", str(spec), "--verbose", env=env)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "Finished in state Completed" in second.stdout + second.stderr  # --verbose: Prefect's lines too
        assert (
            "starting this home's Prefect server" not in second.stderr
            and "Starting temporary server" not in second.stderr
        )
        assert second.stderr.count("reused from run") == 2  # tokenizer and pretrain
        assert json.loads((tmp_path / "home" / "prefect" / "server.json").read_text()) == state

        wrong = lifecycle("run", str(spec), env=env | {"PREFECT_API_AUTH_STRING": "lifecycle:guessed"})
        assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
        assert wrong.stderr.strip().splitlines()[-1] == (
            f"error: the Prefect API at {state['url']} refused this client (HTTP 401): set PREFECT_API_AUTH_STRING to "
            "the server's auth string (user:password)"
        )
    finally:
        stopped = lifecycle("stop", env=env)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not running(state["pid"]) and not (tmp_path / "home" / "prefect" / "server.json").exists()
    assert "no Prefect server was running" in lifecycle("stop", env=env).stdout


def test_a_server_that_dies_mid_stage_leaves_the_stage_recorded_and_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(SPEC.format(data=QUICK.parent / "data").replace("max_steps: 2,", "max_steps: 400,"))
    env = cli_env(tmp_path / "home") | {"PREFECT_CLIENT_MAX_RETRIES": "0"}  # the client's retries, cut short here
    run = start_run(str(spec), env)
    record = tmp_path / "home" / "prefect" / "server.json"
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "home" / "work").glob("tiny/pretrain-*")):
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-3000:]
            time.sleep(0.2)
        url = json.loads(record.read_text())["url"]
        os.kill(json.loads(record.read_text())["pid"], signal.SIGKILL)  # the server dies while the stage trains
        said = run.communicate(timeout=600)[1]
    finally:
        run.kill()
    assert run.returncode == 2 and "Traceback" not in said
    assert [line for line in said.splitlines() if line.startswith("error: ")] == [
        f"error: the Prefect API at {url} stopped answering (ConnectError: [Errno 111] Connection refused); every "
        "stage that finished is recorded in MLflow: run again once it answers, and they are reused"
    ]
    from mlflow import MlflowClient

    mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = mlflow.get_experiment_by_name("tiny").experiment_id
    assert {r.info.run_name: r.info.status for r in mlflow.search_runs([experiment])}["pretrain"] == "FINISHED"


def test_a_server_that_cannot_start_is_one_message_naming_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    # a database the server cannot create: its start fails, and says so in its log
    monkeypatch.setenv(
        "PREFECT_SERVER_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{tmp_path}/missing/folder/prefect.db"
    )
    with pytest.raises(server.ServerError, match=r"exited while starting; its log \(.*server\.log\) ends with:\n"):
        server.start(Home(tmp_path))[1]()
    assert not (tmp_path / "prefect" / "server.json").exists()


def test_the_users_prefect_api_is_used_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert server.start(Home(tmp_path))[1]() == "http://127.0.0.1:4200/api"
    assert not (tmp_path / "prefect").exists() and os.environ["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"


def test_a_server_whose_home_is_removed_stops_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home" / "prefect"))
    url = server.start(Home(tmp_path / "home"))[1]()
    pid = json.loads((tmp_path / "home" / "prefect" / "server.json").read_text())["pid"]
    assert url.startswith("http://127.0.0.1:") and running(pid)
    shutil.rmtree(tmp_path / "home")  # `make clean` while the server runs
    deadline = time.monotonic() + 4 * server.WATCH_SECONDS
    while running(pid) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # started by this process: reap it once it exits
        except ChildProcessError:
            pass
        time.sleep(0.5)
    assert not running(pid)


def test_a_recorded_pid_that_is_now_another_process_is_never_signalled(tmp_path: Path) -> None:
    """The server died and the system gave its pid to another program: `stop` (and a `run` that starts a new
    server) leaves that program alone."""
    stranger = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        folder = tmp_path / "home" / "prefect"
        folder.mkdir(parents=True)
        record = {"pid": stranger.pid, "url": "http://127.0.0.1:9/api", "prefect": "3.8.8", "started": "1"}
        (folder / "server.json").write_text(json.dumps(record))
        stopped = lifecycle("stop", env=cli_env(tmp_path / "home"))
        assert stopped.returncode == 0 and "no Prefect server was running" in stopped.stdout
        time.sleep(0.5)
        assert stranger.poll() is None and not (folder / "server.json").exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_a_server_no_request_reached_for_its_idle_time_stops_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home" / "prefect"))
    monkeypatch.setenv(server.IDLE, "6")
    url = server.start(Home(tmp_path / "home"))[1]()
    record = tmp_path / "home" / "prefect" / "server.json"
    pid = json.loads(record.read_text())["pid"]
    for _ in range(4):  # in use: a request every 2 s keeps it, past its idle time
        time.sleep(2)
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            assert response.status == 200
    assert running(pid)
    deadline = time.monotonic() + 60  # then left alone
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not running(pid) and not record.exists()
