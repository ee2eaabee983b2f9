"""The demo's stage effects over several seeds, through the product's own sweep: every checkpoint's eval metrics and
each stage's change over its input stage, as mean ± sample std over the seeds, so what a stage does is read against
how much runs differ.

A copy of the spec is written beside it (so its relative data paths read the same files) with `sweep: {seeds: [...]}`
(every training stage's `train.seed` set to each seed: the initial weights, the data order, dropout, GRPO's sampling;
and its `mix.seed` where it samples its sources) and, with --precision, every training stage's `train.precision`.
`lifecycle run` runs it in the home --out/home, its branches `--concurrency` at a time; what this script prints is
what `lifecycle report` prints for it (tasks/sweeps.py says how each figure is made), with the machine, the wall time
and each stage's precision as its runs recorded it.

    .venv/bin/python -m bench.seeds                                           # toy.yaml, seeds 0 1 2
    .venv/bin/python -m bench.seeds --spec examples/quick.yaml --seeds 0 1    # a few minutes
    .venv/bin/python -m bench.seeds --precision fp32 --out /tmp/seeds-fp32

--out keeps the home and `lifecycle.log`, and gets `seeds.md` (the report as Markdown tables, with the machine);
default: a new temporary folder. Run again with the same --out, finished stages are reused (a resume): the wall time
is then not the run's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench.threads import cpu_model
from schemas.load import load_spec
from schemas.sweep import branches
from stages.common.training import cpu_has_bf16
from tasks.home import Home
from tasks.lineage import client, experiment_id, finished_run
from tasks.plan import plan
from tasks.sweeps import SweepReport, report

ROOT = Path(__file__).resolve().parent.parent


def seeded_copy(spec_path: Path, seeds: list[int], concurrency: str, precision: str | None) -> Path:
    """The spec with a sweep over the seeds alone (and the precision), beside it."""
    raw = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    if raw.get("sweep"):
        raise SystemExit(f"{spec_path} sweeps already: `lifecycle run` and `lifecycle report` it as it is")
    raw["sweep"] = {"seeds": seeds, "concurrency": int(concurrency) if concurrency.isdigit() else concurrency}
    if precision:
        trained = {stage.name for stage in load_spec(spec_path).training_stages()}
        for stage in raw["stages"]:
            if stage["name"] in trained:
                stage.setdefault("train", {})["precision"] = precision
    copy = spec_path.parent / f".{spec_path.stem}-seeds.yaml"
    copy.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return copy


def lifecycle(*args: str, home: Path, log) -> int:
    # the --out home alone: a tracking store or Prefect server named in this environment would mix runs in
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_HOME", "PREFECT_API_URL")}
    command = [sys.executable, "-m", "flows.cli", *args]
    return subprocess.run(
        command, stdout=log, stderr=subprocess.STDOUT, env=env | {"LIFECYCLE_HOME": str(home)}
    ).returncode


def precisions(home: Path, spec_path: Path) -> dict[str, set[str]]:
    """Each training stage's precision over the branches, as its runs recorded what `precision` chose."""
    spec, store = load_spec(spec_path), Home(home)
    mlflow = client(store)
    experiment = experiment_id(mlflow, store, spec.name, create=False)
    chosen: dict[str, set[str]] = {}
    for branch in branches(spec):
        for stage in plan(branch.spec):
            run = finished_run(mlflow, experiment, stage)
            if run is not None and "lifecycle.precision" in run.data.tags:
                chosen.setdefault(stage.name, set()).add(run.data.tags["lifecycle.precision"])
    return chosen


def markdown(found: SweepReport) -> str:
    def table(columns: list[str], rows: list[list[str]]) -> str:
        lines = ["| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])

    (point,) = found.points
    levels = [[stage, *(row[m].cell(point.seeds) for m in found.metrics)] for stage, row in point.levels.items()]
    changes = [
        [f"{stage} − {found.inputs[stage]}", *(row[m].cell(point.seeds, change=True) for m in found.metrics)]
        for stage, row in point.changes.items()
    ]
    return (
        f"Each checkpoint, mean ± sample std over {point.seeds} seeds:\n\n"
        f"{table(['checkpoint', *found.metrics], levels)}\n\n"
        "Each stage's change over its input stage, mean ± sample std of the per-seed differences; * where the 95 % "
        "t-interval of the mean leaves out 0 (from 3 seeds on):\n\n"
        f"{table(['stage − input', *found.metrics], changes)}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=ROOT / "examples" / "toy.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="at least 2 (3 for a verdict)")
    parser.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], help="every training stage's; default: the spec's"
    )
    parser.add_argument("--concurrency", default="auto", help="branches at a time (the sweep's concurrency)")
    parser.add_argument("--out", type=Path, help="the home, the log and seeds.md; default: a new temporary folder")
    args = parser.parse_args()
    seeds = list(dict.fromkeys(args.seeds))
    if len(seeds) < 2:
        parser.error("give at least 2 distinct seeds: a spread needs them")
    out = (args.out or Path(tempfile.mkdtemp(prefix="lifecycle-seeds-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    home = out / "home"
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    machine = (
        f"commit {commit.stdout.strip() or 'unknown'}; {cpu_model()}, {len(os.sched_getaffinity(0))} cores, "
        f"native bf16 on the CPU: {cpu_has_bf16()}, GPU: {gpu}; "
        f"torch {torch.__version__}"
    )
    copy = seeded_copy(args.spec.resolve(), seeds, args.concurrency, args.precision)
    try:
        print(f"{args.spec}, seeds {seeds}, branches {args.concurrency} at a time; {machine}; out: {out}", flush=True)
        resumed = (home / "mlflow.db").exists()
        with open(out / "lifecycle.log", "w") as log:
            load, started = os.getloadavg(), time.perf_counter()
            code = lifecycle("run", str(copy), home=home, log=log)
            wall, load_end = time.perf_counter() - started, os.getloadavg()
            lifecycle("stop", home=home, log=log)
        if code != 0:
            raise SystemExit(f"lifecycle run {copy} failed (exit {code}); see {out / 'lifecycle.log'}")
        spec = load_spec(copy)
        store = Home(home)
        mlflow = client(store)
        found = report(mlflow, experiment_id(mlflow, store, spec.name, create=False), spec, branches(spec))
        chosen = ", ".join(f"{stage} {'/'.join(sorted(p))}" for stage, p in precisions(home, copy).items())
    finally:
        copy.unlink()
    said = (
        f"`{args.spec}`, seeds {', '.join(map(str, seeds))} (`sweep: {{seeds: {seeds}}}`), "
        f"{args.concurrency} branches at a time; {machine}; wall {wall:.0f} s{' (a resume)' * resumed}, "
        "load average 1/5/15 min "
        f"{'/'.join(f'{x:.1f}' for x in load)} at the start, {'/'.join(f'{x:.1f}' for x in load_end)} at the end; "
        f"precision: {chosen}.\n\n{markdown(found)}"
    )
    (out / "seeds.md").write_text(said)
    print(said)


if __name__ == "__main__":
    main()
