"""Pretrain text streamed from corpora larger than memory, at flat resident memory.

Hugging Face `datasets` streams it: `IterableDataset.from_generator` over a list of data sources,
`shuffle(seed, buffer_size)` for the per-epoch order of the sources and a bounded buffer of blocks,
`set_epoch`, `split_dataset_by_node` to deal the sources out to ranks, and its DataLoader worker
split within a rank. Together the readers (ranks x workers) see every row once per epoch, and
nothing holds more than a batch of documents, a partial block and the shuffle buffer.

Ours, because that library cannot do it:

- The rows are checked as they pass (`parse_line`): a bad row names file:line: field: rule (row n for a
  container of records), or with on_invalid="skip" is counted and left out. A file may be in any container
  schemas/readers.py reads (JSON Lines, a JSON array, parquet, arrow, csv, text, compressed or not).
  The library's json reader neither names the line nor skips (a cut-off string on line 2 gave
  `ArrowInvalid: JSON parse error: Invalid encoding in string. in row 1`).
- Tokenising + packing (`Packer`), run as a batched `map` of the library's pipeline: the run_clm
  recipe (`group_texts`) drops a partial block at the end of every batch; ours carries it to the
  next batch, so blocks are cut exactly as `stages.pretrain.pack` cuts them.
- Fewer files than readers (`slices`): the library shards by data source only. With fewer sources
  than DataLoader workers it stops the extra workers, and with a source count that world_size does
  not divide, `split_dataset_by_node` falls back to keeping every world_size-th example of the
  whole pipeline, so every rank reads, parses and tokenises the whole corpus. So a file is cut
  into position-strided slices (line or row index % parts) until there is a source per reader, and
  the split is asked for by source ("shards"); each row is then tokenised by one reader only (and in
  JSON Lines and text its line decoded and parsed by that reader only).
- One source at a time into the shuffle buffer (`max_buffer_input_shards=1`): the library's shuffle
  interleaves up to 10 sources, fetching from each on its own thread, so the packing map (which
  must carry its tail) is called from several threads at once and mixes their tokens.

Measured with `python -m bench.streaming --split-only` (files of 2,000 generated documents,
datasets 5.2.0): the library alone gave each of 2 ranks all 2,000 documents of one file to
tokenise, and of 2 DataLoader workers one all 2,000, the other none; ours 1,000 to each. With
its interleaving on 4 files, 3 passes gave 5,013, 5,466 and 5,586 blocks where `pack` gives
4,557 (tokens repeated); ours 4,557 on each pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import datasets
import torch
import torch.distributed as dist
import torch.utils.data
from datasets.distributed import split_dataset_by_node

from schemas.data import DataError, OnInvalid, Problem, excerpt
from schemas.formats import Shape, flatten
from schemas.readers import MAX_TEXT_LINE_BYTES, Rows, read_rows
from schemas.sources import Source
from schemas.sources import expand as expand_patterns
from stages.common.packing import tokenize_documents

DOCUMENTS_PER_CALL = 256  # one tokenizer call per batch amortises its overhead; the batch stays ~1 MB
MAX_WORKERS = 64  # DataLoader workers one dataset can count skipped rows for (one shared slot each)
KEPT_PROBLEMS = 1000  # a corpus check lists this many problems and counts the rest, so memory stays flat


@dataclass(frozen=True)
class Slice:
    """One data source of the stream: the rows of `path` whose index % parts == part (all of them when parts is 1);
    the index counts lines in JSON Lines and text, rows in a container of records. `source`, when the file came
    from a spec's source, says how its rows are read (column mapping, documents by line or paragraph)."""

    path: Path
    part: int = 0
    parts: int = 1
    source: Source | None = None


