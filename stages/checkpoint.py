"""Checkpoint IO: what a stage saves, and how any stage's output loads again.

A stage's output is a Hugging Face folder in safetensors with its tokenizer. A LoRA stage's
output is its adapter (`adapter_config.json` naming the base folder it applies to), plus,
with `merge: true`, the base with the adapter merged in. Whoever loads a checkpoint gets one
plain model either way: an adapter is applied to its base and merged on load.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from schemas.spec import LoraSpec
from stages.contract import adapter_base, is_adapter, point_adapter_at

def load_model(folder: Path, auto_class=AutoModelForCausalLM, dtype: torch.dtype = torch.float32, **config) -> PreTrainedModel:
    """A checkpoint as one plain model: an adapter is applied to its base (itself loaded the same way) and merged."""
    if not is_adapter(folder):
        return auto_class.from_pretrained(folder, dtype=dtype, **config)
    base = load_model(adapter_base(folder), auto_class, dtype, **config)
    # PEFT loads an adapter for inference, freezing every weight; a merged checkpoint trains like any other
    return PeftModel.from_pretrained(base, folder).merge_and_unload().requires_grad_(True)


def with_lora(model: PreTrainedModel, lora: LoraSpec, task_type: str = "CAUSAL_LM") -> PeftModel:
    """The model wrapped with fresh LoRA adapters; only they (and a sequence classifier's head) train."""
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type=task_type,
                        target_modules=lora.targets if isinstance(lora.targets, str) else list(lora.targets))
    return get_peft_model(model, config)


def save(model: PreTrainedModel | PeftModel, tokenizer, workdir: Path, lora: LoraSpec | None = None,
         base: Path | None = None) -> tuple[Path, Path | None]:
    """The stage's output folders: (the checkpoint the next stage takes, the adapter logged beside it).

    Without lora: the model, and no adapter. With lora: the adapter, naming `base` (the stage's input
    checkpoint) as what it applies to, is the checkpoint, unless `merge` asks for the merged model
    as the checkpoint, and then the adapter is logged beside it."""
    def fresh(folder: Path) -> Path:
        shutil.rmtree(folder, ignore_errors=True)
        return folder

    if lora is None:
        model.save_pretrained(fresh(workdir / "model"))
        tokenizer.save_pretrained(workdir / "model")
        return workdir / "model", None
    adapter = fresh(workdir / "adapter")
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    # PEFT records the folder the base weights loaded from, which for an input that was itself an adapter is its base's base
    point_adapter_at(adapter, base)
    if not lora.merge:
        return adapter, None
    merged = model.merge_and_unload()
    merged.save_pretrained(fresh(workdir / "model"))
    tokenizer.save_pretrained(workdir / "model")
    return workdir / "model", adapter
