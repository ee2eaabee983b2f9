"""Checkpoints as MLflow logged models and registered versions, read back through MLflow's API: after the quick run
(the conftest's, shared with the flow tests), and on small stores of their own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient
from mlflow.artifacts import list_artifacts
from mlflow.entities import LoggedModelStatus

from flows.cli import main
from flows.lifecycle import lifecycle
from schemas.load import load_spec
from stages.common.contract import adapter_base, is_adapter
from tasks.export import lineage_of
from tasks.home import Home
from tasks.keys import file_digest
from tasks.lineage import input_run_of
from tasks.plan import plan
from tasks.registry import fetch_checkpoint, fetch_model, mark_best, model_id_of

from .conftest import QUICK, cli_env, stage_run, use_home

DATA = QUICK.parent / "data"
MODELS = ["pretrain", "sft", "sft-lora", "dpo", "pro", "tuna", "reward", "kto", "grpo"]  # the stages with a version


def store(root) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def model_of(mlflow: MlflowClient, run_id: str):
    return mlflow.get_logged_model(mlflow.get_run(run_id).data.tags["lifecycle.model_id"])


def test_each_checkpoint_is_a_logged_model_of_its_run_and_the_store_holds_its_weights_once(quick_run) -> None:
    root, runs = quick_run
    mlflow = store(root)
    for name in ["tokenizer", *MODELS]:
        run = mlflow.get_run(runs[name])
        model = model_of(mlflow, runs[name])
        assert model.status == LoggedModelStatus.READY and model.model_uri == f"models:/{model.model_id}"
        assert model.model_id in {output.model_id for output in run.outputs.model_outputs}, name
        if name != "pro":  # the curriculum's model is its last part's, which made it
            assert (model.source_run_id, model.name, model.tags["lifecycle.stage"]) == (runs[name], name, name)
    assert model_of(mlflow, runs["pro"]).name == "pro-n3"
    assert model_of(mlflow, runs["tokenizer"]).model_type == "tokenizer"
    assert model_of(mlflow, runs["reward"]).model_type == "reward-model"
    # the Hugging Face folder as it was saved is the model's artifacts: weights, config, tokenizer, chat template
    sft = model_of(mlflow, runs["sft"])
    files = {
        info.path.split("/")[-1] for info in list_artifacts(sft.artifact_location, tracking_uri=mlflow.tracking_uri)
    }
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= files
    assert sft.tags["mlflow.note.content"].startswith("The causal-lm of stage **sft**. sft sft: trains on sft.jsonl")
    # and nowhere else: every weight file under the store's artifacts is one model's
    weights = [path.relative_to(root / "artifacts") for path in (root / "artifacts").rglob("*.safetensors")]
    assert weights and all(path.parts[1:4:2] == ("models", "artifacts") for path in weights), weights
    assert len({path.parts[2] for path in weights}) == len(weights)


def test_an_adapter_is_its_own_model_naming_the_model_it_applies_to(quick_run) -> None:
    root, runs = quick_run
    mlflow, home = store(root), Home(root)
    sft, merged, dpo = (model_of(mlflow, runs[name]) for name in ("sft", "sft-lora", "dpo"))
    # a merged LoRA stage: the merged model stands for the run, its adapter is a second model of the run
    adapter = mlflow.get_logged_model(mlflow.get_run(runs["sft-lora"]).data.tags["lifecycle.adapter_model_id"])
    assert (adapter.name, adapter.model_type, adapter.source_run_id) == (
        "sft-lora-adapter",
        "lora-adapter",
        runs["sft-lora"],
    )
    assert adapter.tags["lifecycle.base_model_id"] == sft.model_id and merged.model_type == "causal-lm"
    # an unmerged one: its model is the adapter, which names its base; fetched, it applies to the fetched base
    assert dpo.model_type == "lora-adapter" and dpo.tags["lifecycle.base_model_id"] == merged.model_id
    folder = fetch_model(mlflow, home, dpo.model_id)
    assert is_adapter(folder) and adapter_base(folder) == fetch_model(mlflow, home, merged.model_id)
    assert folder == root / "cache" / "checkpoint" / dpo.model_id  # the cache is keyed by model


def test_metrics_are_linked_to_the_model_with_their_run_and_dataset_and_runs_name_their_input_models(
    quick_run, tmp_path
) -> None:
    root, runs = quick_run
    mlflow = store(root)
    sft = model_of(mlflow, runs["sft"])
    linked = {(m.key, m.run_id): m for m in sft.metrics}
    held_out, trained = linked["exact_match", runs["sft"]], linked["train_loss", runs["sft"]]
    assert (held_out.dataset_name, held_out.dataset_digest) == (
        "sft_heldout.jsonl",
        file_digest(DATA / "sft_heldout.jsonl")[:32],
    )
    assert (
        trained.dataset_name == "sft.jsonl"
        and held_out.value == mlflow.get_run(runs["sft"]).data.metrics["exact_match"]
    )
    # the eval's scores of this checkpoint, from the eval run, with the file each was measured on
    table = json.loads(open(mlflow.download_artifacts(runs["eval"], "eval/metrics.json", str(tmp_path))).read())
    row = dict(zip(table["columns"], next(r for r in table["data"] if r[0] == "sft")))
    assert linked["eval/perplexity", runs["eval"]].value == pytest.approx(row["perplexity"])
    assert linked["eval/perplexity", runs["eval"]].dataset_name == "pretrain_heldout.jsonl"
    assert linked["eval/task_accuracy", runs["eval"]].dataset_name == "rl_prompts_heldout.jsonl"
    assert linked["eval/toy_facts/acc", runs["eval"]].value == pytest.approx(row["toy_facts/acc"])
    # each stage's run names the models it started from (and scored with); the eval's, every one it scored
    inputs = {name: {m.model_id for m in mlflow.get_run(runs[name]).inputs.model_inputs} for name in runs}
    assert inputs["sft"] == {model_of(mlflow, runs["pretrain"]).model_id} and inputs["pretrain"] == set()
    assert inputs["grpo"] == {model_of(mlflow, runs[name]).model_id for name in ("sft-lora", "reward")}
    assert inputs["eval"] >= {model_of(mlflow, runs[name]).model_id for name in MODELS if name != "reward"}


def test_the_registry_has_a_version_per_stage_and_a_rerun_adds_none(
    quick_run, prefect_harness, monkeypatch, capsys
) -> None:
    root, runs = quick_run
    mlflow = store(root)
    use_home(monkeypatch, root)
    before = {v.version for v in mlflow.search_model_versions("name = 'quick'")}
    assert lifecycle(str(QUICK)) == runs  # every stage reused: no version more, the aliases set again
    assert {v.version for v in mlflow.search_model_versions("name = 'quick'")} == before
    # and the pipeline run says so where the runs list shows it, linking the runs it reused
    latest = mlflow.search_runs(
        [mlflow.get_experiment_by_name("quick").experiment_id],
        "tags.`lifecycle.kind` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    assert latest.info.run_name == "quick (all reused)"
    note = latest.data.tags["mlflow.note.content"]
    assert "Outcome: finished, every stage reused from an earlier run (nothing trained)." in note
    sft = f"#/experiments/{latest.info.experiment_id}/runs/{runs['sft']}?workflowType=machine_learning"
    assert f"[sft]({sft}) (reused)" in note  # opens in the UI's model-training view

    planned = {stage.name: stage for stage in plan(load_spec(QUICK))}
    ours = {v.run_id: v for v in mlflow.search_model_versions("name = 'quick'") if v.run_id in runs.values()}
    versions = {name: ours[runs[name]] for name in MODELS}
    assert len(ours) == len(MODELS)  # no tokenizer, no eval
    for name, version in versions.items():
        assert version.source == f"models:/{model_of(mlflow, runs[name]).model_id}"
        assert (
            version.tags["lifecycle.stage"] == name
            and version.tags["lifecycle.fingerprint"] == planned[name].fingerprint
        )
        input_stage = planned[name].input_stage
        assert version.tags.get("lifecycle.input_version") == (
            str(versions[input_stage].version) if input_stage else None
        )
    assert [int(versions[name].version) for name in MODELS] == sorted(int(versions[name].version) for name in MODELS)
    # the logged model's page lists its version (MLflow's UI reads this tag)
    assert {"name": "quick", "version": str(versions["sft"].version)} in json.loads(
        model_of(mlflow, runs["sft"]).tags["mlflow.modelVersions"]
    )
    # aliases: each stage's current version, and the eval's best by perplexity (quick's best_by: lowest wins)
    registered = mlflow.get_registered_model("quick")
    assert {name: str(registered.aliases[name]) for name in MODELS} == {n: str(v.version) for n, v in versions.items()}
    parent = mlflow.get_run(mlflow.get_run(runs["eval"]).data.tags["mlflow.parentRunId"])
    named = dict(step.split(":") for step in parent.data.tags["lifecycle.steps.eval"].split())
    scores = {m.step: m.value for m in mlflow.get_metric_history(runs["eval"], "eval/perplexity")}
    best = named[str(min(sorted(scores), key=scores.get))]  # min keeps the first of equals: the earliest step
    assert str(registered.aliases["best"]) == str(versions[best].version)
    why = registered.tags["lifecycle.best"]
    assert why.startswith(f"{best} (version {versions[best].version}) is best: perplexity")
    assert main(["report", str(QUICK)]) == 0  # and the report says which and why
    assert f"\nregistry quick, alias best: {why}\n" in capsys.readouterr().out


def test_best_goes_by_the_metric_its_direction_and_the_earlier_of_equals(tmp_path) -> None:
    mlflow = store(tmp_path)
    mlflow.create_registered_model("p")
    versions = {name: mlflow.create_model_version("p", str(tmp_path)).version for name in ("a", "b", "c")}
    versions = {name: str(version) for name, version in versions.items()}
    table = {
        "columns": ["checkpoint", "perplexity", "exact_match"],
        "data": [["a", 9.0, 0.5], ["b", 4.0, 0.5], ["c", None, 0.2]],
    }
    assert mark_best(mlflow, "p", "eval", table, "perplexity", versions) == versions["b"]  # lower is better
    assert mlflow.get_registered_model("p").tags["lifecycle.best"] == (
        f"b (version {versions['b']}) is best: perplexity 4, the lowest of 2 checkpoints in eval eval."
    )
    assert mark_best(mlflow, "p", "eval", table, "exact_match", versions) == versions["a"]  # higher; a tie: the first
    assert {k: str(v) for k, v in mlflow.get_registered_model("p").aliases.items()} == {"best": versions["a"]}
    # a metric no checkpoint was measured on: no best, rather than a stale one
    assert mark_best(mlflow, "p", "eval", table, "top1", versions) is None
    assert mlflow.get_registered_model("p").aliases == {}
    assert mlflow.get_registered_model("p").tags["lifecycle.best"] == (
        "No version is best: eval eval measured no checkpoint's top1."
    )
    # every checkpoint scoring the same: none is best (not the first)
    mark_best(mlflow, "p", "eval", table, "exact_match", versions)
    tied = {"columns": ["checkpoint", "exact_match"], "data": [["a", 0.0], ["b", 0.0], ["c", 0.0]]}
    assert mark_best(mlflow, "p", "eval", tied, "exact_match", versions) is None
    assert mlflow.get_registered_model("p").aliases == {}
    assert mlflow.get_registered_model("p").tags["lifecycle.best"] == (
        "No version is best: all 3 checkpoints scored exact_match 0 in eval eval."
    )


def test_generate_answers_from_models_uris_and_refuses_what_is_not_a_language_model(
    quick_run, monkeypatch, capsys
) -> None:
    root, runs = quick_run
    mlflow = store(root)
    prompt = "What is 2 + 3?"
    answered = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "generate",
            "--model",
            "models:/quick@sft",
            "--max-new-tokens",
            "4",
            prompt,
        ],
        env=cli_env(root),
        capture_output=True,
        text=True,
    )
    assert answered.returncode == 0, answered.stderr[-3000:]
    assert answered.stdout.startswith(f"> {prompt}\n") and len(answered.stdout.splitlines()) >= 2

    use_home(monkeypatch, root)
    dpo = model_of(mlflow, runs["dpo"]).model_id
    assert model_id_of(mlflow, f"models:/{dpo}") == dpo
    assert (
        main(["generate", "--model", f"models:/{dpo}", "--max-new-tokens", "4", prompt]) == 0
    )  # an adapter, on its base
    assert capsys.readouterr().out.startswith(f"> {prompt}\n")
    assert main(["generate", "--model", "models:/quick@reward", prompt]) == 2
    assert "is a reward-model (stage reward), not a language model" in capsys.readouterr().err
    assert main(["generate", "--model", "models:/quick@nothing", prompt]) == 2
    assert "models:/quick@nothing: no such model in the store" in capsys.readouterr().err


def test_stage_runs_that_train_or_evaluate_log_the_machine_s_use(quick_run) -> None:
    root, runs = quick_run
    mlflow = store(root)
    measured = {
        run.info.run_name: {key for key in run.data.metrics if key.startswith("system/")}
        for run in mlflow.search_runs([mlflow.get_experiment_by_name("quick").experiment_id], max_results=100)
    }
    for name in ("pretrain", "sft", "pro-n2", "grpo", "eval"):
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= measured[name], name
    assert measured["tokenizer"] == measured["pro"] == measured["quick"] == set()  # seconds; its parts; the pipeline
    assert len(mlflow.get_metric_history(runs["sft"], "system/cpu_utilization_percentage")) >= 2


def test_a_run_of_an_older_store_is_fetched_from_its_checkpoint_artifact(trained_tokenizer, tmp_path) -> None:
    mlflow, run_id = stage_run(tmp_path)
    mlflow.log_artifacts(run_id, str(trained_tokenizer), "checkpoint")  # as stages were logged before models
    folder = fetch_checkpoint(mlflow, Home(tmp_path), mlflow.get_run(run_id))
    assert folder == tmp_path / "cache" / "checkpoint" / run_id
    assert (folder / "tokenizer.json").read_bytes() == (trained_tokenizer / "tokenizer.json").read_bytes()


def test_a_run_of_an_older_store_names_its_input_run_under_the_tag_of_then(tmp_path) -> None:
    mlflow, first = stage_run(tmp_path, "pretrain")
    _, old = stage_run(tmp_path, "sft")
    mlflow.set_tag(old, "lifecycle.upstream_run", first)  # as runs were tagged before the tag was named input_run
    _, new = stage_run(tmp_path, "dpo")
    mlflow.set_tag(new, "lifecycle.input_run", old)
    assert [input_run_of(mlflow.get_run(run)) for run in (new, old, first)] == [old, first, None]
    assert [run.info.run_id for run in lineage_of(mlflow, mlflow.get_run(new))] == [first, old, new]


def test_best_by_takes_exactly_the_eval_table_s_metrics() -> None:
    from typing import get_args

    from pydantic import ValidationError

    from schemas.spec import LOWER_IS_BETTER, EvalMetric, EvalStage, lower_is_better
    from stages.eval import METRICS

    assert set(get_args(EvalMetric)) == {metric for metrics in METRICS.values() for metric in metrics}
    assert set(LOWER_IS_BETTER) <= set(get_args(EvalMetric))
    # or a benchmark's column, of a stage that runs benchmarks; its direction by lm-eval's metric
    asked = {"name": "eval", "kind": "eval", "benchmarks": {"tasks": ["hellaswag"]}}
    assert EvalStage(**asked, best_by="hellaswag/acc_norm").best_by == "hellaswag/acc_norm"
    with pytest.raises(ValidationError, match="is a benchmark's column, and this stage has no benchmarks"):
        EvalStage(name="eval", kind="eval", best_by="hellaswag/acc")
    with pytest.raises(ValidationError):
        EvalStage(**asked, best_by="acc")  # neither a column of the table nor <task>/<metric>
    assert lower_is_better("wikitext/word_perplexity") and lower_is_better("perplexity")
    assert not lower_is_better("hellaswag/acc") and not lower_is_better("exact_match")


def test_export_writes_a_folder_that_loads_without_the_store_and_names_its_lineage(
    quick_run, tmp_path, monkeypatch, capsys
) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from stages.common.checkpoint import load_model

    root, runs = quick_run
    use_home(monkeypatch, root)
    mlflow = store(root)
    dpo = model_of(mlflow, runs["dpo"]).model_id  # LoRA adapters on sft-lora's merged model
    out = tmp_path / "dpo-export"
    assert main(["export", f"models:/{dpo}", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(name.endswith(".bin") or name.startswith("adapter") for name in names)  # merged, safetensors only
    card = (out / "README.md").read_text()
    for stage in ("pretrain", "sft", "sft-lora", "dpo"):
        assert f"| {stage} | " in card and runs[stage] in card
    assert "## Scores the eval stages gave this model" in card and "| exact_match | " in card
    assert "| eval/toy_facts/acc | " in card  # and its benchmark scores
    assert main(["export", f"models:/{dpo}", str(out)]) == 2  # a folder that holds something is never overwritten
    assert "exists and is not empty" in capsys.readouterr().err
    # --gguf: a GGUF file beside the folder, read back and checked against it
    assert main(["export", f"{QUICK}:sft", str(tmp_path / "sft-export"), "--gguf"]) == 0
    said = capsys.readouterr().out
    assert "stage sft of quick exported to" in said and "(read back and checked against the folder)" in said
    from gguf import GGUFReader

    read = GGUFReader(tmp_path / "sft-export.gguf")
    assert bytes(read.fields["general.architecture"].parts[-1]).decode() == "llama"
    assert len(read.tensors) == len(load_file(tmp_path / "sft-export" / "model.safetensors"))

    # a fresh process with no store at all: the merged weights give the pipeline's logits, generation stops at the turn
    tokenizer = AutoTokenizer.from_pretrained(out)
    asked = [{"role": "user", "content": "What is 2 + 3?"}]
    probe = list(tokenizer.apply_chat_template(asked, add_generation_prompt=True, return_dict=True)["input_ids"])
    expected = load_model(fetch_model(mlflow, Home(root), dpo), tokenizer)(torch.tensor([probe])).logits[0, -1]
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "ids = torch.tensor([[int(t) for t in sys.argv[2].split(',')]])\n"
        "print(','.join(f'{v:.6f}' for v in model(ids).logits[0, -1].tolist()))\n"
        "print(model.generation_config.eos_token_id)\n"
    )
    gone = tmp_path / "no-store"
    done = subprocess.run(
        [sys.executable, "-c", script, str(out), ",".join(map(str, probe))],
        env=cli_env(gone) | {"MLFLOW_TRACKING_URI": f"sqlite:///{gone / 'nothing.db'}"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    logits, eos = done.stdout.strip().splitlines()[-2:]
    assert torch.allclose(torch.tensor([float(v) for v in logits.split(",")]), expected, atol=1e-4)
    # a reply ends at the template's end of turn, or at the end of the text
    assert json.loads(eos) == [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    assert not gone.exists()
