"""Sweeps (schemas/sweep.py, tasks/sweeps.py): the spread over seeds and each stage's change over its input, a spec's
expansion into branches and its cost, and a sweep run through the flow and the store."""

from __future__ import annotations

import math
import re

import pytest

from schemas.load import load_spec
from tasks.sweeps import Spread, changes, inputs_of, spread, table_of
from tests.conftest import QUICK

NAN = math.nan


def test_table_of_reads_a_logged_table_with_nan_as_null():
    logged = {
        "columns": ["checkpoint", "perplexity", "reward_margin"],
        "data": [["pretrain", 40.0, None], ["sft", 20, 1.5]],
    }
    table = table_of(logged)
    assert list(table) == ["pretrain", "sft"]
    assert table["sft"] == {"perplexity": 20.0, "reward_margin": 1.5}
    assert math.isnan(table["pretrain"]["reward_margin"])


def test_changes_subtract_the_input_stage_and_skip_stages_without_a_scored_input():
    table = {
        "pretrain": {"ppl": 40.0, "acc": NAN},
        "sft": {"ppl": 25.0, "acc": 0.5},
        "grpo": {"ppl": 27.0, "acc": 0.75},
    }
    input_stage = {"pretrain": None, "sft": "pretrain", "grpo": "sft", "dpo": "sft"}
    found = changes(table, input_stage)
    assert list(found) == ["sft", "grpo"]  # pretrain has no input; dpo is not in the table
    assert found["sft"]["ppl"] == -15.0 and math.isnan(found["sft"]["acc"])  # nan on either side stays nan
    assert found["grpo"] == {"ppl": 2.0, "acc": 0.25}
    assert changes(table, {"grpo": "reward"}) == {}  # an input the table does not score


def test_spread_is_the_mean_and_sample_std_over_seeds_leaving_nan_out():
    seeds = [{"sft": {"acc": 0.2, "m": NAN}}, {"sft": {"acc": 0.4, "m": 1.0}}, {"sft": {"acc": 0.6, "m": 3.0}}]
    found = spread(seeds)["sft"]
    assert found["acc"].n == 3 and found["acc"].mean == pytest.approx(0.4)
    # sample std: sqrt(((0.2 - 0.4)² + 0² + (0.6 - 0.4)²) / (3 - 1)) = sqrt(0.04) = 0.2
    assert found["acc"].std == pytest.approx(0.2)
    assert found["m"].n == 2 and found["m"].mean == 2.0 and found["m"].std == pytest.approx(math.sqrt(2.0))
    alone = spread([{"sft": {"acc": 0.3}}])["sft"]["acc"]
    assert (alone.mean, alone.n) == (0.3, 1) and math.isnan(alone.std)
    assert spread([{"sft": {"acc": NAN}}, {"sft": {"acc": NAN}}])["sft"]["acc"].n == 0


def test_a_change_is_clear_when_its_95_percent_t_interval_leaves_out_zero_from_3_seeds_on():
    # n = 3: t(2) = 4.303, half-width 4.303 · 0.2 / sqrt(3) = 0.497
    assert not Spread(0.4, 0.2, 3).clear
    assert Spread(-0.6, 0.2, 3).clear
    # n = 5: t(4) = 2.776, half-width 2.776 · 0.2 / sqrt(5) = 0.248
    assert not Spread(0.24, 0.2, 5).clear and Spread(0.26, 0.2, 5).clear
    assert Spread(0.1, 0.0, 3).clear  # the same change on every seed
    assert not Spread(0.95, 0.001, 2).clear and not Spread(0.1, 0.0, 2).clear  # two seeds never
    assert not Spread(5.0, NAN, 1).clear


def test_a_spread_below_float32_rounding_is_zero():
    # 1/24 as two float32 accuracies' differences: 0.29166666 - 0.33333334 and 0.125 - 0.16666667
    same = Spread.of([0.29166666 - 0.33333334, 0.125 - 0.16666667, 0.5 - 0.5416667])
    assert same.std == 0.0 and same.mean == pytest.approx(-1 / 24)
    assert Spread.of([1 / 24, -1 / 24]).mean == 0.0
    assert Spread.of([0.1, 0.1001]).std > 0


def test_every_training_stage_of_quick_yaml_has_its_input_named():
    assert inputs_of(load_spec(QUICK)) == {
        "pretrain": None,
        "sft": "pretrain",
        "sft-lora": "sft",
        "dpo": "sft-lora",
        "pro": "dpo",
        "tuna": "pro",
        "reward": "sft",
        "kto": "sft-lora",
        "grpo": "sft-lora",
    }


