"""MLflow as the record of every run: lineage, reuse, checkpoints and stage states.

One parent run per pipeline run, one child run per stage that trains. Run ids are passed
explicitly (MLflow's active run is thread-local, and Prefect may run tasks in threads), so
everything here goes through an `MlflowClient`. A stage's checkpoint is logged once, at the
end, as a logged model of its run (`tasks/registry.py`); the run is marked FINISHED only after
that, so a FINISHED run always has a complete checkpoint to reuse.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from schemas.errors import LifecycleError
from schemas.launch import Launch
from schemas.sources import Source
from stages.common.contract import StageResult
from stages.common.progress import say
from tasks.home import Home, host, lease_seconds, running, started
from tasks.keys import digest, source_digests
from tasks.plan import PlannedStage

TAG = "lifecycle."
# What an experiment holds, as MLflow 3's UI reads it (mlflow/server/js: the `mlflow.experimentKind` tag, whose values
# it writes itself from its experiment-type selector): model training opens on runs, charts and models, not on the
# GenAI view of traces. MLflow 3.17's own UI lets a per-browser GenAI / Model training switch override it; `lifecycle
# ui` prints each experiment's address with that switch set.
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


class StoreError(LifecycleError):
    """The MLflow store cannot be opened or created: the message names it and the cause."""


class StageBusy(LifecycleError):
    """Another live process is running this stage right now."""


def client(home: Home) -> MlflowClient:
    return MlflowClient(tracking_uri=home.tracking_uri)


def open_store(home: Home) -> MlflowClient:
    """The MLflow store, created (its database migrated) by one process at a time the first time a home is used."""
    home.root.mkdir(parents=True, exist_ok=True)
    try:
        with open(home.root / "store.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            mlflow = client(home)
            mlflow.search_experiments(max_results=1)
    except Exception as err:  # any failure to open the store ends here, named, whatever MLflow raised
        raise StoreError(
            f"could not open the MLflow store at {home.tracking_uri}: {type(err).__name__}: {err}; "
            "check that the location is writable (or that the tracking server answers), "
            "or point MLFLOW_TRACKING_URI elsewhere"
        ) from None
    return mlflow


def experiment_id(mlflow: MlflowClient, home: Home, name: str, create: bool = True) -> str | None:
    """The experiment named after the spec; created, marked as model training, when missing. One that exists (the
    user's own, say) is used as it is."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted" and create:
            # a deleted experiment's name is taken until it is purged
            mlflow.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    if not create:
        return None
    artifact_root = home.artifact_root
    try:
        return mlflow.create_experiment(
            name,
            artifact_location=f"{artifact_root}/{name}" if artifact_root else None,
            tags={EXPERIMENT_KIND: MODEL_TRAINING},
        )
    except MlflowException as err:
        # two first runs of a spec at once: the other made it between the look and the create (the store's unique
        # name refused this one); its stages' claims settle the rest ("being run right now by ...")
        if err.error_code != "RESOURCE_ALREADY_EXISTS" or (made := mlflow.get_experiment_by_name(name)) is None:
            raise
        return made.experiment_id


def runs_of(mlflow: MlflowClient, experiment: str, stage: PlannedStage, status: str | None = None) -> list[Run]:
    """Runs of this exact stage (same fingerprint), newest first."""
    query = f"tags.`{TAG}fingerprint` = '{stage.fingerprint}'"
    if status:
        query += f" and attributes.status = '{status}'"
    return mlflow.search_runs([experiment], query, order_by=["attributes.start_time DESC"])


def input_run_of(run: Run) -> str | None:
    """The run of the stage whose checkpoint `run` trained from; None for a stage built from the spec. Runs logged
    before the tag was named `input_run` carry it as `upstream_run`."""
    tags = run.data.tags
    return tags.get(f"{TAG}input_run") or tags.get(f"{TAG}upstream_run")


def fingerprint_of(run: Run) -> str:
    return run.data.tags[f"{TAG}fingerprint"]


def finished_run(mlflow: MlflowClient, experiment: str, stage: PlannedStage) -> Run | None:
    runs = runs_of(mlflow, experiment, stage, "FINISHED")
    return runs[0] if runs else None


LEASE = f"{TAG}lease_until"  # unix time until which a RUNNING run's process is taken to be alive
# How long a stage run waits, once opened, before it reads who else opened one: longer than a request takes to reach the
# store, so of two processes that race for a stage both see both runs and agree on the first.
CLAIM_SETTLE_SECONDS = 1.0


def _pid_namespace() -> str:
    """This process's pid namespace ("pid:[4026531836]"): two containers share a host name where they are given one,
    never a pid namespace, so a pid is judged only by a process that sees the same pids; "" without /proc."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_tags() -> dict[str, str]:
    """What identifies this process as a run's owner, and its first lease."""
    return {
        f"{TAG}host": host(),
        f"{TAG}pid": str(os.getpid()),
        f"{TAG}pid_started": started(os.getpid()),
        f"{TAG}pid_namespace": _pid_namespace(),
        LEASE: f"{time.time() + lease_seconds():.3f}",
    }


def lease_until(run: Run) -> float:
    """Until when the run's process is taken to be alive; a run opened before leases, from its start."""
    if LEASE in run.data.tags:
        return float(run.data.tags[LEASE])
    return run.info.start_time / 1000 + lease_seconds()


def alive(run: Run) -> bool:
    """Whether the process that opened a RUNNING run still holds it. On this host its pid answers at once; on any
    other, its lease: a run whose heartbeat stopped for longer than a lease is dead wherever it ran."""
    tags = run.data.tags
    if tags.get(f"{TAG}host") == host() and tags.get(f"{TAG}pid_namespace", "") == _pid_namespace():
        pid = int(tags.get(f"{TAG}pid", "0"))
        return pid > 0 and running(pid) and tags.get(f"{TAG}pid_started", "") == started(pid)
    return time.time() < lease_until(run)


@contextmanager
def heartbeat(mlflow: MlflowClient, run_id: str) -> Iterator[None]:
    """Renew the run's lease from a daemon thread while the block runs (a launched stage's ranks included: the
    process that waits for them beats for them)."""
    length = lease_seconds()
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(length / 4):
            try:
                mlflow.set_tag(run_id, LEASE, f"{time.time() + length:.3f}")
            except Exception as err:  # the store did not answer this time: the next beat tries again, within the lease
                say(f"run {run_id}: its lease was not renewed this time ({type(err).__name__}: {err})")

    thread = threading.Thread(target=renew, name=f"lease-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=length)


class LeaseLost(LifecycleError):
    """This process stalled past its lease and another closed its run or took the stage over: it stops here."""


def still_held(mlflow: MlflowClient, run_id: str) -> None:
    """Before a stage run is recorded as finished (its models logged, FINISHED set): its process still holds it. A
    process that stalled past its lease (a long pause, the store out of reach) may find its run closed as KILLED by
    another, which then trains the stage in a run of its own; it stops rather than finish the stage a second time."""
    run = mlflow.get_run(run_id)
    if run.info.status != "RUNNING" or run.data.tags.get(f"{TAG}pid") != str(os.getpid()):
        why = run.data.tags.get(f"{TAG}killed", f"it is {run.info.status}")
        raise LeaseLost(
            f"stage {run.data.tags.get(f'{TAG}stage', run.info.run_name)}: run {run_id} is no longer this process's "
            f"({why}); its work is not recorded as finished, and the stage is the run that took it over"
        )


def owner(run: Run) -> str:
    tags = run.data.tags
    return f"pid {tags.get(TAG + 'pid', '?')} on {tags.get(TAG + 'host', '?')} (MLflow run {run.info.run_id})"


def busy(stage: PlannedStage, run: Run) -> StageBusy:
    return StageBusy(
        f"stage {stage.name} is being run right now by {owner(run)}; wait for it to finish or stop that process, "
        "then run again"
    )


@contextmanager
def pipeline_run(
    mlflow: MlflowClient,
    experiment: str,
    spec_name: str,
    spec_path: Path,
    stages: list[str],
    branch: tuple[str, str, dict[str, str]] | None = None,
) -> Iterator[str]:
    """The parent run of one pipeline run: FINISHED when every stage is, FAILED otherwise. Its description (the run
    page's first lines) names the spec, its stages in order and how the run ended. A sweep's branch (`branch`: the
    sweep's run, the branch's name and its tags) is a child of the sweep's run, named and tagged as the branch."""
    tags = {f"{TAG}kind": "pipeline", f"{TAG}spec": str(spec_path), f"{TAG}stages": " ".join(stages)}
    name = spec_name
    if branch is not None:
        sweep, branch_name, branch_tags = branch
        tags |= {MLFLOW_PARENT_RUN_ID: sweep, f"{TAG}branch": branch_name} | branch_tags
        name = f"{spec_name} [{branch_name}]"
    tags[MLFLOW_RUN_NOTE] = _pipeline_note(spec_name, tags, "running")
    run_id = mlflow.create_run(experiment, run_name=name, tags=tags | process_tags()).info.run_id
    try:
        with heartbeat(mlflow, run_id):
            mlflow.log_artifact(run_id, str(spec_path), "spec")
            yield run_id
    except BaseException as err:
        fail(mlflow, run_id, err)
        run = mlflow.get_run(run_id)
        # a stage is linked to the parent once it has finished (or was reused): the first one not linked is where
        # the run stopped
        stopped = next((name for name in stages if f"{TAG}stage.{name}" not in run.data.tags), None)
        where = f"at stage {stopped}" if stopped else "after its last stage"
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:300]  # the whole of it: the tag lifecycle.error
        how = interruption(err)
        outcome = f"{how} {where}" if how else f"failed {where}: {reason}"
        mlflow.set_tag(run_id, MLFLOW_RUN_NOTE, _pipeline_note(spec_name, run.data.tags, outcome))
        raise
    tags = mlflow.get_run(run_id).data.tags
    outcome = "finished"
    if all(tags.get(f"{TAG}stage.{name}", "").endswith(" (reused)") for name in stages):
        # nothing trained: said where the runs list shows it, so the run is not taken for a new model
        mlflow.update_run(run_id, name=f"{name} (all reused)")
        outcome = "finished, every stage reused from an earlier run (nothing trained)"
    mlflow.set_tag(run_id, MLFLOW_RUN_NOTE, _pipeline_note(spec_name, tags, outcome, experiment))
    mlflow.set_terminated(run_id, status="FINISHED")


@contextmanager
def sweep_run(
    mlflow: MlflowClient, experiment: str, spec_name: str, spec_path: Path, branches: list[str], sweep: dict
) -> Iterator[str]:
    """The parent run of a sweep, whose children are its branches' pipeline runs: FINISHED when every branch is,
    FAILED otherwise. It carries the sweep as params and, at the end, the report of every point (`tasks.sweeps`)."""
    tags = {f"{TAG}kind": "sweep", f"{TAG}spec": str(spec_path), f"{TAG}branches": " | ".join(branches)}
    tags[MLFLOW_RUN_NOTE] = f"Sweep **{spec_name}** (`{spec_path}`): {len(branches)} branches: {'; '.join(branches)}."
    run_id = mlflow.create_run(experiment, run_name=f"{spec_name} (sweep)", tags=tags | process_tags()).info.run_id
    try:
        with heartbeat(mlflow, run_id):
            mlflow.log_artifact(run_id, str(spec_path), "spec")
            mlflow.log_dict(run_id, sweep, "sweep.json")
            yield run_id
    except BaseException as err:
        fail(mlflow, run_id, err)
        raise
    mlflow.set_terminated(run_id, status="FINISHED")


def ui_route(experiment: str, run: str | None = None) -> str:
    """The MLflow UI's address (after the server's) of an experiment's runs, or of one run, in its model-training view:
    MLflow 3.17 opens its GenAI view (traces) unless the address or the browser's last choice says otherwise."""
    return f"#/experiments/{experiment}/runs" + (f"/{run}" if run else "") + "?workflowType=machine_learning"


def _pipeline_note(spec_name: str, tags: dict[str, str], outcome: str, experiment: str | None = None) -> str:
    """The parent run's description, in the Markdown MLflow shows it in; `tags`: the run's. With `experiment`, each
    stage's run linked (those reused marked so)."""
    lines = [
        f"Pipeline **{spec_name}** (`{tags[TAG + 'spec']}`): {' → '.join(tags[TAG + 'stages'].split())}.",
        f"Outcome: {outcome}.",
    ]
    linked = [(name, tags.get(f"{TAG}stage.{name}")) for name in tags[TAG + "stages"].split()]
    if experiment is not None and any(run for _, run in linked):
        runs = [
            f"[{name}]({ui_route(experiment, run.split()[0])}){' (reused)' * run.endswith('(reused)')}"
            for name, run in linked
            if run
        ]
        lines.append(f"Runs: {', '.join(runs)}.")
    for key, steps in sorted(tags.items()):
        if key.startswith(f"{TAG}steps."):
            evaluation = key.removeprefix(f"{TAG}steps.")
            lines.append(f"Charts: `{evaluation}/<metric>` by step, one checkpoint a step: {steps}.")
    return "\n\n".join(lines)


def interruption(err: BaseException) -> str | None:
    """How the process was stopped, when `err` says it was: Ctrl-C, an exit, or a termination signal (SIGTERM: how
    Docker, Kubernetes and Slurm stop a job; Prefect raises its TerminationSignal for it); None for a failure."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(err, SystemExit):
        return "interrupted (exit)"
    signal_number = getattr(err, "signal", None)
    if type(err).__name__ == "TerminationSignal" and isinstance(signal_number, int):
        return f"stopped by {signal.Signals(signal_number).name}"
    return None


def fail(mlflow: MlflowClient, run_id: str, err: BaseException) -> None:
    """Close a run that did not finish: KILLED when interrupted, FAILED otherwise, with the reason as a tag. A store
    that does not answer now is said, and the error that ended the stage is the one raised: the run's lease runs out,
    and the next run closes it as KILLED."""
    how = interruption(err)
    interrupted = how is not None
    reason = how or f"{type(err).__name__}: {err}"
    try:
        mlflow.set_tag(run_id, f"{TAG}error", reason[:5000])
        mlflow.set_terminated(run_id, status="KILLED" if interrupted else "FAILED")
    except Exception as unrecorded:
        say(
            f"run {run_id} could not be closed in the store ({type(unrecorded).__name__}: {unrecorded}); once its "
            "lease runs out the next run closes it as KILLED"
        )


def link(mlflow: MlflowClient, parent: str, stage: PlannedStage, run_id: str, reused: bool) -> None:
    """Record in the parent run which run stands for each stage, trained now or reused."""
    mlflow.set_tag(parent, f"{TAG}stage.{stage.name}", f"{run_id} (reused)" if reused else run_id)


def start_stage_run(
    mlflow: MlflowClient,
    experiment: str,
    stage: PlannedStage,
    parent: str,
    input_run: str | None,
    tokenizer_run: str | None,
    workdir: Path,
) -> str:
    """Open the stage's run, which claims the stage across homes: of the live runs of the stage, the first opened
    trains it; a later one is closed as KILLED, saying who won, and StageBusy raised."""
    tags = {
        MLFLOW_PARENT_RUN_ID: parent,
        f"{TAG}stage": stage.name,
        f"{TAG}kind": stage.kind,
        f"{TAG}fingerprint": stage.fingerprint,
        f"{TAG}workdir": str(workdir),
    } | process_tags()
    if input_run:
        tags[f"{TAG}input_run"] = input_run
    if tokenizer_run:
        tags[f"{TAG}tokenizer_run"] = tokenizer_run
    tags[MLFLOW_RUN_NOTE] = describe(stage, input_run)
    run_id = mlflow.create_run(experiment, run_name=stage.name, tags=tags).info.run_id
    time.sleep(CLAIM_SETTLE_SECONDS)
    rivals = [run for run in runs_of(mlflow, experiment, stage, "RUNNING") if run.info.run_id == run_id or alive(run)]
    first = min(rivals, key=lambda run: (run.info.start_time, run.info.run_id))
    if first.info.run_id != run_id:
        mlflow.set_tag(run_id, f"{TAG}killed", f"lost the claim on stage {stage.name} to {owner(first)}")
        mlflow.set_terminated(run_id, status="KILLED")
        raise busy(stage, first)
    return run_id


def describe(stage: PlannedStage, input_run: str | None) -> str:
    """A stage run's description, one line: what kind of stage, on which data files, from which input."""
    spec = stage.spec
    if stage.kind == "tokenizer":
        if spec.path is not None:
            return f"tokenizer: the tokenizer at {spec.path}, adopted"
        corpus = _files(spec.train.data) if spec.train.data else "the data of every stage"
        return f"tokenizer: a {spec.train.vocab_size}-token BPE trained on {corpus}"
    if stage.kind == "eval":
        files = [path for paths, _ in spec.files().values() for path in paths]
        return f"eval {stage.name}: scores {', '.join(spec.checkpoints)} side by side on {_files(files)}"
    line = f"{stage.kind} {stage.name}: trains on {_files(spec.data)}"
    if spec.heldout:
        line += f", measured on {_files(spec.heldout)}"
    if stage.input_stage is None:
        return f"{line}, from the spec's model"
    return f"{line}, from stage {stage.input_stage}" + (f" (run {input_run})" if input_run else "")


def _files(sources: list[Source], shown: int = 3) -> str:
    if not sources:
        return "no files"
    names = ", ".join(source.name for source in sources[:shown])
    return f"{names} and {len(sources) - shown} more" if len(sources) > shown else names


def log_stage_spec(mlflow: MlflowClient, run_id: str, stage: PlannedStage) -> None:
    """The resolved stage spec, as a JSON artifact and as flat params."""
    resolved = stage.spec.model_dump(mode="json", by_alias=True)
    mlflow.log_dict(run_id, resolved, "stage_spec.json")
    mlflow.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in _flatten(resolved).items()])


