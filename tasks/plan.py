"""The plan of a pipeline run: every stage in order, with its input stage and its fingerprint (tasks/keys.py says what a
fingerprint covers)."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.spec import TOKENIZER_STAGE, EvalStage, PipelineSpec, Stage, TokenizerSpec
from tasks.keys import part_fingerprint, stage_fingerprint, tokenizer_fingerprint


@dataclass(frozen=True)
class PlannedStage:
    name: str
    kind: str
    spec: Stage | TokenizerSpec
    fingerprint: str
    input_stage: str | None  # the stage whose checkpoint is this stage's input; None: built from the spec
    pipeline: str  # the spec's name: two pipelines in one home never share a stage's work folder or claim

    @property
    def folder(self) -> str:
        """Where this stage's work and claim live inside the home: `<pipeline>/<stage>-<fingerprint>`."""
        return f"{self.pipeline}/{self.name}-{self.fingerprint[:16]}"


def plan(spec: PipelineSpec) -> list[PlannedStage]:
    """The tokenizer stage, then the spec's stages, each fingerprinted from its inputs."""
    tokenizer = PlannedStage(
        TOKENIZER_STAGE, TOKENIZER_STAGE, spec.tokenizer, tokenizer_fingerprint(spec), None, spec.name
    )
    planned = {TOKENIZER_STAGE: tokenizer}
    fingerprints: dict[str, str] = {}
    for stage in spec.stages:
        input_stage = spec.input_of(stage)
        fingerprints[stage.name] = stage_fingerprint(spec, stage, fingerprints, tokenizer.fingerprint)
        source = input_stage.name if input_stage is not None and not isinstance(stage, EvalStage) else None
        planned[stage.name] = PlannedStage(stage.name, stage.kind, stage, fingerprints[stage.name], source, spec.name)
    return list(planned.values())


def parts(stage: PlannedStage) -> list[PlannedStage]:
    """A curriculum stage's sub-stages, each training on one list length and fed by the one before; [] for other
    stages."""
    lengths = getattr(stage.spec, "curriculum", [])
    if len(lengths) < 2:
        return []
    return [
        PlannedStage(
            f"{stage.name}-n{n}",
            stage.kind,
            stage.spec.model_copy(update={"curriculum": [n], "name": f"{stage.name}-n{n}"}),
            part_fingerprint(stage.fingerprint, n),
            stage.input_stage if i == 0 else f"{stage.name}-n{lengths[i - 1]}",
            stage.pipeline,
        )
        for i, n in enumerate(lengths)
    ]


@dataclass(frozen=True)
class SweepCost:
    """What a sweep's branches cost in stage runs: each distinct fingerprint runs once."""

    branches: int
    points: int
    seeds: int
    shared: int  # stage runs every branch shares (the tokenizer, the stages before the first swept one)
    total: int  # distinct stage runs in all
    one_by_one: int  # stage runs had every branch run alone

    def line(self) -> str:
        seeds = f" × {self.seeds} seeds" if self.seeds > 1 else ""
        return (
            f"sweep: {self.points} point{'s' * (self.points != 1)}{seeds} = {self.branches} branches; "
            f"{self.total} stage runs "
            f"({self.shared} shared by every branch, {self.total - self.shared} of single branches), "
            f"against {self.one_by_one} for the branches run one by one"
        )


def sweep_cost(spec: PipelineSpec) -> SweepCost:
    from schemas.sweep import branches

    planned = [{stage.fingerprint for stage in plan(branch.spec)} for branch in branches(spec)]
    sweep = spec.sweep
    return SweepCost(
        branches=len(planned),
        points=len(sweep.point_list()) if sweep else 1,
        seeds=len(sweep.seeds) if sweep and sweep.seeds else 1,
        shared=len(set.intersection(*planned)),
        total=len(set.union(*planned)),
        one_by_one=sum(map(len, planned)),
    )