SWEEP = """
name: swept
model: {{init: {{hidden_size: 32, layers: 1, heads: 2, max_seq_len: 128}}}}
tokenizer: {{train: {{vocab_size: 300, data: [{data}/pretrain.jsonl]}}}}
sweep: {sweep}
stages:
  - {{name: pretrain, kind: pretrain, data: {data}/pretrain.jsonl, packing: {{block_size: 64}},
      train: {{max_steps: 6, batch_size: 8}}}}
  - {{name: sft, kind: sft, data: {data}/sft.jsonl, max_len: 128, train: {{max_steps: 6, batch_size: 8}}}}
  - {{name: dpo, kind: dpo, data: {data}/preference.jsonl, max_len: 96, train: {{max_steps: 4, batch_size: 8}}}}
  - {{name: eval, kind: eval, checkpoints: [sft, dpo], preference: {data}/preference_heldout.jsonl, limit: 16,
      best_by: preference_accuracy}}
"""


def sweep_spec(tmp_path, sweep: str):
    path = tmp_path / "swept.yaml"
    path.write_text(SWEEP.format(data=QUICK.parent / "data", sweep=sweep))
    return path


def test_a_sweep_expands_into_branches_that_share_the_stages_before_it(tmp_path) -> None:
    from schemas.sweep import branches
    from tasks.plan import plan, sweep_cost

    spec = load_spec(sweep_spec(tmp_path, "{grid: {dpo.beta: [0.1, 0.5], dpo.train.lr: [0.001]}, seeds: [0, 1, 2]}"))
    found = branches(spec)
    assert [b.name for b in found][:2] == [
        "dpo.beta=0.1 dpo.train.lr=0.001 seed=0",
        "dpo.beta=0.1 dpo.train.lr=0.001 seed=1",
    ]
    assert [(b.spec.stages[2].beta, b.spec.stages[2].train.seed) for b in found] == [
        (beta, seed) for beta in (0.1, 0.5) for seed in (0, 1, 2)
    ]
    assert all(b.spec.sweep is None and not b.spec.registry for b in found)
    fingerprints = [{s.name: s.fingerprint for s in plan(b.spec)} for b in found]
    for name in ("tokenizer", "pretrain", "sft"):  # before the swept stage: one run for all six
        assert len({f[name] for f in fingerprints}) == 1
    assert len({f["dpo"] for f in fingerprints}) == len({f["eval"] for f in fingerprints}) == 6
    cost = sweep_cost(spec)
    assert (cost.branches, cost.shared, cost.total, cost.one_by_one) == (6, 3, 15, 30)


@pytest.mark.parametrize(
    "sweep, said",
    [
        ("{grid: {dpo.betta: [0.1]}}", "sweep key 'dpo.betta': DPOStage has no field 'betta' (did you mean 'beta'?)"),
        (
            "{grid: {dop.beta: [0.1]}}",
            "sweep key 'dop.beta' names no stage field `<stage>.<field>` (did you mean 'dpo'?)",
        ),
        ("{grid: {dpo.beta: [-1]}}", "sweep key 'dpo.beta': -1 is not a value it takes"),
        ("{grid: {dpo.beta: [0.1]}, points: [{dpo.beta: 0.2}]}", "as `grid` (every combination) or as `points`"),
        ("{grid: {eval.limit: [4]}, seeds: [0, 1]}", "stage eval trains nothing, so no seed of its own to vary"),
    ],
)
def test_a_sweep_that_names_what_is_not_there_is_refused_naming_the_field(tmp_path, sweep: str, said: str) -> None:
    from schemas.load import SpecError

    with pytest.raises(SpecError, match=re.escape(said)):
        load_spec(sweep_spec(tmp_path, sweep))


