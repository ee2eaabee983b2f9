"""Prefect tasks around the stages: check the data, reuse or prepare, train, record.

Tasks are thin: the work is in `stages/`, the record in `tasks/lineage.py`. Prefect's own
result cache is off (`NO_CACHE`): MLflow is the one record of what finished, so a re-run in
a new process, or after `prefect flow-run retry`, decides reuse the same way.

The stage modules are imported when a stage trains, not before: torch and transformers take
seconds to load, and a re-run that reuses every stage needs neither. What every task of one
pipeline run shares travels as one `Context`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from schemas.spec import PipelineSpec
from stages import training_stage
from stages.common import estimate, memory
from stages.common.contract import ADDED_TOKENS, ModelError, StageInputs, StageResult
from stages.common.folders import partial_folder, publish
from stages.common.progress import prepared_line, say
from tasks import claims, lineage, mirror
from tasks.checks import check_contracts
from tasks.home import Home
from tasks.keys import dataset_key, digest, folder_digest, reference_key
from tasks.plan import PlannedStage, parts
from tasks.registry import (
    ADAPTER,
    CHECKPOINT,
    fetch_checkpoint,
    fetch_language_model,
    log_checkpoints,
    log_input_models,
    mark_best,
    model_of,
    record_base_model,
    register,
)
from tasks.torchrun import launch_stage


@dataclass(frozen=True)
class Context:
    """What every stage task of one pipeline run shares."""

    home: Home
    spec: PipelineSpec
    experiment: str  # the MLflow experiment id
    parent: str  # the run a stage's run is a child of: the pipeline run, or a curriculum stage's own run for its parts
    tokenizer_run: str | None = None  # the tokenizer stage's run, once it has one


@task(cache_policy=NO_CACHE)
def check_data(home: Home, spec: PipelineSpec) -> int:
    """The machine and data checks as the flow's first step, before any model loads; the number of valid rows."""
    memory.check(spec, Path(spec.name))
    estimate.check(spec, Path(spec.name))
    return sum(checked.rows for checked in check_contracts(spec, home))


@task(cache_policy=NO_CACHE, task_run_name="reuse-{stage.name}")
def reuse(ctx: Context, stage: PlannedStage) -> str | None:
    run = lineage.finished_run(lineage.client(ctx.home), ctx.experiment, stage)
    if run is None:
        return None
    get_run_logger().info(
        "stage %s: reused from run %s (fingerprint %s)", stage.name, run.info.run_id, stage.fingerprint[:12]
    )
    return run.info.run_id


@task(cache_policy=NO_CACHE, task_run_name="fetch-{run_id}")
def fetch(ctx: Context, run_id: str) -> Path:
    """A finished stage's checkpoint, downloaded from MLflow into the cache."""
    mlflow = lineage.client(ctx.home)
    return fetch_checkpoint(mlflow, ctx.home, mlflow.get_run(run_id))


@task(cache_policy=NO_CACHE, task_run_name="prepare-{stage.name}")
def prepare(ctx: Context, stage: PlannedStage, tokenizer_dir: Path) -> Path:
    """Tokenized (and packed) datasets, cached by data, tokenizer, template and packing parameters."""
    target = ctx.home.cache("datasets", dataset_key(stage.kind, stage.spec, tokenizer_dir))
    if target.exists():
        return target
    from transformers import AutoTokenizer

    started = time.monotonic()
    prepared = training_stage(stage.kind).prepare(stage.spec, AutoTokenizer.from_pretrained(tokenizer_dir))
    say(prepared_line(stage.name, prepared, time.monotonic() - started))
    partial = partial_folder(target)
    prepared.datasets.save_to_disk(str(partial / "datasets"))
    (partial / PREPARE_REPORT).write_text(
        json.dumps({"counts": prepared.counts, "rejected": [p.record() for p in prepared.rejected]})
    )
    return publish(partial, target)


