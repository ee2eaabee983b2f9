"""Each stage on a tiny model: the tokenizer renders chats as training does, losses fall, outputs load.

A loss compared with a threshold is compared as a Python float, and the comment beside it gives the
value measured with the test's seed (CPU, fp32) and the margin by which it clears the threshold.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from examples.generate import DATA_DIR
from schemas.data import read_files
from schemas.spec import STAGE_KINDS, ModelInit, PretrainStage, SFTStage, TemplateName, TrainSpec
from stages import TRAINING_STAGES, pretrain, sft, training_stage
from stages.common.contract import StageInputs
from stages.common.recipe import build_model
from stages.common.templates import IGNORE, OWN_TEMPLATE, TEMPLATES, encode_conversation, encode_prompt
from stages.common.tools import chats
from stages.common.training import last_checkpoint
from tests.conftest import FAST, TINY


def test_every_training_kind_of_the_spec_has_a_module_with_the_stage_protocol() -> None:
    assert list(TRAINING_STAGES) == [kind for kind in STAGE_KINDS if kind != "eval"]
    for kind in TRAINING_STAGES:
        module = training_stage(kind)
        assert module.__name__ == f"stages.{kind}"
        for name in ("prepare", "examples", "run"):
            assert callable(getattr(module, name)), f"stages.{kind} has no {name}"


def test_the_spec_names_every_template_the_stages_render_and_no_other() -> None:
    assert set(get_args(TemplateName)) == {*TEMPLATES, OWN_TEMPLATE}


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Reverse the letters of cat."},
    {"role": "assistant", "content": "tac"},
]


def test_tokenizer_stores_the_template_training_renders_with(trained_tokenizer: Path) -> None:
    tok = AutoTokenizer.from_pretrained(trained_tokenizer)
    ids, _ = encode_conversation(CHAT, tok, max_len=512)
    assert list(tok.apply_chat_template(CHAT, tokenize=True)["input_ids"]) == ids
    prompt = tok.apply_chat_template(CHAT[:-1], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert list(prompt) == encode_prompt(CHAT[:-1], tok)
    assert tok.decode(tok("plain words 12 + 7")["input_ids"]) == "plain words 12 + 7"


def test_loss_only_on_every_assistant_turn(trained_tokenizer: Path) -> None:
    tok = AutoTokenizer.from_pretrained(trained_tokenizer)
    ids, labels = encode_conversation(CHAT, tok, max_len=512)
    trained = [i for i, label in zip(ids, labels) if label != IGNORE]
    assert tok.decode(trained) == "5<|im_end|>tac<|im_end|>"
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels))
    short_ids, short_labels = encode_conversation(CHAT, tok, max_len=10)
    assert (short_ids, short_labels) == (ids[:10], labels[:10])


def test_pretrain_packs_documents_with_eos_between(trained_tokenizer: Path) -> None:
    tok = AutoTokenizer.from_pretrained(trained_tokenizer)
    blocks, dropped = pretrain.pack(["one two", "three"], tok, block_size=2)
    stream = (
        tok("one two", add_special_tokens=False)["input_ids"]
        + [tok.eos_token_id]
        + tok("three", add_special_tokens=False)["input_ids"]
        + [tok.eos_token_id]
    )
    assert sum(blocks["input_ids"], []) == stream[: len(stream) // 2 * 2]
    assert dropped == len(stream) % 2


def test_pretrain_loss_falls_and_the_output_loads(pretrained) -> None:
    # a 512-token vocabulary starts near ln(512) = 6.24. Seed 0: train loss 4.52 (clears 6.0 by 1.48), held-out 3.75
    # (clears 5.0 by 1.25); seeds 1 and 2: 4.60 / 3.90 and 4.57 / 3.84
    assert float(pretrained.metrics["train_loss"]) < 6.0
    assert float(pretrained.metrics["heldout_loss"]) < 5.0
    model = AutoModelForCausalLM.from_pretrained(pretrained.checkpoint)
    assert model.config.hidden_size == 64 and model.num_parameters() == pretrained.counts["parameters"]
    assert (pretrained.checkpoint / "model.safetensors").exists() and (
        pretrained.checkpoint / "tokenizer.json"
    ).exists()
    assert not list(pretrained.checkpoint.glob("*.bin"))


def test_sft_lowers_response_loss_and_resumes_from_its_checkpoint(
    trained_tokenizer: Path, pretrained, tmp_path: Path
) -> None:
    spec = SFTStage(
        name="sft",
        kind="sft",
        data=[DATA_DIR / "sft.jsonl"],
        heldout=[DATA_DIR / "sft_heldout.jsonl"],
        max_len=128,
        eval_samples=8,
        template="chatml",
        train=TrainSpec(max_steps=30, save_steps=10, **FAST),
    )
    tok = AutoTokenizer.from_pretrained(trained_tokenizer)
    prepared = sft.prepare(spec, tok)
    read = chats(read_files(spec.data, "conversations").frame)
    overlong = sum(len(encode_conversation(c.messages, tok, 10_000)[0]) > 128 for c in read)
    assert prepared.counts["train_truncated"] == overlong > 0 and prepared.counts["train_dropped"] == 0
    # best-fit packing leaves little of a row empty: 0.935, no seed in it
    assert float(prepared.counts["train_row_fill"]) > 0.9
    datasets = prepared.datasets
    result = sft.run(spec, StageInputs(pretrained.checkpoint, trained_tokenizer, datasets), tmp_path)
    # held-out loss 4.71 → 3.19 (seed 0): a fall of 1.52, clearing 0.5 by 1.02 (seeds 1, 2: 1.55, 1.54)
    assert float(result.metrics["heldout_loss"]) < float(result.metrics["heldout_loss_before"]) - 0.5
    # exact match is measured on the first eval_samples (8) held-out conversations, before and after
    assert {result.metrics[k] * 8 % 1 for k in ("exact_match", "exact_match_before")} == {0.0}
    assert result.resumed_from_step == 0
    # the checkpoint holds the trained weights: every one finite, and not those the stage started from
    trained, started = (AutoModelForCausalLM.from_pretrained(p) for p in (result.checkpoint, pretrained.checkpoint))
    assert all(torch.isfinite(p).all() for p in trained.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), started.parameters()))

    # a longer run of the same stage continues from the last in-stage checkpoint, not from step 0
    assert last_checkpoint(tmp_path / "trainer").name == "checkpoint-30"
    longer = spec.model_copy(update={"train": spec.train.model_copy(update={"max_steps": 40})})
    resumed = sft.run(longer, StageInputs(pretrained.checkpoint, trained_tokenizer, datasets), tmp_path)
    assert resumed.resumed_from_step == 30 and resumed.counts["global_step"] == 40


def test_incomplete_checkpoints_are_discarded(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text('{\n  "global_step": 10\n}\n')
    (tmp_path / "checkpoint-20" / "trainer_state.json").write_text('{\n  "global_st')  # killed while writing it
    # checkpoint-30 was killed before its state was written at all
    assert last_checkpoint(tmp_path).name == "checkpoint-10"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10"]


def test_fresh_model_follows_the_init_spec(trained_tokenizer: Path) -> None:
    model = build_model(
        ModelInit(hidden_size=64, layers=3, heads=4, kv_heads=2, max_seq_len=96),
        AutoTokenizer.from_pretrained(trained_tokenizer),
    )
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.intermediate_size) == (
        3,
        2,
        192,
    )
    assert model.config.vocab_size == 512
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("arch, extra", [("qwen2", {"config": {"rms_norm_eps": 1e-5}}), ("gpt2", {}), ("phi3", {})])
def test_fresh_model_of_any_architecture(trained_tokenizer: Path, arch: str, extra: dict) -> None:
    init = ModelInit(arch=arch, hidden_size=64, layers=2, heads=4, max_seq_len=96, tie_embeddings=False, **extra)
    model = build_model(init, AutoTokenizer.from_pretrained(trained_tokenizer))
    assert model.config.model_type == arch and model.config.num_hidden_layers == 2 and model.config.vocab_size == 512
    assert model.config.max_position_embeddings == 96 and model.config.hidden_size == 64
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert all(model.config.to_dict()[k] == v for k, v in extra.get("config", {}).items())
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize(
    "init, expected",
    [
        ({"arch": "t5"}, "arch 't5' is not a transformers architecture with a causal LM head"),
        ({"arch": "gpt2", "kv_heads": 2}, "kv_heads: a gpt2 config has no num_key_value_heads"),
        (
            {"arch": "qwen2", "config": {"slidng_window": 32}},
            r"config: \['slidng_window'\] are not fields of a qwen2 config",
        ),
    ],
)
def test_fresh_model_of_an_unknown_architecture_or_field_is_refused(init: dict, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        ModelInit(hidden_size=64, heads=4, **init)


def test_pretrain_streams_a_globbed_corpus(trained_tokenizer: Path, tmp_path: Path) -> None:
    lines = (DATA_DIR / "pretrain.jsonl").read_text().splitlines(keepends=True)
    for part in range(3):
        (tmp_path / f"part-{part}.jsonl").write_text("".join(lines[part::3]))
    spec = PretrainStage(
        name="pretrain",
        kind="pretrain",
        data=[tmp_path / "part-*.jsonl"],
        streaming=True,
        packing={"block_size": 64},
        train=TrainSpec(max_steps=20, save_steps=20, **FAST),
    )
    prepared = pretrain.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer))
    assert "train" not in prepared.datasets  # nothing is prepared ahead of a stream
    result = pretrain.run(spec, StageInputs(TINY, trained_tokenizer, prepared.datasets), tmp_path / "work")
    # train loss 5.18 (seed 0), clearing 6.0 by 0.82 (seeds 1, 2: 5.21, 5.18)
    assert result.counts["global_step"] == 20 and float(result.metrics["train_loss"]) < 6.0
    assert result.counts["stream_rows_skipped"] == 0 and "train_rows" not in result.counts
