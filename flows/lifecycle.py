"""The `lifecycle` flow: every stage of a spec, in order, each reused or trained and recorded."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from prefect import flow, get_run_logger

from schemas.errors import LifecycleError
from schemas.load import load_spec
from schemas.spec import TOKENIZER_STAGE, PipelineSpec
from schemas.sweep import Branch, branches
from stages.common.progress import quiet_libraries
from tasks import claims, lineage
from tasks.home import Home, sweep_partials
from tasks.plan import PlannedStage, plan
from tasks.stage import (
    Context,
    check_data,
    choose_best,
    evaluate,
    fetch,
    prepare,
    register_model,
    reuse,
    train,
    train_tokenizer,
)


def models_of(stage: PlannedStage, runs: dict[str, str]) -> dict[str, str]:
    """The runs of the other stages whose models the stage loads (reward models, a teacher), by stage."""
    return {name: runs[name] for name in stage.spec.model_stages()}


@flow(name="lifecycle")
def lifecycle(spec_path: str, checked: bool = False, branch: str | None = None, sweep_run: str | None = None) -> dict:
    """Run a spec end to end; return the MLflow run id of every stage (of a sweep: of every branch's stages, by
    branch). `checked`: the caller has checked the data. `branch` (with `sweep_run`, the sweep's run): only that branch
    of a sweep, as a sweep that fans its branches out runs each."""
    quiet_libraries()  # before any stage loads them; a launched stage's ranks inherit the settings
    home = Home.from_env()
    spec = load_spec(Path(spec_path))
    if not checked:
        check_data(home, spec)
    mlflow = lineage.open_store(home)
    experiment = lineage.experiment_id(mlflow, home, spec.name)
    if branch is not None:
        return run_branch(home, mlflow, experiment, spec, Path(spec_path).resolve(), branch, sweep_run)
    if closed := claims.close_dead(mlflow, experiment):
        get_run_logger().info("%d runs left RUNNING by processes that died are marked KILLED", len(closed))
    if swept := sweep_partials(home):
        get_run_logger().info("%d cache entries left half-written by processes that died are removed", swept)
    if spec.sweep is None:
        runs = pipeline(home, mlflow, experiment, spec, Path(spec_path).resolve())
        get_run_logger().info(
            "pipeline %s: every stage finished; browse with `lifecycle ui` (%s)", spec.name, home.tracking_uri
        )
        return runs
    return sweep(home, mlflow, experiment, spec, Path(spec_path).resolve())


WAIT_SECONDS = 2.0  # how often a branch waiting for a stage another one is training looks again


def pipeline(
    home: Home, mlflow, experiment: str, spec: PipelineSpec, spec_path: Path, branch: tuple | None = None
) -> dict[str, str]:
    """Every stage of one pipeline (a sweep's branch: `branch`, its parent run, name and tags), reused or trained;
    the run id of each stage. A branch that reaches a stage another process is running (a branch beside it) waits
    for it and reuses it."""
    tokenizer_stage, *model_stages = plan(spec)
    runs: dict[str, str] = {}
    versions: dict[str, str] = {}  # stage -> its model's version in the pipeline's registered model
    stages = [tokenizer_stage, *model_stages]
    with lineage.pipeline_run(mlflow, experiment, spec.name, spec_path, [s.name for s in stages], branch) as parent:
        ctx = Context(home, spec, experiment, parent)
        for stage in stages:
            run_id, reused = _run_stage(ctx, stage, runs, waits=branch is not None)
            if stage is tokenizer_stage:
                ctx = replace(ctx, tokenizer_run=run_id)
            lineage.link(mlflow, parent, stage, run_id, reused)
            if spec.registry and (version := register_model(ctx, stage, run_id, versions.get(stage.input_stage))):
                versions[stage.name] = version
            if stage.kind == "eval":
                table = lineage.copy_report(mlflow, run_id, parent, stage.name)
                if spec.registry and stage.spec.best_by is not None:
                    choose_best(ctx, stage, table, versions)
            runs[stage.name] = run_id
    return runs


def _run_stage(ctx: Context, stage: PlannedStage, runs: dict[str, str], waits: bool) -> tuple[str, bool]:
    """The stage's run, and whether it was reused: a finished run of it, else the one trained now. `waits`: while
    another process runs the stage, wait for it (and reuse what it finishes) rather than fail."""
    while True:
        if (run_id := reuse(ctx, stage) or (_wait_turn(ctx, stage) if waits else None)) is not None:
            return run_id, True
        try:
            if stage.kind == TOKENIZER_STAGE:
                return train_tokenizer(ctx, stage), False
            if stage.kind == "eval":
                scored = {name: runs[name] for name in stage.spec.checkpoints}
                return evaluate(ctx, stage, scored, models_of(stage, runs)), False
            datasets = prepare(ctx, stage, fetch(ctx, ctx.tokenizer_run))
            return train(ctx, stage, runs.get(stage.input_stage), datasets, models_of(stage, runs)), False
        except lineage.StageBusy:
            if not waits:  # taken between the look and the claim: a branch looks again
                raise


def _wait_turn(ctx: Context, stage: PlannedStage) -> str | None:
    """Wait while another process runs the stage; the run it finished meanwhile, if any (None: nobody was running
    it, or its runner stopped without finishing it)."""
    mlflow, waited = lineage.client(ctx.home), False
    while (holder := claims.holder(mlflow, ctx.home, ctx.experiment, stage)) is not None:
        if not waited:
            get_run_logger().info("stage %s: %s is running it; this branch waits for it", stage.name, holder)
            waited = True
        time.sleep(WAIT_SECONDS)
    return reuse(ctx, stage) if waited else None


def sweep(home: Home, mlflow, experiment: str, spec: PipelineSpec, spec_path: Path) -> dict[str, dict[str, str]]:
    """Every branch of a sweep spec as children of one sweep run, `concurrency` at a time (flows/fanout.py): a stage
    several branches share runs once, the others wait for it and reuse it. A branch that fails does not stop the
    others; the sweep then fails naming them, and a re-run redoes only what did not finish. The sweep's report is
    logged with its run at the end, and with `registry`, the winning branch's models are registered."""
    from flows import fanout
    from tasks.sweeps import log_report

    branched = branches(spec)
    logger = get_run_logger()
    described = spec.sweep.model_dump(mode="json")
    with lineage.sweep_run(mlflow, experiment, spec.name, spec_path, [b.name for b in branched], described) as parent:
        at_once = fanout.concurrency(spec.sweep.concurrency, len(branched))
        if at_once == 1 and not fanout.from_deployment():
            failed = {}
            for i, branch in enumerate(branched, 1):
                logger.info("sweep %s: branch %d of %d, %s", spec.name, i, len(branched), branch.name)
                try:
                    run_branch(home, mlflow, experiment, spec, spec_path, branch.name, parent)
                except Exception as err:  # the next branches still run; Ctrl-C and SIGTERM stop the sweep
                    failed[branch.name] = f"{type(err).__name__}: {err}".splitlines()[0]
                    logger.error("sweep %s: branch %s failed: %s", spec.name, branch.name, failed[branch.name])
        else:
            failed = fanout.run_branches(spec, spec_path, branched, parent, at_once)
        if failed:
            raise SweepFailed(
                f"sweep {spec.name}: {len(failed)} of {len(branched)} branches failed ("
                + "; ".join(f"{name}: {why}" for name, why in failed.items())
                + f"); run `lifecycle run {spec_path}` again: every stage that finished is reused"
            )
        found = log_report(mlflow, parent, spec, branched)
        if spec.registry and found is not None and (winner := found.winner) is not None:
            register_branch(home, mlflow, experiment, next(b for b in branched if b.name == winner))
    logger.info("sweep %s: every branch finished; `lifecycle report %s` compares them", spec.name, spec_path)
    return {branch.name: finished_runs(mlflow, experiment, branch.spec) for branch in branched}


def run_branch(
    home: Home, mlflow, experiment: str, spec: PipelineSpec, spec_path: Path, name: str, sweep_run: str | None
) -> dict[str, str]:
    """One branch of a sweep, by name, as a child of the sweep's run."""
    branch = next((b for b in branches(spec) if b.name == name), None)
    if branch is None or sweep_run is None:
        raise LifecycleError(
            f"{spec_path}: no branch {name!r} in its sweep" if branch is None else "a branch runs under a sweep's run"
        )
    return pipeline(home, mlflow, experiment, branch.spec, spec_path, (sweep_run, branch.name, branch_tags(branch)))


def branch_tags(branch: Branch) -> dict[str, str]:
    """What a branch's run is tagged with: each swept field's value and the seed."""
    tags = {f"{lineage.TAG}point.{key}": str(value) for key, value in branch.point.items()}
    return tags | ({f"{lineage.TAG}seed": str(branch.seed)} if branch.seed is not None else {})


def finished_runs(mlflow, experiment: str, spec: PipelineSpec) -> dict[str, str]:
    """The finished run of every stage of a pipeline, by stage."""
    return {stage.name: lineage.finished_run(mlflow, experiment, stage).info.run_id for stage in plan(spec)}


def register_branch(home: Home, mlflow, experiment: str, branch: Branch) -> None:
    """The winning branch's models as versions of the pipeline's registered model, its eval stage's best checkpoint
    aliased `best`: the models a user takes from a sweep."""
    runs = finished_runs(mlflow, experiment, branch.spec)
    ctx = Context(home, branch.spec.model_copy(update={"registry": True}), experiment, parent="")
    versions: dict[str, str] = {}
    for stage in plan(branch.spec):
        if version := register_model(ctx, stage, runs[stage.name], versions.get(stage.input_stage)):
            versions[stage.name] = version
        if stage.kind == "eval" and stage.spec.best_by is not None:
            table = lineage.eval_table(mlflow, runs[stage.name])
            choose_best(ctx, stage, table, versions)


class SweepFailed(LifecycleError):
    """Some branches of a sweep failed; the others finished and are recorded."""
