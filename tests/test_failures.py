"""Failures end in one clear message and an honest record: a diverging stage, a stage another process is running."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file

from schemas.load import load_spec
from tasks import claims, lineage
from tasks.home import Home
from tasks.plan import plan

from .conftest import QUICK, cli_env, start_run, wait_for_checkpoint

DATA = QUICK.parent / "data"

# lr 1e6 with no warmup: the second step's gradient is NaN; every step saves, so the first is kept as the last good one
DIVERGING = f"""
name: diverging
model: {{init: {{hidden_size: 64, layers: 2, heads: 2, max_seq_len: 128}}}}
tokenizer: {{train: {{vocab_size: 512}}}}
stages:
  - {{name: pretrain, kind: pretrain, data: {DATA}/pretrain.jsonl, packing: {{block_size: 64}},
      train: {{max_steps: 20, batch_size: 4, lr: 1.0e+6, warmup: 0, save_steps: 1, logging_steps: 1, precision: fp32}}}}
  - {{name: sft, kind: sft, data: {DATA}/sft.jsonl, train: {{max_steps: 4, batch_size: 4}}}}
"""

# pretrain, then an SFT stage long enough to be caught running
LONG = """
name: {name}
model: {{init: {{hidden_size: 64, layers: 2, heads: 2, max_seq_len: 256}}}}
tokenizer: {{train: {{vocab_size: 512, data: [{data}/pretrain.jsonl]}}}}
stages:
  - {{name: pretrain, kind: pretrain, data: {data}/pretrain.jsonl, packing: {{block_size: 128}},
      train: {{max_steps: 4, batch_size: 4}}}}
  - {{name: sft, kind: sft, data: {data}/sft.jsonl, max_len: 128,
      train: {{max_steps: 2000, batch_size: 4, save_steps: 3}}}}
"""


def run(spec: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(spec)], env=env, capture_output=True, text=True, timeout=900
    )


def test_a_diverging_stage_stops_at_that_step_fails_and_keeps_the_last_good_checkpoint(prefect_api, tmp_path) -> None:
    spec = tmp_path / "diverging.yaml"
    spec.write_text(DIVERGING)
    root = tmp_path / "home"
    done = run(spec, cli_env(root, prefect_api))

    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage pretrain diverged at step 2: its weights are not finite"), last
    assert "(last finite loss " in last and last.endswith("then run again.")
    saved = sorted((root / "work" / "diverging").glob("pretrain-*/trainer/checkpoint-*"))
    assert [folder.name for folder in saved] == ["checkpoint-1"] and str(saved[0]) in last
    assert all(bool(tensor.isfinite().all()) for tensor in load_file(saved[0] / "model.safetensors").values())

    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in mlflow.search_runs([mlflow.get_experiment_by_name("diverging").experiment_id])}
    assert set(runs) == {"diverging", "tokenizer", "pretrain"}  # SFT never started on NaN weights
    assert runs["pretrain"].info.status == "FAILED" and runs["diverging"].info.status == "FAILED"
    assert "diverged at step 2" in runs["pretrain"].data.tags["lifecycle.error"]
    assert all(math.isfinite(v) for k, v in runs["pretrain"].data.metrics.items() if k == "loss")


def test_a_stage_being_run_is_refused_to_a_second_process_and_other_pipelines_run_beside_it(
    prefect_api, tmp_path
) -> None:
    root = tmp_path / "home"
    env = cli_env(root, prefect_api)
    specs = {}
    for name in ("first", "second"):  # the same stages under two names: two pipelines with equal fingerprints
        specs[name] = tmp_path / f"{name}.yaml"
        specs[name].write_text(LONG.format(name=name, data=DATA))
    first = start_run(specs["first"], env)
    try:
        wait_for_checkpoint(root / "work", "first/sft-*", first)
        again = run(specs["first"], env)
        assert again.returncode == 2
        message = again.stderr.strip().splitlines()[-1]
        assert message.startswith(f"error: stage sft is being run right now by pid {first.pid} on "), message
        assert "wait for it to finish" in message

        other = start_run(specs["second"], env)
        try:  # the other pipeline trains its own SFT beside the first one's, in its own work folder
            wait_for_checkpoint(root / "work", "second/sft-*", other)
        finally:
            other.kill()
            other.wait()
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    first_sft, second_sft = (next((root / "work" / name).glob("sft-*")) for name in ("first", "second"))
    assert first_sft.name == second_sft.name  # same fingerprint, separate folders


# pretrain, then an SFT stage that saves every 3 steps, to be caught running, and short enough for a second worker
TAKEN_OVER = """
name: leased
model: {{init: {{hidden_size: 64, layers: 2, heads: 2, max_seq_len: 256}}}}
tokenizer: {{train: {{vocab_size: 512, data: [{data}/pretrain.jsonl]}}}}
stages:
  - {{name: pretrain, kind: pretrain, data: {data}/pretrain.jsonl, packing: {{block_size: 128}},
      train: {{max_steps: 4, batch_size: 4}}}}
  - {{name: sft, kind: sft, data: {data}/sft.jsonl, max_len: 128,
      train: {{max_steps: 60, batch_size: 4, save_steps: 3}}}}
