"""The demo's stage effects over several seeds: every checkpoint's eval metrics, and each stage's change over its
input stage, as mean ± sample std over seeds, so what a stage does is read against how much runs differ.

For each seed s (integers; 0 is the demo as shipped):
- the toy world's data is generated anew with seed SEED + s (`examples/generate.py`; SEED + 0 is the bundled data)
  into `<out>/seed-<s>/data/`;
- a copy of the spec is written beside it, so its relative data paths read that folder, with every training
  stage's `train.seed` set to s (the model's initial weights, the data order, dropout, GRPO's sampling) and, with
  --precision, its `train.precision`;
- `lifecycle run` runs the copy in a process and a home of its own (`<out>/seed-<s>/home`), then its server stops;
- the eval stage's table (what `lifecycle report` prints) is read from that home's MLflow store.

A stage's input is its `from:` or the previous training stage (`PipelineSpec.input_of`); a stage without one
(pretrain: fresh weights, not scored) or whose input the eval stage does not score has no change row. A change is
marked * where its 95 % t-interval over the seeds, mean ± t(n−1)·std/√n, leaves out 0: with 3 seeds that needs
|mean| > 2.5 std, with 5 seeds 1.2 std. With 2 seeds nothing is marked: two seeds that happen to agree (a metric counted
in whole prompts often moves by one prompt on both) would give a zero-width interval. "n=k" in a cell: only k seeds
measured it (nan on the others).

    .venv/bin/python -m bench.seeds                                       # toy.yaml, seeds 0 1 2: about 1 h on 2 cores
    .venv/bin/python -m bench.seeds --spec examples/quick.yaml --seeds 0 1    # a few minutes
    .venv/bin/python -m bench.seeds --precision fp32 --out /tmp/seeds-fp32    # and --precision bf16 where native

--out keeps each seed's data, spec, home and `lifecycle.log`, and writes `seeds.json` (the per-seed tables, the
machine, the aggregate) and `seeds.md` (the same as Markdown tables); default: a new temporary folder. Run again
with the same --out, finished stages are reused (a resume): the wall times are then not the runs'.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from mlflow import MlflowClient

from examples.generate import SEED, generate, render
from flows.cli import format_metrics
from schemas.load import load_spec
from stages.common.training import cpu_has_bf16
from tasks.home import Home
from tasks.lineage import EVAL_ARTIFACTS, experiment_id, finished_run
from tasks.plan import plan
from tasks.sweeps import Spread, Table, changes, inputs_of, spread, table_of

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class SeedRun:
    seed: int
    folder: Path
    spec: Path
    resumed: bool  # the home held runs already: finished stages were reused
    wall_s: float = math.nan
    load: dict[str, list[float]] = field(default_factory=dict)  # 1/5/15-min load average at the start and end
    logged: dict = field(default_factory=dict)  # the eval table as logged
    precision: dict[str, str] = field(default_factory=dict)  # training stage -> "bf16" | "fp32"

    @property
    def home(self) -> Path:
        return self.folder / "home"


def prepare(spec_path: Path, seed: int, precision: str | None, out: Path) -> SeedRun:
    """The seed's data and a copy of the spec that reads it, with the seed (and precision) in every training stage."""
    folder = out / f"seed-{seed}"
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for name, rows in generate(SEED + seed).items():
        (folder / "data" / name).write_text(render(rows), encoding="utf-8")
    trained = {stage.name for stage in load_spec(spec_path).training_stages()}
    raw = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    for stage in raw["stages"]:
        if stage["name"] in trained:
            stage.setdefault("train", {}).update({"seed": seed} | ({"precision": precision} if precision else {}))
    copy = folder / spec_path.name
    copy.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    outside = [str(path) for path, _, _ in load_spec(copy).data_contracts() if (folder / "data") not in path.parents]
    if outside:
        raise SystemExit(
            f"{spec_path}: names data outside the toy world's files (data/<name>.jsonl beside the spec), "
            f"which a seed cannot regenerate: {', '.join(outside)}"
        )
    return SeedRun(seed, folder, copy, resumed=(folder / "home" / "mlflow.db").exists())


