"""kill -9 in the middle of SFT, then run again: finished stages are reused, SFT resumes from its checkpoint."""

from __future__ import annotations

import os
import signal

from mlflow import MlflowClient

from flows.lifecycle import lifecycle
from schemas.load import load_spec
from tasks.claims import stage_statuses
from tasks.home import Home
from tasks.lineage import client, runs_of
from tasks.plan import plan

from .conftest import QUICK, cli_env, start_run, use_home, wait_for_checkpoint

# quick.yaml with an SFT stage long enough to be killed after its first checkpoint
SPEC = """
name: quick
model: {{init: {{hidden_size: 64, layers: 2, heads: 2, max_seq_len: 256}}}}
tokenizer: {{train: {{vocab_size: 512}}}}
stages:
  - {{name: pretrain, kind: pretrain, data: {data}/pretrain.jsonl, packing: {{block_size: 128}},
      train: {{max_steps: 20, batch_size: 8}}}}
  - name: sft
    kind: sft
    data: {data}/sft.jsonl
    train: {{max_steps: 120, batch_size: 8, save_steps: 10, logging_steps: 10}}
"""


def test_killed_sft_resumes_from_its_checkpoint_and_reuses_finished_stages(prefect_api, tmp_path, monkeypatch) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(SPEC.format(data=QUICK.parent / "data"))
    root = tmp_path / "home"
    process = start_run(spec_path, cli_env(root, prefect_api))
    try:
        checkpoint = wait_for_checkpoint(root / "work", "*/sft-*", process, timeout=240)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    killed_at = int(checkpoint.name.split("-")[1])

    use_home(monkeypatch, root)
    home = Home.from_env()
    stages = plan(load_spec(spec_path))
    assert [s.state for s in stage_statuses(client(home), home, "quick", stages)] == ["finished", "finished", "failed"]

    runs = lifecycle(str(spec_path))

    mlflow = MlflowClient(home.tracking_uri)
    experiment = mlflow.get_experiment_by_name("quick").experiment_id
    for stage in stages[:2]:  # trained once, before the kill; reused after it
        (only,) = runs_of(mlflow, experiment, stage)
        assert only.info.run_id == runs[stage.name]
    sft_runs = runs_of(mlflow, experiment, stages[2])
    assert [r.info.status for r in sft_runs] == ["FINISHED", "KILLED"]
    resumed = sft_runs[0]
    assert int(resumed.data.tags["lifecycle.resumed_from_step"]) >= killed_at >= 10
    assert resumed.data.params["global_step"] == "120"
    assert [s.state for s in stage_statuses(mlflow, home, "quick", stages)] == ["finished"] * 3
