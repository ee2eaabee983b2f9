"""Checkpoint IO: what a stage saves, and how any stage's output loads again.

A stage's output is a Hugging Face folder in safetensors with its tokenizer. A LoRA stage's
output is its adapter (`adapter_config.json` naming the base folder it applies to), plus,
with `merge: true`, the base with the adapter merged in. Whoever loads a checkpoint gets one
plain model either way: an adapter is applied to its base and merged on load.

A model always loads fitted to the pipeline's tokenizer: where the tokenizer stage added tokens
a user's checkpoint lacks (a template's turn markers, a pad), the embeddings grow, each new row
the mean of the trained ones, and the model's pad id is the tokenizer's. LoRA trains those rows
too (PEFT's trainable tokens), so an adapter carries what its base never had: it loads on its
base resized to the tokenizer (`resize_token_embeddings(len(tokenizer))`), then the adapter.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel, Trainer
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.pytorch_utils import Conv1D

from schemas.spec import LoraSpec
from stages.common.contract import ModelError, adapter_base, is_adapter, point_adapter_at
from stages.common.training import main_process


def fit_vocabulary(model: PreTrainedModel, tokenizer) -> None:
    """Grow the embeddings to the tokenizer's length, each new row the mean of the old ones.

    The model's pad id becomes the tokenizer's (a sequence classifier finds each row's last token by it)."""
    rows = model.get_input_embeddings().num_embeddings
    added = len(tokenizer) - rows
    if added > 0:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
                if layer is not None:
                    layer.weight[rows:] = layer.weight[:rows].mean(dim=0)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:  # a sequence classifier has none
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_model(
    folder: Path, tokenizer, auto_class=AutoModelForCausalLM, dtype: torch.dtype = torch.float32, **config
) -> PreTrainedModel:
    """A checkpoint as one plain model fitted to `tokenizer`: an adapter is applied to its base (itself loaded the
    same way) and merged."""
    if not is_adapter(folder):
        model = auto_class.from_pretrained(folder, dtype=dtype, **config)
        fit_vocabulary(model, tokenizer)
        return model
    base_folder = adapter_base(folder)
    if not base_folder.is_dir():
        raise ModelError(
            f"the adapter in {folder} applies to the base model {base_folder}, which is not there: "
            f"put that checkpoint back (or a copy of it) at that path"
        )
    base = load_model(base_folder, tokenizer, auto_class, dtype, **config)
    # PEFT loads an adapter for inference, freezing every weight; a merged checkpoint trains like any other
    return PeftModel.from_pretrained(base, folder).merge_and_unload().requires_grad_(True)


def _module_name(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None) if module is not None else None


def lora_targets(model: PreTrainedModel, lora: LoraSpec) -> tuple[list[str] | str, bool]:
    """PEFT's target_modules for the spec's targets, and whether they are Conv1D layers (GPT-2's, stored transposed).

    A named target that matches no module fails here, naming the layers the model has."""
    output = model.get_output_embeddings()
    layers = {
        name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not output
    }
    if lora.targets == "all-linear":
        targeted = list(layers.values())
    else:
        suffixes = {name.rsplit(".", 1)[-1] for name in layers}
        unknown = [t for t in lora.targets if not any(name == t or name.endswith(f".{t}") for name in layers)]
        if unknown:
            raise ModelError(
                f"lora.targets {unknown} match no layer of this {model.config.model_type} model; "
                f"its adaptable layers are {sorted(suffixes)} (or use targets: all-linear)"
            )
        targeted = [m for name, m in layers.items() if any(name == t or name.endswith(f".{t}") for t in lora.targets)]
    return (lora.targets if isinstance(lora.targets, str) else list(lora.targets)), any(
        isinstance(m, Conv1D) for m in targeted
    )


def quantized(lora: LoraSpec, bf16: bool) -> dict:
    """`from_pretrained`'s arguments that load a LoRA stage's frozen base quantized (`lora.quantize`): bitsandbytes'
    config (4-bit NF4 with double quantization, computing in bf16 when the stage trains in it; or 8-bit) and the one
    device to place it on. A clear error where bitsandbytes is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            f"lora.quantize: {lora.quantize} loads the base through bitsandbytes, which is not installed here "
            "(pip install bitsandbytes)"
        )
    if lora.quantize == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": {"": device}}


def with_lora(
    model: PreTrainedModel, lora: LoraSpec, new_tokens: list[int] = (), task_type: str = "CAUSAL_LM"
) -> PeftModel:
    """The model wrapped with fresh LoRA adapters; only they, the rows of `new_tokens` (tokens the pipeline added,
    in the input and, when untied, the output embeddings) and a sequence classifier's head train. A quantized base
    is readied for training first (its norms and embeddings in float32, gradients reaching the adapters' inputs)."""
    if getattr(model, "is_quantized", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets, conv1d = lora_targets(model, lora)
    trainable = None
    if new_tokens:
        embeddings = [model.get_input_embeddings()]
        if task_type == "CAUSAL_LM" and not model.config.get_text_config().tie_word_embeddings:
            embeddings.append(model.get_output_embeddings())
        trainable = {_module_name(model, layer).rsplit(".", 1)[-1]: list(new_tokens) for layer in embeddings}
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        task_type=task_type,
        target_modules=targets,
        fan_in_fan_out=conv1d,
        trainable_token_indices=trainable,
    )
    wrapped = get_peft_model(model, config)
    if new_tokens:
        # every save (the Trainer's in-stage checkpoints too) keeps the added rows as trainable tokens; PEFT would
        # otherwise copy both whole embedding matrices into each one, as it does for any resized vocabulary
        wrapped.save_pretrained = functools.partial(wrapped.save_pretrained, save_embedding_layers=False)
    return wrapped


@contextlib.contextmanager
def whole_weights(model) -> Iterator[None]:
    """Under ZeRO-3 every rank holds a shard of each weight: gather them whole on every rank for the length of the block
    (each rank must enter it); elsewhere the weights are whole already."""
    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


def save(
    trainer: Trainer, tokenizer, workdir: Path, lora: LoraSpec | None = None, base: Path | None = None
) -> tuple[Path, Path | None]:
    """The stage's output folders: (the checkpoint the next stage takes, the adapter logged beside it).

    Without lora: the model, and no adapter. With lora: the adapter, naming `base` (the stage's input
    checkpoint) as what it applies to, is the checkpoint, unless `merge` asks for the merged model
    as the checkpoint, and then the adapter is logged beside it. Every rank of a launched stage calls
    this; rank 0 alone writes. Under ZeRO-3 a full model is gathered into rank 0 one layer at a time
    by DeepSpeed (the consolidated state dict); an adapter, which needs its base to merge, gathers the model whole."""
    model = trainer.model
    checkpoint = workdir / ("adapter" if lora is not None and not lora.merge else "model")
    adapter = workdir / "adapter" if lora is not None and lora.merge else None

    def fresh(folder: Path) -> Path:
        shutil.rmtree(folder, ignore_errors=True)
        return folder

    # FSDP2's parameters are shards on every rank: gathered whole (every rank takes part) for rank 0 to write
    state = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if lora is None:
        if is_deepspeed_zero3_enabled():
            state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if main_process():
            model.save_pretrained(fresh(checkpoint), state_dict=state)
            tokenizer.save_pretrained(checkpoint)
        return checkpoint, None
    trained = adapter or checkpoint  # the adapter's folder
    with whole_weights(model):
        if main_process():
            model.save_pretrained(fresh(trained), state_dict=state)
            tokenizer.save_pretrained(trained)
            # PEFT records the folder the base weights loaded from, which for an input that was itself an adapter is its
            # base's base
            point_adapter_at(trained, base)
            if lora.merge:
                # a quantized base would be merged at its quantized precision, a sharded one is not whole here: the
                # adapter goes onto the full base as it was saved
                merged = (
                    PeftModel.from_pretrained(load_model(base, tokenizer), trained).merge_and_unload()
                    if (lora.quantize or trainer.is_fsdp_enabled) and base is not None
                    else model.merge_and_unload()
                )
                merged.save_pretrained(fresh(checkpoint))
                tokenizer.save_pretrained(checkpoint)
    return checkpoint, adapter