def test_a_sweep_runs_each_shared_stage_once_and_reports_every_point_with_its_spread(
    prefect_harness, tmp_path, monkeypatch, capsys
) -> None:
    from mlflow import MlflowClient

    from flows.cli import main
    from flows.lifecycle import lifecycle

    from .conftest import use_home

    root = tmp_path / "home"
    use_home(monkeypatch, root)
    # two branches at a time, each a process of its own; the winner's models registered
    path = sweep_spec(tmp_path, "{grid: {dpo.beta: [0.1, 0.5]}, seeds: [0, 1], concurrency: 2}\nregistry: true")
    path.write_text(path.read_text().replace("best_by: preference_accuracy", "best_by: preference_margin"))
    runs = lifecycle(str(path))
    said = capsys.readouterr().err
    assert list(runs) == [f"dpo.beta={beta} seed={seed}" for beta in (0.1, 0.5) for seed in (0, 1)]
    # the branches ran side by side: the second waited for the shared stages the first was training
    assert "[dpo.beta=0.1 seed=1] " in said and "is running it; this branch waits for it" in said
    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("swept").experiment_id
    stage_runs = [
        r for r in mlflow.search_runs([experiment]) if r.data.tags.get("lifecycle.kind") not in ("pipeline", "sweep")
    ]
    trained = {
        name: sum(r.info.run_name == name for r in stage_runs)
        for name in ("tokenizer", "pretrain", "sft", "dpo", "eval")
    }
    assert trained == {"tokenizer": 1, "pretrain": 1, "sft": 1, "dpo": 4, "eval": 4}  # P + 2 branch stages × 2 × 2
    assert len({branch["sft"] for branch in runs.values()}) == 1  # every branch starts from the one SFT run
    (sweep,) = mlflow.search_runs([experiment], "tags.`lifecycle.kind` = 'sweep'")
    children = mlflow.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sweep.info.run_id}'")
    assert sweep.info.status == "FINISHED" and len(children) == 4
    assert {(c.data.tags["lifecycle.point.dpo.beta"], c.data.tags["lifecycle.seed"]) for c in children} == {
        (beta, seed) for beta in ("0.1", "0.5") for seed in ("0", "1")
    }
    assert sweep.data.tags["lifecycle.best_point"].startswith("best point by preference_margin of dpo: ")
    # the registered model holds the winning branch's chain, `best` on its best checkpoint by preference_margin
    winner = sweep.data.tags["lifecycle.best_branch"]
    assert sweep.data.tags["lifecycle.best_point"].startswith(
        f"best point by preference_margin of dpo: {winner.rsplit(' seed=', 1)[0]} ("
    )
    versions = mlflow.search_model_versions("name = 'swept'")
    assert {v.run_id for v in versions} == {runs[winner][name] for name in ("pretrain", "sft", "dpo")}
    best = mlflow.get_model_version_by_alias("swept", "best")
    assert best.run_id in (runs[winner]["sft"], runs[winner]["dpo"])

    assert main(["report", str(path)]) == 0
    said = capsys.readouterr().out
    assert said.startswith("sweep swept: 4 of 4 branches measured by eval stage eval")
    assert "dpo.beta=0.1 (2 seeds): mean ± std" in said and "dpo.beta=0.5 (2 seeds): mean ± std" in said
    assert "dpo − sft" in said and " ± " in said
    assert said.strip().splitlines()[-1] == sweep.data.tags["lifecycle.best_point"]

    again = lifecycle(str(path))  # a re-run reuses every branch
    assert again == runs


def test_a_branch_that_fails_leaves_the_others_finished_and_a_re_run_redoes_only_it(
    prefect_harness, tmp_path, monkeypatch
) -> None:
    from mlflow import MlflowClient

    from flows.lifecycle import SweepFailed, lifecycle

    from .conftest import use_home

    root = tmp_path / "home"
    use_home(monkeypatch, root)
    text = SWEEP.format(data=QUICK.parent / "data", sweep="{grid: {sft.train.lr: [0.001, 1.0e+30]}, concurrency: 1}")
    path = tmp_path / "diverges.yaml"
    path.write_text(text[: text.index("  - {name: dpo")])  # an lr of 1e30 diverges at once
    for _ in range(2):
        with pytest.raises(SweepFailed, match=r"1 of 2 branches failed \(sft.train.lr=1e\+30: Diverged: stage sft"):
            lifecycle(str(path))
    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("swept").experiment_id
    sft = [
        (r.data.params["train.lr"], r.info.status)
        for r in mlflow.search_runs([experiment], "attributes.run_name = 'sft'")
    ]
    # the first branch trained once and was reused by the re-run; the one that failed was tried again
    assert sorted(sft) == [("0.001", "FINISHED"), ("1e+30", "FAILED"), ("1e+30", "FAILED")]


def test_a_sweep_without_an_eval_stage_logs_no_report_and_report_says_why(tmp_path) -> None:
    from tasks.sweeps import NoEvalStage, log_report, report

    text = SWEEP.format(data=QUICK.parent / "data", sweep="{grid: {dpo.beta: [0.1]}}")
    path = tmp_path / "no-eval.yaml"
    path.write_text(text[: text.index("  - {name: eval")])
    spec = load_spec(path)
    log_report(None, "a-run", spec, [])  # touches no store
    with pytest.raises(NoEvalStage, match="has no eval stage to compare the branches by"):
        report(None, "an-experiment", spec, [])