def log_launch(mlflow: MlflowClient, run_id: str, launch: Launch) -> None:
    """How a launched stage ran: its world size as a param, its DeepSpeed config as an artifact."""
    mlflow.log_param(run_id, "world_size", launch.world_size)
    if (config := launch.deepspeed_config()) is not None:
        mlflow.log_artifact(run_id, str(config), "launch")


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value
    return out


def _dataset(source: Source) -> tuple[str, str]:
    """A data source as MLflow names a dataset: its name and our full-content digest (MLflow's own reads only the
    first rows), which also covers how it is read (columns, revision)."""
    digests = source_digests([source])
    return source.name, (digests[0] if len(digests) == 1 else digest(digests))[:32]


def _origin(source: Source) -> tuple[str, str]:
    """Where a dataset came from, as MLflow records it: a local path, or a Hub id at the commit read."""
    if source.hf is not None:
        return "hugging_face", json.dumps(
            {"path": source.hf, "config_name": source.config, "split": source.split, "revision": source.revision}
        )
    return "local", json.dumps({"uri": source.path.as_uri() if source.path else ""})


def _measured_on(sources: list[Source]) -> tuple[str | None, str | None]:
    """The dataset a metric measured on these sources is linked to; none for several (a metric names one)."""
    return _dataset(sources[0]) if len(sources) == 1 else (None, None)