def slices(files: list[Slice], readers: int) -> list[Slice]:
    """The sources the library deals out: whole files when every reader gets one, so no byte is read twice.
    With fewer files than readers each file is cut into as many position-strided slices as it takes; a reader
    then scans its slice's file and tokenises only its own rows (reading is cheap beside tokenising), and in
    JSON Lines and text does not even decode another slice's lines."""
    parts = -(-readers // len(files))
    return [replace(file, part=part, parts=parts) for file in files for part in range(parts)]


def named_files(patterns: Iterable[str | Path | Source]) -> list[Slice]:
    """Every file a path, glob pattern or spec source names, sorted within a pattern, each once, in the order
    given, as whole-file slices."""
    if isinstance(patterns, (str, Path, Source)):
        patterns = [patterns]  # one path, not the characters of one
    files: list[Slice] = []
    missing: list[Problem] = []
    for pattern in patterns:
        if isinstance(pattern, Source):
            matches = [Slice(path, source=pattern) for path in pattern.files]
        else:
            matches = [Slice(path) for path in expand_patterns([Path(pattern)])]
        if not matches:
            missing.append(
                Problem(Path(str(pattern)), 0, "(file)", "no file has this path or matches this pattern")
                if not isinstance(pattern, Source)
                else Problem(pattern.path or Path(pattern.name), 0, "(source)", "names no data file")
            )
        files += matches
    if missing:
        raise DataError(missing)
    if not files:
        raise DataError([Problem(Path("."), 0, "(corpus)", "no data files were given")])
    return list(dict.fromkeys(files))


def parse_line(rows: Rows, position: int, row: dict | Problem, source: Source | None = None) -> str | Problem:
    """The document of one row that `rows` (`schemas.readers.read_rows`) gave; a Problem when it breaks the pretrain
    format.

    Rows are read by `read_rows` and shaped by `schemas.formats.flatten`, as `read_file` does for
    text rows, so a streamed file and a validated one fail with the same sentence, and no row,
    however broken, gives a traceback."""
    if isinstance(row, Problem):
        return row
    try:
        text = flatten("text", source.mapped(row) if source else row)["text"]
    except Shape as err:
        shown = excerpt(json.dumps(row, ensure_ascii=False, default=str))
        return Problem(rows.path, position, err.field, err.rule, shown, rows.unit, rows.starts_on)
    if not text or text.isspace():  # the pandera rule of schemas.data, on one row
        return Problem(rows.path, position, "text", "must not be empty", excerpt(text), rows.unit, rows.starts_on)
    return text


def read_lines(source: Slice) -> Iterator[tuple[Rows, int, dict | Problem]]:
    """(the file's rows, position, row or Problem) of one slice, one row in memory at a time; DataError when the file
    cannot be read at all."""
    rows = read_rows(
        source.path,
        limit=MAX_TEXT_LINE_BYTES,
        documents=source.source.documents if source.source else "line",
        keep=lambda position: (position - 1) % source.parts == source.part,
    )
    for position, row in rows:
        if position == 0:  # the file itself is unusable
            raise DataError([row])
        yield rows, position, row


def checked_texts(
    sources: Iterable[Slice], on_invalid: OnInvalid, skipped: torch.Tensor | None = None, slot: int = 0
) -> Iterator[str]:
    """The documents of `sources` in order; a bad row raises DataError, or under "skip" is counted in skipped[slot]."""
    for source in sources:
        for rows, position, row in read_lines(source):
            parsed = parse_line(rows, position, row, source.source)
            if isinstance(parsed, Problem):
                if on_invalid == "fail":
                    raise DataError([parsed])
                if skipped is not None:
                    skipped[slot] += 1
            else:
                yield parsed


def checked_rows(sources: list[Slice], on_invalid: OnInvalid, skipped: torch.Tensor) -> Iterator[dict[str, str]]:
    """The library's generator: called with the sources it gave this reader, in the reader's process."""
    worker = torch.utils.data.get_worker_info()
    # [1] rows skipped in the main process, [2 + w] by DataLoader worker w (see StreamingTextDataset._shared)
    for text in checked_texts(sources, on_invalid, skipped, 2 + worker.id if worker else 1):
        yield {"text": text}


class Packer:
    """`stages.pretrain.pack` as a batched map: EOS after each document, full blocks only, the tail carried to
    the next batch and dropped at the end. Stateful: one Packer serves one pass over the stream, called from one
    thread at a time."""

    def __init__(self, tokenizer, block_size: int):
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.eos = tokenizer.eos_token_id  # read once: a transformers tokenizer's attributes cost a lookup each
        self.pending: list[int] = []

    def __call__(self, texts: list[str]) -> dict[str, list[torch.Tensor]]:
        # the tokenisation of the in-memory path, so both give the same ids
        for ids in tokenize_documents(texts, self.tokenizer):
            self.pending += ids
            self.pending.append(self.eos)
        usable = len(self.pending) // self.block_size * self.block_size
        # one tensor per block, not views of a batch tensor: a view in the shuffle buffer would pin its whole batch
        blocks = [
            torch.tensor(self.pending[start : start + self.block_size], dtype=torch.long)
            for start in range(0, usable, self.block_size)
        ]
        del self.pending[:usable]
        return {"input_ids": blocks}


def resolve_ranks(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit arguments win (the HF Trainer needs world_size=1, see StreamingTextDataset);
    else torch.distributed when initialised; else one process."""
    if world_size is None:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        world_size = 1
    rank = 0 if rank is None else rank
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
    return rank, world_size


class StreamingTextDataset(torch.utils.data.IterableDataset):
    """Blocks of `block_size` tokens from pretrain files ({"text"} rows, in any container) too large for memory.

    Yields {"input_ids", "labels"} (equal: causal LM), int64 tensors of `block_size`. With
    `shuffle_buffer` > 0 the library permutes the sources per epoch and passes the blocks through a
    buffer of that many; the order is fixed by (seed, epoch, world size, worker count). With 0,
    blocks come in file order, equal to `stages.pretrain.pack` of the same documents on one reader.

    Each pass builds the library's pipeline for the readers there are (world_size x the DataLoader's
    workers, known only inside a worker) and a fresh Packer. Rank and world size come from the
    arguments, else from torch.distributed when it is initialised at construction. Under the HF
    Trainer on several processes pass rank=0, world_size=1: accelerate reads an IterableDataset on
    rank 0 only and sends each rank its batches (`dispatch_batches`, its default there), so a
    rank-sharded stream would lose data.

    A bad row raises DataError naming file:line: field: rule, or with on_invalid="skip" is
    counted in `skipped` (summed over DataLoader workers) and left out.
    """

    def __init__(
        self,
        files: Iterable[str | Path | Source],
        tokenizer,
        block_size: int,
        *,
        shuffle_buffer: int = 1024,
        seed: int = 0,
        on_invalid: OnInvalid = "fail",
        rank: int | None = None,
        world_size: int | None = None,
    ):
        if block_size < 1 or shuffle_buffer < 0 or seed < 0:
            raise ValueError(
                f"need block_size >= 1, shuffle_buffer >= 0, seed >= 0; got {block_size}, {shuffle_buffer}, {seed}"
            )
        if on_invalid not in ("fail", "skip"):
            raise ValueError(f"on_invalid must be 'fail' or 'skip', not {on_invalid!r}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token to put between documents")
        self.files = named_files(files)
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.on_invalid = on_invalid
        self.rank, self.world_size = resolve_ranks(rank, world_size)
        # In shared memory, so that DataLoader workers (forked, spawned or persistent) read the epoch
        # set after they started and the main process reads their counts:
        # [0] epoch, [1] rows skipped in the main process, [2 + w] rows skipped by worker w.
        self._shared = torch.zeros(2 + MAX_WORKERS, dtype=torch.long).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Called by the HF Trainer (via accelerate) before each epoch: a new source order and shuffle."""
        self._shared[0] = epoch

    @property
    def epoch(self) -> int:
        return int(self._shared[0])

    @property
    def skipped(self) -> int:
        """Invalid rows left out so far under on_invalid="skip", over every iteration and worker."""
        return int(self._shared[1:].sum())

    def blocks(self, workers: int) -> datasets.IterableDataset:
        """This rank's part of the stream as the library's pipeline; iterated in a DataLoader worker, the library
        keeps that worker's sources."""
        if workers > MAX_WORKERS:
            raise ValueError(f"a StreamingTextDataset serves at most {MAX_WORKERS} DataLoader workers, not {workers}")
        rows = datasets.IterableDataset.from_generator(
            checked_rows,
            gen_kwargs={
                "sources": slices(self.files, self.world_size * workers),
                "on_invalid": self.on_invalid,
                "skipped": self._shared,
            },
        )
        blocks = rows.map(
            Packer(self.tokenizer, self.block_size),
            input_columns=["text"],
            remove_columns=["text"],
            batched=True,
            batch_size=DOCUMENTS_PER_CALL,
        )
        if self.shuffle_buffer:
            # The same seed on every rank, so every rank permutes the sources alike and the split stays a partition.
            # One source at a time into the buffer: the library interleaves several on prefetching threads, which
            # would call the Packer at once (see the module docstring).
            blocks = blocks.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer, max_buffer_input_shards=1)
        # "shards": deal out sources, never every world_size-th example (every rank would tokenise everything)
        blocks = split_dataset_by_node(blocks, self.rank, self.world_size, strategy="shards")
        if self.shuffle_buffer:  # unshuffled, the library would still permute the sources from epoch 1 on
            blocks.set_epoch(self.epoch)  # after the split, which starts a new dataset at epoch 0
        return blocks

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        for example in self.blocks(worker.num_workers if worker else 1):
            block = example["input_ids"]
            yield {"input_ids": block, "labels": block.clone()}


