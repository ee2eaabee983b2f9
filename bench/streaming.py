"""Streaming a generated multi-GB pretrain corpus: throughput and peak resident memory, beside the baselines.

A seeded generator writes a corpus of jsonl files into a temp folder (deleted at the end); each
measurement then runs in its own process, so its peak RSS (the kernel's high-water mark VmHWM,
plus a psutil sampler for the growth over time) is its own:

1. scan: `check_corpus` reads, decodes and checks every line of the whole corpus;
2. stream 1/S: one reader of S (rank 0 of S, as on S ranks) streams its share of the corpus and
   tokenises + packs + buffer-shuffles it into blocks (read MB: the bytes the process read);
3. on the first N MB (one file, the same bytes for each), tokenise + pack:
   a. StreamingTextDataset, one reader;
   b. the in-memory pretrain path, `pack(read_files(...))` as `stages.pretrain.prepare` does;
   c. `datasets.load_dataset("json")` + `map(tokenize)` + `map(group_texts)`, not streaming;
4. `datasets.load_dataset("json")` alone, not streaming, on the first M MB: its RSS as it grows;
5. the split: what the `datasets` pipeline alone does with fewer files than readers (documents each
   rank and each DataLoader worker tokenises) and with its shuffle interleaving several sources
   (blocks per pass with a packing map), beside StreamingTextDataset on the same files.

    python -m bench.streaming                 # prints a table; figures go to bench/RESULTS.md by hand
    python -m bench.streaming --gb 0.1 --slice-mb 8 --load-mb 32    # a quick trial
    python -m bench.streaming --split-only    # only 5, on a small corpus (about 2 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

MB = 1 << 20
BLOCK_SIZE = 512
SHUFFLE_BUFFER = 1024
VOCAB_SIZE = 8192
TOKENIZER_SAMPLE_DOCS = 4000
POOL_DOCUMENTS = 50_000  # ~75 MB of distinct documents the corpus is drawn from
SAMPLE_EVERY_S = 0.1
GROWTH_POINTS = 5  # RSS reported at 20/40/60/80/100% of a measurement's run
SPLIT_FILES = 4  # the split check's corpus: this many files of SPLIT_FILE_MB each
SPLIT_FILE_MB = 2
SPLIT_PASSES = 3


# ---- the corpus --------------------------------------------------------------------------------


def word_pool(rng: random.Random, size: int) -> list[str]:
    """Pseudo-words from syllables (some accented, so the corpus is real UTF-8), with digits and punctuation."""
    syllables = [
        "ka",
        "lo",
        "mi",
        "ter",
        "vos",
        "an",
        "dre",
        "qui",
        "su",
        "pel",
        "nor",
        "ix",
        "zé",
        "bü",
        "ça",
        "th",
        "ou",
    ]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(size)]
    return words + [str(n) for n in range(200)] + [",", ".", ";", "—"]


def sentence_pool(rng: random.Random, size: int) -> list[str]:
    words = word_pool(rng, 30_000)
    return [" ".join(rng.choices(words, k=rng.randint(4, 18))).capitalize() + "." for _ in range(size)]


def generate(folder: Path, total_bytes: int, files: int, seed: int) -> list[Path]:
    """`files` jsonl files of {"text"} documents (2 to 40 sentences) totalling ~`total_bytes`.

    Lines are drawn from a pool of POOL_DOCUMENTS distinct documents, so GBs are written in seconds;
    the repeats cost the reader and the tokenizer what new documents would (no whole-document cache)."""
    rng = random.Random(seed)
    sentences = sentence_pool(rng, 100_000)
    pool = [
        (
            json.dumps({"text": " ".join(rng.choices(sentences, k=rng.randint(2, 40)))}, ensure_ascii=False) + "\n"
        ).encode()
        for _ in range(POOL_DOCUMENTS)
    ]
    paths = []
    for i in range(files):
        path = folder / f"part-{i:03d}.jsonl"
        written, target = 0, total_bytes // files
        with open(path, "wb") as handle:
            while written < target:
                lines = b"".join(rng.choices(pool, k=1000))
                handle.write(lines)
                written += len(lines)
        paths.append(path)
    return paths


def head(sources: list[Path], target: Path, size: int) -> Path:
    """The corpus's first whole lines up to `size` bytes, in one file."""
    written = 0
    with open(target, "wb") as dst:
        for source in sources:
            with open(source, "rb") as src:
                for line in src:
                    if written + len(line) > size:
                        return target
                    dst.write(line)
                    written += len(line)
    return target


