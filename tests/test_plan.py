"""Fingerprints: deterministic, content-addressed, and changed exactly downstream of an edit."""

from __future__ import annotations

import shutil
from pathlib import Path

from examples.generate import DATA_DIR
from schemas.spec import load_spec
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


def test_data_content_and_tokenizer_reach_the_fingerprint(tmp_path: Path) -> None:
    base = fingerprints(tmp_path)
    with open(tmp_path / "sft.jsonl", "a") as handle:
        handle.write('{"conversations": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')
    changed = fingerprints(tmp_path)
    assert changed["pretrain"] != base["pretrain"]  # the tokenizer learns from the SFT text too
    assert all(changed[name] != base[name] for name in base)
    vocab = fingerprints(tmp_path, SPEC.replace("vocab_size: 512", "vocab_size: 600"))
    assert all(vocab[name] != changed[name] for name in base)
