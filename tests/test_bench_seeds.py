"""bench/seeds.py's arithmetic on hand-made tables: the spread over seeds and each stage's change over its input."""

from __future__ import annotations

import math

import pytest

from bench.seeds import Spread, changes, inputs_of, spread, table_of
from schemas.load import load_spec
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