def log_data_inputs(mlflow: MlflowClient, run_id: str, sources: dict[str, list[Source]]) -> None:
    """Data sources as run inputs, named and digested by `_dataset`; `sources`: by context (train, eval)."""
    inputs = [
        DatasetInput(
            Dataset(*_dataset(source), *_origin(source)),
            tags=[InputTag("mlflow.data.context", split)],
        )
        for split, given in sources.items()
        for source in given
    ]
    if inputs:
        mlflow.log_inputs(run_id, datasets=inputs)


def count_params(counts: dict[str, float]) -> list[Param]:
    """Counts as MLflow params (whole numbers without a decimal point): figures of the run's record, not charts."""
    return [Param(name, str(int(value)) if float(value).is_integer() else str(value)) for name, value in counts.items()]


def log_preparation(mlflow: MlflowClient, run_id: str, counts: dict[str, float], rejected: list[dict]) -> None:
    """What data preparation kept, dropped or cut, as params (`data_*`); rows rejected under on_invalid: skip as an
    artifact with reasons."""
    counted = {f"data_{name}": value for name, value in counts.items()}
    counted["data_rejected_rows"] = len({(r["file"], r["line"]) for r in rejected})
    mlflow.log_batch(run_id, params=count_params(counted))
    if rejected:
        mlflow.log_text(
            run_id, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected), "data/rejected.jsonl"
        )


