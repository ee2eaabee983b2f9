"""A sweep: branches of one pipeline, stage fields to try over several seeds, each branch a spec of its own.

`sweep:` names stage fields by `<stage>.<field path>` (`dpo.beta`, `sft.train.lr`) with the values to try: `grid`
tries every combination, `points` a listed set. `seeds` repeats each point over seeds: they are the `train.seed` of
every stage a key names (of every training stage when `seeds` is given alone: how much runs of the spec as written
differ), and its `mix.seed` where its training set is a seeded sample of its sources. The spec
expands into one branch per point and seed. A stage that comes out the same in several branches has one fingerprint
(tasks/keys.py) and so runs once, reused by every branch after the first: a sweep over DPO's beta trains the
tokenizer, pretrain and SFT once. `concurrency` branches run at a time (flows/lifecycle.py); one that reaches a stage
another branch is training waits for it.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, Field, PositiveInt, TypeAdapter, ValidationError, model_validator

from schemas.base import Strict

if TYPE_CHECKING:
    from schemas.spec import PipelineSpec


class Sweep(Strict):
    """Stage fields to try, each point over several seeds; every stage a branch shares with another runs once."""

    grid: dict[str, list[Any]] = Field(
        {}, description="`<stage>.<field path>` -> the values to try; every combination is a point"
    )
    points: list[dict[str, Any]] = Field(
        [], description="the points to try, each `{<stage>.<field path>: value, ...}` (instead of a grid)"
    )
    seeds: list[int] = Field(
        [],
        description="each point is run once per seed, as the train.seed of every stage a key names (and its mix.seed "
        "where its training set is a seeded sample of its sources); none: once, with the spec's own seeds",
    )
    concurrency: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="branches run at a time, each a process of its own with its share of the cores (or, submitted "
        "to a deployment, a flow run of its own on the pool's workers); auto: one per core on a machine without a "
        "GPU, one at a time with one, every branch at once on a pool",
    )

    @model_validator(mode="after")
    def _one_way(self) -> Sweep:
        if self.grid and self.points:
            raise ValueError("give the values to try as `grid` (every combination) or as `points`, one of the two")
        if not (self.grid or self.points or self.seeds):
            raise ValueError("name values to try (`grid` or `points`), seeds to repeat over (`seeds`), or both")
        if empty := [key for key, values in self.grid.items() if not values]:
            raise ValueError(f"grid.{empty[0]} lists no value to try")
        if self.points and len({tuple(sorted(point)) for point in self.points}) > 1:
            raise ValueError("every point must name the same fields")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds lists a seed twice")
        return self

    def point_list(self) -> list[dict[str, Any]]:
        """The points to try; seeds alone: one, the spec as written."""
        if self.points:
            return [dict(point) for point in self.points]
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[key] for key in keys))]

    def stages(self) -> list[str]:
        """The stages the sweep's keys name, in the order first named."""
        return list(dict.fromkeys(key.split(".", 1)[0] for point in self.point_list() for key in point))


AS_WRITTEN = "as written"  # the one point of a sweep over seeds alone: the spec's own values


@dataclass(frozen=True)
class Branch:
    point: dict[str, Any]
    seed: int | None
    spec: PipelineSpec

    @property
    def name(self) -> str:
        """`dpo.beta=0.1 seed=1`: what the branch tries."""
        words = [f"{key}={value}" for key, value in self.point.items()]
        return " ".join(words + ([f"seed={self.seed}"] if self.seed is not None else []))

    @property
    def point_name(self) -> str:
        return " ".join(f"{key}={value}" for key, value in self.point.items()) or AS_WRITTEN


def _set(model: BaseModel, parts: list[str], value: Any, key: str) -> BaseModel:
    """`model` with the field at `parts` set to `value`, the value checked against the field's type."""
    fields = type(model).model_fields
    names = {field.alias or name: name for name, field in fields.items()} | {name: name for name in fields}
    if parts[0] not in names:
        nearest = difflib.get_close_matches(parts[0], list(names), n=1)
        hint = f" (did you mean {nearest[0]!r}?)" if nearest else ""
        raise ValueError(f"sweep key {key!r}: {type(model).__name__} has no field {parts[0]!r}{hint}")
    name = names[parts[0]]
    if len(parts) > 1:
        inner = getattr(model, name)
        if not isinstance(inner, BaseModel):
            raise ValueError(f"sweep key {key!r}: {parts[0]} is not a section with fields of its own")
        return model.model_copy(update={name: _set(inner, parts[1:], value, key)})
    try:
        # the field's type with its constraints (gt, ge, a pattern): the value is checked as the spec's own would be
        checked = TypeAdapter(Annotated[fields[name].annotation, fields[name]]).validate_python(value)
    except ValidationError as err:
        raise ValueError(f"sweep key {key!r}: {value!r} is not a value it takes ({err.errors()[0]['msg']})") from None
    return model.model_copy(update={name: checked})


def apply(spec: PipelineSpec, point: dict[str, Any], seed: int | None) -> PipelineSpec:
    """The branch of `spec` that tries `point` with `seed`: a spec without a sweep, whose branches register no
    models (they would move each stage's alias in turn)."""
    stages = {stage.name: stage for stage in spec.stages}
    for key, value in point.items():
        name, _, path = key.partition(".")
        if name not in stages or not path:
            nearest = difflib.get_close_matches(name, list(stages), n=1)
            hint = f" (did you mean {nearest[0]!r}?)" if nearest else f"; the stages are {', '.join(stages)}"
            raise ValueError(f"sweep key {key!r} names no stage field `<stage>.<field>`{hint}")
        stages[name] = _set(stages[name], path.split("."), value, key)
    if seed is not None:
        # the stages the point names; with seeds alone, every stage that trains
        named = [key.split(".", 1)[0] for key in point] or [stage.name for stage in spec.training_stages()]
        for name in dict.fromkeys(named):
            if getattr(stages[name], "train", None) is None:
                raise ValueError(f"sweep seeds: stage {name} trains nothing, so no seed of its own to vary")
            stages[name] = _set(stages[name], ["train", "seed"], seed, f"{name}.train.seed")
            if stages[name].sampled:
                stages[name] = _set(stages[name], ["mix", "seed"], seed, f"{name}.mix.seed")
    return spec.model_copy(update={"stages": [stages[s.name] for s in spec.stages], "sweep": None, "registry": False})


def branches(spec: PipelineSpec) -> list[Branch]:
    """Every branch of a sweep spec, points in order, each over the seeds; one branch, the spec, without a sweep."""
    if spec.sweep is None:
        return [Branch({}, None, spec)]
    seeds: list[int | None] = list(spec.sweep.seeds) or [None]
    return [Branch(point, seed, apply(spec, point, seed)) for point in spec.sweep.point_list() for seed in seeds]
