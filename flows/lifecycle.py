"""The `lifecycle` flow: every stage of a spec, in order, each reused or trained and recorded."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prefect import flow, get_run_logger

from schemas.errors import LifecycleError
from schemas.load import load_spec
from schemas.spec import PipelineSpec
from schemas.sweep import branches
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


def scorers(stage: PlannedStage, runs: dict[str, str]) -> dict[str, str]:
    """The runs of the reward stages whose models the stage scores replies with."""
    return {name: runs[name] for name in stage.spec.reward_stages()}


@flow(name="lifecycle")
def lifecycle(spec_path: str, checked: bool = False) -> dict:
    """Run a spec end to end; return the MLflow run id of every stage (of a sweep: of every branch's stages, by
    branch). `checked`: the caller has checked the data."""
    quiet_libraries()  # before any stage loads them; a launched stage's ranks inherit the settings
    home = Home.from_env()
    spec = load_spec(Path(spec_path))
    if not checked:
        check_data(home, spec)
    mlflow = lineage.open_store(home)
    experiment = lineage.experiment_id(mlflow, home, spec.name)
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


def pipeline(
    home: Home, mlflow, experiment: str, spec: PipelineSpec, spec_path: Path, branch: tuple | None = None
) -> dict[str, str]:
    """Every stage of one pipeline (a sweep's branch: `branch`, its parent run, name and tags), reused or trained;
    the run id of each stage."""
    tokenizer_stage, *model_stages = plan(spec)
    runs: dict[str, str] = {}
    versions: dict[str, str] = {}  # stage -> its model's version in the pipeline's registered model
    stages = [tokenizer_stage, *model_stages]
    with lineage.pipeline_run(mlflow, experiment, spec.name, spec_path, [s.name for s in stages], branch) as parent:
        ctx = Context(home, spec, experiment, parent)
        for stage in stages:
            run_id = reuse(ctx, stage)
            reused = run_id is not None
            if stage is tokenizer_stage and not reused:
                run_id = train_tokenizer(ctx, stage)
            elif stage.kind == "eval" and not reused:
                scored = {name: runs[name] for name in stage.spec.checkpoints}
                run_id = evaluate(ctx, stage, scored, scorers(stage, runs))
            elif not reused:
                datasets = prepare(ctx, stage, fetch(ctx, ctx.tokenizer_run))
                run_id = train(ctx, stage, runs.get(stage.input_stage), datasets, scorers(stage, runs))
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


def sweep(home: Home, mlflow, experiment: str, spec: PipelineSpec, spec_path: Path) -> dict[str, dict[str, str]]:
    """Every branch of a sweep spec, one after another, as children of one sweep run: a stage two branches share
    runs once and is reused by the next. A branch that fails does not stop the others; the sweep then fails naming
    them, and a re-run redoes only what did not finish. The sweep's report is logged with its run at the end."""
    from tasks.sweeps import log_report

    branched = branches(spec)
    logger = get_run_logger()
    runs: dict[str, dict[str, str]] = {}
    failed: dict[str, str] = {}
    described = spec.sweep.model_dump(mode="json")
    with lineage.sweep_run(mlflow, experiment, spec.name, spec_path, [b.name for b in branched], described) as parent:
        for i, branch in enumerate(branched, 1):
            logger.info("sweep %s: branch %d of %d, %s", spec.name, i, len(branched), branch.name)
            tags = {f"lifecycle.point.{key}": str(value) for key, value in branch.point.items()}
            tags |= {"lifecycle.seed": str(branch.seed)} if branch.seed is not None else {}
            try:
                runs[branch.name] = pipeline(
                    home, mlflow, experiment, branch.spec, spec_path, (parent, branch.name, tags)
                )
            except Exception as err:  # the next branches still run; Ctrl-C and SIGTERM stop the sweep
                failed[branch.name] = f"{type(err).__name__}: {err}".splitlines()[0]
                logger.error("sweep %s: branch %s failed: %s", spec.name, branch.name, failed[branch.name])
        if failed:
            raise SweepFailed(
                f"sweep {spec.name}: {len(failed)} of {len(branched)} branches failed ("
                + "; ".join(f"{name}: {why}" for name, why in failed.items())
                + f"); run `lifecycle run {spec_path}` again: every stage that finished is reused"
            )
        log_report(mlflow, parent, spec, branched)
    logger.info("sweep %s: every branch finished; `lifecycle report %s` compares them", spec.name, spec_path)
    return runs


class SweepFailed(LifecycleError):
    """Some branches of a sweep failed; the others finished and are recorded."""
