"""The command line as a user meets it: validate, errors without tracebacks, the UI serving the store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from schemas.load import load_spec

from .conftest import QUICK


def lifecycle(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"LIFECYCLE_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_validate_checks_spec_and_data_without_training(tmp_path: Path) -> None:
    done = lifecycle("validate", str(QUICK), home=tmp_path)
    assert done.returncode == 0, done.stderr
    spec = load_spec(QUICK)
    files = spec.data_contracts()  # a file two stages read in different formats is checked (and counted) in each
    rows = sum(1 for source, _, _ in files for path in source.files for line in path.read_text().splitlines() if line)
    stages = len(spec.stages) + 1  # the tokenizer is a stage too
    assert f"spec valid; {stages} stages; {len(files)} data files, {rows} rows, all valid" in done.stdout
    assert not (tmp_path / "work").exists()


def test_bad_data_fails_run_in_seconds_with_file_line_errors(tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text('{"conversations": [{"role": "user", "content": "hi"}]}\n{"text": 1}\n')
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "fine"}\n')
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: bad\nmodel: {init: {hidden_size: 64, layers: 1, heads: 1}}\nstages:\n"
        "  - {name: pretrain, kind: pretrain, data: text.jsonl}\n  - {name: sft, kind: sft, data: chat.jsonl}\n"
    )
    start = time.monotonic()
    done = lifecycle("run", str(spec), home=tmp_path / "home")
    assert done.returncode == 2 and time.monotonic() - start < 30
    assert f"{data}:1: roles: the last turn must be the assistant's" in done.stderr
    assert f"{data}:2: conversations: required" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "home" / "work").exists()


def test_bad_spec_is_one_clear_message(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(QUICK.read_text().replace("max_steps: 40", "max_steps: -4", 1))
    done = lifecycle("status", str(spec), home=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "stages[0].train.max_steps: Input should be greater than 0" in done.stderr


def test_every_subcommand_says_what_it_does_in_the_overview_and_its_own_help() -> None:
    import argparse

    from flows.cli import parser

    top = parser()
    (commands,) = [action for action in top._actions if isinstance(action, argparse._SubParsersAction)]
    listed = {choice.dest: choice.help for choice in commands._choices_actions}
    assert set(listed) == set(commands.choices) and all(len(text.split()) >= 4 for text in listed.values()), listed
    for name, sub in commands.choices.items():
        assert sub.description and len(sub.description.split()) >= 4, name  # `lifecycle NAME --help` says it too
        assert all(action.help for action in sub._actions if action.dest != "help"), name  # and every argument


def test_status_of_a_spec_never_run_is_pending(tmp_path: Path) -> None:
    done = lifecycle("status", str(QUICK), "--json", home=tmp_path)
    names = ["tokenizer", "pretrain", "sft", "sft-lora", "dpo", "pro", "tuna", "reward", "kto", "grpo", "eval"]
    assert [(row["name"], row["state"], row["run_id"]) for row in json.loads(done.stdout)] == [
        (name, "pending", None) for name in names
    ]
    header, rule, *rows = lifecycle("status", str(QUICK), home=tmp_path).stdout.splitlines()
    assert header.split() == ["stage", "kind", "fingerprint", "state", "run", "id", "metrics"] and set(rule) == {"─"}
    assert [row.split()[0] for row in rows] == names and {row.split()[3] for row in rows} == {"pending"}
    assert {row.index("pending") for row in rows} == {header.index("state")}  # aligned under its header


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ui_serves_the_project_store_on_loopback_and_ctrl_c_stops_all_of_it(quick_run, tmp_path: Path) -> None:
    import psutil
    from mlflow import MlflowClient

    root, runs = quick_run
    port = free_port()
    env = os.environ | {"LIFECYCLE_HOME": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    with open(tmp_path / "ui.out", "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "ui", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: the test's cleanup reaches whatever it left
        )
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={runs['sft']}"
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    run = json.load(response)["run"]
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the UI did not come up"
                time.sleep(0.5)
        assert run["info"]["run_name"] == "sft" and run["info"]["status"] == "FINISHED"

        # what browsing needs: mlflow's command (this process, exec'd) and one server; no job runner, no consumers
        top = psutil.Process(server.pid)
        tree = [top, *top.children(recursive=True)]
        commands = [" ".join(process.cmdline()) for process in tree]
        assert len(tree) == 2 and "-m mlflow ui" in commands[0] and "-m uvicorn" in commands[1], commands
        listening = {c.laddr for p in tree for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        assert listening == {("127.0.0.1", port)}

        experiment = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_experiment_by_name("quick").experiment_id
        link = f"quick: http://127.0.0.1:{port}/#/experiments/{experiment}/runs?workflowType=machine_learning"
        said = (tmp_path / "ui.out").read_text()
        assert link in said and "GET /api" not in said  # no line per request

        server.send_signal(signal.SIGINT)  # to the command alone, not its group: it stops what it started
        gone, left = psutil.wait_procs(tree, timeout=10)
        assert not left, [" ".join(process.cmdline()) for process in left]
    finally:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait(timeout=30)


def test_inspect_marks_what_each_stage_trains(quick_run, tmp_path: Path) -> None:
    root, _ = quick_run
    done = lifecycle("inspect", str(QUICK), "--stage", "sft", "-n", "2", home=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("--- sft example") == 2
    # how each source was read, before the examples
    sources, _, _ = done.stdout.partition("--- sft example")
    assert sources.startswith("sft data: sft.jsonl (jsonl), read as conversations; ")
    assert "shapes of the first rows: messages (200)" in sources and "sft heldout: sft_heldout.jsonl" in sources
    # the first row's first reply, trained with its end of turn, as the bundled file holds it
    first = json.loads((QUICK.parent / "data" / "sft.jsonl").read_text().splitlines()[0])["conversations"]
    reply = next(message["content"] for message in first if message["role"] == "assistant")
    assert f"<|im_start|>assistant\n⟦{reply}<|im_end|>⟧" in done.stdout
    pretrain = lifecycle("inspect", str(QUICK), "--stage", "pretrain", "-n", "1", home=root).stdout
    assert "\n--- pretrain example 1" in pretrain and pretrain.rstrip().endswith("<|endoftext|>⟧")
    # a row's chosen, then rejected
    pair = lifecycle("inspect", str(QUICK), "--stage", "dpo", "-n", "1", home=root).stdout
    assert pair.count("--- dpo example") == 2
    chosen = json.loads((QUICK.parent / "data" / "preference.jsonl").read_text().splitlines()[0])["chosen"]
    assert f"assistant\n⟦{chosen}<|im_end|>⟧" in pair
    missing = lifecycle("inspect", str(QUICK), "--stage", "nope", home=root)
    assert missing.returncode == 2 and "no stage named 'nope'; the stages are pretrain, sft" in missing.stderr

    # before any run: the tokenizer is built as the run builds it, so the examples are the run's, token for token
    fresh = lifecycle("inspect", str(QUICK), "--stage", "sft", "-n", "2", home=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    note, _, examples = fresh.stdout.partition("\n")
    assert note.startswith("note: the tokenizer stage has not run yet") and examples == done.stdout
    again = lifecycle("inspect", str(QUICK), "--stage", "sft", "-n", "2", home=tmp_path)
    assert again.stdout == done.stdout  # kept in the home's cache: built once
    assert not (tmp_path / "work").exists()  # nothing trained, nothing recorded as a stage
