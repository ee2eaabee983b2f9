"""Start-up figures of `lifecycle run`, idle and with two CPU-bound processes beside it, each beside its baseline.

1. a first run in a new home: seconds until the first training log line (the home's Prefect server is started on the
   way), against the same run through Prefect's ephemeral mode (a temporary server per process, Prefect's default);
2. a re-run of a fully finished spec: `lifecycle run` (the home's server already up) against the same flow through
   Prefect's ephemeral mode, which starts a temporary server in every process.

    python -m bench.startup                                  # quick.yaml, finished once in a fresh home first
    python -m bench.startup --spec examples/toy.yaml --home .lifecycle    # a home where the spec has finished
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

EPHEMERAL_RUN = "import sys; from flows.lifecycle import lifecycle; lifecycle(sys.argv[1])"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def env_for(home: Path) -> dict[str, str]:
    env = os.environ | {
        "LIFECYCLE_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "PREFECT_HOME": str(home / "prefect"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PREFECT_API_URL", None)
    return env


@contextmanager
def busy(processes: int):
    """`processes` CPU-bound processes running beside the measurement."""
    hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(processes)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def until_first_step(command: list[str], env: dict[str, str], cwd: Path) -> float:
    """Seconds from the command's start to its first training log line; the command is stopped there."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        for line in process.stdout:
            if "  step " in line and "  loss " in line:  # the first training step's progress line
                return time.perf_counter() - start
        print(
            f"failed ({' '.join(command[-2:])}): ended with code {process.wait()} before any training step", flush=True
        )
        return float("nan")
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # with Prefect's temporary server, if it started one
        process.wait()


def timed(command: list[str], env: dict[str, str]) -> float:
    """Seconds the command took; NaN if it failed (Prefect's ephemeral server can miss its 20 s on a busy machine)."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    if done.returncode != 0:
        print(f"failed ({' '.join(command[-2:])}): {done.stderr.strip().splitlines()[-1][:300]}", flush=True)
        return float("nan")
    return time.perf_counter() - start


def lifecycle(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def first_step(spec: Path) -> tuple[float, float, int]:
    """(ours, Prefect's ephemeral mode, the logging step the time is taken at), each in a new home."""
    steps = next(stage.train.logging_steps for stage in load(spec).stages if hasattr(stage, "train"))
    ours_home, theirs_home = (Path(tempfile.mkdtemp(prefix="lifecycle-startup-")) for _ in range(2))
    try:
        ours = until_first_step(lifecycle("run", str(spec)), env_for(ours_home), ROOT)
    finally:
        subprocess.run(lifecycle("stop"), env=env_for(ours_home), stdout=subprocess.DEVNULL)
    theirs = until_first_step([sys.executable, "-c", EPHEMERAL_RUN, str(spec)], env_for(theirs_home), ROOT)
    return ours, theirs, steps


def load(spec: Path):
    from schemas.load import load_spec

    return load_spec(spec)


def rerun(spec: Path, home: Path) -> tuple[float, float]:
    """(ours with the home's server up, the same flow in Prefect's ephemeral mode), on a home where `spec` finished."""
    env = env_for(home)
    timed(lifecycle("run", str(spec)), env)  # starts the home's server if none is up; not counted
    return timed(lifecycle("run", str(spec)), env), timed([sys.executable, "-c", EPHEMERAL_RUN, str(spec)], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=ROOT / "examples" / "quick.yaml")
    parser.add_argument(
        "--home", type=Path, help="a home where the spec has finished; default: finish it in a fresh one"
    )
    parser.add_argument("--busy", type=int, default=2, help="CPU-bound processes beside the second round (default 2)")
    args = parser.parse_args()
    spec = args.spec.resolve()
    home = args.home.resolve() if args.home else Path(tempfile.mkdtemp(prefix="lifecycle-startup-"))
    if args.home is None:
        timed(lifecycle("run", str(spec)), env_for(home))
    rows = []
    for load_name, hogs in (("idle", 0), (f"{args.busy} busy processes beside", args.busy)):
        with busy(hogs):
            ours_first, theirs_first, steps = first_step(spec)
            ours_rerun, theirs_rerun = rerun(spec, home)
        rows.append((f"first run, s to step {steps} ({load_name})", ours_first, theirs_first))
        rows.append((f"re-run of finished {spec.name}, s ({load_name})", ours_rerun, theirs_rerun))
        print(*rows[-2:], sep="\n", flush=True)
    subprocess.run(lifecycle("stop"), env=env_for(home), stdout=subprocess.DEVNULL)
    print(f"\n{cpu_model()}, {os.cpu_count()} cores; spec {spec.name}")
    print(f"{'measure':<52} {'ours':>8} {'ephemeral':>10}  ratio")
    for name, ours, theirs in rows:
        print(f"{name:<52} {ours:>8.1f} {theirs:>10.1f}  {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