def finish_stage_run(mlflow: MlflowClient, run_id: str, result: StageResult, model_id: str | None) -> None:
    """Log the final metrics, linked to the model that holds the run's checkpoint (`tasks.registry.log_checkpoints`,
    called before), and the counts as params, then mark the run FINISHED: in that order, always.

    A metric linked to a model is shown on the model's page with the dataset it was measured on: the held-out file
    (`heldout_*`, `exact_match*`) or the training file (`train_*`), where the split is one file."""
    now = int(time.time() * 1000)
    step = int(result.counts.get("global_step", 0))  # at the last step, so MLflow shows them as the latest values
    tags = [RunTag(f"{TAG}resumed_from_step", str(result.resumed_from_step))]
    tags += [RunTag(f"{TAG}{name}", value) for name, value in result.tags.items()]
    if result.source_run is not None:
        tags.append(RunTag(f"{TAG}checkpoint_run", result.source_run))
    for name, columns in result.tables.items():
        mlflow.log_table(run_id, columns, name)
    splits: dict[str, list[tuple[str, str]]] = {}  # the run's datasets (name, digest) by context: train, eval
    for given in mlflow.get_run(run_id).inputs.dataset_inputs:
        context = next((tag.value for tag in given.tags if tag.key == "mlflow.data.context"), "")
        splits.setdefault(context, []).append((given.dataset.name, given.dataset.digest))

    def measured_on(metric: str) -> tuple[str | None, str | None]:
        split = (
            "eval" if metric.startswith(("heldout_", "exact_match")) else "train" if metric.startswith("train_") else ""
        )
        found = splits.get(split, [])
        return found[0] if model_id and len(found) == 1 else (None, None)

    metrics = [Metric(k, float(v), now, step, model_id, *measured_on(k)) for k, v in result.metrics.items()]
    mlflow.log_batch(run_id, metrics=metrics, params=count_params(result.counts), tags=tags)
    mlflow.set_terminated(run_id, status="FINISHED")