PREPARE_REPORT = "prepare_report.json"  # beside the prepared datasets: what preparation dropped, cut or rejected


def _log_preparation(mlflow, run_id: str, prepared_dir: Path) -> None:
    report = json.loads((prepared_dir / PREPARE_REPORT).read_text())
    lineage.log_preparation(mlflow, run_id, report["counts"], report["rejected"])


def _recorded(ctx: Context, stage: PlannedStage, input_run: str | None, work, monitored: bool = False) -> str:
    """Claim the stage, open its child run, do the work, log the checkpoint as the run's model; FAILED on any error.
    `monitored`: the machine's use is logged while the work runs (`lineage.system_metrics`).

    A run that another process finished after this one looked for it (and before the claim) is reused, never trained
    twice."""
    mlflow, workdir = lineage.client(ctx.home), ctx.home.work(stage)
    with claims.claim(mlflow, ctx.home, ctx.experiment, stage) as taken_over:
        if (found := lineage.finished_run(mlflow, ctx.experiment, stage)) is not None:
            get_run_logger().info(
                "stage %s: reused from run %s, finished meanwhile by another process", stage.name, found.info.run_id
            )
            return found.info.run_id
        if taken_over:
            get_run_logger().info(taken_over)
        run_id = lineage.start_stage_run(
            mlflow, ctx.experiment, stage, ctx.parent, input_run, ctx.tokenizer_run, workdir
        )
        try:
            with lineage.heartbeat(mlflow, run_id):
                lineage.log_stage_spec(mlflow, run_id, stage)
                with lineage.system_metrics(mlflow, run_id, monitored):
                    result: StageResult = work(mlflow, run_id)
                lineage.still_held(mlflow, run_id)  # a stalled process whose run was taken over stops here
                model_id = log_checkpoints(mlflow, run_id, result)
                lineage.still_held(mlflow, run_id)
                lineage.finish_stage_run(mlflow, run_id, result, model_id)
        except lineage.LeaseLost:
            raise  # the run is another's to close now
        except BaseException as err:
            lineage.fail(mlflow, run_id, err)
            raise
    # the in-stage checkpoints (optimizer state included) have served, and the saved model has gone to the store: the
    # run's logged model is the record now, fetched into the cache when a stage needs it (linked, with a local store)
    for served in ("trainer", "model", "adapter"):
        shutil.rmtree(workdir / served, ignore_errors=True)
    mirror.drop(mlflow, lineage.runs_of(mlflow, ctx.experiment, stage))
    resumed = f", resumed from step {result.resumed_from_step}" if result.resumed_from_step else ""
    get_run_logger().info("stage %s: finished as run %s%s", stage.name, run_id, resumed)
    return run_id


@task(cache_policy=NO_CACHE, task_run_name="train-{stage.name}")
def train_tokenizer(ctx: Context, stage: PlannedStage) -> str:
    from stages import tokenizer

    spec, workdir = ctx.spec, ctx.home.work(stage)

    def work(mlflow, run_id) -> StageResult:
        if spec.tokenizer.path is None:
            lineage.log_data_inputs(mlflow, run_id, {"train": [source for source, _, _ in spec.tokenizer_corpus()]})
        result = tokenizer.build(spec, workdir)
        if spec.tokenizer.path is not None:
            if added := list(json.loads((result.checkpoint / ADDED_TOKENS).read_text())):
                get_run_logger().info(
                    "tokenizer: added %s to the tokenizer of %s; the model's embeddings grow by as many rows "
                    "(each the mean of its trained rows) when it loads, and LoRA stages train them",
                    ", ".join(added),
                    spec.tokenizer.path,
                )
                mlflow.set_tag(run_id, f"{lineage.TAG}added_tokens", " ".join(added))
        return result

    return _recorded(ctx, stage, None, work)


