"""The pretrain stage: next-token prediction on raw text.

Documents are joined with EOS between them and cut into blocks of `block_size` tokens
(the tail shorter than a block is dropped and counted). The model is a fresh Llama built
from `model.init`, or the upstream checkpoint when pretraining continues.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, DataCollatorForLanguageModeling, LlamaConfig, LlamaForCausalLM, set_seed

from schemas.data import read_files
from schemas.spec import LlamaInit, PretrainStage
from stages.checkpoint import load_model, save, with_lora
from stages.contract import Prepared, StageInputs, StageResult, added_token_ids
from stages.packing import concat_chunk, tokenize_documents
from stages.streaming import StreamingTextDataset
from stages.training import fit, make_trainer, training_arguments


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
            read = read_files(files, "text", spec.on_invalid)
            splits[split], counts[f"{split}_tail_tokens_dropped"] = pack(read.frame["text"].to_list(), tokenizer, spec.packing.block_size)
            rejected += read.rejected
    return Prepared(DatasetDict(splits), rejected, counts)


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
        model = load_model(inputs.model, tokenizer)
    if spec.lora is not None:
        model = with_lora(model, spec.lora, added_token_ids(inputs.tokenizer))
    datasets = dict(inputs.datasets)
    if spec.streaming:
        # world_size 1: under the Trainer, accelerate has rank 0 read the stream and dispatch batches to every rank
        datasets["train"] = StreamingTextDataset(spec.data, tokenizer, spec.packing.block_size, shuffle_buffer=spec.shuffle_buffer,
                                                 seed=spec.train.seed, on_invalid=spec.on_invalid, rank=0, world_size=1)
    args = training_arguments(spec.train, workdir / "trainer", spec.name)
    trainer = make_trainer(model, tokenizer, args, datasets, DataCollatorForLanguageModeling(tokenizer, mlm=False), inputs.callbacks)
    metrics, resumed_from = fit(trainer)
    if "heldout" in inputs.datasets:
        metrics["heldout_loss"] = trainer.evaluate()["eval_loss"]
    metrics["parameters"] = float(model.num_parameters())
    if spec.streaming:
        metrics["stream_rows_skipped"] = float(datasets["train"].skipped)
    else:
        metrics["train_blocks"] = float(len(datasets["train"]))
    checkpoint, adapter = save(model, tokenizer, workdir, spec.lora, inputs.model)
    return StageResult(checkpoint=checkpoint, adapter=adapter, metrics=metrics, resumed_from_step=resumed_from)
