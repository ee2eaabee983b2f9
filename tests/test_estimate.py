"""The memory estimate: counted from the config alone as the real model has it, each setting moving the part it
should, printed by validate for every training stage and refusing a stage that cannot fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from examples.generate import DATA_DIR
from flows.cli import main
from schemas.architectures import init_config
from schemas.launch import DeepSpeed, Launch
from schemas.load import SpecError, load_spec
from schemas.memory import Memory
from schemas.spec import DistillStage, DPOStage, LoraSpec, ModelInit, SFTStage, TrainSpec
from stages.common.checkpoint import with_lora
from stages.common.estimate import GIB, Shapes, check, estimate

from .conftest import use_home
from .test_memory import SPEC

GQA = ModelInit(arch="qwen2", hidden_size=64, layers=2, heads=4, kv_heads=2, max_seq_len=128, tie_embeddings=False)
CPU = ("cpu", 64 * GIB)


def sft(**fields) -> SFTStage:
    return SFTStage(name="sft", kind="sft", data=[DATA_DIR / "sft.jsonl"], max_len=128, **fields)


def test_parameters_and_lora_share_are_counted_from_the_config_as_the_model_has_them() -> None:
    config = init_config(GQA, vocab_size=300)
    shapes = Shapes.of(config)
    model = AutoModelForCausalLM.from_config(config)
    assert shapes.parameters == model.num_parameters()
    assert (shapes.hidden, shapes.kv, shapes.layers, shapes.vocab) == (64, 32, 2, 300)
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        lora = LoraSpec(r=4, targets=targets)
        wrapped = with_lora(model, lora)
        trained = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        assert shapes.lora_parameters(sft(lora=lora)) == trained
        model = wrapped.unload()


def test_each_setting_moves_its_part() -> None:
    shapes = Shapes.of(init_config(GQA, vocab_size=300))
    plain = estimate(sft(), shapes, CPU).parts
    assert plain["weights"] == 4 * shapes.parameters and plain["gradients"] == 4 * shapes.parameters
    assert plain["optimizer"] == 8 * shapes.parameters
    lora = estimate(sft(lora=LoraSpec(r=4)), shapes, CPU).parts
    assert lora["gradients"] < plain["gradients"] / 5 and lora["optimizer"] < plain["optimizer"] / 5
    saved = estimate(sft(memory=Memory(gradient_checkpointing=True)), shapes, CPU).parts
    assert saved["activations"] < plain["activations"]
    assert estimate(sft(train=TrainSpec(batch_size=32)), shapes, CPU).parts["activations"] == 2 * plain["activations"]
    factored = estimate(sft(train=TrainSpec(optimizer="adafactor")), shapes, CPU)
    small = factored.parts
    assert small["optimizer"] < plain["optimizer"] / 4
    # its step's temporaries come after the activations and logits are freed: the peak is the larger moment
    assert small["step"] == 12 * shapes.largest and plain["step"] == 0
    held = sum(small[name] for name in ("weights", "gradients", "optimizer", "reference", "runtime"))
    assert factored.total == held + max(small["activations"] + small["logits"], small["step"])
    # ZeRO-2 shards gradients and optimizer state over the ranks; on one GPU each, the estimate is per GPU
    zero2 = Launch(processes=4, deepspeed=DeepSpeed(zero=2))
    gpu = estimate(sft(launch=zero2), shapes, ("a GPU", 80 * GIB)).parts
    assert gpu["gradients"] == plain["gradients"] / 4 and gpu["weights"] == plain["weights"]
    assert gpu["activations"] == plain["activations"] / 4  # each rank takes a quarter of the batch
    assert gpu["runtime"] == 0
    offloaded = Launch(processes=4, deepspeed=DeepSpeed(zero=3, offload=True))
    gpu3 = estimate(sft(launch=offloaded), shapes, ("a GPU", 80 * GIB)).parts
    assert gpu3["optimizer"] == 0 and gpu3["weights"] == plain["weights"] / 4
    # a frozen reference is a second copy of the weights; a precomputed one costs nothing while training
    pairs = dict(name="dpo", kind="dpo", data=[DATA_DIR / "preference.jsonl"], max_len=64)
    assert estimate(DPOStage(**pairs, reference="frozen"), shapes, CPU).parts["reference"] == plain["weights"]
    assert estimate(DPOStage(**pairs, reference="precomputed"), shapes, CPU).parts["reference"] == 0
    # QLoRA: the base's linear layers at half a byte and a little (NF4 with double quantization), 8 bits at one
    linear = sum(i * o for _, i, o in shapes.matrices)
    for bits, per_weight in (("4bit", 0.5 + 1 / 64 + 4 / (64 * 256)), ("8bit", 1.0)):
        quantized = estimate(sft(lora=LoraSpec(quantize=bits)), shapes, CPU).parts["weights"]
        full = estimate(sft(lora=LoraSpec()), shapes, CPU).parts["weights"]
        assert quantized == pytest.approx(full - (4 - per_weight) * linear)
    # a distillation holds its frozen teacher beside the student, and the teacher's logits beside its own
    rows = dict(name="d", data=[DATA_DIR / "sft.jsonl"], max_len=64)
    distilled = estimate(DistillStage(kind="distill", teacher="sft", **rows), shapes, CPU).parts
    alone = estimate(SFTStage(kind="sft", **rows), shapes, CPU).parts
    assert distilled["teacher"] == alone["weights"] and distilled["logits"] == 2 * alone["logits"]


def test_validate_prints_every_training_stage_and_refuses_one_that_cannot_fit(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    use_home(monkeypatch, tmp_path / "home")  # main() sets the home's variables: restored after the test
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    assert main(["validate", str(path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("memory: ")]
    assert [line.split(":")[1].strip() for line in lines] == ["pretrain", "sft", "dpo"]
    assert all(" fits: weights " in line for line in lines)
    # 16 rows of 64 tokens (a pair: 128) need more than a device of 6 MiB holds
    assert main(["validate", str(path), "--device-memory", "6MiB"]) == 2
    err = capsys.readouterr().err
    assert "3 stage(s) would not fit in memory" in err and "sft: about " in err and "DOES NOT FIT" in err
    assert "to fit: lower train.batch_size" in err
    with pytest.raises(SpecError, match="would not fit"):
        check(load_spec(path), path, ("a small GPU", 1 << 20))
