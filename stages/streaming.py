"""Pretrain text streamed from corpora larger than memory, at flat resident memory.

Rows are read one line at a time from many jsonl files (paths or glob patterns) and checked as
they pass; documents are tokenised a small batch at a time, joined with EOS and cut into blocks
exactly as `stages.pretrain.pack` cuts them; a bounded buffer shuffles the blocks. Each
(rank, DataLoader worker) pair reads its own shard, so together they see every row exactly once
per epoch. Nothing holds more than one batch of documents, one partial block and the shuffle
buffer, whatever the size of the corpus.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from schemas.data import MAX_TEXT_LINE_BYTES, DataError, OnInvalid, Problem, excerpt, numbered_lines, parse_json_line
from schemas.formats import Shape, flatten
from schemas.spec import expand as expand_patterns
from stages.packing import tokenize_documents

DOCUMENTS_PER_CALL = 256  # one tokenizer call per batch amortises its overhead; the batch stays ~1 MB
MAX_WORKERS = 64  # DataLoader workers one dataset can count skipped rows for (one shared slot each)
KEPT_PROBLEMS = 1000  # a corpus check lists this many problems and counts the rest, so memory stays flat


@dataclass(frozen=True)
class Shard:
    """The part of the corpus one reader sees: lines or files whose position % count == index."""

    index: int
    count: int

    def by_file(self, files: int) -> bool:
        """Whole files per reader when every reader gets at least one: no byte is read twice.
        With fewer files than readers some would idle, so each reader then scans every file and
        parses and tokenises only every count-th line (reading is cheap beside tokenising)."""
        return files >= self.count


def named_files(patterns: Iterable[str | Path]) -> list[Path]:
    """Every file a path or glob pattern names, sorted within a pattern, each once, in the order given."""
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]  # one path, not the characters of one
    files: list[Path] = []
    missing: list[Problem] = []
    for pattern in patterns:
        matches = expand_patterns([Path(pattern)])
        if not matches:
            missing.append(Problem(Path(pattern), 0, "(file)", "no file has this path or matches this pattern"))
        files += matches
    if missing:
        raise DataError(missing)
    if not files:
        raise DataError([Problem(Path("."), 0, "(corpus)", "no data files were given")])
    return list(dict.fromkeys(files))


def parse_line(path: Path, number: int, raw: bytes, oversize: int = 0) -> str | Problem | None:
    """The document on one line; a Problem when the line breaks the pretrain format; None when blank.

    Lines are parsed by `schemas.data.parse_json_line` and shaped by `schemas.formats.flatten`, as
    `read_file` does for text rows, so a streamed file and a validated one fail with the same
    sentence, and no line, however broken, gives a traceback."""
    row = parse_json_line(path, number, raw, oversize, MAX_TEXT_LINE_BYTES)
    if row is None or isinstance(row, Problem):
        return row
    try:
        text = flatten("text", row)["text"]
    except Shape as err:
        return Problem(path, number, err.field, err.rule, excerpt(raw.decode("utf-8", "replace").strip()))
    if not text or text.isspace():  # the pandera rule of schemas.data, on one row
        return Problem(path, number, "text", "must not be empty", excerpt(raw.decode("utf-8", "replace").strip()))
    return text


def read_lines(files: list[Path], shard: Shard) -> Iterator[tuple[Path, int, bytes, int]]:
    """(file, line number, raw line, oversize) of this shard's lines, one line in memory at a time."""
    by_file = shard.by_file(len(files))
    position = 0  # of a line across all files, for line sharding
    for order, path in enumerate(files):
        if by_file and order % shard.count != shard.index:
            continue
        try:
            handle = open(path, "rb")
        except OSError as err:
            raise DataError([Problem(path, 0, "(file)", f"cannot be read: {err.strerror or err}")]) from None
        with handle:
            for number, raw, oversize in numbered_lines(handle, MAX_TEXT_LINE_BYTES):
                if not by_file:
                    mine = position % shard.count == shard.index
                    position += 1
                    if not mine:
                        continue  # another reader's line: not even decoded here
                yield path, number, raw, oversize


def chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(islice(items, size)):
        yield batch


def pack_blocks(texts: Iterator[str], tokenizer, block_size: int) -> Iterator[torch.Tensor]:
    """`stages.pretrain.pack` as a stream: EOS after each document, full blocks only, the tail dropped."""
    eos = tokenizer.eos_token_id
    pending: list[int] = []
    for batch in chunks(texts, DOCUMENTS_PER_CALL):
        # the tokenisation of the in-memory path, so both give the same ids
        for ids in tokenize_documents(batch, tokenizer):
            pending += ids
            pending.append(eos)
        usable = len(pending) // block_size * block_size
        for start in range(0, usable, block_size):
            # one tensor per block, not views of a batch tensor: a view in the shuffle buffer would pin its whole batch
            yield torch.tensor(pending[start : start + block_size], dtype=torch.long)
        del pending[:usable]


