"""Packing: many documents per row, so a batch carries tokens instead of padding.

Pretrain text is concatenated with EOS after each document and cut into full blocks
(`concat_chunk`); a document may continue into the next block, as usual for pretraining.

SFT and preference examples are packed whole (`best_fit`, `pack_examples`) and must never
see each other. `PackedCollator` gives every document position ids that restart at 0 and
masks the label of its first token, and transformers turns restarting position ids into a
block-diagonal causal mask for each row (see the collator for why this, and not our own
4-D mask). Rows of max_len, each with its own mask, because without varlen flash attention
(CPU) attention over one flattened batch is quadratic in the whole batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset

from stages.common.templates import IGNORE

Overlong = Literal["truncate", "drop"]

TOKENIZE_BATCH = 8192  # documents per Rust call: enough to keep its threads busy, few enough to bound memory


def tokenize_documents(texts: Sequence[str], tokenizer) -> list[list[int]]:
    """Token ids of each text, without special tokens.

    Calls the Rust tokenizer directly: `tokenizer(texts)` also builds attention masks and a
    BatchEncoding we would throw away, and `encode_batch_fast` skips computing the character
    offsets nobody reads here.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (pure Python) tokenizer has no Rust backend to call
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    ids: list[list[int]] = []
    for start in range(0, len(texts), TOKENIZE_BATCH):
        batch = list(texts[start : start + TOKENIZE_BATCH])
        ids += [encoding.ids for encoding in backend.encode_batch_fast(batch, add_special_tokens=False)]
    return ids


@dataclass(frozen=True)
class Blocks:
    """Pretrain blocks: `input_ids` of shape (blocks, block_size), and the tail tokens that did not fill a block."""

    input_ids: np.ndarray
    dropped_tokens: int

    def to_dataset(self) -> Dataset:
        # A fixed-size Arrow list built from the flat buffer: no Python list per block, no per-token conversion.
        block_size = self.input_ids.shape[1]
        column = pa.FixedSizeListArray.from_arrays(pa.array(self.input_ids.reshape(-1)), block_size)
        return Dataset.from_dict({"input_ids": column})


def concat_chunk(token_lists: Iterable[Sequence[int]], eos_id: int, block_size: int) -> Blocks:
    """Documents joined with EOS after each, cut into full blocks of `block_size`; the shorter tail is dropped and
    counted."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    documents = token_lists if isinstance(token_lists, Sequence) else list(token_lists)
    lengths = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))
    tokens = np.fromiter(chain.from_iterable(documents), dtype=np.int32, count=int(lengths.sum()))
    stream = np.insert(tokens, np.cumsum(lengths), eos_id)  # EOS after every document, the last one included
    usable = len(stream) // block_size * block_size
    return Blocks(input_ids=stream[:usable].reshape(-1, block_size), dropped_tokens=len(stream) - usable)


@dataclass(frozen=True)
class RowPlan:
    """Which examples go in which row, in row order; over-long examples counted by what happened to them."""

    rows: list[list[int]]
    truncated: int  # longer than max_len, kept as their first max_len tokens (each fills a row alone)
    dropped: int  # longer than max_len, left out

    def fill(self, lengths: Sequence[int], max_len: int) -> float:
        """Packed tokens over the row capacity: 1.0 means no padding at all."""
        used = sum(min(lengths[i], max_len) for row in self.rows for i in row)
        return used / (len(self.rows) * max_len) if self.rows else 1.0


class _OpenRows:
    """Rows with room left, found by remaining capacity in O(log max_len).

    A Fenwick tree counts open rows per remaining capacity (1..max_len); the best fit for
    `length` is the smallest capacity >= length that has a row.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.tree = [0] * (max_len + 1)
        self.by_capacity: list[list[int]] = [[] for _ in range(max_len + 1)]
        self.count = 0
        self.top_bit = 1 << max_len.bit_length()

    def _add(self, capacity: int, delta: int) -> None:
        self.count += delta
        while capacity <= self.max_len:
            self.tree[capacity] += delta
            capacity += capacity & -capacity

    def _open_below(self, capacity: int) -> int:
        total = 0
        while capacity > 0:
            total += self.tree[capacity]
            capacity -= capacity & -capacity
        return total

    def put(self, row: int, capacity: int) -> None:
        if capacity > 0:
            self.by_capacity[capacity].append(row)
            self._add(capacity, 1)

    def take_best(self, length: int) -> tuple[int, int] | None:
        """The open row whose remaining capacity fits `length` most tightly, as (row, capacity); None if none fits."""
        rank = self._open_below(length - 1) + 1  # the first open row at capacity >= length, counted from the smallest
        if rank > self.count:
            return None
        capacity, seen, step = 0, 0, self.top_bit
        while step:  # descend the tree to the smallest capacity whose prefix count reaches `rank`
            if capacity + step <= self.max_len and seen + self.tree[capacity + step] < rank:
                capacity += step
                seen += self.tree[capacity]
            step >>= 1
        capacity += 1
        self._add(capacity, -1)
        return self.by_capacity[capacity].pop(), capacity