@contextmanager
def system_metrics(mlflow: MlflowClient, run_id: str, on: bool) -> Iterator[None]:
    """CPU, memory, disk, network and (with an NVIDIA or AMD GPU) GPU use, logged to the run as `system/*` metrics by
    MLflow's SystemMetricsMonitor while the block runs (every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds, 10 by
    default), when `on` and unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is false.

    MLflow starts its monitor only from the fluent `start_run`; this tool opens runs through the client, so the monitor
    is made here, for the explicit run id, on the client's store. Which stages: those that train or evaluate a model
    (`on`), the ones that take minutes; not the tokenizer (seconds), nor a curriculum's own run (its parts have theirs).
    How long a stage will take is not known before it runs; a stage shorter than one interval logs no sample. The
    machine is sampled whole, so a launched stage's ranks on this node are counted in."""
    if not on or os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() in ("false", "0"):
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=mlflow.tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


# the artifact folder of an eval stage's comparison: metrics.json, samples.json (MLflow tables), metrics.png
EVAL_ARTIFACTS = "eval"


def log_report(
    mlflow: MlflowClient, run_id: str, metrics: dict[str, list], samples: dict[str, list], plot: Path
) -> None:
    """An eval stage's comparison as MLflow tables (a row per checkpoint; a row per sample prompt) and a plot."""
    mlflow.log_table(run_id, metrics, f"{EVAL_ARTIFACTS}/metrics.json")
    mlflow.log_table(run_id, samples, f"{EVAL_ARTIFACTS}/samples.json")
    mlflow.log_artifact(run_id, str(plot), EVAL_ARTIFACTS)


