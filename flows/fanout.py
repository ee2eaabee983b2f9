"""A sweep's branches run side by side: each a process of its own on this machine, or a flow run of its own on the
work pool's workers when the sweep itself runs from a deployment.

A branch is `lifecycle run SPEC --branch NAME --sweep-run RUN` (the `lifecycle` flow with those parameters), so it is
recorded, resumed and refused exactly as a pipeline is. Branches that reach a stage they share wait for the one that
runs it (flows/lifecycle.py), on this machine as across workers: the claim and the lease say who runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from pathlib import Path
from typing import Literal

from prefect import get_run_logger

from schemas.spec import PipelineSpec
from schemas.sweep import Branch
from stages.common.progress import say

STOP_SECONDS = 60  # how long a branch stopped with the sweep (Ctrl-C, SIGTERM) has to record itself before a kill


def cores() -> int:
    """The cores this process may run on (a container's or a job's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def from_deployment() -> bool:
    """This flow run came from a deployment: its pool's workers can run the branches."""
    from prefect.runtime import deployment

    return deployment.id is not None


def concurrency(setting: int | Literal["auto"], branches: int) -> int:
    """How many branches run at a time: the spec's number; auto: every branch on a pool, one per core on a machine
    without a GPU, one at a time on a machine with one (the branches would share it)."""
    if setting != "auto":
        return min(setting, branches)
    if from_deployment():
        return branches
    import torch

    return 1 if torch.cuda.is_available() else max(1, min(branches, cores()))


def run_branches(spec: PipelineSpec, spec_path: Path, branched: list[Branch], sweep_run: str, at_once: int) -> dict:
    """Run every branch, `at_once` at a time; the branches that failed, each with its last word."""
    logger = get_run_logger()
    if from_deployment():
        logger.info(
            "sweep %s: %d branches as flow runs of this deployment, %d at a time", spec.name, len(branched), at_once
        )
        run = _on_pool
    else:
        threads = max(1, cores() // at_once)
        logger.info(
            "sweep %s: %d branches, %d at a time, each a process of %d thread%s",
            spec.name,
            len(branched),
            at_once,
            threads,
            "s" * (threads > 1),
        )
        run = _Processes(threads)
    pool = ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="branch")
    try:
        # each thread sees this flow run (a branch's flow run is its child)
        outcomes = list(pool.map(lambda b: copy_context().run(run, spec_path, b, sweep_run), branched))
    except BaseException:  # the sweep is stopped: so are its branches, before this process goes
        pool.shutdown(wait=False, cancel_futures=True)
        if isinstance(run, _Processes):
            run.stop()
        raise
    pool.shutdown()
    failed = {branch.name: why for branch, why in zip(branched, outcomes) if why is not None}
    for name, why in failed.items():
        logger.error("sweep %s: branch %s failed: %s", spec.name, name, why)
    return failed


def _on_pool(spec_path: Path, branch: Branch, sweep_run: str) -> str | None:
    """The branch as a flow run of this flow run's deployment, waited for; why it failed, None when it finished."""
    from prefect.deployments import run_deployment
    from prefect.runtime import deployment, flow_run

    finished = run_deployment(
        f"{flow_run.flow_name}/{deployment.name}",
        parameters={"spec_path": str(spec_path), "checked": True, "branch": branch.name, "sweep_run": sweep_run},
        flow_run_name=f"{flow_run.name} [{branch.name}]",
        idempotency_key=f"{sweep_run} {branch.name}",  # a retried sweep does not queue a branch twice
        as_subflow=True,
    )
    state = finished.state
    return (
        None if state is not None and state.is_completed() else f"flow run {finished.name}: {state and state.message}"
    )


class _Processes:
    """Runs one branch as `lifecycle run SPEC --branch NAME` in a process of `threads` threads, its lines printed here
    with the branch's name before each. `stop` (the sweep stopped: Ctrl-C, SIGTERM) stops every branch still running,
    each recording where it stopped."""

    def __init__(self, threads: int):
        from prefect.settings import PREFECT_API_URL

        self.env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value()}
        self.env.setdefault("OMP_NUM_THREADS", str(threads))  # torch's threads per process; a user's own stands
        self.printing = threading.Lock()  # one branch's line at a time; also guards `running` and `stopped`
        self.running: set[subprocess.Popen] = set()
        self.stopped = False

    def __call__(self, spec_path: Path, branch: Branch, sweep_run: str) -> str | None:
        command = [sys.executable, "-m", "flows.cli", "run", str(spec_path), "--branch", branch.name]
        with self.printing:
            if self.stopped:  # the sweep stopped while this branch waited for its turn
                return "not started: the sweep was stopped"
            process = subprocess.Popen(
                [*command, "--sweep-run", sweep_run],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            self.running.add(process)
        last = ""
        try:
            for line in process.stdout:
                if line.strip():
                    last = line.strip()
                    with self.printing:
                        say(f"[{branch.name}] {line.rstrip()}")
            process.wait()
        finally:
            _stop(process)
            with self.printing:
                self.running.discard(process)
        return None if process.returncode == 0 else last.removeprefix("error: ") or f"exit code {process.returncode}"

    def stop(self) -> None:
        with self.printing:
            self.stopped = True
            running = list(self.running)
        for process in running:
            _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """A branch process still running when its sweep stops: asked to stop (it records where), killed if it does not."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
