"""The pretrain stage: next-token prediction on raw text.

Documents are joined with EOS between them and cut into blocks of `block_size` tokens
(the tail shorter than a block is dropped and counted). The model is built fresh from
`model.init` (any architecture transformers has a causal LM for), or is the input
checkpoint when pretraining continues.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict
from transformers import DataCollatorForLanguageModeling

from schemas.data import read_files
from schemas.spec import PretrainStage
from stages.common.contract import Prepared, StageInputs, StageResult
from stages.common.packing import concat_chunk, tokenize_documents
from stages.common.progress import short_of_a_batch
from stages.common.recipe import adapt, fit, load, make_trainer, save
from stages.common.streaming import StreamingTextDataset

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


def run(spec: PretrainStage, inputs: StageInputs, workdir: Path) -> StageResult:
    tokenizer, model = load(spec, inputs)
    model = adapt(spec, inputs, model)
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
    counts = {"parameters": float(model.num_parameters())}
    if spec.streaming:
        counts["stream_rows_skipped"] = float(datasets["train"].skipped)
    return save(spec, inputs, trainer, workdir, metrics, resumed_from, counts=counts)
