"""Reading each container: rows/s of `read_file` against `datasets.load_dataset` on the same file, and the peak
resident memory of streaming `read_rows` over GB-sized files.

1. speed: the same seeded SFT rows (alpaca: instruction, input, output) written as jsonl, a JSON array, parquet,
   csv, arrow (IPC stream, as `datasets` saves) and jsonl.gz; each file read by `schemas.data.read_file(path,
   "conversations")` (read + flatten + pandera validation; by columns where schemas/columnar.py applies), by
   read_file row by row as before that path ("row path"), and by `datasets.load_dataset(builder,
   data_files=path, split="train", cache_dir=<a fresh folder>)` (read + convert + write its Arrow cache), each in
   a process of its own, timed from after the imports;
2. memory: `read_rows` streamed over a --big-gb JSON array, parquet file and jsonl file of the same rows, each in a
   process of its own: the peak RSS (the kernel's high-water mark, VmHWM) beside the RSS after the imports.

    python -m bench.readers                              # 200,000 rows, 1 GB files; figures to bench/RESULTS.md
    python -m bench.readers --rows 20000 --big-gb 0.05   # a quick trial
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.streaming import high_water_mark, run_measure, sentence_pool
from bench.threads import cpu_model

MB = 1 << 20
READERS = "bench.readers"
BATCH = 10_000  # rows per parquet row group and per arrow batch written
SPEED = {  # file name: the datasets builder that reads it
    "rows.jsonl": "json",
    "rows.json": "json",
    "rows.parquet": "parquet",
    "rows.csv": "csv",
    "rows.arrow": "arrow",
    "rows.jsonl.gz": "json",
}
BIG = ("big.jsonl", "big.json", "big.parquet")


# ---- the rows and their files ----------------------------------------------------------------


def generated(count: int, seed: int) -> Iterator[dict]:
    """`count` alpaca rows: an instruction of 1-3 sentences, an input (empty a third of the time), an output of 2-12."""
    rng = random.Random(seed)
    sentences = sentence_pool(rng, 20_000)
    for _ in range(count):
        yield {
            "instruction": " ".join(rng.choices(sentences, k=rng.randint(1, 3))),
            "input": "" if rng.random() < 1 / 3 else " ".join(rng.choices(sentences, k=rng.randint(1, 4))),
            "output": " ".join(rng.choices(sentences, k=rng.randint(2, 12))),
        }


def batches(rows: Iterator[dict]) -> Iterator[list[dict]]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def write(path: Path, rows: Iterator[dict]) -> None:
    """The rows in the container `path`'s suffix names, written a batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        with gzip.open(path, "wt", encoding="utf-8") if name.endswith(".gz") else open(path, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif name.endswith(".json"):
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("[")
            for i, row in enumerate(rows):
                handle.write(("\n  " if i == 0 else ",\n  ") + json.dumps(row, ensure_ascii=False))
            handle.write("\n]\n")
    elif name.endswith(".csv"):
        with open(path, "w", encoding="utf-8", newline="") as handle:
            out = csv.DictWriter(handle, ["instruction", "input", "output"])
            out.writeheader()
            out.writerows(rows)
    else:
        schema = pa.schema([(key, pa.string()) for key in ("instruction", "input", "output")])
        opened = pq.ParquetWriter if name.endswith(".parquet") else pa.ipc.new_stream
        with opened(str(path), schema) as writer:
            for batch in batches(rows):
                writer.write_table(pa.Table.from_pylist(batch, schema))


# ---- one measurement, in its own process ------------------------------------------------------


def measure_ours(path: str) -> dict:
    from schemas.data import read_file

    start = time.perf_counter()
    rows = len(read_file(Path(path), "conversations").frame)
    return {"rows": rows, "seconds": time.perf_counter() - start}


def measure_rows(path: str) -> dict:
    """read_file as it read before schemas/columnar.py: every file row by row (the columnar path declining)."""
    import schemas.data

    schemas.data.canonical = lambda *args: None
    return measure_ours(path)


