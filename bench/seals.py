"""What checking a checkpoint before it loads costs (tasks/seals.py), beside what fetching it costs anyway.

A checkpoint folder as a stage logs it (`bench.transfer.model_folder`: one fp32 model.safetensors of --size-mb with
its config and tokenizer files) is logged to the home's own store (sqlite and a file:// artifact folder) and fetched
into a cache three ways, in the same process, each --repeats times:

- copy: the folder copied file by file (what a fetch from the local store did before, and the floor of a download);
- link: the fetch as it is now from a local store, every file hard-linked into the cache;
- digest: `checkpoint_digest`, the full-content sha256 every fetch and every cache read now checks.

The figure that matters is digest against copy: the check a load pays on top of the transfer it does anyway.
Each figure is the median of the repeats; the files are read from the page cache after the first repeat, as a
checkpoint a stage has just written or fetched is.

    python -m bench.seals
    python -m bench.seals --size-mb 1000 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.transfer import cpu_model, model_folder
from tasks.registry import _linked
from tasks.seals import checkpoint_digest


def timed(work, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folder = model_folder(root / "model", args.size_mb)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6

        def fresh(name: str) -> Path:
            target = root / name
            shutil.rmtree(target, ignore_errors=True)
            return target

        copy = timed(lambda: shutil.copytree(folder, fresh("copied")), args.repeats)
        link = timed(lambda: _linked(folder, fresh("linked")), args.repeats)
        digest = timed(lambda: checkpoint_digest(folder), args.repeats)
    print(f"machine: {cpu_model()}; a {size:.0f} MB checkpoint folder, median of {args.repeats}")
    print(f"  copy into the cache    {copy:7.3f} s  {size / copy:8.0f} MB/s  (baseline)")
    print(f"  link into the cache    {link:7.3f} s  {size / link:8.0f} MB/s  {link / copy:.2f}x the copy")
    print(f"  full-content digest    {digest:7.3f} s  {size / digest:8.0f} MB/s  {digest / copy:.2f}x the copy")
    print(f"  load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
