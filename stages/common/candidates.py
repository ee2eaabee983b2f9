"""Prompts with several scored replies: the shared plumbing of the preference and ranking stages.

A preference pair is a ranked list of two (chosen scores 1, rejected 0), so DPO, the reward
model, PRO and Tuna read one layout: per row, `input_ids` and `labels` for each candidate
(prompt through the template, loss on the reply only) best first, and their `scores`. A batch
is every candidate of every row in one right-padded forward; `candidate_logps` gives back the
summed log-prob of each reply and its token count, shaped [rows, candidates]. KTO reads it too:
its row is a labelled completion and, as a second candidate, a completion of another prompt
(stages/kto.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from datasets import Dataset, DatasetDict
from torch import Tensor
from transformers import PreTrainedModel

from schemas.data import read_files
from schemas.spec import ChatStage
from stages.common.contract import Prepared, StageInputs
from stages.common.losses import sequence_logps
from stages.common.metrics import mean_scores, preference, ranking
from stages.common.progress import short_of_a_batch
from stages.common.templates import IGNORE, conversations, encode_completion
from stages.common.training import StageTrainer, make_trainer

# per row: prompt messages, candidates best first, their scores
Listed = list[tuple[list[dict], list[str], list[float]]]


def rows(frame: pl.DataFrame) -> Listed:
    """(prompt messages, candidates best first, their scores) of preference or ranked rows in canonical form."""
    prompts = conversations(frame, "prompt_")
    if "chosen" in frame.columns:
        return [
            (p, [c, r], [1.0, 0.0]) for p, c, r in zip(prompts, frame["chosen"].to_list(), frame["rejected"].to_list())
        ]
    return list(zip(prompts, frame["completions"].to_list(), frame["scores"].to_list()))


def encode(listed: Listed, tokenizer, max_len: int, template: str) -> tuple[Dataset, dict[str, int]]:
    """One row per prompt with its candidates encoded, cut to max_len; also what the cut did.

    A candidate cut to max_len keeps its prompt and the start of its reply (counted as `truncated`). A row
    in which the cut leaves some candidate no reply token at all is dropped (counted as `dropped`): that
    candidate would score a log-prob of 0, the best there is, whatever its text."""
    columns: dict[str, list] = {"input_ids": [], "labels": [], "scores": []}
    truncated = dropped = 0
    for prompt, completions, scores in listed:
        encoded = [encode_completion(prompt, completion, tokenizer, 1 << 30, template) for completion in completions]
        cut = [(ids[:max_len], labels[:max_len]) for ids, labels in encoded]
        if any(all(label == IGNORE for label in labels) for _, labels in cut):
            dropped += 1
            continue
        truncated += sum(len(ids) > max_len for ids, _ in encoded)
        columns["input_ids"].append([ids for ids, _ in cut])
        columns["labels"].append([labels for _, labels in cut])
        columns["scores"].append(scores)
    return Dataset.from_dict(columns), {"truncated": truncated, "dropped": dropped}


def prepare(
    spec: ChatStage, tokenizer, listing: Callable[[pl.DataFrame, str], Listed] = lambda frame, split: rows(frame)
) -> Prepared:
    """Each split's rows encoded; `listing` lists a split's canonical rows as the stage scores them (default:
    `rows`)."""
    splits, rejected, counts = {}, [], {}
    for split, files in (("train", spec.data), ("heldout", spec.heldout)):
        if files:
            read = read_files(files, spec.data_format, spec.on_invalid, spec.mix if split == "train" else None)
            counts |= {f"{split}_{name}": float(value) for name, value in read.counts.items()}
            splits[split], cut = encode(listing(read.frame, split), tokenizer, spec.max_len, spec.template)
            counts |= {f"{split}_{name}": float(value) for name, value in cut.items()}
            rejected += read.rejected
    prepared = Prepared(DatasetDict(splits), rejected, counts)
    short_of_a_batch(spec.name, prepared, spec.train.batch_size)
    return prepared


def examples(spec: ChatStage, tokenizer, n: int) -> list[tuple[list[int], list[int]]]:
    """Every candidate of the first n rows as the stage encodes it: (input_ids, labels), best first."""
    listed = rows(read_files(spec.data, spec.data_format, spec.on_invalid).frame.head(n))
    dataset, _ = encode(listed, tokenizer, spec.max_len, spec.template)
    return [pair for row in dataset for pair in zip(row["input_ids"], row["labels"])]


def with_length(datasets: Mapping, n: int | None) -> tuple[dict, dict[str, float]]:
    """The datasets with every training row cut to its n best candidates (rows with fewer left out); n defaults to the
    longest list. Also the list length and the rows left out, as the stage records them."""
    dataset = datasets["train"]
    lengths = [len(ids) for ids in dataset["input_ids"]]
    n = n or max(lengths)
    keep = [i for i, length in enumerate(lengths) if length >= n]
    kept = dataset.select(keep).map(lambda row: {key: row[key][:n] for key in ("input_ids", "labels", "scores")})
    lists = {"list_length": float(n), "short_lists_left_out": float(len(lengths) - len(keep))}
    return dict(datasets) | {"train": kept}, lists


@dataclass(frozen=True)
class CandidatesCollator:
    """Every candidate of every row as one right-padded batch, row by row, best first; scores as [rows, candidates]."""

    pad_id: int

    def __call__(self, features: list[dict]) -> dict[str, Tensor]:
        sequences = [ids for f in features for ids in f["input_ids"]]
        labels = [lab for f in features for lab in f["labels"]]
        width = max(map(len, sequences))
        batch = {
            "input_ids": torch.tensor([ids + [self.pad_id] * (width - len(ids)) for ids in sequences]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in sequences]),
            "labels": torch.tensor([lab + [IGNORE] * (width - len(lab)) for lab in labels]),
            "scores": torch.tensor([f["scores"] for f in features], dtype=torch.float32),
        }
        if "reference_logps" in features[0]:
            batch["reference_logps"] = torch.tensor([f["reference_logps"] for f in features], dtype=torch.float32)
        return batch


def nth_candidate(batch: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    """The k-th candidate of every row alone, as the collator would batch it: scores [rows, 1], padding cut to the
    longest."""
    rows_, candidates = batch["scores"].shape
    picked = {key: batch[key].view(rows_, candidates, -1)[:, k] for key in ("input_ids", "attention_mask", "labels")}
    width = int(picked["attention_mask"].sum(1).max())
    return {key: value[:, :width] for key, value in picked.items()} | {"scores": batch["scores"][:, k : k + 1]}


def candidate_logps(model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed log-prob of each candidate's reply and its token count, both [rows, candidates]."""
    rows_, candidates = batch["scores"].shape
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    sums, counts = sequence_logps(logits, batch["labels"])
    return sums.view(rows_, candidates), counts.view(rows_, candidates)


