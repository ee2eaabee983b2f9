"""Launched stages: 2 ranks under torchrun (DDP, DeepSpeed ZeRO-2/3) on this CPU, against one process.

The equivalence tests run one tiny pretrain stage four ways from the same weights and data and compare
the loss of every optimizer step. One optimizer step sees the same 8 rows however they are split, and
the gradient all-reduce sums the two halves' gradients: the same numbers added in another order. In
fp32 that differs in the last bits (~1e-7 relative), and AdamW's update carries such a difference on
without amplifying it over a few steps; 1e-4 relative is far below any real difference (a wrong
batch split or a skipped all-reduce changes the loss at the second step by ~1e-2).
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from examples.generate import DATA_DIR
from schemas.launch import DEEPSPEED_CONFIGS, FSDP, DeepSpeed, Launch
from schemas.load import SpecError, load_spec
from schemas.spec import DPOStage, PretrainStage, PROStage, RewardStage, SFTStage, TrainSpec
from stages.common.contract import StageInputs
from stages.common.training import complete
from tasks.plan import plan
from tasks.torchrun import LaunchError, launch_stage

from .conftest import FAST, ROOT, TINY, cli_env, stage_run

STEPS = 6


def pretrain_stage(launch: Launch | None, steps: int = STEPS) -> PretrainStage:
    return PretrainStage(
        name="pretrain",
        kind="pretrain",
        data=[DATA_DIR / "pretrain.jsonl"],
        packing={"block_size": 64},
        train=TrainSpec(max_steps=steps, save_steps=STEPS // 2, **FAST | {"logging_steps": 1}),
        launch=launch,
    )


@pytest.fixture(scope="module")
def prepared(trained_tokenizer, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from stages import pretrain

    folder = tmp_path_factory.mktemp("prepared") / "datasets"
    pretrain.prepare(pretrain_stage(None), AutoTokenizer.from_pretrained(trained_tokenizer)).datasets.save_to_disk(
        str(folder)
    )
    return folder


def losses(mlflow: MlflowClient, run_id: str) -> list[float]:
    return [m.value for m in sorted(mlflow.get_metric_history(run_id, "loss"), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def trajectories(trained_tokenizer, prepared, tmp_path_factory) -> dict:
    """The per-step losses of the same stage in one process, and as 2 ranks under DDP, ZeRO-2 and ZeRO-3 (work folders
    under "root")."""
    from datasets import load_from_disk

    from stages import pretrain
    from tasks.step_metrics import StepMetrics

    root = tmp_path_factory.mktemp("launch-home")
    found = {}
    for name, launch in [
        ("one", None),
        ("ddp", Launch(processes=2)),
        ("zero2", Launch(processes=2, deepspeed=DeepSpeed(zero=2))),
        ("zero3", Launch(processes=2, deepspeed=DeepSpeed(zero=3))),
        ("fsdp", Launch(processes=2, fsdp=FSDP())),
    ]:
        mlflow, run_id = stage_run(root, name)
        spec, workdir = pretrain_stage(launch), root / name
        if launch is None:
            inputs = StageInputs(
                TINY, trained_tokenizer, load_from_disk(str(prepared)), callbacks=(StepMetrics(mlflow, run_id),)
            )
            result = pretrain.run(spec, inputs, workdir)
        else:
            with pytest.MonkeyPatch.context() as env:
                env.setenv("MLFLOW_TRACKING_URI", mlflow.tracking_uri)
                result = launch_stage(spec, StageInputs(TINY, trained_tokenizer, None), prepared, workdir, root, run_id)
            assert result.tags["precision"] in ("bf16", "fp32") and result.counts["global_step"] > 0
        assert (result.checkpoint / "model.safetensors").exists()
        found[name] = losses(mlflow, run_id)
        assert len(found[name]) == STEPS, (name, found[name])
    return found | {"root": root}


def test_ddp_with_half_the_rows_per_rank_follows_the_one_process_trajectory(trajectories) -> None:
    assert trajectories["ddp"] == pytest.approx(trajectories["one"], rel=1e-4)
    assert trajectories["one"][-1] < trajectories["one"][0]  # it trained


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_zero_starts_at_the_same_loss_and_ends_within_tolerance_of_ddp(trajectories, zero) -> None:
    assert trajectories[zero][0] == pytest.approx(trajectories["ddp"][0], rel=1e-6)  # same weights, same rows
    assert trajectories[zero] == pytest.approx(trajectories["ddp"], rel=1e-4)


def test_fsdp2_shards_every_layer_and_follows_ddp(trajectories) -> None:
    """FSDP2 (`fully_shard` through Accelerate, on CPU with gloo): the same rows and weights as DDP, so the same losses
    up to the order of the reductions; its saved model was gathered whole from the shards."""
    from safetensors.torch import load_file

    assert trajectories["fsdp"][0] == pytest.approx(trajectories["ddp"][0], rel=1e-6)
    assert trajectories["fsdp"] == pytest.approx(trajectories["ddp"], rel=1e-4)
    folders = (trajectories["root"] / name / "model" / "model.safetensors" for name in ("fsdp", "ddp"))
    saved, ddp = (load_file(str(folder)) for folder in folders)
    assert saved.keys() == ddp.keys() and all(saved[k].shape == ddp[k].shape for k in ddp)
    assert all(torch.allclose(saved[k], ddp[k], atol=1e-4) for k in ddp)


def test_a_launched_stage_resumed_from_its_in_stage_checkpoint_equals_the_uninterrupted_run(
    trajectories, trained_tokenizer, prepared, tmp_path
) -> None:
    """ZeRO-2: the checkpoint at the half holds each rank's optimizer shard; a run that starts from it ends as the
    one that went on."""
    import shutil

    from safetensors.torch import load_file

    uninterrupted = trajectories["root"] / "zero2"
    shutil.copytree(
        uninterrupted / "trainer" / f"checkpoint-{STEPS // 2}", tmp_path / "trainer" / f"checkpoint-{STEPS // 2}"
    )
    mlflow, run_id = stage_run(tmp_path, "resume")
    result = launch_stage(
        pretrain_stage(Launch(processes=2, deepspeed=DeepSpeed(zero=2))),
        StageInputs(TINY, trained_tokenizer, None),
        prepared,
        tmp_path,
        tmp_path,
        run_id,
    )
    assert result.resumed_from_step == STEPS // 2
    assert losses(mlflow, run_id) == pytest.approx(trajectories["zero2"][STEPS // 2 :], rel=1e-5)
    resumed, whole = (
        load_file(str(result.checkpoint / "model.safetensors")),
        load_file(str(uninterrupted / "model" / "model.safetensors")),
    )
    assert resumed.keys() == whole.keys() and all(torch.allclose(resumed[k], whole[k], atol=1e-6) for k in whole)


def test_a_failing_rank_fails_the_stage_with_its_own_error(trained_tokenizer, prepared, tmp_path) -> None:
    spec = pretrain_stage(Launch(processes=2)).model_copy(update={"lora": {"targets": ["no_such_layer"]}})
    with pytest.raises(LaunchError, match=r"stage pretrain: rank \d of 2 failed first: .*no_such_layer"):
        launch_stage(spec, StageInputs(TINY, trained_tokenizer, None), prepared, tmp_path, tmp_path, "no-run")
    assert not (tmp_path / "model").exists()


def distributed_spec() -> dict:
    """examples/distributed.yaml as a mapping, its data paths made absolute so a copy anywhere reads the same files."""
    raw = yaml.safe_load((ROOT / "examples" / "distributed.yaml").read_text())
    for stage in raw["stages"]:
        for field in ("data", "heldout", "prompts"):
            if field in stage:
                stage[field] = str(ROOT / "examples" / stage[field])
    return raw


def test_launch_is_checked_with_the_spec_and_is_not_in_the_fingerprint(tmp_path) -> None:
    raw = distributed_spec()
    (tmp_path / "launched.yaml").write_text(yaml.safe_dump(raw))
    launched = load_spec(tmp_path / "launched.yaml")
    assert [s.launch.zero_stage() for s in launched.training_stages()] == [0, 2, 3]
    assert all(s.launch.world_size == 2 for s in launched.training_stages())
    plain = dict(raw, launch=None, stages=[{k: v for k, v in s.items() if k != "launch"} for s in raw["stages"]])
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain))
    assert [p.fingerprint for p in plan(launched)] == [p.fingerprint for p in plan(load_spec(tmp_path / "plain.yaml"))]

    bad = dict(raw, launch={"processes": 3})
    bad["stages"][2] = dict(raw["stages"][2], reference="frozen")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(SpecError) as err:
        load_spec(tmp_path / "bad.yaml")
    assert (
        "stages[0] (pretrain): train.batch_size 16 is the batch of all 3 processes together and must divide evenly"
        in str(err.value)
    )
    assert "stages[2] (dpo): a frozen reference copy is not sharded under ZeRO-3" in str(err.value)
    assert {p.name for p in DEEPSPEED_CONFIGS.glob("*.json")} == {
        "zero2.json",
        "zero3.json",
        "zero2_offload.json",
        "zero3_offload.json",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_meet_at_the_master(prefect_api, tmp_path) -> None:
    """Node 0 is `lifecycle run`; node 1 is `lifecycle join` on the same spec (here on the same machine and home)."""
    spec = {
        "name": "nodes",
        "model": {"init": TINY.model_dump()},
        "tokenizer": {"train": {"vocab_size": 512, "data": [str(DATA_DIR / "pretrain.jsonl")]}},
        "stages": [
            {
                "name": "pretrain",
                "kind": "pretrain",
                "data": str(DATA_DIR / "pretrain.jsonl"),
                "packing": {"block_size": 64},
                "launch": {"processes": 1, "nodes": 2, "master": f"127.0.0.1:{free_port()}"},
                "train": {"max_steps": 4, "save_steps": 1000, **FAST},
            }
        ],
    }
    (tmp_path / "nodes.yaml").write_text(yaml.safe_dump(spec))
    env = cli_env(tmp_path / "home", prefect_api)
    lifecycle = [sys.executable, "-m", "flows.cli"]
    node0 = subprocess.Popen(
        [*lifecycle, "run", "nodes.yaml"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    node1 = subprocess.run(
        [*lifecycle, "join", "nodes.yaml", "--stage", "pretrain", "--node-rank", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out0, _ = node0.communicate(timeout=600)
    assert node0.returncode == 0, out0[-3000:]
    assert node1.returncode == 0 and "node 1: the stage's ranks here finished" in node1.stdout, (
        node1.stdout[-2000:] + node1.stderr[-2000:]
    )
    mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = next(
        r
        for r in mlflow.search_runs([mlflow.get_experiment_by_name("nodes").experiment_id])
        if r.info.run_name == "pretrain"
    )
    assert (
        run.info.status == "FINISHED" and run.data.params["world_size"] == "2" and "world_size" not in run.data.metrics
    )


def quick_distributed(folder: Path) -> Path:
    """examples/distributed.yaml in its quick form: the same stages and launches, a few steps each, a tiny model."""
    raw = distributed_spec()
    raw["model"]["init"] = TINY.model_dump()
    raw["tokenizer"]["train"] = {"vocab_size": 512, "data": [str(DATA_DIR / "pretrain.jsonl")]}
    steps = {"pretrain": 6, "sft": 8, "dpo": 4}
    for stage in raw["stages"]:
        if stage["name"] in steps:
            stage["train"] |= {"max_steps": steps[stage["name"]], "save_steps": 2, "logging_steps": 2, "batch_size": 8}
        stage |= {"max_len": 128, "eval_samples": 4} if stage["name"] == "sft" else {}
        stage |= {"limit": 8, "max_new_tokens": 8} if stage["kind"] == "eval" else {}
    raw["stages"][0]["packing"] = {"block_size": 64}
    (folder / "distributed.yaml").write_text(yaml.safe_dump(raw))
    return folder / "distributed.yaml"


def ranks_of(home: Path) -> list[int]:
    """Pids of the processes still running a launched stage of this home."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "tasks.torchrun" in cmdline and str(home) in cmdline:
            found.append(int(proc.name))
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="ranks die with the flow through Linux's parent-death signal")
def test_distributed_example_survives_a_kill_of_the_flow_during_sft_and_resumes_it(prefect_api, tmp_path) -> None:
    """kill -9 of `lifecycle run` while SFT's ranks train under ZeRO-2: no rank outlives it, and a plain re-run resumes
    SFT from its last in-stage checkpoint (DeepSpeed's sharded optimizer state included) and finishes every stage."""
    spec = quick_distributed(tmp_path)
    home = tmp_path / "home"
    env = cli_env(home, prefect_api)
    command = [sys.executable, "-m", "flows.cli", "run", str(spec)]
    with open(tmp_path / "killed.log", "w") as log:
        flow = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not any(complete(f) for f in home.glob("work/distributed/sft-*/trainer/checkpoint-*")):
        assert flow.poll() is None, (
            "the run ended before SFT saved a checkpoint:\n" + (tmp_path / "killed.log").read_text()[-3000:]
        )
        assert time.time() < deadline, "SFT saved no in-stage checkpoint in 10 minutes"
        time.sleep(0.5)
    assert ranks_of(home), "SFT's ranks should be running"
    os.kill(flow.pid, signal.SIGKILL)
    flow.wait()
    deadline = time.time() + 30
    while ranks_of(home):
        assert time.time() < deadline, f"ranks outlived the flow: {ranks_of(home)}"
        time.sleep(0.5)

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = {
        r.info.run_name: r
        for r in mlflow.search_runs([mlflow.get_experiment_by_name("distributed").experiment_id])
        if r.info.status == "FINISHED"
    }
    assert int(runs["sft"].data.tags["lifecycle.resumed_from_step"]) >= 2
    for name, config in (("pretrain", None), ("sft", "zero2.json"), ("dpo", "zero3.json")):
        assert runs[name].data.params["world_size"] == "2"
        logged = [a.path for a in mlflow.list_artifacts(runs[name].info.run_id, "launch")]
        assert logged == ([f"launch/{config}"] if config else [])
    assert runs["sft"].data.metrics["heldout_loss"] < runs["sft"].data.metrics["heldout_loss_before"]
    assert "eval" in runs