def measure_datasets(path: str, builder: str, cache: str) -> dict:
    import datasets

    datasets.disable_progress_bars()
    start = time.perf_counter()
    rows = len(datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache))
    return {"rows": rows, "seconds": time.perf_counter() - start}


def measure_stream(path: str) -> dict:
    from schemas.readers import read_rows

    before = high_water_mark()
    start = time.perf_counter()
    rows = sum(1 for _ in read_rows(Path(path)))
    return {
        "rows": rows,
        "seconds": time.perf_counter() - start,
        "rss0_mb": before / MB,
        "peak_mb": high_water_mark() / MB,
    }


MEASURES = {"ours": measure_ours, "rows": measure_rows, "datasets": measure_datasets, "stream": measure_stream}


# ---- the run ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="rows of each file of the speed comparison")
    parser.add_argument("--big-gb", type=float, default=1.0, help="size of each file of the memory comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", nargs=2, metavar=("NAME", "JSON_ARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        name, kwargs = args.measure
        print(json.dumps(MEASURES[name](**json.loads(kwargs))))
        return

    root = Path(tempfile.mkdtemp(prefix="lifecycle-readers-bench-"))
    need = 3.5 * args.big_gb * 1024 * MB  # three big files, written one beside the others
    if shutil.disk_usage(root).free < need * 1.2:
        sys.exit(
            f"{root}: {shutil.disk_usage(root).free / MB:,.0f} MB free, the benchmark needs {need * 1.2 / MB:,.0f}"
        )
    print(f"CPU: {cpu_model()}; {args.rows:,} rows; {root}", flush=True)
    try:
        print(
            f"{'file':<16} {'MB':>7} {'read_file rows/s':>17} {'row path rows/s':>16} {'load_dataset rows/s':>20} "
            f"{'ratio':>6}",
            flush=True,
        )
        for name, builder in SPEED.items():
            path = root / name
            write(path, generated(args.rows, args.seed))
            ours, rows = run_measure("ours", READERS, path=str(path)), run_measure("rows", READERS, path=str(path))
            theirs = run_measure(
                "datasets", READERS, path=str(path), builder=builder, cache=str(root / f"cache-{name}")
            )
            assert ours["rows"] == rows["rows"] == theirs["rows"] == args.rows, (ours, rows, theirs)
            ours_speed, rows_speed, theirs_speed = (args.rows / m["seconds"] for m in (ours, rows, theirs))
            print(
                f"{name:<16} {path.stat().st_size / MB:>7.1f} {ours_speed:>17,.0f} {rows_speed:>16,.0f} "
                f"{theirs_speed:>20,.0f} {ours_speed / theirs_speed:>5.2f}x",
                flush=True,
            )
            shutil.rmtree(root / f"cache-{name}", ignore_errors=True)
            path.unlink()

        sample = sum(len(json.dumps(row, ensure_ascii=False).encode()) + 1 for row in generated(2000, args.seed))
        per_row = sample / 2000
        big_rows = int(args.big_gb * 1024 * MB / per_row)
        print(f"\nstreaming read_rows over {big_rows:,} rows (~{args.big_gb:g} GB of jsonl)", flush=True)
        print(f"{'file':<12} {'MB':>7} {'rows/s':>10} {'RSS0 MB':>8} {'peak MB':>8} {'peak - RSS0':>12}", flush=True)
        for name in BIG:
            path = root / name
            write(path, generated(big_rows, args.seed))
            result = run_measure("stream", READERS, path=str(path))
            assert result["rows"] == big_rows, result
            print(
                f"{name:<12} {path.stat().st_size / MB:>7.0f} {big_rows / result['seconds']:>10,.0f} "
                f"{result['rss0_mb']:>8.0f} {result['peak_mb']:>8.0f} {result['peak_mb'] - result['rss0_mb']:>12.0f}",
                flush=True,
            )
            path.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