@task(cache_policy=NO_CACHE, task_run_name="train-{stage.name}")
def train(
    ctx: Context, stage: PlannedStage, input_run: str | None, datasets_dir: Path, model_runs: dict[str, str]
) -> str:
    """Train a stage as a child run of the pipeline run; a curriculum stage trains its parts as child runs of its own.
    `model_runs`: the runs of the other stages whose models the stage loads (reward models, a teacher)."""
    from datasets import load_from_disk

    from tasks.step_metrics import recorders

    home, spec, mlflow = ctx.home, ctx.spec, lineage.client(ctx.home)
    tokenizer = fetch_checkpoint(mlflow, home, mlflow.get_run(ctx.tokenizer_run))
    datasets = load_from_disk(str(datasets_dir / "datasets"))

    def trained(part: PlannedStage, within: Context, input_run: str | None) -> str:
        """One training run of `part` on the input run's checkpoint: recorded, or reused when it finished before."""

        def work(mlflow, run_id) -> StageResult:
            lineage.log_data_inputs(mlflow, run_id, {"train": part.spec.data, "eval": part.spec.heldout})
            _log_preparation(mlflow, run_id, datasets_dir)
            log_input_models(mlflow, run_id, [mlflow.get_run(run) for run in [input_run, *model_runs.values()] if run])
            if input_run is not None:
                source = mlflow.get_run(input_run)
                model = fetch_checkpoint(mlflow, home, source, ADAPTER if part.spec.input == "adapter" else CHECKPOINT)
                reference = datasets_dir / reference_key(lineage.fingerprint_of(source))
            elif (student := getattr(part.spec, "student", None)) is not None:  # a fresh student to distil into
                model, reference = student, None
            else:
                model, reference = spec.model.init or spec.model.path, None
                if spec.model.path is not None:
                    record_base_model(mlflow, run_id, spec.model)
            inputs = StageInputs(
                model=model,
                tokenizer=tokenizer,
                datasets=datasets,
                reference=reference,
                callbacks=recorders(mlflow, run_id),
                stage_models=stage_models(mlflow, home, model_runs) | uri_models(mlflow, home, part.spec),
            )
            try:
                if part.spec.launch is not None:
                    lineage.log_launch(mlflow, run_id, part.spec.launch)
                    return launch_stage(
                        part.spec, inputs, datasets_dir / "datasets", home.work(part), home.root, run_id
                    )
                return training_stage(part.kind).run(part.spec, inputs, home.work(part))
            except ModelError as err:
                raise ModelError(f"stage {part.name}: {err}") from None

        return _recorded(within, part, input_run, work, monitored=True)

    if not (curriculum := parts(stage)):
        return trained(stage, ctx, input_run)

    def work(mlflow, run_id) -> StageResult:
        last = input_run
        for part in curriculum:
            last = trained(part, replace(ctx, parent=run_id), last)
        # the last part's logged checkpoint stands for the stage: pointed at, not downloaded or logged again; its
        # final metrics and counts are the stage's (the machine's use, sampled for each part, is each part's)
        data = mlflow.get_run(last).data
        metrics = {k: v for k, v in data.metrics.items() if not k.startswith("system/")}
        # the last part's steps, so the stage's final metrics sit at its last step as a part's do (a part recorded
        # before steps were counted as params has them as a metric)
        steps = float(data.params.get("global_step", data.metrics.get("global_step", 0)))
        return StageResult(checkpoint=None, metrics=metrics, source_run=last, counts={"global_step": steps})

    return _recorded(ctx, stage, input_run, work)


def stage_models(mlflow, home: Home, model_runs: dict[str, str]) -> dict[str, Path]:
    """The logged checkpoint of each stage the stage loads besides its input (a reward model, a teacher), fetched."""
    return {name: fetch_checkpoint(mlflow, home, mlflow.get_run(run)) for name, run in model_runs.items()}


