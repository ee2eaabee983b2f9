"""A stage with `launch`: its ranks run under torchrun, rank 0 records, the flow waits.

The flow writes the stage's plan (its spec, its input folders, the MLflow run id) into the
stage's work folder and starts `torchrun` on `python -m tasks.torchrun worker`. Every rank
receives the plan from rank 0 over the process group (so ranks on other machines, started by
`lifecycle join`, need nothing but the rendezvous address and a home on a shared filesystem),
loads the same prepared data and runs the stage's own `run`; the HF Trainer does DDP or
DeepSpeed. Rank 0 alone logs per-step metrics to the stage's run and saves the checkpoint;
it writes the stage's result where the flow reads it. A rank that fails writes its error
first, and the flow raises the earliest one.

Nothing outlives the flow: torchrun and every rank die with their parent (Linux's
parent-death signal), so a kill -9 of `lifecycle run` leaves no rank holding a port or memory;
the next run resumes the stage from its last complete in-stage checkpoint.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from schemas.errors import LifecycleError
from schemas.launch import Launch
from schemas.spec import ModelInit, TrainingStage
from stages.common.contract import StageInputs, StageResult
from stages.common.progress import quiet_libraries

PLAN, RESULT, ERRORS = "plan.json", "result.json", "errors"
PARENT_PID = "LIFECYCLE_LAUNCHER_PID"  # the process a launched one must die with


class LaunchError(LifecycleError):
    """A rank of a launched stage failed; the message is that rank's error."""


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the one that started it dies (Linux), and exit if it already has."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    expected = os.environ.get(PARENT_PID)
    if expected is not None and os.getppid() != int(expected):
        raise LaunchError(f"the process that started this one ({expected}) is gone (its parent is now {os.getppid()})")


def torchrun(launch: Launch, node_rank: int, worker_args: list[str], log_dir: Path | None = None) -> list[str]:
    """The command line of one node's torchrun: standalone on one node, else the static rendezvous at `master`."""
    if launch.nodes == 1:
        where = ["--standalone"]  # a free port of its own: concurrent stages never collide
    else:
        host, port = launch.master.rsplit(":", 1)
        where = [
            f"--nnodes={launch.nodes}",
            f"--node-rank={node_rank}",
            f"--master-addr={host}",
            f"--master-port={port}",
        ]
    # each rank's output to the console and a file
    logs = ["--log-dir", str(log_dir), "--tee", "3"] if log_dir is not None else []
    return [
        sys.executable,
        "-m",
        "tasks.torchrun",
        "torchrun",
        *where,
        f"--nproc-per-node={launch.processes}",
        *logs,
        "-m",
        "tasks.torchrun",
        "worker",
        *worker_args,
    ]


def environment(launch: Launch) -> dict[str, str]:
    import torch

    env = os.environ | {PARENT_PID: str(os.getpid())}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPU: gloo, no CUDA
    # the node's cores shared among its ranks, unless the user chose
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.processes)))
    return env


def run_launched(command: list[str], env: dict[str, str], folder: Path | None, what: str) -> None:
    """Run one node's torchrun to the end; on failure raise the earliest rank error written in `folder` (node 0's).

    Ctrl-C or any error here stops torchrun (it stops its ranks), then kills what is left."""
    process = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        code = process.wait()
    except BaseException:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        raise
    if code != 0:
        errors = (
            [] if folder is None else sorted((folder / ERRORS).glob("rank-*.json"), key=lambda p: p.stat().st_mtime)
        )
        if not errors:
            tails = (
                [
                    f"{log.parent.name}: " + " | ".join(log.read_text(errors="replace").strip().splitlines()[-5:])
                    for log in sorted(folder.glob("logs/**/stderr.log"))
                    if log.stat().st_size
                ]
                if folder is not None
                else []
            )
            raise LaunchError(
                f"{what}: torchrun exited with status {code} before any rank reported an error"
                + (f"; the ranks' last words: {'; '.join(tails)}" if tails else " (see its output above)")
            )
        first = json.loads(errors[0].read_text())
        raise LaunchError(
            f"{what}: rank {first['rank']} of {first['world_size']} failed first: {first['error']}"
            + (f" ({len(errors) - 1} more rank(s) failed after it)" if len(errors) > 1 else "")
        )


