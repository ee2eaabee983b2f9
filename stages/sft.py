"""The SFT stage: conversations through the chat template, loss on assistant replies only.

Every assistant turn of a multi-turn conversation is trained, its tool calls included; system
and user turns, tool results, tool definitions and the template's headers are context.
Conversations are best-fit packed into rows of max_len (position ids restart per conversation
and attention never crosses one; stages/common/packing.py), or padded per batch with `packing: false`.
On held-out conversations the stage measures the response loss and the exact-match rate of
greedy answers, before and after training, so each run shows what SFT changed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from datasets import Dataset, DatasetDict
from transformers import DataCollatorForSeq2Seq

from schemas.data import read_files
from schemas.spec import ConversationStage, SFTStage
from stages.common.contract import Prepared, StageInputs, StageResult
from stages.common.generation import exact_match
from stages.common.packing import PackedCollator, pack_examples
from stages.common.progress import short_of_a_batch
from stages.common.recipe import adapt, fit, load, make_trainer, save
from stages.common.templates import IGNORE, encode_conversation
from stages.common.tools import Chat, chats
from stages.common.training import attention

__all__ = ["examples", "prepare", "run"]  # the TrainingStage protocol (stages/__init__.py)


def encode(conversations: list[Chat], tokenizer, spec: ConversationStage) -> tuple[Dataset, dict[str, float]]:
    """Training rows for the conversations (packed or one per row) and what max_len cut or dropped."""
    encoded = [encode_conversation(c.messages, tokenizer, sys.maxsize, spec.template, c.tools) for c in conversations]
    input_ids, labels = [ids for ids, _ in encoded], [lab for _, lab in encoded]
    if spec.packing:
        packed = pack_examples(input_ids, labels, spec.max_len, spec.overlong)
        return packed.dataset, {"truncated": packed.truncated, "dropped": packed.dropped, "row_fill": packed.fill}
    keep = [i for i, ids in enumerate(input_ids) if len(ids) <= spec.max_len or spec.overlong == "truncate"]
    counts = {"truncated": sum(len(input_ids[i]) > spec.max_len for i in keep), "dropped": len(input_ids) - len(keep)}
    return Dataset.from_dict(
        {"input_ids": [input_ids[i][: spec.max_len] for i in keep], "labels": [labels[i][: spec.max_len] for i in keep]}
    ), counts


def examples(spec: ConversationStage, tokenizer, n: int) -> list[tuple[list[int], list[int]]]:
    """The first n training conversations as the stage encodes them: (input_ids, labels)."""
    first = chats(read_files(spec.data, "conversations", spec.on_invalid).frame.head(n))
    return [encode_conversation(c.messages, tokenizer, spec.max_len, spec.template, c.tools) for c in first]


def prepare(spec: ConversationStage, tokenizer) -> Prepared:
    splits, rejected, counts = {}, [], {}
    for split, files in (("train", spec.data), ("heldout", spec.heldout)):
        if files:
            read = read_files(files, "conversations", spec.on_invalid, spec.mix if split == "train" else None)
            counts |= {f"{split}_{name}": float(value) for name, value in read.counts.items()}
            read_chats = chats(read.frame)
            splits[split], split_counts = encode(read_chats, tokenizer, spec)
            counts |= {f"{split}_{name}": float(value) for name, value in split_counts.items()}
            rejected += read.rejected
            if split == "heldout":  # the conversations themselves, for exact match through generation
                splits["heldout_conversations"] = Dataset.from_dict(
                    {
                        "messages": [json.dumps(c.messages, ensure_ascii=False) for c in read_chats],
                        "tools": [json.dumps(c.tools, ensure_ascii=False) for c in read_chats],
                    }
                )
    prepared = Prepared(DatasetDict(splits), rejected, counts)
    short_of_a_batch(spec.name, prepared, spec.train.batch_size)
    return prepared


def held_out_chats(datasets: DatasetDict, n: int) -> list[Chat]:
    """The first n held-out conversations as `prepare` kept them."""
    kept = datasets["heldout_conversations"].select(range(min(n, len(datasets["heldout_conversations"]))))
    tools = kept["tools"] if "tools" in kept.column_names else [None] * len(kept)  # prepared before tools were kept
    return [Chat(json.loads(m), json.loads(t) if t else None) for m, t in zip(kept["messages"], tools)]


def collator(spec: ConversationStage, tokenizer):
    """Batches of packed rows (or of conversations padded to the longest)."""
    if spec.packing:
        # flash attention's varlen kernel takes the whole batch as one unpadded row: padding-free packing
        return PackedCollator(tokenizer.pad_token_id, flatten=attention(spec) == "flash_attention_2")
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)


def held_out_measure(trainer, spec: ConversationStage, asked: list[Chat], loss_name: str):
    """What a conversation stage measures before and after training: its objective on the held-out conversations
    (the Trainer's evaluate, as `loss_name`) and the exact match of greedy answers to the first eval_samples."""

    def measure() -> dict[str, float]:
        if trainer.eval_dataset is None:
            return {}
        found = {loss_name: trainer.evaluate()["eval_loss"]}
        if asked:
            found["exact_match"] = exact_match(trainer.model, trainer.processing_class, asked, spec.template)
        return found

    return measure


def run(spec: SFTStage, inputs: StageInputs, workdir: Path) -> StageResult:
    tokenizer, model = load(spec, inputs)
    model = adapt(spec, inputs, model)
    datasets = inputs.datasets
    asked = held_out_chats(datasets, spec.eval_samples) if "heldout" in datasets else []
    trainer = make_trainer(spec, model, tokenizer, workdir, datasets, collator(spec, tokenizer), inputs.callbacks)

    metrics, resumed_from = fit(trainer, held_out_measure(trainer, spec, asked, "heldout_loss"))
    return save(spec, inputs, trainer, workdir, metrics, resumed_from)