"""


def test_a_stage_killed_on_another_host_is_taken_over_once_its_lease_runs_out_and_not_before(
    prefect_api, tmp_path
) -> None:
    spec = tmp_path / "leased.yaml"
    spec.write_text(TAKEN_OVER.format(data=DATA))
    store = f"sqlite:///{tmp_path / 'shared.db'}"  # two homes that share only the store
    elsewhere = cli_env(tmp_path / "a", prefect_api) | {
        "MLFLOW_TRACKING_URI": store,
        "LIFECYCLE_HOST": "elsewhere",  # its pid means nothing here: only its lease says whether it lives
        "LIFECYCLE_LEASE_SECONDS": "6",
    }
    first = start_run(str(spec), elsewhere)
    try:
        wait_for_checkpoint(tmp_path / "a" / "work", "leased/sft-*", first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    killed = time.time()

    mlflow = MlflowClient(store)
    experiment = mlflow.get_experiment_by_name("leased").experiment_id
    sft = plan(load_spec(spec))[2]
    (dead,) = lineage.runs_of(mlflow, experiment, sft, "RUNNING")
    assert dead.data.tags["lifecycle.host"] == "elsewhere"
    # renewed every 1.5 s until the kill: still alive on the store's word, and a claim is refused
    assert time.time() < lineage.lease_until(dead) <= killed + 6.5
    assert claims.state(dead) == "running"
    with pytest.raises(lineage.StageBusy, match="being run right now by pid .* on elsewhere"):
        with claims.claim(mlflow, Home(tmp_path / "b"), experiment, sft):
            pass
    # its work folder is gone with its machine: the stage restarts, and says so
    shutil.rmtree(tmp_path / "a" / "work")
    time.sleep(max(0.0, lineage.lease_until(dead) - time.time()) + 0.2)
    assert claims.state(mlflow.get_run(dead.info.run_id)) == "failed"

    second = run(spec, cli_env(tmp_path / "b", prefect_api) | {"MLFLOW_TRACKING_URI": store})
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"stage sft restarts from step 0: the in-stage checkpoints of its unfinished run {dead.info.run_id}" in (
        second.stderr
    )
    runs = lineage.runs_of(mlflow, experiment, sft)
    assert [r.info.status for r in runs] == ["FINISHED", "KILLED"]
    assert "its lease ran out at" in runs[1].data.tags["lifecycle.killed"]
    assert runs[0].data.tags["lifecycle.resumed_from_step"] == "0" and runs[0].data.params["global_step"] == "60"
    assert runs[0].info.start_time / 1000 >= lineage.lease_until(dead)


def test_of_two_workers_racing_to_start_a_stage_exactly_one_trains_it(tmp_path) -> None:
    spec = tmp_path / "raced.yaml"
    spec.write_text(TAKEN_OVER.format(data=DATA).replace("leased", "raced"))
    stage = plan(load_spec(spec))[1]
    mlflow = MlflowClient(f"sqlite:///{tmp_path / 'shared.db'}")
    experiment = mlflow.create_experiment("raced", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = mlflow.create_run(experiment).info.run_id
    both_claimed = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def worker(name: str) -> None:  # a home of its own: its claim file does not see the other's
        home = Home(tmp_path / name)
        with claims.claim(mlflow, home, experiment, stage):
            both_claimed.wait()  # both looked and found no run: each opens one
            try:
                outcomes[name] = lineage.start_stage_run(
                    mlflow, experiment, stage, parent, None, None, home.work(stage)
                )
            except lineage.StageBusy as err:
                outcomes[name] = str(err)

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    runs = lineage.runs_of(mlflow, experiment, stage)
    assert sorted(r.info.status for r in runs) == ["KILLED", "RUNNING"]
    (winner,) = [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    (loser,) = [r for r in runs if r.info.status == "KILLED"]
    refusal = f"stage pretrain is being run right now by {lineage.owner(mlflow.get_run(winner))}"
    assert sorted(outcomes.values(), key=len) == [
        winner,
        f"{refusal}; wait for it to finish or stop that process, then run again",
    ]
    assert loser.data.tags["lifecycle.killed"].startswith("lost the claim on stage pretrain to pid")


def test_sigterm_ends_a_run_with_one_line_and_a_record_the_next_run_resumes_from(prefect_api, tmp_path) -> None:
    """How Docker, Kubernetes and Slurm stop a job: SIGTERM to the command, then (after a grace period) SIGKILL."""
    root, spec = tmp_path / "home", tmp_path / "leased.yaml"
    spec.write_text(TAKEN_OVER.format(data=DATA))
    env = cli_env(root, prefect_api)
    first = start_run(str(spec), env)
    try:
        wait_for_checkpoint(root / "work", "leased/sft-*", first)
        first.send_signal(signal.SIGTERM)
        said = first.communicate(timeout=60)[1]
    finally:
        first.kill()
    assert first.returncode == 143 and "Traceback" not in said
    assert said.strip().splitlines()[-1] == (
        f"error: stopped by SIGTERM; the stage it was in is recorded as KILLED, and `lifecycle run {spec}` resumes it "
        "from its last in-stage checkpoint, reusing every finished stage"
    )
    mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = mlflow.get_experiment_by_name("leased").experiment_id
    stopped = {r.info.run_name: r for r in mlflow.search_runs([experiment]) if r.info.status != "FINISHED"}
    assert {name: (r.info.status, r.data.tags["lifecycle.error"]) for name, r in stopped.items()} == {
        name: ("KILLED", "stopped by SIGTERM") for name in ("leased", "sft")
    }

    again = run(spec, env)
    assert again.returncode == 0, again.stderr[-3000:]
    sft = mlflow.search_runs([experiment], "attributes.run_name = 'sft' and attributes.status = 'FINISHED'")[0]
    assert int(sft.data.tags["lifecycle.resumed_from_step"]) >= 3 and "stage pretrain: reused" in again.stderr


def test_a_full_disk_while_saving_marks_nothing_finished_says_so_and_the_next_run_resumes(
    prefect_harness, tmp_path, monkeypatch
) -> None:
    import errno

    from flows.cli import _disk_full
    from flows.lifecycle import lifecycle
    from stages.common import checkpoint

    from .conftest import use_home

    root, spec = tmp_path / "home", tmp_path / "leased.yaml"
    spec.write_text(TAKEN_OVER.format(data=DATA))
    use_home(monkeypatch, root)
    save = checkpoint.save

    def full(trainer, tokenizer, workdir, *args, **kwargs):
        if "sft" in str(workdir):  # the SFT stage's final save: its in-stage checkpoints are on disk already
            raise OSError(errno.ENOSPC, "No space left on device", str(workdir / "model" / "model.safetensors"))
        return save(trainer, tokenizer, workdir, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", full)
    with pytest.raises(OSError) as failed:
        lifecycle(str(spec))
    said = _disk_full(failed.value)
    assert said.startswith("the disk is full writing ") and "model.safetensors (no space left on device)" in said
    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("leased").experiment_id
    sft = mlflow.search_runs([experiment], "attributes.run_name = 'sft'")[0]
    assert sft.info.status == "FAILED" and "No space left on device" in sft.data.tags["lifecycle.error"]
    assert "lifecycle.model_id" not in sft.data.tags and not mlflow.search_logged_models(
        [experiment], filter_string="name = 'sft'"
    )

    monkeypatch.setattr(checkpoint, "save", save)
    runs = lifecycle(str(spec))  # space freed: the stage resumes from its last in-stage checkpoint
    assert int(mlflow.get_run(runs["sft"]).data.tags["lifecycle.resumed_from_step"]) == 60