# ---- one measurement, in its own process ------------------------------------------------------


def high_water_mark() -> int:
    """This process's peak resident bytes since it started (exec), from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # in kB
    raise RuntimeError("no VmHWM in /proc/self/status: the peak RSS is read the Linux way")


class RssSampler:
    """RSS sampled every SAMPLE_EVERY_S in a thread, for the growth pattern; the peak also from VmHWM.

    Not getrusage's ru_maxrss: Linux carries that over from the parent through fork and exec, so a
    measurement would report the benchmark's own resident memory whenever it is the larger."""

    def __init__(self):
        self.process = psutil.Process()
        self.samples: list[int] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.done.wait(SAMPLE_EVERY_S):
            self.samples.append(self.process.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self.start_rss = self.process.memory_info().rss
        self.start_cpu = time.process_time()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu_seconds = time.process_time() - self.start_cpu  # every thread's, the tokenizer's included
        self.done.set()
        self.thread.join()
        self.samples.append(self.process.memory_info().rss)

    def report(self) -> dict:
        peak = max(high_water_mark(), *self.samples)
        picks = [
            self.samples[min(len(self.samples) - 1, len(self.samples) * k // GROWTH_POINTS)]
            for k in range(1, GROWTH_POINTS + 1)
        ]
        return {
            "cpu_seconds": self.cpu_seconds,
            "start_rss_mb": self.start_rss / MB,
            "peak_rss_mb": peak / MB,
            "growth_mb": [round(r / MB) for r in picks],
        }


def measure_scan(files: list[str]) -> dict:
    from stages.common.streaming import check_corpus

    with RssSampler() as rss:
        start = time.perf_counter()
        check = check_corpus(files)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "read_mb": check.bytes / MB, "rows": check.rows, **rss.report()}


class CountingTokenizer:
    """Counts the documents and UTF-8 bytes it is given per DataLoader worker, in shared memory (so the counts of
    worker processes reach the main one). Tokenises with the tokenizer at `folder`; with none, gives no ids, to
    count a reader's share without paying for tokenising."""

    def __init__(self, folder: str | None = None):
        import torch
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder) if folder else None
        self.eos_token_id = self.tokenizer.eos_token_id if self.tokenizer else 0
        self.documents = torch.zeros(16, dtype=torch.long).share_memory_()
        self.bytes = torch.zeros(16, dtype=torch.long).share_memory_()

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        import torch.utils.data

        worker = torch.utils.data.get_worker_info()
        slot = worker.id if worker else 0
        self.documents[slot] += len(texts)
        self.bytes[slot] += sum(len(text.encode()) for text in texts)
        if self.tokenizer is None:
            return {"input_ids": [[] for _ in texts]}
        return {"input_ids": self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]}


def measure_stream(files: list[str], tokenizer_dir: str, readers: int) -> dict:
    from transformers import AutoTokenizer

    from stages.common.streaming import StreamingTextDataset

    def reader(tokenizer) -> StreamingTextDataset:
        return StreamingTextDataset(
            files, tokenizer, BLOCK_SIZE, shuffle_buffer=SHUFFLE_BUFFER, rank=0, world_size=readers
        )

    dataset = reader(AutoTokenizer.from_pretrained(tokenizer_dir))
    dataset.blocks(workers=1)  # built once untimed, so that the modules it imports are not counted as data read
    io = psutil.Process()
    with RssSampler() as rss:
        read_before = io.io_counters().read_chars
        start = time.perf_counter()
        blocks = sum(1 for _ in dataset)
        seconds = time.perf_counter() - start
        read = io.io_counters().read_chars - read_before
    # the bytes of this reader's own documents, counted after the timed run by a second pass that does not tokenise
    counter = CountingTokenizer()
    sum(1 for _ in reader(counter))
    return {
        "seconds": seconds,
        "read_mb": read / MB,
        "tokenised_mb": int(counter.bytes.sum()) / MB,
        "blocks": blocks,
        **rss.report(),
    }