def eval_table(mlflow: MlflowClient, run_id: str) -> dict:
    """An eval run's comparison table (a log_table JSON: a row per checkpoint)."""
    with tempfile.TemporaryDirectory() as folder:
        return json.loads(Path(mlflow.download_artifacts(run_id, f"{EVAL_ARTIFACTS}/metrics.json", folder)).read_text())


def copy_report(mlflow: MlflowClient, source_run: str, target_run: str, folder_name: str) -> dict:
    """An eval run's comparison, logged again in the pipeline run under `folder_name` (the eval stage's name),
    so the pipeline's page shows it whether the eval ran now or was reused; its figures become metrics there too.
    The table (a log_table JSON)."""
    with tempfile.TemporaryDirectory() as folder:
        report = mlflow.download_artifacts(source_run, EVAL_ARTIFACTS, folder)
        mlflow.log_artifacts(target_run, report, folder_name)
        table = json.loads((Path(report) / "metrics.json").read_text())
    log_comparison(mlflow, target_run, folder_name, table)
    return table


def log_comparison(
    mlflow: MlflowClient,
    run_id: str,
    evaluation: str,
    table: dict,
    models: list[str | None] | None = None,
    measured_on: dict[str, list[Path]] | None = None,
) -> None:
    """The eval table (a log_table JSON: a row per checkpoint, in lineage order) as metrics `<eval stage>/<metric>`,
    each logged at step = its checkpoint's row, and the tag `lifecycle.steps.<eval stage>` ("0:pretrain 1:sft ...")
    naming the checkpoint of each step. With `models` (the logged model of each row's checkpoint), each figure is
    linked to its model, and to the dataset it was measured on where `measured_on` (metric: files) names one file: the
    eval run logs them so, once; the pipeline runs that copy its report do not link them again.

    Why steps: MLflow charts a metric's history as a line over steps, so each measure is one chart that follows the
    lineage from checkpoint to checkpoint, and the pipeline runs of an experiment overlay in it. Metrics named
    `<checkpoint>/<metric>` (as the eval run logs them) are single values: the UI gives each its own chart of one bar
    a run, checkpoints times metrics of them, and no chart puts two checkpoints side by side. The eval stage's name
    prefixes the metrics, so the UI groups them in a section of that name and two eval stages never mix."""
    columns, rows = table["columns"], table["data"]
    checkpoints = [row[columns.index("checkpoint")] for row in rows]
    now = int(time.time() * 1000)
    models, measured_on = models or [None] * len(rows), measured_on or {}
    metrics = [
        Metric(
            f"{evaluation}/{column}",
            float(value),
            now,
            step,
            models[step],
            *(_measured_on(measured_on.get(column, [])) if models[step] else (None, None)),
        )
        for step, row in enumerate(rows)
        for column, value in zip(columns, row)
        # null: not measured for that checkpoint (log_table writes nan as null), left out of the line
        if column != "checkpoint" and isinstance(value, int | float) and math.isfinite(value)
    ]
    steps = " ".join(f"{step}:{name}" for step, name in enumerate(checkpoints))
    mlflow.log_batch(run_id, metrics=metrics, tags=[RunTag(f"{TAG}steps.{evaluation}", steps)])