def documents(patterns: Iterable[str | Path | Source], on_invalid: OnInvalid = "fail") -> Iterator[str]:
    """Every document of a corpus in file order, one row in memory at a time (e.g. to train a tokenizer on)."""
    yield from checked_texts(named_files(patterns), on_invalid)


@dataclass
class CorpusCheck:
    """A streamed check of every row: counts, and the first KEPT_PROBLEMS problems."""

    files: int = 0
    rows: int = 0
    invalid: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)


def check_corpus(patterns: Iterable[str | Path | Source], on_invalid: OnInvalid = "fail") -> CorpusCheck:
    """Every row of a streamed corpus checked at flat memory, before any model loads.

    With "fail", raise one DataError listing the problems (the first KEPT_PROBLEMS, then a count)."""
    files = named_files(patterns)
    check = CorpusCheck(files=len(files))
    for file in files:
        check.bytes += file.path.stat().st_size
        for rows, position, row in read_lines(file):
            parsed = parse_line(rows, position, row, file.source)
            if isinstance(parsed, Problem):
                check.invalid += 1
                if len(check.problems) < KEPT_PROBLEMS:
                    check.problems.append(parsed)
            else:
                check.rows += 1
    if on_invalid == "fail" and check.invalid:
        listed = list(check.problems)
        if check.invalid > len(listed):
            listed.append(
                Problem(
                    Path("(corpus)"), 0, "(corpus)", f"{check.invalid - len(listed)} more invalid row(s) not listed"
                )
            )
        raise DataError(listed)
    return check