def library_alone(files: list[str], tokenizer, rank: int, world_size: int, shuffle: bool):
    """The `datasets` pipeline with nothing of ours but the row check and the Packer: a source per file,
    `split_dataset_by_node` as it chooses ("auto"), its shuffle with its own interleaving of sources."""
    import torch
    from datasets import IterableDataset
    from datasets.distributed import split_dataset_by_node

    from stages.common.streaming import Packer, Slice, checked_rows

    rows = IterableDataset.from_generator(
        checked_rows,
        gen_kwargs={"sources": [Slice(Path(f)) for f in files], "on_invalid": "fail", "skipped": torch.zeros(1)},
    )
    blocks = rows.map(
        Packer(tokenizer, BLOCK_SIZE), input_columns=["text"], remove_columns=["text"], batched=True, batch_size=256
    )
    if shuffle:
        blocks = blocks.shuffle(seed=0, buffer_size=SHUFFLE_BUFFER)
    return split_dataset_by_node(blocks, rank, world_size)


def streaming_reader(files: list[str], tokenizer, rank: int, world_size: int, shuffle: bool):
    from stages.common.streaming import StreamingTextDataset

    buffer = SHUFFLE_BUFFER if shuffle else 0
    return StreamingTextDataset(files, tokenizer, BLOCK_SIZE, shuffle_buffer=buffer, rank=rank, world_size=world_size)


def measure_split(files: list[str], tokenizer_dir: str) -> dict:
    """On the first file: documents tokenised by each of 2 ranks (in turn, in this process) and by each of 2
    DataLoader workers (forked). On all files, one reader: blocks per pass with a shuffle, beside `pack`."""
    from torch.utils.data import DataLoader

    from schemas.data import read_files
    from stages.pretrain import pack

    tokenizer = CountingTokenizer(tokenizer_dir)
    texts = read_files([Path(f) for f in files], "text").frame["text"].to_list()
    result: dict = {
        "documents": len(read_files([Path(files[0])], "text").frame),
        "pack_blocks": len(pack(texts, tokenizer.tokenizer, BLOCK_SIZE)[0]),
    }
    for name, build in (("library", library_alone), ("ours", streaming_reader)):
        per_rank = []
        for rank in range(2):
            counter = CountingTokenizer()
            sum(1 for _ in build(files[:1], counter, rank, 2, False))
            per_rank.append(int(counter.documents.sum()))
        counter = CountingTokenizer()
        sum(1 for _ in DataLoader(build(files[:1], counter, 0, 1, False), batch_size=None, num_workers=2))
        passes = [sum(1 for _ in build(files, tokenizer, 0, 1, True)) for _ in range(SPLIT_PASSES)]
        result[name] = {"per_rank": per_rank, "per_worker": counter.documents[:2].tolist(), "blocks_per_pass": passes}
    return result


def measure_pack(files: list[str], tokenizer_dir: str) -> dict:
    from transformers import AutoTokenizer

    from schemas.data import read_files
    from stages.pretrain import pack

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with RssSampler() as rss:
        start = time.perf_counter()
        dataset, _ = pack(read_files([Path(f) for f in files], "text").frame["text"].to_list(), tokenizer, BLOCK_SIZE)
        blocks = len(dataset)
        seconds = time.perf_counter() - start
    size = sum(os.path.getsize(f) for f in files)
    return {"seconds": seconds, "read_mb": size / MB, "tokenised_mb": size / MB, "blocks": blocks, **rss.report()}


