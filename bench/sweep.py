"""A sweep's wall time with its branches one at a time against two at a time (flows/fanout.py), on this machine.

examples/sweep.yaml (DPO's beta over two values × three seeds on quick.yaml's world: 6 branches, 15 stage runs) runs
once per --concurrency value, each as `lifecycle run` in a fresh home of its own (nothing reused, no dataset cached),
one after the other in this script. The figure is the ratio of each wall time to the first one's; the first run pays
for nothing the second does not (each home starts its own Prefect server, each process loads the same libraries).
With concurrency 1 the branches run in the flow's process, each with every core; with k > 1 each branch is a process
of cores / k threads, and a branch that reaches a stage another one is training (the tokenizer, pretrain, SFT) waits
for it.

    python -m bench.sweep                       # concurrency 1 then 2
    python -m bench.sweep --concurrency 1 2 3 --spec examples/sweep.yaml
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.threads import cpu_model
from schemas.load import load_spec
from tasks.plan import sweep_cost

ROOT = Path(__file__).resolve().parent.parent


def with_concurrency(spec: Path, concurrency: int) -> Path:
    """A copy of the spec beside it with the sweep's concurrency set, its relative data paths still the spec's."""
    text = yaml.safe_load(spec.read_text())
    text["sweep"]["concurrency"] = concurrency
    copy = spec.parent / f".{spec.stem}-concurrency-{concurrency}.yaml"  # beside it: its data paths read the same
    copy.write_text(yaml.safe_dump(text, sort_keys=False))
    return copy


def timed_run(spec: Path, home: Path) -> float:
    env = os.environ | {"LIFECYCLE_HOME": str(home)}
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_HOME"):  # each home its own, as on a new machine
        env.pop(name, None)
    started = time.perf_counter()
    with open(home.parent / f"{home.name}.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(spec)], env=env, stdout=log, stderr=log)
    seconds = time.perf_counter() - started
    subprocess.run([sys.executable, "-m", "flows.cli", "stop"], env=env, capture_output=True)
    if done.returncode != 0:
        raise SystemExit(f"{spec} failed (exit {done.returncode}); see {home.parent / f'{home.name}.log'}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "examples" / "sweep.yaml")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, help="keeps each run's home and log; default: a temporary folder")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    out.mkdir(parents=True, exist_ok=True)
    cost = sweep_cost(load_spec(args.spec))
    print(f"CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} cores; {args.spec.name}: {cost.line()}", flush=True)
    seconds = {}
    for concurrency in args.concurrency:
        copy = with_concurrency(args.spec, concurrency)
        try:
            seconds[concurrency] = timed_run(copy, out / f"home-{concurrency}")
        finally:
            copy.unlink()
        first = seconds[args.concurrency[0]]
        print(
            f"concurrency {concurrency}: {seconds[concurrency]:7.1f} s wall, {seconds[concurrency] / first:.2f}x of "
            f"concurrency {args.concurrency[0]}",
            flush=True,
        )


if __name__ == "__main__":
    main()
