"""Memory and optimizer settings: handed to the Trainer and transformers, out of the fingerprint where they change
only speed or memory, and refused before anything loads where the machine cannot honour them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from examples.generate import DATA_DIR
from schemas.load import SpecError, load_spec
from schemas.memory import Memory
from schemas.spec import PretrainStage, SFTStage, TrainSpec
from stages import pretrain, sft
from stages.common import memory
from stages.common.contract import StageInputs
from stages.common.training import training_arguments
from tasks.plan import plan

from .conftest import FAST, TINY


def sft_stage(train_seed: int, **settings) -> SFTStage:
    train = TrainSpec(**(FAST | {"max_steps": 6, "seed": train_seed} | settings.pop("train", {})))
    return SFTStage(
        name="sft",
        kind="sft",
        data=[DATA_DIR / "sft.jsonl"],
        heldout=[DATA_DIR / "sft_heldout.jsonl"],
        max_len=64,
        eval_samples=0,
        template="chatml",
        train=train,
        **settings,
    )


def test_checkpointing_the_kernel_and_padding_free_rows_change_no_number(
    trained_tokenizer, pretrained, train_seed, tmp_path, monkeypatch
):
    tok = AutoTokenizer.from_pretrained(trained_tokenizer)
    plain = sft_stage(train_seed)
    saving = sft_stage(train_seed, memory=Memory(gradient_checkpointing=True, attention="eager"))
    prepared = sft.prepare(plain, tok)

    def run(spec: SFTStage, name: str):
        return sft.run(spec, StageInputs(pretrained.checkpoint, trained_tokenizer, prepared.datasets), tmp_path / name)

    runs = [run(plain, "plain"), run(saving, "saving")]
    # the batch as one unpadded row, as the SFT stage lays it out for flash attention's varlen kernel (here: sdpa,
    # which finds the documents from the position ids alike)
    monkeypatch.setattr(sft, "attention", lambda spec: "flash_attention_2")
    runs.append(run(plain, "flat"))
    assert [run.tags for run in runs[:2]] == [
        {"attention": kernel, "precision": "fp32"} for kernel in ("sdpa", "eager")
    ]
    # fp32 on CPU: recomputed activations, the eager kernel and one flat row give the same losses to rounding
    for metric in ("train_loss", "heldout_loss"):
        assert runs[1].metrics[metric] == pytest.approx(runs[0].metrics[metric], rel=1e-4)
        assert runs[2].metrics[metric] == pytest.approx(runs[0].metrics[metric], rel=1e-4)
    args = training_arguments(saving, tmp_path / "args")
    assert args.activation_checkpointing and args.activation_checkpointing_kwargs == {"use_reentrant": False}


def test_a_compiled_model_trains_to_the_same_losses(trained_tokenizer, train_seed, tmp_path):
    # pretraining blocks: one shape, so torch.compile builds its graphs once (CPU: inductor's C++ kernels)
    tok = AutoTokenizer.from_pretrained(trained_tokenizer)
    train = TrainSpec(**(FAST | {"max_steps": 2, "seed": train_seed}))
    stages = {
        name: PretrainStage(
            name="pretrain",
            kind="pretrain",
            data=[DATA_DIR / "pretrain.jsonl"],
            packing={"block_size": 32},
            train=train,
            memory=Memory(torch_compile=name == "compiled"),
        )
        for name in ("plain", "compiled")
    }
    datasets = pretrain.prepare(stages["plain"], tok).datasets
    losses = {
        name: pretrain.run(spec, StageInputs(TINY, trained_tokenizer, datasets), tmp_path / name).metrics["train_loss"]
        for name, spec in stages.items()
    }
    assert training_arguments(stages["compiled"], tmp_path / "args").torch_compile
    assert losses["compiled"] == pytest.approx(losses["plain"], rel=1e-3)


def test_adafactor_and_neftune_train(trained_tokenizer, pretrained, train_seed, tmp_path):
    tok = AutoTokenizer.from_pretrained(trained_tokenizer)
    spec = sft_stage(train_seed, train={"optimizer": "adafactor", "neftune_noise_alpha": 5.0, "lr": 1e-3})
    args = training_arguments(spec, tmp_path / "args")
    assert args.optim == "adafactor" and args.neftune_noise_alpha == 5.0
    result = sft.run(
        spec, StageInputs(pretrained.checkpoint, trained_tokenizer, sft.prepare(spec, tok).datasets), tmp_path
    )
    assert math.isfinite(result.metrics["train_loss"])
    assert result.metrics["heldout_loss"] < result.metrics["heldout_loss_before"]


SPEC = {
    "name": "m",
    "model": {"init": TINY.model_dump()},
    "tokenizer": {"train": {"vocab_size": 512}},
    "stages": [
        {
            "name": "pretrain",
            "kind": "pretrain",
            "data": str(DATA_DIR / "pretrain.jsonl"),
            "packing": {"block_size": 64},
        },
        {"name": "sft", "kind": "sft", "data": str(DATA_DIR / "sft.jsonl"), "max_len": 64},
        {"name": "dpo", "kind": "dpo", "data": str(DATA_DIR / "preference.jsonl"), "max_len": 64},
    ],
}


def fingerprints(tmp_path: Path, spec: dict) -> dict[str, str]:
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return {stage.name: stage.fingerprint for stage in plan(load_spec(tmp_path / "spec.yaml"))}


def edited(stage: int, **fields) -> dict:
    stages = [dict(s) for s in SPEC["stages"]]
    stages[stage] |= fields
    return SPEC | {"stages": stages}


def test_speed_and_memory_settings_are_not_in_the_fingerprint_and_the_optimizer_is(tmp_path: Path) -> None:
    base = fingerprints(tmp_path, SPEC)
    settings = {"gradient_checkpointing": True, "attention": "eager", "torch_compile": True}
    assert fingerprints(tmp_path, SPEC | {"memory": settings}) == base  # pipeline-wide
    assert fingerprints(tmp_path, edited(1, memory=settings)) == base  # one stage's
    assert fingerprints(tmp_path, edited(1, train={"optimizer": "adamw_torch_fused"})) == base  # the default, given
    optimizer = fingerprints(tmp_path, edited(1, train={"optimizer": "adafactor"}))
    assert optimizer["pretrain"] == base["pretrain"] and optimizer["sft"] != base["sft"]
    assert optimizer["dpo"] != base["dpo"]  # downstream of the change
    assert fingerprints(tmp_path, edited(1, train={"neftune_noise_alpha": 5}))["sft"] != base["sft"]
    # the pipeline's memory is every training stage's unless the stage gives its own
    (tmp_path / "spec.yaml").write_text(
        yaml.safe_dump(edited(2, memory={"attention": "eager"}) | {"memory": {"gradient_checkpointing": True}})
    )
    resolved = load_spec(tmp_path / "spec.yaml")
    assert [s.memory for s in resolved.training_stages()] == [
        Memory(gradient_checkpointing=True),
        Memory(gradient_checkpointing=True),
        Memory(attention="eager"),
    ]


def test_settings_this_machine_cannot_honour_are_refused_by_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(memory.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(memory, "_installed", lambda package: False)
    train = {"optimizer": "paged_adamw_8bit", "precision": "fp32"}
    spec = edited(1, memory={"attention": "flash_attention_2", "liger": True}, train=train)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError) as err:
        memory.check(load_spec(tmp_path / "spec.yaml"), tmp_path / "spec.yaml")
    assert str(err.value).splitlines()[1:] == [
        "  stages[1] (sft): memory.attention flash_attention_2 needs a CUDA GPU, and this machine has none",
        "  stages[1] (sft): memory.attention flash_attention_2 needs the flash-attn package (pip install flash-attn)",
        "  stages[1] (sft): memory.attention flash_attention_2 needs bf16 (train.precision bf16, or auto on a GPU that "
        "has it)",
        "  stages[1] (sft): memory.liger needs a CUDA GPU, and this machine has none",
        "  stages[1] (sft): memory.liger needs the liger-kernel package",
        "  stages[1] (sft): train.optimizer paged_adamw_8bit needs the bitsandbytes package",
        "  stages[1] (sft): train.optimizer paged_adamw_8bit needs a CUDA GPU",
    ]
    # what this machine has passes: sdpa and checkpointing everywhere
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC | {"memory": {"gradient_checkpointing": True}}))
    memory.check(load_spec(tmp_path / "spec.yaml"), tmp_path / "spec.yaml")


def test_neftune_is_for_sft_stages(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(edited(2, train={"neftune_noise_alpha": 5})))
    with pytest.raises(SpecError, match=r"stages\[2\]: train.neftune_noise_alpha: NEFTune is noise on the embeddings"):
        load_spec(tmp_path / "spec.yaml")
