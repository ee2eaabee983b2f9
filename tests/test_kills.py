"""kill -9 of the whole process group at seeded random moments of quick.yaml, then a plain re-run, again and again.

After every kill, and after the final run, the MLflow store and the home must show that nothing finished was
redone, no cache entry is incomplete, and a resumed stage started from its last complete in-stage checkpoint.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from mlflow import MlflowClient

from schemas.load import load_spec
from tasks.plan import plan

from .conftest import QUICK, cli_env

SEED = 20261127
KILLS = 8


def stage_runs(mlflow: MlflowClient, experiment: str) -> list:
    return [
        r for r in mlflow.search_runs([experiment], max_results=1000) if r.data.tags.get("lifecycle.kind") != "pipeline"
    ]


def complete_checkpoint(folder: Path) -> bool:
    has_weights = any(folder.glob("*.safetensors"))
    return has_weights and ((folder / "config.json").exists() or (folder / "adapter_config.json").exists())


def check_cache(root: Path) -> None:
    """Every published cache entry is whole; only `.partial-<pid>` folders may be half-written, and nothing reads
    them."""
    cache = root / "cache"
    for kind in ("checkpoint", "adapter"):
        for entry in (cache / kind).glob("*"):
            if ".partial-" not in entry.name:
                assert complete_checkpoint(entry) or (entry / "tokenizer.json").exists(), (
                    f"incomplete cache entry {entry}"
                )
    for entry in (cache / "datasets").glob("*"):
        if ".partial-" not in entry.name:
            assert (entry / "prepare_report.json").exists() and (entry / "datasets" / "dataset_dict.json").exists(), (
                entry
            )
            for reference in entry.glob("reference-*"):  # DPO's precomputed reference log-probs, published whole
                assert ".partial-" in reference.name or (reference / "reference_logps.safetensors").exists(), reference


def saved_steps(root: Path) -> dict[str, int]:
    """The newest complete in-stage checkpoint of every stage work folder, by folder name."""
    steps = {}
    for state in root.glob("work/quick/*/trainer/checkpoint-*/trainer_state.json"):
        folder = state.parent.parent.parent.name
        steps[folder] = max(steps.get(folder, 0), int(state.parent.name.split("-")[1]))
    return steps


def wait_for_stage_run(
    mlflow: MlflowClient, root: Path, since_ms: int, process: subprocess.Popen, skip: set[str], timeout: float
) -> None:
    """Until a stage run opened after `since_ms`, of a stage not in `skip`, is RUNNING (or the process ends, or time
    runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        experiment = mlflow.get_experiment_by_name("quick") if (root / "mlflow.db").exists() else None
        if experiment and any(
            r.info.status == "RUNNING" and r.info.start_time >= since_ms and r.info.run_name not in skip
            for r in stage_runs(mlflow, experiment.experiment_id)
        ):
            return
        time.sleep(0.3)


def test_random_kills_never_redo_finished_work_nor_use_partial_files(prefect_api, tmp_path) -> None:
    rng = random.Random(SEED)
    landed, stages = 0, Counter()
    for home in range(3):  # a fast machine can finish the pipeline between kills: then a new home, until a dozen landed
        kills, hit = kill_series(tmp_path / f"home-{home}", rng, KILLS - landed, prefect_api)
        landed, stages = landed + kills, stages + hit
        if landed >= KILLS:
            break
    print(f"{landed} kills; stage runs caught running: {dict(stages)}")
    assert landed >= KILLS and len(stages) >= 3  # the kills landed, and inside several stages


def kill_series(root: Path, rng: random.Random, wanted: int, prefect_api: str) -> tuple[int, Counter]:
    """Up to `wanted` kills of runs of quick.yaml in the home `root`, then a final run; every check after each kill
    and at the end. The number of kills that landed and the stage runs they caught."""
    root.mkdir(parents=True)
    env = cli_env(root, prefect_api)
    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    finished: dict[str, str] = {}  # fingerprint -> the run that finished it
    kills: list[tuple[float, dict[str, int]]] = []  # (time of the kill, newest complete checkpoint per work folder)
    hit = Counter()
    for number in range(wanted):
        started_ms = int(time.time() * 1000)
        log = root / f"run-{number}.log"
        with open(log, "w") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "run", str(QUICK)],
                env=env,
                start_new_session=True,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        if number < 2:  # during start-up, data checks and the tokenizer
            time.sleep(rng.uniform(1.0, 12.0))
        else:  # inside a stage (its preparation, training, a save, the upload, the next one's download): mostly one
            # not killed before, so the kills walk through the pipeline; sometimes the same one again, mid-resume
            skip = set() if rng.random() < 0.5 else set(hit)
            wait_for_stage_run(mlflow, root, started_ms, process, skip, timeout=600)
            time.sleep(rng.uniform(0.0, 8.0))
        if process.poll() is not None:
            assert process.returncode == 0, log.read_text()[-3000:]
            break
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        kills.append((time.time() * 1000, saved_steps(root)))

        experiment = mlflow.get_experiment_by_name("quick")
        if experiment is None:
            continue
        runs = stage_runs(mlflow, experiment.experiment_id)
        hit.update(r.info.run_name for r in runs if r.info.status == "RUNNING" and r.info.start_time >= started_ms)
        for run in runs:
            if run.info.status == "FINISHED":
                fingerprint = run.data.tags["lifecycle.fingerprint"]
                assert finished.setdefault(fingerprint, run.info.run_id) == run.info.run_id, (
                    f"{run.info.run_name} finished twice"
                )
        assert set(finished.values()) <= {r.info.run_id for r in runs if r.info.status == "FINISHED"}
        check_cache(root)

    final = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(QUICK)], env=env, capture_output=True, text=True, timeout=1800
    )
    assert final.returncode == 0, final.stderr[-3000:]

    experiment = mlflow.get_experiment_by_name("quick").experiment_id
    everything = mlflow.search_runs([experiment], max_results=1000)
    assert not [r.info.run_name for r in everything if r.info.status == "RUNNING"]
    pipelines = [r for r in everything if r.data.tags.get("lifecycle.kind") == "pipeline"]
    # the final run's (newest first); an earlier cycle may have finished too
    assert pipelines[0].info.status == "FINISHED"
    for run in pipelines:  # the killed pipelines' parent runs say they are dead, and why
        if run.info.status != "FINISHED":
            assert run.info.status == "KILLED" and "found dead" in run.data.tags["lifecycle.killed"]

    runs = stage_runs(mlflow, experiment)
    by_fingerprint = Counter(r.data.tags["lifecycle.fingerprint"] for r in runs if r.info.status == "FINISHED")
    planned = plan(load_spec(QUICK))
    assert all(by_fingerprint[stage.fingerprint] == 1 for stage in planned), by_fingerprint
    for run in runs:
        if run.info.status == "FINISHED":
            assert finished.setdefault(run.data.tags["lifecycle.fingerprint"], run.info.run_id) == run.info.run_id
            # resumed from the newest checkpoint saved before it started: at most one save interval lost
            folder = f"{run.info.run_name}-{run.data.tags['lifecycle.fingerprint'][:16]}"
            saved = max((steps.get(folder, 0) for at, steps in kills if at <= run.info.start_time), default=0)
            assert int(run.data.tags["lifecycle.resumed_from_step"]) >= saved, (run.info.run_name, saved)
        else:
            assert run.info.status in ("KILLED", "FAILED")
    check_cache(root)
    # what killed writers left is swept by the next run
    assert not list((root / "cache").glob("*/*.partial-*")) and not list(
        (root / "cache").glob("datasets/*/*.partial-*")
    )
    return len(kills), hit
