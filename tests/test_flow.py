"""The flow end to end on examples/quick.yaml, under prefect_test_harness with a temp MLflow store."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from flows.lifecycle import lifecycle
from schemas.load import load_spec
from stages.common.training import use_bf16
from tasks.plan import plan

from .conftest import QUICK, use_home


def test_quick_spec_makes_a_parent_run_and_a_finished_child_run_per_stage(quick_run) -> None:
    root, runs = quick_run
    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert list(runs) == [
        "tokenizer",
        "pretrain",
        "sft",
        "sft-lora",
        "dpo",
        "pro",
        "tuna",
        "reward",
        "kto",
        "grpo",
        "eval",
    ]
    planned = {stage.name: stage for stage in plan(load_spec(QUICK))}
    parents = set()
    for name, run_id in runs.items():
        run = mlflow.get_run(run_id)
        tags = run.data.tags
        assert run.info.status == "FINISHED" and run.info.run_name == name
        assert tags["lifecycle.stage"] == name and tags["lifecycle.fingerprint"] == planned[name].fingerprint
        parents.add(tags["mlflow.parentRunId"])
    for name in ("tokenizer", "pretrain", "sft", "dpo", "tuna", "reward"):  # checkpoints are logged models, not here
        assert [a.path for a in mlflow.list_artifacts(runs[name])] == ["stage_spec.json"]
    tags = mlflow.get_run(runs["sft"]).data.tags
    assert tags["lifecycle.input_run"] == runs["pretrain"] and tags["lifecycle.tokenizer_run"] == runs["tokenizer"]
    (parent,) = parents
    parent_run = mlflow.get_run(parent)
    assert parent_run.info.status == "FINISHED" and parent_run.data.tags["lifecycle.stage.sft"] == runs["sft"]
    sft = mlflow.get_run(runs["sft"])
    assert sft.data.params["train.max_steps"] == "40"
    assert sft.data.params["global_step"] == "40" and "exact_match" in sft.data.metrics
    # what `auto` chose on this machine is a tag; what the stage counted, params: no one-point charts beside the loss
    assert sft.data.tags["lifecycle.precision"] == ("bf16" if use_bf16("auto") else "fp32")
    assert int(sft.data.params["train_rows"]) > 0 and not {"bf16", "global_step", "train_rows"} & set(sft.data.metrics)
    assert len(mlflow.get_metric_history(runs["sft"], "loss")) == 4  # per-step metrics, every 10 of 40 steps
    assert {d.dataset.name for d in sft.inputs.dataset_inputs} == {"sft.jsonl", "sft_heldout.jsonl"}


def test_logged_checkpoints_load_with_transformers(quick_run, tmp_path, monkeypatch) -> None:
    from mlflow.artifacts import download_artifacts

    root, runs = quick_run
    use_home(monkeypatch, root)  # MLflow resolves a models:/ URI on the process's tracking URI
    model_id = MlflowClient().get_run(runs["sft"]).data.tags["lifecycle.model_id"]
    folder = download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == len(tokenizer) == 512
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


def test_rerun_reuses_every_finished_stage_and_an_edit_reruns_downstream_only(quick_run, tmp_path, monkeypatch) -> None:
    root, runs = quick_run
    use_home(monkeypatch, root)
    assert lifecycle(str(QUICK)) == runs  # nothing trains: the same runs stand for every stage

    # an SFT edit: held-out data with one bad row, skipped under on_invalid: skip (the tokenizer never reads held-out
    # data)
    heldout = tmp_path / "sft_heldout.jsonl"
    heldout.write_text((QUICK.parent / "data" / "sft_heldout.jsonl").read_text() + '{"conversations": []}\n')
    edited = tmp_path / "quick.yaml"
    spine = QUICK.read_text().split("  # ---- alignment")[0]  # the stages after SFT would only re-run too, at length
    edited.write_text(
        spine.replace("data: data/sft.jsonl", "data: data/sft.jsonl\n    on_invalid: skip")
        .replace("data/sft_heldout.jsonl", str(heldout))
        .replace("data/", str(QUICK.parent / "data") + "/")
    )
    again = lifecycle(str(edited))
    assert list(again) == ["tokenizer", "pretrain", "sft"]
    assert again["tokenizer"] == runs["tokenizer"] and again["pretrain"] == runs["pretrain"]
    assert again["sft"] != runs["sft"]
    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    sft = mlflow.get_run(again["sft"])
    assert sft.data.tags["lifecycle.input_run"] == runs["pretrain"]
    assert sft.data.params["data_rejected_rows"] == "1"
    path = mlflow.download_artifacts(again["sft"], "data/rejected.jsonl", str(tmp_path))
    (rejected,) = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert (rejected["file"], rejected["line"]) == (str(heldout), 201)


def test_status_reads_the_store_from_another_process(quick_run) -> None:
    root, runs = quick_run
    env = {"LIFECYCLE_HOME": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PATH": ""}
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "status", str(QUICK), "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = json.loads(out)
    assert [(r["name"], r["state"], r["run_id"]) for r in rows] == [
        (name, "finished", run) for name, run in runs.items()
    ]
    assert rows[2]["kind"] == "sft" and "train_loss" in rows[2]["metrics"]


def test_alignment_stages_chain_through_their_logged_checkpoints(quick_run, tmp_path) -> None:
    from transformers import AutoTokenizer

    from stages.common.checkpoint import load_model
    from stages.common.contract import adapter_base, is_adapter
    from tasks.home import Home
    from tasks.registry import fetch_checkpoint

    root, runs = quick_run
    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    home = Home(root)

    # LoRA with merge: the merged model is the checkpoint, the adapter is a logged model of the run beside it
    outputs = mlflow.get_run(runs["sft-lora"]).outputs.model_outputs
    assert {mlflow.get_logged_model(m.model_id).name for m in outputs} == {"sft-lora", "sft-lora-adapter"}
    # LoRA without merge: the checkpoint is the adapter; fetched, it names the fetched checkpoint of its input as its
    # base
    dpo = fetch_checkpoint(mlflow, home, mlflow.get_run(runs["dpo"]))
    assert is_adapter(dpo) and adapter_base(dpo) == fetch_checkpoint(mlflow, home, mlflow.get_run(runs["sft-lora"]))
    # applied to its base and merged on load
    assert load_model(dpo, AutoTokenizer.from_pretrained(dpo)).config.hidden_size == 64
    dpo_run = mlflow.get_run(runs["dpo"])
    assert {"rewards/margin", "rewards/accuracy", "logps/chosen", "heldout_preference_accuracy"} <= set(
        dpo_run.data.metrics
    )

    # the PRO curriculum: one child run per list length under the PRO run, each fed by the one before
    pro = mlflow.get_run(runs["pro"])
    parts = mlflow.search_runs(
        [pro.info.experiment_id], f"tags.`mlflow.parentRunId` = '{runs['pro']}'", order_by=["attributes.start_time ASC"]
    )
    assert [p.info.run_name for p in parts] == ["pro-n2", "pro-n3"] and all(p.info.status == "FINISHED" for p in parts)
    assert parts[0].data.tags["lifecycle.input_run"] == runs["dpo"]
    assert parts[1].data.tags["lifecycle.input_run"] == parts[0].info.run_id
    assert [p.data.params["list_length"] for p in parts] == ["2", "3"]
    assert pro.data.tags["lifecycle.checkpoint_run"] == parts[1].info.run_id
    assert mlflow.get_run(runs["tuna"]).data.tags["lifecycle.input_run"] == runs["pro"]
    assert fetch_checkpoint(mlflow, home, pro) == fetch_checkpoint(mlflow, home, parts[1])

    # KTO on the pairs split into unpaired rows, an adapter on sft-lora's merged model (its reference: the adapter
    # switched off)
    kto = mlflow.get_run(runs["kto"])
    assert kto.data.tags["lifecycle.input_run"] == runs["sft-lora"] and is_adapter(fetch_checkpoint(mlflow, home, kto))
    assert (
        int(kto.data.params["train_rows"]) == 2 * int(kto.data.params["train_desirable_rows"])
        and kto.data.params["desirable_weight_ratio"] == "1"
    )
    assert {
        "rewards/desirable",
        "rewards/undesirable",
        "rewards/margin",
        "reference_point",
        "heldout_desirable_margin_before",
        "heldout_desirable_margin",
    } <= set(kto.data.metrics)

    reward = mlflow.get_run(runs["reward"])
    assert reward.data.tags["lifecycle.input_run"] == runs["sft"] and "heldout_reward_accuracy" in reward.data.metrics
    grpo = mlflow.get_run(runs["grpo"])
    assert grpo.data.tags["lifecycle.input_run"] == runs["sft-lora"]
    assert {
        "reward",
        "reward/answer",
        "reward/reward_model",
        "clip_fraction",
        "heldout_task_accuracy_before",
        "heldout_task_accuracy",
    } <= set(grpo.data.metrics)
    assert math.isfinite(grpo.data.metrics["reward/reward_model"])  # the reward stage's logged model, in the loop
    assert [a.path for a in mlflow.list_artifacts(runs["grpo"])] == ["grpo_samples.json", "stage_spec.json"]


def test_eval_stage_logs_the_comparison_in_its_run_and_the_pipeline_run(quick_run, tmp_path) -> None:
    root, runs = quick_run
    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    scored = ["pretrain", "sft", "sft-lora", "dpo", "pro", "tuna", "kto", "grpo"]
    parent = mlflow.get_run(runs["eval"]).data.tags["mlflow.parentRunId"]
    for run_id, folder in ((runs["eval"], "eval"), (parent, "eval")):
        assert {a.path for a in mlflow.list_artifacts(run_id, folder)} == {
            f"{folder}/metrics.json",
            f"{folder}/samples.json",
            f"{folder}/metrics.png",
        }
        table = json.loads(
            open(mlflow.download_artifacts(run_id, f"{folder}/metrics.json", str(tmp_path / run_id))).read()
        )
        assert [row[table["columns"].index("checkpoint")] for row in table["data"]] == scored
        assert {
            "perplexity",
            "response_loss",
            "exact_match",
            "task_accuracy",
            "preference_accuracy",
            "kendall_tau",
            "reward",
            "reward_model",
        } <= set(table["columns"])
        # every checkpoint's greedy replies scored by grpo's rewards and by the reward stage's model
        for column in ("reward", "reward_model"):
            assert all(math.isfinite(row[table["columns"].index(column)]) for row in table["data"])
        samples = json.loads(
            open(mlflow.download_artifacts(run_id, f"{folder}/samples.json", str(tmp_path / run_id))).read()
        )
        assert set(scored) <= set(samples["columns"]) and samples["data"]
    # the eval run charts its table as the pipeline run does: a metric a line, a checkpoint a step
    history = mlflow.get_metric_history(runs["eval"], "eval/perplexity")
    assert sorted(m.step for m in history) == list(range(len(scored)))
    # the benchmarks (lm-eval on examples/benchmarks) too, and what each cost, a line over the same steps
    for metric in ("eval/toy_facts/acc", "eval/toy_skills/exact_match", "eval/seconds/toy_facts"):
        history = mlflow.get_metric_history(runs["eval"], metric)
        assert sorted(m.step for m in history) == list(range(len(scored))), metric
    assert all(0 <= m.value <= 1 for m in mlflow.get_metric_history(runs["eval"], "eval/toy_facts/acc"))


def test_experiments_made_here_open_as_model_training_and_a_users_own_is_left_as_it_is(
    quick_run, tmp_path, monkeypatch
) -> None:
    from tasks.home import Home
    from tasks.lineage import experiment_id, open_store

    root, _ = quick_run
    made = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_experiment_by_name("quick")
    assert made.tags["mlflow.experimentKind"] == "custom_model_development"

    use_home(monkeypatch, tmp_path)
    home = Home.from_env()
    mlflow = open_store(home)
    traces = mlflow.create_experiment("traces", tags={"mlflow.experimentKind": "genai_development"})
    plain = mlflow.create_experiment("plain")
    assert experiment_id(mlflow, home, "traces") == traces and experiment_id(mlflow, home, "plain") == plain
    assert mlflow.get_experiment(traces).tags == {"mlflow.experimentKind": "genai_development"}
    assert mlflow.get_experiment(plain).tags == {}
    new = experiment_id(mlflow, home, "new")
    assert mlflow.get_experiment(new).tags == {"mlflow.experimentKind": "custom_model_development"}


def test_the_pipeline_run_charts_the_eval_table_one_checkpoint_a_step(quick_run, tmp_path) -> None:
    root, runs = quick_run
    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    parent = mlflow.get_run(mlflow.get_run(runs["eval"]).data.tags["mlflow.parentRunId"])
    table = json.loads(open(mlflow.download_artifacts(parent.info.run_id, "eval/metrics.json", str(tmp_path))).read())
    columns, rows = table["columns"], table["data"]
    checkpoints = [row[columns.index("checkpoint")] for row in rows]
    assert checkpoints == ["pretrain", "sft", "sft-lora", "dpo", "pro", "tuna", "kto", "grpo"]
    assert parent.data.tags["lifecycle.steps.eval"] == " ".join(f"{i}:{name}" for i, name in enumerate(checkpoints))
    measured = {}
    for column in columns[1:]:
        points = [(step, row[columns.index(column)]) for step, row in enumerate(rows)]
        if finite := [(step, value) for step, value in points if value is not None and math.isfinite(value)]:
            measured[f"eval/{column}"] = finite
    assert set(parent.data.metrics) == set(measured)
    for name, points in measured.items():
        history = sorted((m.step, m.value) for m in mlflow.get_metric_history(parent.info.run_id, name))
        assert history == points, name
    # every checkpoint has a perplexity: a line across the whole lineage; only some are scored on preferences
    assert [step for step, _ in measured["eval/perplexity"]] == list(range(len(checkpoints)))


def test_runs_describe_themselves_on_their_pages(quick_run) -> None:
    root, runs = quick_run
    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")

    def note(run_id: str) -> str:
        return mlflow.get_run(run_id).data.tags["mlflow.note.content"]

    parent = mlflow.get_run(runs["eval"]).data.tags["mlflow.parentRunId"]
    experiment = mlflow.get_run(parent).info.experiment_id
    training_view = "workflowType=machine_learning"  # each link opens in the UI's model-training view
    assert note(parent).split("\n\n") == [
        f"Pipeline **quick** (`{QUICK}`): " + " → ".join(runs) + ".",
        "Outcome: finished.",
        "Runs: "
        + ", ".join(f"[{name}](#/experiments/{experiment}/runs/{run}?{training_view})" for name, run in runs.items())
        + ".",
        "Charts: `eval/<metric>` by step, one checkpoint a step: "
        "0:pretrain 1:sft 2:sft-lora 3:dpo 4:pro 5:tuna 6:kto 7:grpo.",
    ]
    assert note(runs["tokenizer"]) == "tokenizer: a 512-token BPE trained on pretrain.jsonl"
    assert note(runs["pretrain"]) == (
        "pretrain pretrain: trains on pretrain.jsonl, measured on pretrain_heldout.jsonl, from the spec's model"
    )
    assert note(runs["sft"]) == (
        f"sft sft: trains on sft.jsonl, measured on sft_heldout.jsonl, from stage pretrain (run {runs['pretrain']})"
    )
    assert note(runs["kto"]).endswith(f"from stage sft-lora (run {runs['sft-lora']})")
    assert note(runs["eval"]).startswith("eval eval: scores pretrain, sft, sft-lora, dpo, pro, tuna, kto, grpo side")


def test_a_pipeline_run_that_stops_says_at_which_stage(tmp_path) -> None:
    from tasks.lineage import link, pipeline_run

    mlflow = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("quick", artifact_location=(tmp_path / "artifacts").as_uri())
    tokenizer, pretrain, *_ = stages = plan(load_spec(QUICK))
    names = [stage.name for stage in stages]
    header = f"Pipeline **quick** (`{QUICK}`): " + " → ".join(names) + "."
    parents = []
    for interruption, done in ((ValueError("the data moved\nmore about it"), [tokenizer]), (KeyboardInterrupt(), [])):
        with pytest.raises(type(interruption)), pipeline_run(mlflow, experiment, "quick", QUICK, names) as parent:
            parents.append(parent)
            assert mlflow.get_run(parent).data.tags["mlflow.note.content"] == f"{header}\n\nOutcome: running."
            for stage in done:
                link(mlflow, parent, stage, "a-run-id", reused=False)
            raise interruption
    failed, interrupted = (mlflow.get_run(parent) for parent in parents)
    assert failed.info.status == "FAILED" and interrupted.info.status == "KILLED"
    assert failed.data.tags["mlflow.note.content"] == (
        f"{header}\n\nOutcome: failed at stage {pretrain.name}: ValueError: the data moved."
    )
    assert (
        interrupted.data.tags["mlflow.note.content"] == f"{header}\n\nOutcome: interrupted (Ctrl-C) at stage tokenizer."
    )
