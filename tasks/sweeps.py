"""A sweep's report: each point's eval figures over its seeds, and each stage's change over its input stage.

A point's figures are every checkpoint's eval metrics as mean ± sample std over the seeds (the branches of that
point). A stage's change is its metrics minus its input stage's (`from:` or the previous training stage), taken in
each seed and then spread: it is marked where its 95 % t-interval, mean ± t(n−1)·std/√n, leaves out 0 (from three
seeds; with two, two seeds that happen to agree would give a zero-width interval). "n=k": only k seeds measured it.
The best point is the one whose last swept stage scores best on the eval stage's `best_by`, by its mean.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from mlflow import MlflowClient

from schemas.errors import LifecycleError
from schemas.spec import EvalStage, PipelineSpec, lower_is_better
from schemas.sweep import Branch
from tasks import lineage
from tasks.lineage import finished_run
from tasks.plan import plan

# two-sided 95 % quantiles of Student's t by degrees of freedom; past 10, 10's (a little wider than the truth)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}

Table = dict[str, dict[str, float]]  # checkpoint -> metric -> value (nan: not measured)


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation of one figure over the seeds that measured it."""

    mean: float
    std: float  # n - 1 in the denominator; nan with fewer than 2 values
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        values = [v for v in values if not math.isnan(v)]
        if not values:
            return cls(math.nan, math.nan, 0)
        mean, std = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan
        # the eval figures are float32: below a millionth of the values, a mean or spread is rounding (1/24 - 1/24)
        rounding = 1e-6 * max(map(abs, values))
        return cls(0.0 if abs(mean) <= rounding else mean, 0.0 if std <= rounding else std, len(values))

    @property
    def clear(self) -> bool:
        """The 95 % t-interval of the mean leaves out 0, from 3 seeds on."""
        return self.n >= 3 and abs(self.mean) > T95[min(self.n - 1, 10)] * self.std / math.sqrt(self.n)

    def cell(self, seeds: int, change: bool = False) -> str:
        """`0.61 ± 0.03`, a change `+0.05 ± 0.02*` (* its interval leaves out 0), `(n=2)` where seeds were missing."""
        if self.n == 0:
            return "-"
        text = f"{self.mean:+.3g}" if change else f"{self.mean:.4g}"
        if self.n > 1:
            text += f" ± {self.std:.2g}" + ("*" if change and self.clear else "")
        return text + (f" (n={self.n})" if self.n < seeds else "")


def table_of(logged: dict) -> Table:
    """An eval metrics table as MLflow's log_table wrote it ({"columns", "data"}, nan as null) by checkpoint."""
    columns = logged["columns"][1:]
    return {
        row[0]: {c: math.nan if v is None else float(v) for c, v in zip(columns, row[1:])} for row in logged["data"]
    }


def changes(table: Table, inputs: dict[str, str | None]) -> Table:
    """Each checkpoint's metrics minus its input stage's, for the checkpoints whose input the same table scores."""
    return {
        stage: {metric: value - table[up].get(metric, math.nan) for metric, value in row.items()}
        for stage, row in table.items()
        if (up := inputs.get(stage)) in table
    }


def spread(tables: list[Table]) -> dict[str, dict[str, Spread]]:
    """Every (checkpoint, metric) of the tables, its Spread over the tables (the seeds)."""
    stages = list(dict.fromkeys(stage for table in tables for stage in table))
    metrics = list(dict.fromkeys(metric for table in tables for row in table.values() for metric in row))
    return {
        stage: {metric: Spread.of([t[stage].get(metric, math.nan) for t in tables if stage in t]) for metric in metrics}
        for stage in stages
    }


def inputs_of(spec: PipelineSpec) -> dict[str, str | None]:
    return {stage.name: getattr(spec.input_of(stage), "name", None) for stage in spec.training_stages()}


class NoEvalStage(LifecycleError):
    """A sweep's report compares the branches' eval tables: without an eval stage there is none."""


@dataclass(frozen=True)
class Point:
    """One point of a sweep, over its seeds: each checkpoint's figures and each stage's change over its input."""

    name: str
    seeds: int
    levels: dict[str, dict[str, Spread]]
    changes: dict[str, dict[str, Spread]]