def best_fit(lengths: Sequence[int], max_len: int, overlong: Overlong = "truncate") -> RowPlan:
    """Best-fit-decreasing packing of whole examples (their indices) into rows of at most max_len tokens.

    Longest first (equal lengths in index order), each into the open row it fills most
    tightly; the same lengths always give the same rows. An example longer than max_len is truncated to fill a row
    alone, or dropped.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    if any(length < 1 for length in lengths):
        raise ValueError("every example needs at least one token")
    over = [i for i, length in enumerate(lengths) if length > max_len]
    skipped = set(over) if overlong == "drop" else set()
    order = sorted((i for i in range(len(lengths)) if i not in skipped), key=lambda i: (-min(lengths[i], max_len), i))
    rows: list[list[int]] = []
    open_rows = _OpenRows(max_len)
    for i in order:
        length = min(lengths[i], max_len)
        fit = open_rows.take_best(length)
        if fit is None:
            rows.append([])
            row, capacity = len(rows) - 1, max_len
        else:
            row, capacity = fit
        rows[row].append(i)
        open_rows.put(row, capacity - length)
    return RowPlan(rows=rows, truncated=len(over) - len(skipped), dropped=len(skipped))


@dataclass(frozen=True)
class PackedExamples:
    """Packed rows (columns input_ids, labels, position_ids) and what packing did to the examples."""

    dataset: Dataset
    examples: int
    truncated: int
    dropped: int
    fill: float  # packed tokens over row capacity


def pack_examples(
    input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], max_len: int, overlong: Overlong = "truncate"
) -> PackedExamples:
    """Whole examples best-fit into rows of at most max_len tokens, with position ids restarting at 0 per example.

    The columns are all arguments of the model's forward, so the Trainer's unused-column
    pruning keeps them, and the collator finds document boundaries where position ids are 0.
    """
    lengths = [len(ids) for ids in input_ids]
    if len(labels) != len(lengths) or any(len(example) != length for example, length in zip(labels, lengths)):
        raise ValueError("every example needs as many labels as input_ids")
    plan = best_fit(lengths, max_len, overlong)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    flat_ids = np.fromiter(chain.from_iterable(input_ids), dtype=np.int64, count=int(starts[-1]))
    flat_labels = np.fromiter(chain.from_iterable(labels), dtype=np.int64, count=int(starts[-1]))

    order = np.fromiter(chain.from_iterable(plan.rows), dtype=np.int64)
    kept = np.minimum(np.asarray(lengths, dtype=np.int64)[order], max_len)
    # gather index of every packed token: each example's first `kept` tokens, examples in row order
    out_starts = np.concatenate([[0], np.cumsum(kept)])
    position_ids = np.arange(out_starts[-1]) - np.repeat(out_starts[:-1], kept)
    gather = np.repeat(starts[order], kept) + position_ids
    row_bounds = np.cumsum([0] + [len(row) for row in plan.rows])  # in examples
    # in tokens: Arrow's standard list, as datasets builds it
    row_offsets = pa.array(out_starts[row_bounds], pa.int32())

    def column(values: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(row_offsets, pa.array(values, pa.int32()))

    dataset = Dataset.from_dict(
        {
            "input_ids": column(flat_ids[gather]),
            "labels": column(flat_labels[gather]),
            "position_ids": column(position_ids),
        }
    )
    return PackedExamples(
        dataset=dataset,
        examples=len(order),
        truncated=plan.truncated,
        dropped=plan.dropped,
        fill=plan.fill(lengths, max_len),
    )


@dataclass(frozen=True)
class PackedCollator:
    """Batches packed rows into input_ids, labels and position_ids, each row padded to the longest.

    How attention stays inside each document. transformers 5 (masking_utils.create_causal_mask)
    accepts either a ready 4-D mask, passed through untouched, or, when there is no
    attention_mask, position ids from which it detects packed sequences (wherever they do not
    step by 1) and builds the block-diagonal causal mask itself, for each row. We send position
    ids and no attention_mask, because:
      * on CPU it is the same boolean mask into the same SDPA kernel, built once per forward
        inside the model from a (batch, length) tensor, instead of shipping a (batch, 1, length,
        length) tensor through the data loader (measured: equal step times within noise);
      * it is right for every attention implementation that builds its mask there: eager gets
        an additive float mask (our boolean 4-D mask would be added to the scores as 0/1, no
        masking at all; the tests run eager too), flex a BlockMask;
      * with an attention_mask in the batch the Trainer counts non-padding tokens by summing it:
        a 4-D mask would count length² per row.
    The detection is skipped when the model builds a KV cache (`use_cache`, True in most model
    configs; the Trainer turns it off, a plain forward call does not): every document would then
    silently attend to the ones before it. So the batch carries `use_cache=False` itself.

    Padding at the row end gets position ids 0, 1, ... as well: it becomes one more document that
    attends only to itself, so no query is fully masked (which gives NaN in SDPA) and no real
    token attends to padding.

    Labels: the loss shifts them (logits at t predict labels[t + 1]), so the label of a document's
    first token would be predicted from the end of the previous document; it is masked wherever
    position_ids is 0.

    `flatten=True` concatenates the whole batch into one unpadded row instead: the layout
    flash-attention's varlen kernel needs (transformers derives cu_seqlens from position ids only
    when the batch size is 1). Without varlen kernels, on CPU, it makes attention quadratic in
    the whole batch, so rows of max_len stay the default.
    """

    pad_id: int
    pad_to_multiple_of: int | None = None
    flatten: bool = False

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor | bool]:
        ids = [torch.as_tensor(row["input_ids"], dtype=torch.long) for row in rows]
        labels = [
            torch.as_tensor(row["labels"] if "labels" in row else row["input_ids"], dtype=torch.long) for row in rows
        ]
        positions = [
            torch.as_tensor(row["position_ids"], dtype=torch.long) if "position_ids" in row else torch.arange(len(i))
            for row, i in zip(rows, ids)
        ]
        if self.flatten:
            ids, labels, positions = [torch.cat(ids)], [torch.cat(labels)], [torch.cat(positions)]
            width = len(ids[0])
        else:
            width = max(len(i) for i in ids)
            if self.pad_to_multiple_of:
                width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        batch_labels = torch.full((len(ids), width), IGNORE, dtype=torch.long)
        batch_positions = torch.empty((len(ids), width), dtype=torch.long)
        for r, (row_ids, row_labels, row_positions) in enumerate(zip(ids, labels, positions)):
            n = len(row_ids)
            batch_ids[r, :n], batch_labels[r, :n], batch_positions[r, :n] = row_ids, row_labels, row_positions
            batch_positions[r, n:] = torch.arange(width - n)
        batch_labels[batch_positions == 0] = IGNORE
        return {"input_ids": batch_ids, "labels": batch_labels, "position_ids": batch_positions, "use_cache": False}
