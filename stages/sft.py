"""The SFT stage: conversations through the chat template, loss on assistant replies only.

Every assistant turn of a multi-turn conversation is trained; system and user turns and
the template's headers are context. On held-out conversations the stage measures the
response loss and the exact-match rate of greedy answers, before and after training, so
each run shows what SFT changed.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, set_seed

from schemas.data import validate_file
from schemas.spec import SFTStage
from stages.contract import StageInputs, StageResult
from stages.generation import exact_match
from stages.templates import IGNORE, encode_conversation
from stages.training import fit, make_trainer, save, training_arguments


def read_conversations(files: list[Path]) -> list[list[dict]]:
    frame = pl.concat([validate_file(f, "conversations") for f in files])
    return [[{"role": r, "content": c} for r, c in zip(roles, contents)]
            for roles, contents in zip(frame["roles"].to_list(), frame["contents"].to_list())]


def encode(conversations: list[list[dict]], tokenizer, max_len: int) -> Dataset:
    columns: dict[str, list] = {"input_ids": [], "labels": [], "messages": []}
    for messages in conversations:
        input_ids, labels = encode_conversation(messages, tokenizer, max_len)
        columns["input_ids"].append(input_ids)
        columns["labels"].append(labels)
        columns["messages"].append(json.dumps(messages, ensure_ascii=False))
    return Dataset.from_dict(columns)


def prepare(spec: SFTStage, tokenizer) -> DatasetDict:
    splits = {"train": encode(read_conversations(spec.data), tokenizer, spec.max_len)}
    if spec.heldout:
        splits["heldout"] = encode(read_conversations(spec.heldout), tokenizer, spec.max_len)
    return DatasetDict(splits)


def run(spec: SFTStage, inputs: StageInputs, workdir: Path) -> StageResult:
    tokenizer = AutoTokenizer.from_pretrained(inputs.tokenizer)
    set_seed(spec.train.seed)
    model = AutoModelForCausalLM.from_pretrained(inputs.model, dtype=torch.float32)
    datasets = inputs.datasets
    heldout = [json.loads(m) for m in datasets["heldout"]["messages"][: spec.eval_samples]] if "heldout" in datasets else []
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
    trainer = make_trainer(model, training_arguments(spec.train, workdir / "trainer"),
                           datasets.remove_columns("messages"), collator, inputs.callbacks)
    before: dict[str, float] = {}
    if heldout:
        before = {"heldout_loss_before": trainer.evaluate()["eval_loss"], "exact_match_before": exact_match(model, tokenizer, heldout)}
    metrics, resumed_from = fit(trainer)
    if heldout:
        metrics |= before | {"heldout_loss": trainer.evaluate()["eval_loss"], "exact_match": exact_match(model, tokenizer, heldout)}
    metrics["train_conversations"] = float(len(datasets["train"]))
    return StageResult(checkpoint=save(model, tokenizer, workdir / "model"), metrics=metrics, resumed_from_step=resumed_from)
