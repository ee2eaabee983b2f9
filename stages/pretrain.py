"""The pretrain stage: next-token prediction on raw text.

Documents are joined with EOS between them and cut into blocks of `block_size` tokens
(the tail shorter than a block is dropped and counted). The model is built fresh from
`model.init` (any architecture transformers has a causal LM for), or is the upstream
checkpoint when pretraining continues.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, PreTrainedModel, set_seed

from schemas.architectures import init_config
from schemas.data import read_files
from schemas.spec import ModelInit, PretrainStage
from stages.common.checkpoint import load_model, save, with_lora
from stages.common.contract import Prepared, StageInputs, StageResult, added_token_ids
from stages.common.packing import concat_chunk, tokenize_documents
from stages.common.progress import short_of_a_batch
from stages.common.streaming import StreamingTextDataset
from stages.common.training import chosen, fit, make_trainer

__all__ = ["examples", "prepare", "run"]  # the TrainingStage protocol (stages/__init__.py)


def pack(texts: list[str], tokenizer, block_size: int) -> tuple[Dataset, int]:
    """Documents joined with EOS after each, cut into full blocks; also the tail tokens that filled no block."""
    blocks = concat_chunk(tokenize_documents(texts, tokenizer), tokenizer.eos_token_id, block_size)
    return blocks.to_dataset(), blocks.dropped_tokens


def examples(spec: PretrainStage, tokenizer, n: int) -> list[tuple[list[int], list[int]]]:
    """The first n documents as the stage sees them, EOS included; every token is trained."""
    texts = read_files(spec.data, "text", spec.on_invalid).frame["text"].head(n).to_list()
    documents = [ids + [tokenizer.eos_token_id] for ids in tokenize_documents(texts, tokenizer)]
    return [(ids, ids) for ids in documents]


def prepare(spec: PretrainStage, tokenizer) -> Prepared:
    """Packed blocks of the training and held-out text; a streamed training corpus is read during training instead."""
    splits, rejected, counts = {}, [], {}
    for split, files in (("train", [] if spec.streaming else spec.data), ("heldout", spec.heldout)):
        if files:
            read = read_files(files, "text", spec.on_invalid, spec.mix if split == "train" else None)
            counts |= {f"{split}_{name}": float(value) for name, value in read.counts.items()}
            splits[split], counts[f"{split}_tail_tokens_dropped"] = pack(
                read.frame["text"].to_list(), tokenizer, spec.packing.block_size
            )
            rejected += read.rejected
    prepared = Prepared(DatasetDict(splits), rejected, counts)
    short_of_a_batch(spec.name, prepared, spec.train.batch_size)
    return prepared


def build_model(init: ModelInit, tokenizer) -> PreTrainedModel:
    config = init_config(
        init,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


def run(spec: PretrainStage, inputs: StageInputs, workdir: Path) -> StageResult:
    tokenizer = AutoTokenizer.from_pretrained(inputs.tokenizer)
    set_seed(spec.train.seed)
    if isinstance(inputs.model, ModelInit):
        model = build_model(inputs.model, tokenizer)
    else:
        model = load_model(inputs.model, tokenizer)
    if spec.lora is not None:
        model = with_lora(model, spec.lora, added_token_ids(inputs.tokenizer))
    datasets = dict(inputs.datasets)
    if spec.streaming:
        # world_size 1: under the Trainer, accelerate has rank 0 read the stream and dispatch batches to every rank
        datasets["train"] = StreamingTextDataset(
            spec.data,
            tokenizer,
            spec.packing.block_size,
            shuffle_buffer=spec.shuffle_buffer,
            seed=spec.train.seed,
            on_invalid=spec.on_invalid,
            rank=0,
            world_size=1,
        )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = make_trainer(spec, model, tokenizer, workdir, datasets, collator, inputs.callbacks)
    metrics, resumed_from = fit(trainer)
    if "heldout" in inputs.datasets:
        metrics["heldout_loss"] = trainer.evaluate()["eval_loss"]
    metrics["parameters"] = float(model.num_parameters())
    if spec.streaming:
        metrics["stream_rows_skipped"] = float(datasets["train"].skipped)
    else:
        metrics["train_blocks"] = float(len(datasets["train"]))
    checkpoint, adapter = save(trainer, tokenizer, workdir, spec.lora, inputs.model)
    return StageResult(
        checkpoint=checkpoint, adapter=adapter, metrics=metrics, resumed_from_step=resumed_from, tags=chosen(trainer)
    )