def uri_models(mlflow, home: Home, spec) -> dict[str, Path]:
    """A models:/ URI the stage loads (a distillation's teacher), fetched, by the URI."""
    teacher = getattr(spec, "teacher", "")
    return {teacher: fetch_language_model(mlflow, home, teacher)} if teacher.startswith("models:/") else {}


def _logged_table(rows: list[dict]) -> dict:
    """Rows (a dict each, the same keys) as a logged table reads back: {"columns": [...], "data": [[...], ...]}."""
    return {"columns": list(rows[0]), "data": [list(row.values()) for row in rows]}


def _bench(home: Home, stage: PlannedStage, scored_runs: dict[str, str]):
    """The eval stage's benchmarks over its checkpoints, their scores kept in the home; None without benchmarks."""
    from stages.common.benchmarks import Bench

    if (benchmarks := stage.spec.benchmarks) is None:
        return None
    folder = folder_digest(benchmarks.folder) if benchmarks.folder is not None else None
    identities = {
        name: digest({"run": run, "folder": folder, "lm_eval": version("lm_eval")}) for name, run in scored_runs.items()
    }
    return Bench(stage.name, benchmarks, home.root / "cache" / "benchmarks", identities)


@task(cache_policy=NO_CACHE, task_run_name="eval-{stage.name}")
def evaluate(ctx: Context, stage: PlannedStage, scored_runs: dict[str, str], reward_runs: dict[str, str]) -> str:
    """Score the checkpoints side by side; the table, plot and samples go to the eval run and to the pipeline run, each
    score to the logged model of its checkpoint."""
    from stages import eval as evaluation

    home = ctx.home

    def work(mlflow, run_id) -> StageResult:
        lineage.log_data_inputs(mlflow, run_id, {fmt: sources for fmt, (sources, _) in stage.spec.files().items()})
        scored = {name: mlflow.get_run(run) for name, run in scored_runs.items()}
        log_input_models(mlflow, run_id, [*scored.values(), *(mlflow.get_run(run) for run in reward_runs.values())])
        checkpoints = {name: fetch_checkpoint(mlflow, home, run) for name, run in scored.items()}
        tokenizer = fetch_checkpoint(mlflow, home, mlflow.get_run(ctx.tokenizer_run))
        bench = _bench(home, stage, scored_runs)
        report = evaluation.run(
            stage.spec, checkpoints, tokenizer, home.work(stage), stage_models(mlflow, home, reward_runs), bench
        )
        lineage.log_report(mlflow, run_id, report.metrics_table(), report.samples_table(), report.plot)
        table = _logged_table(report.metrics)
        measured_on = {
            metric: sources for fmt, (sources, _) in stage.spec.files().items() for metric in evaluation.METRICS[fmt]
        }
        models = [model_of(scored[row["checkpoint"]]) for row in report.metrics]
        lineage.log_comparison(mlflow, run_id, stage.name, table, models, measured_on)
        if bench is not None:  # what each benchmark cost, a line over the checkpoints as the scores are
            lineage.log_comparison(mlflow, run_id, f"{stage.name}/seconds", _logged_table(report.seconds))
        return StageResult(checkpoint=None)

    return _recorded(ctx, stage, None, work, monitored=True)


@task(cache_policy=NO_CACHE, task_run_name="register-{stage.name}")
def register_model(ctx: Context, stage: PlannedStage, run_id: str, input_version: str | None) -> str | None:
    """The stage's model as a version of the pipeline's registered model (`tasks.registry.register`); its number."""
    return register(lineage.client(ctx.home), ctx.spec.name, stage, run_id, input_version)


@task(cache_policy=NO_CACHE, task_run_name="best-of-{stage.name}")
def choose_best(ctx: Context, stage: PlannedStage, table: dict, versions: dict[str, str]) -> str | None:
    """The alias `best` on the version the eval stage scores best by its `best_by` metric; the version."""
    return mark_best(lineage.client(ctx.home), ctx.spec.name, stage.name, table, stage.spec.best_by, versions)