def measure_datasets(files: list[str], tokenizer_dir: str, cache: str, tokenise: bool) -> dict:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def tokenize(batch: dict) -> dict:
        return {
            "input_ids": [
                ids + [tokenizer.eos_token_id]
                for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
            ]
        }

    def group_texts(batch: dict) -> dict:
        stream = [token for ids in batch["input_ids"] for token in ids]
        usable = len(stream) // BLOCK_SIZE * BLOCK_SIZE
        return {"input_ids": [stream[i : i + BLOCK_SIZE] for i in range(0, usable, BLOCK_SIZE)]}

    with RssSampler() as rss:
        start = time.perf_counter()
        data = load_dataset("json", data_files=files, split="train", cache_dir=cache)
        blocks = 0
        if tokenise:
            data = data.map(tokenize, batched=True, remove_columns=["text"])
            blocks = len(data.map(group_texts, batched=True, batch_size=1000))
        seconds = time.perf_counter() - start
    size = sum(os.path.getsize(f) for f in files)
    return {
        "seconds": seconds,
        "read_mb": size / MB,
        "tokenised_mb": size / MB if tokenise else 0.0,
        "blocks": blocks,
        **rss.report(),
    }


MEASURES = {
    "scan": measure_scan,
    "stream": measure_stream,
    "pack": measure_pack,
    "datasets": measure_datasets,
    "split": measure_split,
}


