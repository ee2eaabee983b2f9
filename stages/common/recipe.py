"""The steps every training kind's `run` reads as: load → adapt → fit → save.

    tokenizer, model = load(spec, inputs)
    model = adapt(spec, inputs, model)
    trainer = make_trainer(spec, model, tokenizer, workdir, datasets, collator, inputs.callbacks, KindTrainer)
    metrics, resumed_from = fit(trainer, measure)
    return save(spec, inputs, trainer, workdir, metrics, resumed_from)

A kind adds what is its own between them (DPO its reference, GRPO its rewards, PRO its list length);
the steps themselves are written here once.
"""

from __future__ import annotations

from collections.abc import Sized
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, set_seed

from schemas.architectures import init_config
from schemas.spec import ChatStage, ModelInit, TrainingStage
from stages.common import checkpoint
from stages.common.contract import StageInputs, StageResult, added_token_ids
from stages.common.templates import store_template
from stages.common.training import chosen, fit, make_trainer, use_bf16

__all__ = ["adapt", "build_model", "fit", "load", "make_trainer", "save"]


def build_model(init: ModelInit, tokenizer) -> PreTrainedModel:
    """Fresh weights of the architecture `init` describes, sized to the tokenizer."""
    config = init_config(
        init,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


def load(
    spec: TrainingStage, inputs: StageInputs, auto_class=AutoModelForCausalLM, **config
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The pipeline's tokenizer and the stage's input model, seeded: the input checkpoint loaded as `auto_class`
    (fitted to the tokenizer), or fresh weights where the input is the spec's `model.init`."""
    tokenizer = AutoTokenizer.from_pretrained(inputs.tokenizer)
    set_seed(spec.train.seed)
    if isinstance(inputs.model, ModelInit):
        return tokenizer, build_model(inputs.model, tokenizer)
    if spec.lora is not None and spec.lora.quantize is not None:
        config |= checkpoint.quantized(spec.lora, use_bf16(spec.train.precision))
    return tokenizer, checkpoint.load_model(inputs.model, tokenizer, auto_class, **config)


def adapt(spec: TrainingStage, inputs: StageInputs, model: PreTrainedModel, task_type: str = "CAUSAL_LM"):
    """The model with fresh LoRA adapters when the stage has `lora`, else the model itself (every weight trains)."""
    if spec.lora is None:
        return model
    return checkpoint.with_lora(model, spec.lora, added_token_ids(inputs.tokenizer), task_type)


def save(
    spec: TrainingStage,
    inputs: StageInputs,
    trainer,
    workdir: Path,
    metrics: dict[str, float],
    resumed_from: int,
    tables: dict[str, dict[str, list]] | None = None,
    counts: dict[str, float] | None = None,
) -> StageResult:
    """The trained model written as the stage's output (a chat stage's tokenizer keeps the template it trained with,
    so inference renders prompts exactly as this stage did), and the stage's result: its measures, and what it
    counted (`counts` and, for every stage, its training rows and steps taken)."""
    tokenizer = trainer.processing_class
    if isinstance(spec, ChatStage):
        store_template(tokenizer, spec.template)
    base = inputs.model if isinstance(inputs.model, Path) else None
    folder, adapter = checkpoint.save(trainer, tokenizer, workdir, spec.lora, base)
    counted = {"global_step": float(trainer.state.global_step)}
    if isinstance(trainer.train_dataset, Sized):  # a streamed corpus has no length
        counted["train_rows"] = float(len(trainer.train_dataset))
    return StageResult(
        checkpoint=folder,
        adapter=adapter,
        metrics=metrics,
        resumed_from_step=resumed_from,
        tables=tables or {},
        tags=chosen(trainer),
        counts=counted | (counts or {}),
    )