def run(seed_run: SeedRun, threads: str | None) -> None:
    """`lifecycle run` on the seed's spec in a process and home of its own, then `lifecycle stop`; output to its log."""
    # the seed's home alone: a tracking store or Prefect server named in this environment would mix the seeds
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_HOME", "PREFECT_API_URL")}
    env |= {"LIFECYCLE_HOME": str(seed_run.home)} | ({"OMP_NUM_THREADS": threads} if threads else {})
    log = seed_run.folder / "lifecycle.log"
    print(f"seed {seed_run.seed}: running {seed_run.spec} (log: {log})", flush=True)
    with open(log, "w") as out:
        seed_run.load["start"] = list(os.getloadavg())
        started = time.perf_counter()
        try:
            code = subprocess.run(
                [sys.executable, "-m", "flows.cli", "run", str(seed_run.spec)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            ).returncode
            seed_run.wall_s = time.perf_counter() - started
            seed_run.load["end"] = list(os.getloadavg())
        finally:
            subprocess.run(
                [sys.executable, "-m", "flows.cli", "stop"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"seed {seed_run.seed}: lifecycle run failed (exit {code}); the end of {log}:\n{tail}")
    print(f"seed {seed_run.seed}: finished in {seed_run.wall_s:.0f} s", flush=True)


def read_results(seed_run: SeedRun) -> None:
    """The eval stage's table (the first eval stage, as `lifecycle report` picks it) and each training stage's
    precision, as its run recorded what `precision` chose (the metric bf16)."""
    spec = load_spec(seed_run.spec)
    home = Home(seed_run.home)
    mlflow = MlflowClient(home.embedded_tracking_uri)
    experiment = experiment_id(mlflow, home, spec.name, create=False)
    trained = {stage.name for stage in spec.training_stages()}
    for stage in plan(spec):
        run = finished_run(mlflow, experiment, stage)
        if stage.kind == "eval" and not seed_run.logged:
            with tempfile.TemporaryDirectory() as folder:
                path = Path(mlflow.download_artifacts(run.info.run_id, f"{EVAL_ARTIFACTS}/metrics.json", folder))
                seed_run.logged = json.loads(path.read_text())
        elif stage.name in trained:
            seed_run.precision[stage.name] = run.data.tags["lifecycle.precision"]
    if not seed_run.logged:
        raise SystemExit(
            f"{seed_run.spec}: the spec has no eval stage; stage effects need one ({{name: eval, kind: eval}})"
        )


def machine(threads: str | None) -> dict:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "unknown CPU"
    )
    # the toy world is whatever examples/generate.py makes at this commit (-dirty: with changes not committed)
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    return {
        "commit": commit or "unknown",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "native_bf16_cpu": cpu_has_bf16(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "threads": int(threads) if threads else torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE (set by lifecycle)"),
    }


def markdown(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def loads(figures: list[float]) -> str:
    return "/".join(f"{x:.1f}" for x in figures)


@dataclass
class Outcome:
    """The seeds' eval tables, and over the seeds every checkpoint's figures and every stage's change over its input."""

    spec: str
    host: dict
    runs: list[SeedRun]
    inputs: dict[str, str | None]
    tables: list[Table] = field(init=False)
    levels: dict[str, dict[str, Spread]] = field(init=False)
    changes: dict[str, dict[str, Spread]] = field(init=False)
    metrics: list[str] = field(init=False)

    def __post_init__(self):
        self.tables = [table_of(seed_run.logged) for seed_run in self.runs]
        self.levels = spread(self.tables)
        self.changes = spread([changes(table, self.inputs) for table in self.tables])
        self.metrics = self.runs[0].logged["columns"][1:]

    def rows(self, change: bool) -> list[list[str]]:
        figures = self.changes if change else self.levels
        return [
            [
                f"{stage} − {self.inputs[stage]}" if change else stage,
                *(row[m].cell(len(self.runs), change) for m in self.metrics),
            ]
            for stage, row in figures.items()
        ]

    def machine_line(self) -> str:
        host = self.host
        return (
            f"commit {host['commit']}; {host['cpu']}, {host['cores']} cores, native bf16 on the CPU: "
            f"{host['native_bf16_cpu']}, "
            f"GPU: {host['gpu'] or 'none'}; torch {host['torch']}, threads per run: {host['threads']}, "
            f"OMP_WAIT_POLICY {host['omp_wait_policy']}"
        )

    def text(self) -> str:
        n = len(self.runs)
        parts = [self.machine_line()]
        for seed_run in self.runs:
            parts.append(
                f"seed {seed_run.seed} (data seed {SEED + seed_run.seed}): {seed_run.wall_s:.0f} s wall"
                + (" (a resume: finished stages reused)" if seed_run.resumed else "")
                + f"; training precision {' and '.join(sorted(set(seed_run.precision.values())))} "
                + f"({', '.join(f'{k} {v}' for k, v in seed_run.precision.items())}); load average 1/5/15 min "
                + f"{loads(seed_run.load['start'])} at the start, {loads(seed_run.load['end'])} at the end\n"
                + format_metrics(seed_run.logged)
            )
        parts.append(
            f"Each checkpoint over {n} seeds: mean ± sample std (eval scores in float32)\n"
            + format_metrics({"columns": ["checkpoint", *self.metrics], "data": self.rows(change=False)})
        )
        parts.append(
            f"Each stage's change over its input stage, per seed, then mean ± sample std over {n} seeds; * the 95 % "
            "t-interval of the mean change leaves out 0"
            + ("" if n >= 3 else " (nothing is marked with fewer than 3 seeds)")
            + "\n"
            + format_metrics({"columns": ["stage − input", *self.metrics], "data": self.rows(change=True)})
        )
        if without := [name for name in self.levels if name not in self.changes]:
            parts[-1] += f"\nno change row (no input stage, or its input is not scored): {', '.join(without)}"
        return "\n\n".join(parts)

    def markdown(self) -> str:
        precisions = " and ".join(sorted({p for seed_run in self.runs for p in seed_run.precision.values()}))
        walls = ", ".join(f"seed {r.seed} {r.wall_s:.0f} s" + (" (a resume)" if r.resumed else "") for r in self.runs)
        return (
            f"`{self.spec}`, seeds {', '.join(str(r.seed) for r in self.runs)} (data seed {SEED} + s, train seed s), "
            "training in "
            f"{precisions}; {self.machine_line()}; wall {walls}.\n\n"
            f"Each checkpoint, mean ± sample std over {len(self.runs)} seeds:\n\n"
            f"{markdown(['checkpoint', *self.metrics], self.rows(change=False))}\n\n"
            "Each stage's change over its input stage, mean ± sample std of the per-seed differences; "
            "* where the 95 % t-interval of the mean leaves out 0 (from 3 seeds on):\n\n"
            f"{markdown(['stage − input', *self.metrics], self.rows(change=True))}\n"
        )

    def record(self) -> dict:
        def number(value: float) -> float | None:
            return None if math.isnan(value) else value

        return {
            "spec": self.spec,
            "machine": self.host,
            "inputs": self.inputs,
            "runs": [
                {
                    "seed": r.seed,
                    "data_seed": SEED + r.seed,
                    "wall_s": r.wall_s,
                    "resumed": r.resumed,
                    "load_average": r.load,
                    "precision": r.precision,
                    "table": {k: {m: number(v) for m, v in row.items()} for k, row in table.items()},
                }
                for r, table in zip(self.runs, self.tables)
            ],
            **{
                name: {
                    stage: {
                        m: {"mean": number(f.mean), "std": number(f.std), "n": f.n}
                        | ({"clear": f.clear} if name == "changes" else {})
                        for m, f in row.items()
                    }
                    for stage, row in figures.items()
                }
                for name, figures in (("levels", self.levels), ("changes", self.changes))
            },
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=ROOT / "examples" / "toy.yaml")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help=f"at least 2 (3 for a verdict); data seed {SEED} + s, train seed s",
    )
    parser.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], help="every training stage's; default: the spec's own"
    )
    parser.add_argument(
        "--out", type=Path, help="where each seed's data, spec, home and the tables go; default: a new temp folder"
    )
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once, each with cores / jobs threads")
    args = parser.parse_args()
    # a bar per table read, in the middle of the output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    seeds = list(dict.fromkeys(args.seeds))
    if len(seeds) < 2 or min(seeds) < 0:
        parser.error("give at least 2 distinct seeds, none negative: a spread needs them")
    out = (args.out or Path(tempfile.mkdtemp(prefix="lifecycle-seeds-"))).resolve()
    threads = os.environ.get("OMP_NUM_THREADS") or (
        str(max(1, (os.cpu_count() or 1) // args.jobs)) if args.jobs > 1 else None
    )
    host = machine(threads)
    if args.precision == "bf16" and not (
        host["native_bf16_cpu"] or (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    ):
        print(
            "note: this machine has no native bf16 (no avx512_bf16/amx_bf16, no bf16 GPU): bf16 autocast is emulated "
            "and slow"
        )

    runs = [prepare(args.spec.resolve(), seed, args.precision, out) for seed in seeds]
    print(
        f"{args.spec}, seeds {seeds} (data seeds {[SEED + s for s in seeds]}), precision "
        f"{args.precision or 'as the spec says'}, "
        f"{args.jobs} at a time; out: {out}",
        flush=True,
    )
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda seed_run: run(seed_run, threads), runs))
    for seed_run in runs:
        read_results(seed_run)

    outcome = Outcome(str(args.spec), host, runs, inputs_of(load_spec(runs[0].spec)))
    print("\n" + outcome.text())
    (out / "seeds.json").write_text(json.dumps(outcome.record(), indent=2) + "\n")
    (out / "seeds.md").write_text(outcome.markdown())
    print(f"\nper-seed tables and the aggregate: {out / 'seeds.json'}, {out / 'seeds.md'}")


if __name__ == "__main__":
    main()
