"""Failures end in one clear message and an honest record: a diverging stage, a stage another process is running."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient
from safetensors.torch import load_file

from .conftest import QUICK, cli_env

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


def wait_for(path_pattern: str, root: Path, process: subprocess.Popen, timeout: float = 600) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := sorted(root.glob(path_pattern)):
            return found[0]
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"nothing matched {path_pattern} in time")


def test_a_stage_being_run_is_refused_to_a_second_process_and_other_pipelines_run_beside_it(
    prefect_api, tmp_path
) -> None:
    root = tmp_path / "home"
    env = cli_env(root, prefect_api)
    specs = {}
    for name in ("first", "second"):  # the same stages under two names: two pipelines with equal fingerprints
        specs[name] = tmp_path / f"{name}.yaml"
        specs[name].write_text(LONG.format(name=name, data=DATA))
    first = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(specs["first"])],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for("work/first/sft-*/trainer/checkpoint-*/trainer_state.json", root, first)
        again = run(specs["first"], env)
        assert again.returncode == 2
        message = again.stderr.strip().splitlines()[-1]
        assert message.startswith(f"error: stage sft is being run right now by pid {first.pid} on "), message
        assert "wait for it to finish" in message

        other = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", str(specs["second"])],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:  # the other pipeline trains its own SFT beside the first one's, in its own work folder
            wait_for("work/second/sft-*/trainer/checkpoint-*/trainer_state.json", root, other)
        finally:
            other.kill()
            other.wait()
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    first_sft, second_sft = (next((root / "work" / name).glob("sft-*")) for name in ("first", "second"))
    assert first_sft.name == second_sft.name  # same fingerprint, separate folders
