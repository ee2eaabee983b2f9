"""Checkpoints to and from the store: a tracking server with proxied artifacts against the local store, and what
mirroring an in-stage checkpoint costs per save.

A real `mlflow server --serve-artifacts` on 127.0.0.1 (sqlite behind it, artifacts in a folder of its own, one worker,
job execution off: as tests/test_tracking_server.py starts it) and the home's own store (sqlite and a file:// artifact
folder) move the same folders:

- a checkpoint as a stage logs it: a ~100 MB model.safetensors (fp32 tensors) with its config and tokenizer files,
  up with `log_artifacts` and down with `download_artifacts`, as `finish_stage_run` and `fetch_checkpoint` move it;
- an in-stage checkpoint of the demo's model (3.5M parameters: the weights, AdamW's two moments, the scheduler, RNG
  and trainer state) mirrored with `tasks.mirror.upload`, as each save does with LIFECYCLE_MIRROR_CHECKPOINTS=1, and
  fetched back with `tasks.mirror.fetch`, as a takeover on another machine does.

Each figure is the median of --repeats. Through the server on one machine the bytes cross the loopback twice and
the server's Python process copies them: a lower bound on what a real network adds, not a network measurement.

    python -m bench.transfer
    python -m bench.transfer --size-mb 400 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow import MlflowClient


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{os.cpu_count()} cores"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def tracking_server(folder: Path, timeout: float = 180, admin_password: str | None = None) -> Iterator[str]:
    """A real `mlflow server` on a free 127.0.0.1 port: sqlite behind it, artifacts proxied (served over HTTP from a
    folder no client is told of), one worker, job execution off; its URL while the block runs, stopped after.

    With `admin_password`, MLflow's basic-auth app guards it as a team's server is guarded (deployments/compose.yaml):
    no permission for anyone by default, the user `admin` with that password."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--serve-artifacts"]
    command += ["--artifacts-destination", str(folder / "artifacts")]
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if admin_password is not None:
        config = folder / "basic_auth.ini"
        config.write_text(
            "[mlflow]\ndefault_permission = NO_PERMISSIONS\nadmin_username = admin\n"
            f"database_uri = sqlite:///{folder / 'auth.db'}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        command += ["--app-name", "basic-auth"]
        env |= {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password}
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(32)  # signs the UI's CSRF tokens
    with open(folder / "server.log", "w") as log:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer: {(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def model_folder(folder: Path, megabytes: int) -> Path:
    """A checkpoint as a stage logs it: fp32 tensors in one model.safetensors, and the small files beside it."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = megabytes * 2**20 // (4 * 1024 * 8)
    save_file(
        {f"layers.{i}.weight": rng.standard_normal((rows, 1024), dtype=np.float32) for i in range(8)},
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 1024}))
    (folder / "tokenizer.json").write_bytes(rng.bytes(400_000))
    (folder / "generation_config.json").write_text("{}")
    return folder


def in_stage_checkpoint(folder: Path, parameters: int = 3_500_000) -> Path:
    """An in-stage checkpoint of a model of `parameters` fp32 weights, as the Trainer saves one with AdamW."""
    rng = os.urandom
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(rng(4 * parameters))
    (folder / "optimizer.pt").write_bytes(rng(8 * parameters))  # exp_avg and exp_avg_sq
    (folder / "scheduler.pt").write_bytes(rng(1_500))
    (folder / "rng_state.pth").write_bytes(rng(15_000))
    (folder / "training_args.bin").write_bytes(rng(6_000))
    (folder / "config.json").write_text("{}")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": int(folder.name.split("-")[1])}))
    return folder


def size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def timed(action, *args) -> float:
    started = time.perf_counter()
    action(*args)
    return time.perf_counter() - started


def checkpoint_transfers(mlflow: MlflowClient, experiment: str, folder: Path, scratch: Path, repeats: int):
    """Median seconds up (log_artifacts) and down (download_artifacts into an empty folder) of `folder`."""
    ups, downs = [], []
    for i in range(repeats):
        run_id = mlflow.create_run(experiment).info.run_id
        ups.append(timed(mlflow.log_artifacts, run_id, str(folder), "checkpoint"))
        target = scratch / f"down-{i}"
        target.mkdir()
        downs.append(timed(mlflow.download_artifacts, run_id, "checkpoint", str(target)))
        shutil.rmtree(target)
    return statistics.median(ups), statistics.median(downs)


def mirror_transfers(mlflow: MlflowClient, experiment: str, scratch: Path, repeats: int):
    """Median seconds of one save's mirror (`tasks.mirror.upload`, the run's previous mirror deleted after it, as at
    every save but the first) and of a takeover's fetch (`tasks.mirror.fetch`); and the checkpoint's size."""
    from tasks import mirror

    run_id = mlflow.create_run(experiment).info.run_id
    mirror.upload(mlflow, run_id, in_stage_checkpoint(scratch / "trainer" / "checkpoint-0"))
    ups, downs = [], []
    for i in range(1, repeats + 1):
        saved = in_stage_checkpoint(scratch / "trainer" / f"checkpoint-{i}")
        ups.append(timed(mirror.upload, mlflow, run_id, saved))
        back = scratch / f"takeover-{i}"
        downs.append(timed(mirror.fetch, mlflow, [mlflow.get_run(run_id)], back))
        shutil.rmtree(back)
    return statistics.median(ups), statistics.median(downs), size_mb(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=100, help="model.safetensors of the logged checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = model_folder(root / "checkpoint", args.size_mb)
        total = size_mb(folder)
        (root / "server").mkdir()
        figures = {}
        with tracking_server(root / "server") as url:
            stores = {
                "server (proxied artifacts)": (MlflowClient(url), None),
                "local (sqlite, file://)": (
                    MlflowClient(f"sqlite:///{root / 'mlflow.db'}"),
                    (root / "artifacts").as_uri(),
                ),
            }
            for label, (mlflow, location) in stores.items():
                experiment = mlflow.create_experiment(f"bench-{label.split()[0]}", artifact_location=location)
                scratch = root / f"scratch-{label.split()[0]}"
                scratch.mkdir()
                figures[label] = (
                    *checkpoint_transfers(mlflow, experiment, folder, scratch, args.repeats),
                    *mirror_transfers(mlflow, experiment, scratch, args.repeats),
                )
    (server, local), mirrored = figures.values(), next(iter(figures.values()))[4]
    print(f"machine: {cpu_model()}; mlflow server on 127.0.0.1, 1 worker; median of {args.repeats}")
    print(f"\nlogged checkpoint, {total:.0f} MB ({folder.name}: model.safetensors and 3 small files)")
    print(f"{'store':<28} {'up MB/s':>9} {'up s':>7} {'down MB/s':>10} {'down s':>7}")
    for label, (up, down, *_) in figures.items():
        print(f"{label:<28} {total / up:>9.0f} {up:>7.2f} {total / down:>10.0f} {down:>7.2f}")
    print(f"{'local / server':<28} {server[0] / local[0]:>8.1f}x {'':>7} {server[1] / local[1]:>9.1f}x")
    print(f"\nin-stage checkpoint mirrored per save, {mirrored:.0f} MB (3.5M parameters: weights + AdamW + states)")
    print(f"{'store':<28} {'mirror s':>9} {'fetch s':>8}")
    for label, (*_, up, down, _size) in figures.items():
        print(f"{label:<28} {up:>9.2f} {down:>8.2f}")


if __name__ == "__main__":
    main()