CHAT = dict(max_len=96, template="chatml")
KINDS = {
    # held-out data: the loss before training is evaluated before DeepSpeed has built its engine
    "sft-lora-merged": SFTStage(
        name="s",
        kind="sft",
        data=[DATA_DIR / "sft.jsonl"],
        heldout=[DATA_DIR / "sft_heldout.jsonl"],
        lora={"r": 4, "merge": True},
        eval_samples=0,
        **CHAT,
    ),
    "dpo-adapter-off": DPOStage(
        name="s", kind="dpo", data=[DATA_DIR / "preference.jsonl"], lora={"r": 4}, reference="adapter-off", **CHAT
    ),
    "pro": PROStage(name="s", kind="pro", data=[DATA_DIR / "ranked.jsonl"], **CHAT),
    "reward": RewardStage(name="s", kind="reward", data=[DATA_DIR / "preference.jsonl"], **CHAT),
}


@pytest.mark.parametrize("name", KINDS)
def test_every_training_kind_trains_and_saves_under_zero3(name, chat_model, trained_tokenizer, tmp_path) -> None:
    """Two steps of each kind as 2 ZeRO-3 ranks: the weights are sharded, and what rank 0 saves is whole and loads.
    (DPO with a precomputed reference under ZeRO-3, and DDP and ZeRO-2, run in the distributed example's test; Tuna
    trains through the same candidates path and Trainer as PRO, with another pure loss.)"""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from stages import training_stage

    spec = KINDS[name].model_copy(
        update={
            "train": TrainSpec(max_steps=2, **FAST | {"batch_size": 4, "logging_steps": 1}),
            "launch": Launch(processes=2, deepspeed=DeepSpeed(zero=3)),
        }
    )
    training_stage(spec.kind).prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer)).datasets.save_to_disk(
        str(tmp_path / "datasets")
    )
    mlflow, run_id = stage_run(tmp_path, "kinds")
    result = launch_stage(
        spec,
        StageInputs(chat_model, trained_tokenizer, None, reference=tmp_path / "reference"),
        tmp_path / "datasets",
        tmp_path / "work",
        tmp_path,
        run_id,
    )
    assert len(losses(mlflow, run_id)) == 2 and all(math.isfinite(v) for v in losses(mlflow, run_id))
    saved = {"sft-lora-merged": "model.safetensors", "dpo-adapter-off": "adapter_model.safetensors"}.get(
        name, "model.safetensors"
    )
    weights = load_file(str(result.checkpoint / saved))
    # gathered, not rank 0's empty shards
    assert weights and all(t.numel() > 0 and torch.isfinite(t).all() for t in weights.values())
    if name == "sft-lora-merged":
        assert (result.adapter / "adapter_model.safetensors").exists()
