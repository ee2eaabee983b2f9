"""The `lifecycle` flow: every stage of a spec, in order, each reused or trained and recorded."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prefect import flow, get_run_logger

from schemas.load import load_spec
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
def lifecycle(spec_path: str, checked: bool = False) -> dict[str, str]:
    """Run a spec end to end; return the MLflow run id of every stage. `checked`: the caller has checked the data."""
    quiet_libraries()  # before any stage loads them; a launched stage's ranks inherit the settings
    home = Home.from_env()
    spec = load_spec(Path(spec_path))
    tokenizer_stage, *model_stages = plan(spec)
    if not checked:
        check_data(home, spec)
    mlflow = lineage.open_store(home)
    experiment = lineage.experiment_id(mlflow, home, spec.name)
    if closed := claims.close_dead(mlflow, experiment):
        get_run_logger().info("%d runs left RUNNING by processes that died are marked KILLED", len(closed))
    if swept := sweep_partials(home):
        get_run_logger().info("%d cache entries left half-written by processes that died are removed", swept)
    runs: dict[str, str] = {}
    versions: dict[str, str] = {}  # stage -> its model's version in the pipeline's registered model
    stages = [tokenizer_stage, *model_stages]
    with lineage.pipeline_run(
        mlflow, experiment, spec.name, Path(spec_path).resolve(), [s.name for s in stages]
    ) as parent:
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
    get_run_logger().info(
        "pipeline %s: every stage finished; browse with `lifecycle ui` (%s)", spec.name, home.tracking_uri
    )
    return runs
