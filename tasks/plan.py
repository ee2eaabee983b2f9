"""The plan of a pipeline run: every stage in order, with its upstream and its fingerprint.

A stage's fingerprint is the sha256 of what decides its output: its resolved spec (data
files by content digest, not by path), the upstream stage's fingerprint, the tokenizer's
fingerprint, the fingerprints of the reward stages whose models it scores with, the project
version and the versions of torch, transformers and peft. It is computed from the spec and
the data alone, before anything runs, so `status` can show it and a re-run can find the
stage's finished run in MLflow.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from importlib.metadata import version
from pathlib import Path

from schemas.spec import TOKENIZER_STAGE, EvalStage, PipelineSpec, Stage, TokenizerSpec

CHUNK = 1 << 20


@cache
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            sha.update(block)
    return sha.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's full content (memoised per process on path, size and mtime)."""
    stat = path.stat()
    return _file_digest(path, stat.st_size, stat.st_mtime_ns)


def folder_digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        sha.update(f"{path.relative_to(folder)}\0{file_digest(path)}\n".encode())
    return sha.hexdigest()


def versions() -> dict[str, str]:
    return {name: version(name) for name in ("llm-lifecycle", "torch", "transformers", "peft")}


@dataclass(frozen=True)
class PlannedStage:
    name: str
    kind: str
    spec: Stage | TokenizerSpec
    fingerprint: str
    upstream: str | None  # the stage whose checkpoint is this stage's input; None: built from the spec
    pipeline: str  # the spec's name: two pipelines in one home never share a stage's work folder or claim

    @property
    def folder(self) -> str:
        """Where this stage's work and claim live inside the home: `<pipeline>/<stage>-<fingerprint>`."""
        return f"{self.pipeline}/{self.name}-{self.fingerprint[:16]}"


def _fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def plan(spec: PipelineSpec) -> list[PlannedStage]:
    """The tokenizer stage, then the spec's stages, each fingerprinted from its inputs."""
    base = {"versions": versions(), "template": spec.template}
    if spec.tokenizer.path is not None:
        source = {"path_digest": folder_digest(spec.tokenizer.path)}
    else:
        source = {
            "train": spec.tokenizer.train.model_dump(mode="json", exclude={"data"}),
            "data": [file_digest(p) for p, _, _ in spec.tokenizer_corpus()],
        }
    tokenizer = PlannedStage(
        TOKENIZER_STAGE, TOKENIZER_STAGE, spec.tokenizer, _fingerprint(base | {"tokenizer": source}), None, spec.name
    )
    planned = {TOKENIZER_STAGE: tokenizer}
    for stage in spec.stages:
        upstream = spec.upstream_of(stage)
        # how often a stage checkpoints or logs, and how many processes share its batch, do not change what it makes
        # (beyond numerical noise): editing them keeps reuse and resume
        resolved = stage.model_dump(
            mode="json",
            by_alias=True,
            exclude=dict.fromkeys(stage.files(), True) | {"train": {"save_steps", "logging_steps"}, "launch": True},
        )
        payload = base | {
            "stage": resolved,
            "data": {field: [file_digest(p) for p in paths] for field, (paths, _) in stage.files().items()},
            "tokenizer": tokenizer.fingerprint,
        }
        if isinstance(stage, EvalStage):
            payload["scored"] = {s.name: planned[s.name].fingerprint for s in spec.scored_by(stage)}
        elif upstream is None:
            payload["model"] = (
                spec.model.init.model_dump(mode="json")
                if spec.model.init is not None
                else {"path_digest": folder_digest(spec.model.path)}
            )
        else:
            payload["upstream"] = planned[upstream.name].fingerprint
        if scorers := stage.reward_stages():
            payload["reward_models"] = {name: planned[name].fingerprint for name in scorers}
        source = upstream.name if upstream is not None and not isinstance(stage, EvalStage) else None
        planned[stage.name] = PlannedStage(stage.name, stage.kind, stage, _fingerprint(payload), source, spec.name)
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
            stage.spec.model_copy(update={"curriculum": [n]}),
            _fingerprint({"stage": stage.fingerprint, "part": n}),
            stage.upstream if i == 0 else f"{stage.name}-n{lengths[i - 1]}",
            stage.pipeline,
        )
        for i, n in enumerate(lengths)
    ]
