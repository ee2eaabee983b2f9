"""The pretrain stage: next-token prediction on raw text.

Documents are joined with EOS between them and cut into blocks of `block_size` tokens
(the tail shorter than a block is dropped and counted). The model is a fresh Llama built
from `model.init`, or the upstream checkpoint when pretraining continues.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, LlamaConfig, LlamaForCausalLM, set_seed

from schemas.data import validate_file
from schemas.spec import LlamaInit, PretrainStage
from stages.contract import StageInputs, StageResult
from stages.training import fit, make_trainer, save, training_arguments


def read_texts(files: list[Path]) -> list[str]:
    return pl.concat([validate_file(f, "text") for f in files])["text"].to_list()


def pack(texts: list[str], tokenizer, block_size: int) -> Dataset:
    """Concatenate documents with EOS after each and cut into full blocks."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += ids
        stream.append(eos)
    usable = len(stream) // block_size * block_size
    blocks = [stream[i:i + block_size] for i in range(0, usable, block_size)]
    return Dataset.from_dict({"input_ids": blocks})


def prepare(spec: PretrainStage, tokenizer) -> DatasetDict:
    splits = {"train": pack(read_texts(spec.data), tokenizer, spec.packing.block_size)}
    if spec.heldout:
        splits["heldout"] = pack(read_texts(spec.heldout), tokenizer, spec.packing.block_size)
    return DatasetDict(splits)


def build_model(init: LlamaInit, tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=init.hidden_size,
        intermediate_size=init.intermediate_size or -(-init.hidden_size * 8 // 3 // 64) * 64,
        num_hidden_layers=init.layers,
        num_attention_heads=init.heads,
        num_key_value_heads=init.kv_heads or init.heads,
        max_position_embeddings=init.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": init.rope_theta},
        tie_word_embeddings=init.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def run(spec: PretrainStage, inputs: StageInputs, workdir: Path) -> StageResult:
    tokenizer = AutoTokenizer.from_pretrained(inputs.tokenizer)
    set_seed(spec.train.seed)
    if isinstance(inputs.model, LlamaInit):
        model = build_model(inputs.model, tokenizer)
    else:
        model = AutoModelForCausalLM.from_pretrained(inputs.model, dtype=torch.float32)
    args = training_arguments(spec.train, workdir / "trainer")
    trainer = make_trainer(model, args, inputs.datasets, DataCollatorForLanguageModeling(tokenizer, mlm=False), inputs.callbacks)
    metrics, resumed_from = fit(trainer)
    if "heldout" in inputs.datasets:
        metrics["heldout_loss"] = trainer.evaluate()["eval_loss"]
    metrics["parameters"] = float(model.num_parameters())
    metrics["train_blocks"] = float(len(inputs.datasets["train"]))
    return StageResult(checkpoint=save(model, tokenizer, workdir / "model"), metrics=metrics, resumed_from_step=resumed_from)
