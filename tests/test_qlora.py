"""QLoRA (`lora.quantize`): LoRA on a base loaded in 4 bits through bitsandbytes (its CPU backend here), the adapter
trained and merged onto the full-precision base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from examples.generate import DATA_DIR
from schemas.spec import LoraSpec, SFTStage, TrainSpec
from stages import sft
from stages.common.contract import StageInputs, adapter_base
from stages.common.recipe import adapt, load

from .conftest import FAST


def qlora_sft(quantize: str = "4bit", **train) -> SFTStage:
    return SFTStage(
        name="sft-qlora",
        kind="sft",
        data=[DATA_DIR / "sft.jsonl"],
        heldout=[DATA_DIR / "sft_heldout.jsonl"],
        max_len=256,
        template="chatml",
        eval_samples=0,
        lora=LoraSpec(r=8, alpha=16, quantize=quantize, merge=True),
        train=TrainSpec(**FAST | {"max_steps": 20, "lr": 3e-3} | train),
    )


@pytest.mark.parametrize("quantize, layer", [("4bit", Linear4bit), ("8bit", Linear8bitLt)])
def test_the_base_loads_quantized_and_only_the_adapters_train(
    chat_model: Path, trained_tokenizer: Path, quantize: str, layer: type
) -> None:
    spec = qlora_sft(quantize)
    inputs = StageInputs(chat_model, trained_tokenizer, None)
    _, model = load(spec, inputs)
    assert isinstance(model.model.layers[0].self_attn.q_proj, layer)
    assert model.get_memory_footprint() < AutoModelForCausalLM.from_pretrained(chat_model).get_memory_footprint()
    wrapped = adapt(spec, inputs, model)
    trained = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)


def test_qlora_sft_learns_and_merges_onto_the_full_precision_base(
    pretrained, trained_tokenizer: Path, tmp_path: Path
) -> None:
    """From the pretrained model (conversations are new to it), as a LoRA-SFT stage would start."""
    base = pretrained.checkpoint
    spec = qlora_sft()
    datasets = sft.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer)).datasets
    result = sft.run(spec, StageInputs(base, trained_tokenizer, datasets), tmp_path)
    print({k: round(v, 3) for k, v in result.metrics.items() if k.startswith("heldout")})
    assert result.metrics["heldout_loss"] < result.metrics["heldout_loss_before"] - 0.1
    assert adapter_base(result.adapter) == base
    # the merged checkpoint is a plain full-precision model: the adapter on the base as it was, not on its 4 bits
    merged = AutoModelForCausalLM.from_pretrained(result.checkpoint).eval()
    assert getattr(merged.config, "quantization_config", None) is None
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), result.adapter).eval()
    ids = torch.tensor(
        [AutoTokenizer.from_pretrained(trained_tokenizer)("The capital of Samoria is Uxkel.")["input_ids"]]
    )
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)


def test_the_adapters_get_the_gradients_they_would_get_on_the_dequantized_base(chat_model: Path) -> None:
    """The 4-bit layers' backward (bitsandbytes' CPU kernels; one-row inputs take its gemv path, which torch warns has
    no autograd kernel of its own) gives each adapter the gradient it gets on a plain model holding the dequantized
    weights: exactly on the gemv path, within bf16 rounding on the batched one."""
    import bitsandbytes.functional as bnb_functional
    from peft import LoraConfig, get_peft_model

    from stages.common import checkpoint

    spec = LoraSpec(r=8, quantize="4bit")
    quantized = AutoModelForCausalLM.from_pretrained(chat_model, **checkpoint.quantized(spec, bf16=False))
    plain = AutoModelForCausalLM.from_pretrained(chat_model)
    for name, layer in quantized.named_modules():
        if isinstance(layer, Linear4bit):
            weight = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
            plain.get_submodule(name).weight.data.copy_(weight)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    models = []
    for model in (quantized, plain):
        torch.manual_seed(0)  # the same random adapters on both
        models.append(get_peft_model(model, config))
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    for batch, tolerance in ((ids, 2e-2), (ids[:1, :1], 1e-6)):
        grads = []
        for model in models:
            model.zero_grad()
            model(input_ids=batch, labels=batch).loss.backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
        for name, grad in grads[1].items():
            assert torch.allclose(grads[0][name], grad, rtol=0, atol=tolerance * grad.abs().max().item()), name