def run_measure(name: str, module: str = "bench.streaming", **kwargs) -> dict:
    """One measurement of `module` (its `--measure NAME KWARGS`) in a fresh interpreter, so that its time and peak
    RSS are the measurement's alone."""
    output = subprocess.run(
        [sys.executable, "-m", module, "--measure", name, json.dumps(kwargs)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if output.returncode:
        sys.exit(f"measurement {name} {kwargs} failed:\n{output.stderr}")
    return json.loads(output.stdout.strip().splitlines()[-1])


# ---- the run ----------------------------------------------------------------------------------


def train_tokenizer(files: list[Path], folder: Path) -> Path:
    from schemas.spec import TokenizerTrain
    from stages import tokenizer

    with open(files[0], encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line, _ in zip(handle, range(TOKENIZER_SAMPLE_DOCS))]
    return tokenizer.run(TokenizerTrain(vocab_size=VOCAB_SIZE), texts, "chatml", folder).checkpoint


def row(name: str, result: dict) -> str:
    tokenised = result.get("tokenised_mb", 0.0)
    rate = f"{tokenised / result['seconds']:6.2f}" if tokenised else "     -"
    blocks = f"{result['blocks'] / result['seconds']:7.0f}" if result.get("blocks") else "      -"
    return (
        f"{name:<46} {result['read_mb']:8.0f} {result['read_mb'] / result['seconds']:7.1f} {tokenised:7.0f} {rate} "
        f"{blocks} "
        f"{result['seconds']:6.1f} {result['cpu_seconds']:6.1f} {result['start_rss_mb']:6.0f} "
        f"{result['peak_rss_mb']:6.0f}  {result['growth_mb']}"
    )


def split_report(split: dict) -> str:
    lines = [
        f"\nsplit: the first file's {split['documents']:,} documents, 2 ranks or 2 DataLoader workers; "
        f"blocks per pass over {SPLIT_FILES} files, one reader, shuffled (`pack`: {split['pack_blocks']:,})"
    ]
    for name in ("library", "ours"):
        found = split[name]
        lines.append(
            f"{name:<8} tokenised per rank {found['per_rank']}, per worker {found['per_worker']}; "
            f"blocks per pass {found['blocks_per_pass']}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.5, help="size of the generated corpus")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--readers", type=int, default=16, help="S: the streamed reader tokenises 1/S of the corpus")
    parser.add_argument("--slice-mb", type=int, default=32, help="N: the slice tokenised by every method")
    parser.add_argument("--load-mb", type=int, default=1024, help="M: the slice load_dataset loads alone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-only", action="store_true", help="only the split check (5), on its small corpus")
    parser.add_argument("--measure", nargs=2, metavar=("NAME", "JSON_ARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        name, kwargs = args.measure
        print(json.dumps(MEASURES[name](**json.loads(kwargs))))
        return

    root = Path(tempfile.mkdtemp(prefix="lifecycle-stream-bench-"))
    results = []
    try:
        (root / "split").mkdir()
        split_files = generate(root / "split", SPLIT_FILES * SPLIT_FILE_MB * MB, SPLIT_FILES, args.seed)
        if args.split_only:
            tokenizer_dir = str(train_tokenizer(split_files, root / "tokenizer"))
            print(split_report(run_measure("split", files=[str(f) for f in split_files], tokenizer_dir=tokenizer_dir)))
            return
        need = int(args.gb * 1024 * MB) + 3 * args.load_mb * MB  # the corpus, the slices and the datasets cache
        free = shutil.disk_usage(root).free
        if free < need * 1.2:
            sys.exit(f"{root}: {free / MB:,.0f} MB free, the benchmark needs about {need * 1.2 / MB:,.0f} MB")
        start = time.perf_counter()
        (root / "corpus").mkdir()
        files = generate(root / "corpus", int(args.gb * 1024 * MB), args.files, args.seed)
        corpus_mb = sum(f.stat().st_size for f in files) / MB
        print(
            f"generated {corpus_mb:,.0f} MB in {len(files)} files in {time.perf_counter() - start:.0f} s ({root})",
            flush=True,
        )
        tokenizer_dir = str(train_tokenizer(files, root / "tokenizer"))
        slice_file = str(head(files, root / "slice.jsonl", args.slice_mb * MB))
        load_file = str(head(files, root / "load.jsonl", args.load_mb * MB))
        corpus = [str(f) for f in files]

        for name, measure, kwargs in [
            ("scan: check every line of the corpus", "scan", {"files": corpus}),
            (
                f"stream: 1 reader of {args.readers}, whole corpus",
                "stream",
                {"files": corpus, "tokenizer_dir": tokenizer_dir, "readers": args.readers},
            ),
            (
                f"stream: 1 reader, first {args.slice_mb} MB",
                "stream",
                {"files": [slice_file], "tokenizer_dir": tokenizer_dir, "readers": 1},
            ),
            (
                f"in memory: read_files+pack, first {args.slice_mb} MB",
                "pack",
                {"files": [slice_file], "tokenizer_dir": tokenizer_dir},
            ),
            (
                f"load_dataset+map+group_texts, first {args.slice_mb} MB",
                "datasets",
                {
                    "files": [slice_file],
                    "tokenizer_dir": tokenizer_dir,
                    "cache": str(root / "hf-cache-1"),
                    "tokenise": True,
                },
            ),
            (
                f"load_dataset alone, first {args.load_mb} MB",
                "datasets",
                {
                    "files": [load_file],
                    "tokenizer_dir": tokenizer_dir,
                    "cache": str(root / "hf-cache-2"),
                    "tokenise": False,
                },
            ),
        ]:
            results.append((name, run_measure(measure, **kwargs)))
            print(row(*results[-1]), flush=True)
        split = run_measure("split", files=[str(f) for f in split_files], tokenizer_dir=tokenizer_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"\ncorpus {corpus_mb:,.0f} MB in {args.files} files; block {BLOCK_SIZE}, shuffle buffer {SHUFFLE_BUFFER}, "
        f"vocab {VOCAB_SIZE}"
    )
    print(
        f"{'measure':<46} {'read MB':>8} {'MB/s':>7} {'tok MB':>7} {'tok MB/s':>6} {'blocks/s':>7} {'s':>6} "
        f"{'CPU s':>6} {'RSS0':>6} {'peak':>6}  RSS MB at 20..100% of the run"
    )
    for name, result in results:
        print(row(name, result))
    print("\nRSS0: resident MB after imports and tokenizer load, before the measured work; peak: high-water mark.")
    stream, in_memory, mapped = (results[i][1] for i in (2, 3, 4))

    def speed(of: dict, against: dict) -> str:
        """Same bytes, so the speed ratio is the inverse time ratio: wall clock, and CPU time (steadier on a shared
        machine)."""
        return f"{against['seconds'] / of['seconds']:.2f}x (CPU {against['cpu_seconds'] / of['cpu_seconds']:.2f}x)"

    print(
        f"tokenise + pack, first {args.slice_mb} MB, same run: the stream at {speed(stream, in_memory)} the speed of "
        f"the in-memory path, {speed(stream, mapped)} that of load_dataset+map+group_texts"
    )
    print(split_report(split))


if __name__ == "__main__":
    main()