@dataclass(frozen=True)
class SweepReport:
    eval_stage: str
    metrics: list[str]
    points: list[Point]
    inputs: dict[str, str | None]
    best: str | None  # the best point's sentence; None without best_by
    winner: str | None = None  # the branch of the best point whose models a registry takes: its best seed

    def rows(self) -> list[dict]:
        """Every figure as a flat row: the sweep's record in MLflow, a table of it."""
        return [
            {"point": point.name, "what": what, "checkpoint": stage, "metric": metric} | vars(figure)
            for point in self.points
            for what, figures in (("level", point.levels), ("change", point.changes))
            for stage, row in figures.items()
            for metric, figure in row.items()
        ]


def eval_table(mlflow: MlflowClient, experiment: str, spec: PipelineSpec) -> Table | None:
    """The first eval stage's table of one branch, from its finished run; None while it has none."""
    stage = next(stage for stage in plan(spec) if stage.kind == "eval")
    run = finished_run(mlflow, experiment, stage)
    return None if run is None else table_of(lineage.eval_table(mlflow, run.info.run_id))


def report(mlflow: MlflowClient, experiment: str, spec: PipelineSpec, branched: list[Branch]) -> SweepReport:
    """The sweep's report from its branches' finished eval runs (a branch not finished yet counts as not measured)."""
    evaluation = next((stage for stage in spec.stages if isinstance(stage, EvalStage)), None)
    if evaluation is None:
        raise NoEvalStage(f"sweep {spec.name}: the spec has no eval stage to compare the branches by; add one")
    inputs = inputs_of(spec)
    tables: dict[str, dict[str, Table]] = {}  # point -> branch -> its table
    for branch in branched:
        if (table := eval_table(mlflow, experiment, branch.spec)) is not None:
            tables.setdefault(branch.point_name, {})[branch.name] = table
    points = [
        Point(name, len(found), spread(list(found.values())), spread([changes(t, inputs) for t in found.values()]))
        for name, found in tables.items()
    ]
    metrics = list(dict.fromkeys(m for point in points for row in point.levels.values() for m in row))
    best, winner = _best(spec, evaluation, points, tables)
    return SweepReport(evaluation.name, metrics, points, inputs, best, winner)


def _best(
    spec: PipelineSpec, evaluation: EvalStage, points: list[Point], tables: dict[str, dict[str, Table]]
) -> tuple[str | None, str | None]:
    """The best point's sentence, and the branch whose models a registry takes: of the best point's seeds, the one
    that scores best (the first of a tie). (None, None) without best_by or a point to prefer."""
    metric = evaluation.best_by
    swept = [stage for stage in spec.sweep.stages() if any(stage in p.levels for p in points)] if spec.sweep else []
    if metric is None or not swept or len(points) < 2:
        return None, None
    stage = swept[-1]
    scored = [(p, p.levels[stage].get(metric)) for p in points if stage in p.levels]
    scored = [(p, figure) for p, figure in scored if figure is not None and figure.n]
    if not scored:
        return None, None
    lower = lower_is_better(metric)
    ranked = sorted(scored, key=lambda pair: pair[1].mean, reverse=not lower)
    (best, figure), *rest = ranked
    if rest and rest[0][1].mean == figure.mean:
        return f"best point by {metric} of {stage}: none, the best points tie at {figure.mean:.4g}", None
    others = ", ".join(f"{p.name}: {f.cell(p.seeds)}" for p, f in rest)
    seeds = {name: table[stage].get(metric, math.nan) for name, table in tables[best.name].items() if stage in table}
    measured = [name for name, value in seeds.items() if not math.isnan(value)]
    winner = (min if lower else max)(measured, key=seeds.__getitem__) if measured else None
    return f"best point by {metric} of {stage}: {best.name} ({figure.cell(best.seeds)}; {others})", winner


def log_report(mlflow: MlflowClient, run_id: str, spec: PipelineSpec, branched: list[Branch]) -> SweepReport | None:
    """The sweep's report as its run's table `sweep/report.json` (a row per figure) and, with best_by, its best
    point as the run's tag `lifecycle.best_point` (and the branch a registry takes as `lifecycle.best_branch`); the
    report, None for a sweep without an eval stage."""
    if not any(isinstance(stage, EvalStage) for stage in spec.stages):
        return None
    found = report(mlflow, mlflow.get_run(run_id).info.experiment_id, spec, branched)
    rows = found.rows()
    if rows:
        mlflow.log_table(run_id, {key: [row[key] for row in rows] for key in rows[0]}, "sweep/report.json")
    if found.best:
        mlflow.set_tag(run_id, f"{lineage.TAG}best_point", found.best)
    if found.winner:
        mlflow.set_tag(run_id, f"{lineage.TAG}best_branch", found.winner)
    return found