@torch.no_grad()
def scored(
    model, dataset: Dataset, pad_id: int, batch_size: int = 32, autocast: bool = False, length_normalised: bool = True
) -> list[list[float]]:
    """Each row's candidates scored by the model without gradients: length-normalised log-probs (else summed); lists
    may differ in length."""
    collate = CandidatesCollator(pad_id)
    singles = [
        {"input_ids": [ids], "labels": [labels], "scores": [0.0]}
        for row_ids, row_labels in zip(dataset["input_ids"], dataset["labels"])
        for ids, labels in zip(row_ids, row_labels)
    ]
    was_training = model.training
    model.eval()
    flat: list[float] = []
    for start in range(0, len(singles), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(singles[start : start + batch_size]).items()}
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=autocast):
            sums, counts = candidate_logps(model, batch)
        flat += (mean_scores(sums.float(), counts) if length_normalised else sums.float()).view(-1).tolist()
    model.train(was_training)
    out, at = [], 0
    for row_ids in dataset["input_ids"]:
        out.append(flat[at : at + len(row_ids)])
        at += len(row_ids)
    return out


def heldout_metrics(model, dataset: Dataset, pad_id: int, autocast: bool = False) -> dict[str, float]:
    """Pairs: preference accuracy and margin. Longer lists: ranking agreement (Kendall tau, top-1) as well."""
    model_scores, reference = scored(model, dataset, pad_id, autocast=autocast), dataset["scores"]
    best_vs_worst = [
        (m[max(range(len(r)), key=r.__getitem__)], m[min(range(len(r)), key=r.__getitem__)])
        for m, r in zip(model_scores, reference)
    ]
    pairs = torch.tensor(best_vs_worst)
    found = {f"preference_{k}": v for k, v in preference(pairs[:, 0], pairs[:, 1]).items()}
    if any(len(r) > 2 for r in reference):
        found |= ranking(model_scores, reference)
    return found


def candidates_trainer(
    spec: ChatStage,
    inputs: StageInputs,
    model: PreTrainedModel,
    tokenizer,
    workdir: Path,
    datasets: Mapping,
    trainer_class: type[StageTrainer],
    **extra,
) -> StageTrainer:
    """A candidate stage's Trainer: every candidate of a row in one batch (CandidatesCollator)."""
    collator = CandidatesCollator(tokenizer.pad_token_id)
    return make_trainer(
        spec, model, tokenizer, workdir, datasets, collator, inputs.callbacks, trainer_class, spec=spec, **extra
    )


def on_heldout(datasets: Mapping, measure: Callable[[Dataset], dict[str, float]]) -> Callable[[], dict[str, float]]:
    """`fit`'s measure: `measure` of the held-out rows, its figures named heldout_*; nothing without held-out rows."""
    if "heldout" not in datasets:
        return dict
    return lambda: {f"heldout_{name}": value for name, value in measure(datasets["heldout"]).items()}


def preference_measure(model, tokenizer, datasets: Mapping) -> Callable[[], dict[str, float]]:
    """`fit`'s measure for a stage that scores candidates by log-prob: held-out preference and ranking agreement."""
    return on_heldout(datasets, lambda rows: heldout_metrics(model, rows, tokenizer.pad_token_id))
