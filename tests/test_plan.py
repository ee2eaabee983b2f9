"""Fingerprints: deterministic, content-addressed, and changed exactly downstream of an edit."""

from __future__ import annotations

import shutil
from pathlib import Path

from examples.generate import DATA_DIR
from schemas.load import load_spec
from schemas.sources import files_of
from tasks.plan import plan

SPEC = """
name: t
model: {init: {hidden_size: 64, layers: 2, heads: 2, max_seq_len: 128}}
tokenizer: {train: {vocab_size: 512}}
stages:
  - {name: pretrain, kind: pretrain, data: pretrain.jsonl, packing: {block_size: 64}}
  - {name: sft, kind: sft, data: sft.jsonl, train: {lr: 0.001}}
"""


def fingerprints(folder: Path, text: str = SPEC) -> dict[str, str]:
    for name in ("pretrain.jsonl", "sft.jsonl"):
        if not (folder / name).exists():
            shutil.copy(DATA_DIR / name, folder / name)
    (folder / "spec.yaml").write_text(text)
    return {stage.name: stage.fingerprint for stage in plan(load_spec(folder / "spec.yaml"))}


def test_stable_across_calls_and_folders(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = fingerprints(tmp_path / "a")
    assert first == fingerprints(tmp_path / "a")
    assert first == fingerprints(tmp_path / "b")  # data by content, not by path
    assert list(first) == ["tokenizer", "pretrain", "sft"]
    assert all(len(fp) == 64 for fp in first.values())


def test_an_edit_changes_that_stage_and_everything_downstream_only(tmp_path: Path) -> None:
    base = fingerprints(tmp_path)
    sft_edit = fingerprints(tmp_path, SPEC.replace("lr: 0.001", "lr: 0.002"))
    assert sft_edit["tokenizer"] == base["tokenizer"] and sft_edit["pretrain"] == base["pretrain"]
    assert sft_edit["sft"] != base["sft"]
    pretrain_edit = fingerprints(tmp_path, SPEC.replace("block_size: 64", "block_size: 32"))
    assert pretrain_edit["tokenizer"] == base["tokenizer"]
    assert pretrain_edit["pretrain"] != base["pretrain"] and pretrain_edit["sft"] != base["sft"]
    cadence_edit = fingerprints(tmp_path, SPEC.replace("lr: 0.001", "lr: 0.001, save_steps: 7, logging_steps: 3"))
    assert cadence_edit == base  # checkpoint and logging cadence do not change what a stage makes
    model_edit = fingerprints(tmp_path, SPEC.replace("layers: 2", "layers: 3"))
    assert model_edit["tokenizer"] == base["tokenizer"] and model_edit["pretrain"] != base["pretrain"]


def test_a_stage_added_on_a_file_another_stage_reads_keeps_every_finished_stage(tmp_path: Path) -> None:
    # the tokenizer learns from each file once, so a second stage on sft.jsonl leaves it, and what it made, as it was
    base = fingerprints(tmp_path)
    added = fingerprints(tmp_path, SPEC + "  - {name: sft-more, kind: sft, data: sft.jsonl, train: {lr: 0.002}}\n")
    assert {name: added[name] for name in base} == base and "sft-more" in added
    # sampled at another weight, it is still the file the tokenizer read
    weighted = fingerprints(tmp_path, SPEC + "  - {name: sft-more, kind: sft, data: {path: sft.jsonl, weight: 0.5}}\n")
    assert {name: weighted[name] for name in base} == base
    assert [path.name for path, _, _ in load_spec(tmp_path / "spec.yaml").tokenizer_corpus()] == [
        "pretrain.jsonl",
        "sft.jsonl",
    ]


def test_data_content_and_tokenizer_reach_the_fingerprint(tmp_path: Path) -> None:
    base = fingerprints(tmp_path)
    with open(tmp_path / "sft.jsonl", "a") as handle:
        handle.write('{"conversations": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')
    changed = fingerprints(tmp_path)
    assert changed["pretrain"] != base["pretrain"]  # the tokenizer learns from the SFT text too
    assert all(changed[name] != base[name] for name in base)
    vocab = fingerprints(tmp_path, SPEC.replace("vocab_size: 512", "vocab_size: 600"))
    assert all(vocab[name] != changed[name] for name in base)


def test_a_reward_model_in_the_loop_reaches_the_fingerprints_of_the_stages_it_scores_for(tmp_path: Path) -> None:
    for name in ("preference.jsonl", "rl_prompts.jsonl", "rl_prompts_heldout.jsonl"):
        shutil.copy(DATA_DIR / name, tmp_path / name)
    spec = (
        SPEC
        + """  - {name: reward, kind: reward, data: preference.jsonl, train: {lr: 0.001}}
  - {name: grpo, kind: grpo, from: sft, data: rl_prompts.jsonl, heldout: rl_prompts_heldout.jsonl,
     rewards: [{kind: answer}, {kind: reward_model, stage: reward}]}
  - {name: eval, kind: eval}
"""
    )
    base = fingerprints(tmp_path, spec)
    reward_edit = fingerprints(
        tmp_path, spec.replace("train: {lr: 0.001}}\n  - {name: grpo", "train: {lr: 0.002}}\n  - {name: grpo")
    )
    assert [name for name in base if reward_edit[name] != base[name]] == ["reward", "grpo", "eval"]
    evaluated = load_spec(tmp_path / "spec.yaml").stages[-1]
    # the eval stage scores with the last reward stage's model and grpo's rewards, on grpo's held-out prompts
    assert evaluated.reward_model == "reward" and [r.kind for r in evaluated.rewards] == ["answer", "reward_model"]
    assert files_of(evaluated.prompts) == [tmp_path / "rl_prompts_heldout.jsonl"]


TOOL = '''def population(country: str) -> int:
    """How many people live in a country today."""
    return {answer}
'''


def test_a_tool_file_reaches_the_fingerprint_by_its_content_not_its_path(tmp_path: Path) -> None:
    """A rollout stage's tools (and python rewards) named as file.py:name: the file's content is part of the stage's
    fingerprint and its prepared data's key (the prompts offer the definition), where the checkout lies is not; a
    stage without tools keeps the fingerprint it had."""
    from tasks.keys import dataset_key

    spec = SPEC + (
        "  - {name: grpo, kind: grpo, from: sft, data: rl_prompts.jsonl, max_len: 128,\n"
        "     tools: [{function: tools.py:population}], rewards: [{kind: python, function: tools.py:population}]}\n"
    )
    keys = {}
    for folder, answer in (("a", 1), ("b", 1), ("c", 2)):
        (tmp_path / folder).mkdir()
        shutil.copy(DATA_DIR / "rl_prompts.jsonl", tmp_path / folder / "rl_prompts.jsonl")
        (tmp_path / folder / "tools.py").write_text(TOOL.format(answer=answer))
        keys[folder] = fingerprints(tmp_path / folder, spec)["grpo"]
        grpo = load_spec(tmp_path / folder / "spec.yaml").stages[-1]
        assert grpo.tools[0].function == f"{tmp_path / folder / 'tools.py'}:population"
        keys[f"data-{folder}"] = dataset_key("grpo", grpo, DATA_DIR.parent)  # any folder stands for the tokenizer
    assert keys["a"] == keys["b"] != keys["c"]
    assert keys["data-a"] == keys["data-b"] != keys["data-c"]
    without = fingerprints(tmp_path / "a", spec.replace("tools: [{function: tools.py:population}], ", ""))
    assert without["grpo"] != keys["a"]
    # and a missing file is named when the spec loads (the spec as written last: its python reward)
    (tmp_path / "a" / "tools.py").unlink()
    import pytest

    from schemas.load import SpecError

    with pytest.raises(SpecError, match=r"stages\[2\]\.rewards\[0\]: tools\.py is not a file"):
        load_spec(tmp_path / "a" / "spec.yaml")