def launch_stage(
    spec: TrainingStage, inputs: StageInputs, datasets_dir: Path, workdir: Path, home_root: Path, run_id: str
) -> StageResult:
    """Run a stage under torchrun from the flow's process (node 0), wait, and return rank 0's result."""
    folder = workdir / "launch"
    for stale in (folder / RESULT, *(folder / ERRORS).glob("*")):
        stale.unlink(missing_ok=True)
    shutil.rmtree(folder / "logs", ignore_errors=True)
    (folder / ERRORS).mkdir(parents=True, exist_ok=True)
    plan = {
        "stage": spec.model_dump(mode="json", by_alias=True),
        "model": inputs.model.model_dump(mode="json") if isinstance(inputs.model, ModelInit) else str(inputs.model),
        "tokenizer": str(inputs.tokenizer),
        "datasets": str(datasets_dir),
        "reference": str(inputs.reference) if inputs.reference else None,
        "stage_models": {name: str(path) for name, path in inputs.stage_models.items()},
        "workdir": str(workdir),
        "home": str(home_root),
        "run_id": run_id,
    }
    (folder / PLAN).write_text(json.dumps(plan, indent=2))
    launch = spec.launch
    run_launched(
        torchrun(launch, 0, [str(folder / PLAN)], folder / "logs"), environment(launch), folder, f"stage {spec.name}"
    )
    result = json.loads((folder / RESULT).read_text())
    return StageResult(
        checkpoint=Path(result["checkpoint"]) if result["checkpoint"] else None,
        adapter=Path(result["adapter"]) if result["adapter"] else None,
        metrics=result["metrics"],
        resumed_from_step=result["resumed_from_step"],
        tables=result["tables"],
        tags=result["tags"],
        counts=result["counts"],
    )


def join(launch: Launch, node_rank: int) -> None:
    """One launched stage's ranks on another node: they meet node 0 at `launch.master` and take the plan from it."""
    started = time.time()
    run_launched(torchrun(launch, node_rank, []), environment(launch), None, f"node {node_rank}")
    print(f"node {node_rank}: the stage's ranks here finished after {time.time() - started:.0f} s")


def peak_memory() -> dict[str, float]:
    """This rank's peak resident memory (and GPU memory), in MiB: what ZeRO's sharding saves shows here."""
    import resource

    import torch

    peaks = {"rank_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    if torch.cuda.is_available():
        peaks["rank_peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


def _received_plan(plan_path: str | None) -> dict:
    """Rank 0 reads the plan; every rank gets it over the process group, which the Trainer then uses as it is."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    box = [json.loads(Path(plan_path).read_text()) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def worker(plan_path: str | None) -> None:
    """One rank: run the stage from the plan; rank 0 writes the result, a failing rank its error."""
    quiet_libraries()  # before they load: a rank started by `lifecycle join` did not inherit the flow's settings
    import torch.distributed as dist
    from datasets import load_from_disk
    from pydantic import TypeAdapter

    from schemas.spec import Stage
    from stages import training_stage
    from tasks import lineage
    from tasks.home import Home
    from tasks.step_metrics import recorders

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    folder = Path(plan_path).parent if plan_path else None  # a rank of another node learns it with the plan
    try:
        die_with_parent()
        plan = _received_plan(plan_path)
        folder = Path(plan["workdir"]) / "launch"
        spec = TypeAdapter(Stage).validate_python(plan["stage"])
        model = plan["model"]
        inputs = StageInputs(
            model=ModelInit.model_validate(model) if isinstance(model, dict) else Path(model),
            tokenizer=Path(plan["tokenizer"]),
            datasets=load_from_disk(plan["datasets"]),
            reference=Path(plan["reference"]) if plan["reference"] else None,
            stage_models={name: Path(path) for name, path in plan.get("stage_models", {}).items()},
            # rank 0 alone records: the other ranks (on other nodes too) never open the MLflow store
            callbacks=recorders(lineage.client(Home(Path(plan["home"]))), plan["run_id"]) if rank == 0 else (),
        )
        result = training_stage(spec.kind).run(spec, inputs, Path(plan["workdir"]))
        peaks = [None] * world_size
        dist.all_gather_object(peaks, peak_memory())
        if rank == 0:
            partial = folder / f"{RESULT}.partial"
            partial.write_text(
                json.dumps(
                    {
                        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                        "adapter": str(result.adapter) if result.adapter else None,
                        # the world size is the run's param already (lineage.log_launch)
                        "metrics": result.metrics | {name: max(p[name] for p in peaks) for name in peaks[0]},
                        "resumed_from_step": result.resumed_from_step,
                        "tables": result.tables,
                        "tags": result.tags,
                        "counts": result.counts,
                    }
                )
            )
            partial.rename(folder / RESULT)
        # every rank done before any tears the process group down: a rank leaving early aborted another's exit
        dist.barrier()
    except BaseException as err:
        if folder is None:
            raise
        report = folder / ERRORS / f"rank-{rank}.json"
        error = str(err) if isinstance(err, LifecycleError) else f"{type(err).__name__}: {err} (traceback in {report})"
        report.write_text(
            json.dumps({"rank": rank, "world_size": world_size, "error": error, "traceback": traceback.format_exc()})
        )
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main() -> None:
    """`python -m tasks.torchrun torchrun ARGS` (torchrun, dying with its parent) or `... worker [PLAN]` (one rank)."""
    role, args = sys.argv[1], sys.argv[2:]
    if role == "torchrun":
        from torch.distributed.run import main as torchrun_main

        die_with_parent()
        os.environ[PARENT_PID] = str(os.getpid())  # each rank must die with this torchrun
        torchrun_main(args)
    else:
        worker(args[0] if args else None)


if __name__ == "__main__":
    main()