def buffer_shuffle(blocks: Iterator[torch.Tensor], size: int, rng: np.random.Generator) -> Iterator[torch.Tensor]:
    """Each block leaves from a random place of a buffer of `size`; a block may move forward by about `size`."""
    buffer: list[torch.Tensor] = []
    for block in blocks:
        if len(buffer) < size:
            buffer.append(block)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = block
    rng.shuffle(buffer)
    yield from buffer


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


class StreamingTextDataset(IterableDataset):
    """Blocks of `block_size` tokens from pretrain jsonl files ({"text"} rows) too large for memory.

    Yields {"input_ids", "labels"} (equal: causal LM), int64 tensors of `block_size`. With
    `shuffle_buffer` > 0 the file order is permuted per epoch and blocks pass through a buffer of
    that many blocks; the order is fixed by (seed, epoch, world size, worker count). With 0, blocks
    come in file order, equal to `stages.pretrain.pack` of the same documents on one shard.

    Sharding: reader = rank * workers + worker, readers = world_size * workers (see `Shard.by_file`).
    Rank and world size come from the arguments, else from torch.distributed when it is
    initialised at construction. Under the HF Trainer on several processes pass rank=0,
    world_size=1: accelerate reads an IterableDataset on rank 0 only and sends each rank its
    batches (`dispatch_batches`, its default there), so a rank-sharded stream would lose data.

    A bad line raises DataError naming file:line: field: rule, or with on_invalid="skip" is
    counted in `skipped` (summed over DataLoader workers) and left out.
    """

    def __init__(
        self,
        files: Iterable[str | Path],
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
        """Called by the HF Trainer (via accelerate) before each epoch: a new file order and shuffle."""
        self._shared[0] = epoch

    @property
    def epoch(self) -> int:
        return int(self._shared[0])

    @property
    def skipped(self) -> int:
        """Invalid rows left out so far under on_invalid="skip", over every iteration and worker."""
        return int(self._shared[1:].sum())

    def shard(self) -> tuple[Shard, int]:
        """This reader's shard and the slot it counts skipped rows in."""
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        if workers > MAX_WORKERS:
            raise ValueError(f"a StreamingTextDataset serves at most {MAX_WORKERS} DataLoader workers, not {workers}")
        return Shard(self.rank * workers + worker_id, self.world_size * workers), (2 + worker_id if worker else 1)

    def texts(self, shard: Shard, slot: int, files: list[Path]) -> Iterator[str]:
        for path, number, raw, oversize in read_lines(files, shard):
            parsed = parse_line(path, number, raw, oversize)
            if isinstance(parsed, Problem):
                if self.on_invalid == "fail":
                    raise DataError([parsed])
                self._shared[slot] += 1
            elif parsed is not None:
                yield parsed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        shard, slot = self.shard()
        epoch = self.epoch
        files = self.files
        if self.shuffle_buffer:
            # the same permutation on every reader (seeded without the shard), so the shards still partition the corpus
            files = [files[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(files))]
        blocks = pack_blocks(self.texts(shard, slot, files), self.tokenizer, self.block_size)
        if self.shuffle_buffer:
            blocks = buffer_shuffle(
                blocks, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, shard.count, shard.index])
            )
        for block in blocks:
            yield {"input_ids": block, "labels": block.clone()}


def documents(patterns: Iterable[str | Path], on_invalid: OnInvalid = "fail") -> Iterator[str]:
    """Every document of a corpus in file order, one line in memory at a time (e.g. to train a tokenizer on)."""
    for path, number, raw, oversize in read_lines(named_files(patterns), Shard(0, 1)):
        parsed = parse_line(path, number, raw, oversize)
        if isinstance(parsed, Problem):
            if on_invalid == "fail":
                raise DataError([parsed])
        elif parsed is not None:
            yield parsed


@dataclass
class CorpusCheck:
    """A streamed check of every line: counts, and the first KEPT_PROBLEMS problems."""

    files: int = 0
    rows: int = 0
    invalid: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)


def check_corpus(patterns: Iterable[str | Path], on_invalid: OnInvalid = "fail") -> CorpusCheck:
    """Every line of a streamed corpus checked at flat memory, before any model loads.

    With "fail", raise one DataError listing the problems (the first KEPT_PROBLEMS, then a count)."""
    files = named_files(patterns)
    check = CorpusCheck(files=len(files))
    for path, number, raw, oversize in read_lines(files, Shard(0, 1)):
        check.bytes += oversize or len(raw)
        parsed = parse_line(path, number, raw, oversize)
        if isinstance(parsed, Problem):
            check.invalid += 1
            if len(check.problems) < KEPT_PROBLEMS:
                check.problems.append(parsed)
        elif parsed is not None:
            check.rows += 1
    if on_invalid == "fail" and check.invalid:
        listed = list(check.problems)
        if check.invalid > len(listed):
            listed.append(
                Problem(
                    Path("(corpus)"), 0, "(corpus)", f"{check.invalid - len(listed)} more invalid line(s) not listed"
                )
            )
        raise DataError(listed)
    return check
