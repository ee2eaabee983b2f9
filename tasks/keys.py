"""Every content hash the pipeline keys its work by, in one place.

- A stage's fingerprint is the sha256 of what decides its output: its resolved spec (data files by content digest,
  not by path), the input stage's fingerprint, the tokenizer's fingerprint, the fingerprints of the reward stages
  whose models it scores with, the project version and the versions of torch, transformers and peft. It is computed
  from the spec and the data alone, before anything runs, so `status` can show it and a re-run can find the stage's
  finished run in MLflow.
- A prepared dataset is keyed by its data, the tokenizer, the stage kind and the fields that shape the examples.
- Reference log-probs are kept beside the prepared data, keyed by the input checkpoint's fingerprint.
- A data check is remembered by the file's content, its format and policy, and the versions that check it.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib.metadata import version
from pathlib import Path

from schemas.rewards import PythonReward
from schemas.sources import Source
from schemas.spec import DistillStage, EvalStage, Mix, PipelineSpec, RolloutStage, Stage, TrainingStage, TrainSpec

CHUNK = 1 << 20
PLAIN = Source(path=Path(".")).model_dump(exclude={"path", "files"})  # a file read as it is


def content_digest(path: Path) -> str:
    """sha256 of a file's full content, read now (`tasks.seals` checks what is on disk, never a memo of it)."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            sha.update(block)
    return sha.hexdigest()


@cache
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    return content_digest(path)


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


def digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def source_digests(sources: list[Source]) -> list[str]:
    """The content digests of sources' files; a source read with settings (columns, tags, a Hub revision, a weight
    ...) adds them, so changing how a file is read changes the digest as changing the file does."""
    digests: list[str] = []
    for source in sources:
        files = [file_digest(path) for path in source.files]
        plain = source.path is not None and source.model_dump(exclude={"path", "files"}) == PLAIN
        # where the files lie is not what they hold: a moved project keeps its fingerprints
        reading = source.model_dump(mode="json", exclude={"path", "info", "files"})
        digests += files if plain else [digest({"source": reading, "files": files})]
    return digests


def _data(stage: Stage) -> dict[str, list[str]]:
    return {field: source_digests(sources) for field, (sources, _) in stage.files().items()}


def _unless_default(stage: Stage) -> dict[str, bool | set[str]]:
    """Fields added with a default that keeps what a stage makes as it was: left out of the keys while default, so
    the runs of specs that never set them stay reused."""
    left_out: dict[str, bool | set[str]] = {"mix": True} if getattr(stage, "mix", None) == Mix() else {}
    if isinstance(stage, EvalStage) and stage.benchmarks is None:
        left_out["benchmarks"] = True
    if isinstance(stage, TrainingStage):
        default = TrainSpec()
        added = ("optimizer", "neftune_noise_alpha")
        left_out["train"] = {name for name in added if getattr(stage.train, name) == getattr(default, name)}
    if isinstance(stage, RolloutStage) and not stage.tools:
        left_out |= {"tools": True, "max_tool_turns": True}
    if isinstance(stage, DistillStage) and not stage.on_policy:
        left_out |= {"on_policy": True, "max_new_tokens": True}
    return left_out


def _file_functions(stage: Stage) -> dict[str, str]:
    """The `file.py:name` functions a stage's rewards and tools name, each as the file's name and the function's
    (where the checkout lies is not what it runs) with the file's content digest (what it runs)."""
    named = [r.function for r in getattr(stage, "rewards", []) if isinstance(r, PythonReward)]
    named += [tool.function for tool in getattr(stage, "tools", [])]
    found = {}
    for function in named:
        module, name = function.rsplit(":", 1)
        if module.endswith(".py"):
            found[function] = (f"{Path(module).name}:{name}", file_digest(Path(module)))
    return found


def _excluded(stage: Stage) -> dict:
    """What a stage's fingerprint leaves out: its data fields (digested apart), the fields added since that are still
    default, and what changes how fast or in how many processes it runs, how often it checkpoints or logs, and the
    metric an eval's `best` alias follows: none of them changes what it makes (beyond numerical noise)."""
    excluded = dict.fromkeys(stage.files(), True) | _unless_default(stage)
    if isinstance(stage, TrainingStage):
        excluded["train"] = {"save_steps", "logging_steps", *excluded.get("train", ())}
    if isinstance(stage, EvalStage) and stage.benchmarks is not None:
        excluded["benchmarks"] = {"folder"}  # digested apart: where the task files lie is not what they hold
    return excluded | {"launch": True, "memory": True, "best_by": True}


def tokenizer_fingerprint(spec: PipelineSpec) -> str:
    if spec.tokenizer.path is not None:
        source = {"path_digest": folder_digest(spec.tokenizer.path)}
    else:
        source = {
            "train": spec.tokenizer.train.model_dump(mode="json", exclude={"data"}),
            "data": source_digests([source for source, _, _ in spec.tokenizer_corpus()]),
        }
    return digest({"versions": versions(), "template": spec.template, "tokenizer": source})


def stage_fingerprint(spec: PipelineSpec, stage: Stage, fingerprints: dict[str, str], tokenizer: str) -> str:
    """`fingerprints`: those of the stages before it, by name."""
    input_stage = spec.input_of(stage)
    resolved = stage.model_dump(
        mode="json",
        by_alias=True,
        exclude=_excluded(stage),
    )
    payload = {
        "versions": versions(),
        "template": spec.template,
        "stage": resolved,
        "data": _data(stage),
        "tokenizer": tokenizer,
    }
    if functions := _file_functions(stage):  # a file's content, not where it lies
        for entry in [*resolved.get("rewards", []), *resolved.get("tools", [])]:
            if entry.get("function") in functions:
                entry["function"] = functions[entry["function"]][0]
        payload["functions"] = dict(functions.values())
    if isinstance(stage, EvalStage):
        payload["scored"] = {s.name: fingerprints[s.name] for s in spec.scored_by(stage)}
        if (benchmarks := stage.benchmarks) is not None:
            folder = folder_digest(benchmarks.folder) if benchmarks.folder is not None else None
            payload["benchmarks"] = {"folder": folder, "lm_eval": version("lm_eval")}
    elif input_stage is None:
        payload["model"] = (
            spec.model.init.model_dump(mode="json")
            if spec.model.init is not None
            else {"path_digest": folder_digest(spec.model.path)}
        )
    else:
        payload["upstream"] = fingerprints[input_stage.name]  # the key is spelt as every fingerprint so far has it
    if isinstance(stage, DistillStage) and stage.teacher_is_outside() and not stage.teacher.startswith("models:/"):
        payload["teacher"] = folder_digest(Path(stage.teacher))  # a folder's weights, whatever its path
    if loaded := stage.model_stages():  # the key is spelt as fingerprints have had it since reward models came
        payload["reward_models"] = {name: fingerprints[name] for name in loaded}
    return digest(payload)


def part_fingerprint(stage_fingerprint: str, list_length: int) -> str:
    """A curriculum part's: its stage's and the list length it trains on."""
    return digest({"stage": stage_fingerprint, "part": list_length})


def dataset_key(kind: str, stage: Stage, tokenizer_dir: Path) -> str:
    payload = {
        "kind": kind,
        "data": _data(stage),
        "tokenizer": folder_digest(tokenizer_dir),
        "versions": versions(),
        "shape": stage.model_dump(
            mode="json",
            include={
                "packing",
                "max_len",
                "overlong",
                "on_invalid",
                "template",
                "streaming",
                "mix",
                "max_new_tokens",  # a rollout stage drops prompts with no room for a reply
                "on_policy",  # a distillation keeps the data's prompts
            },
            exclude=_unless_default(stage),
        ),
    }
    functions = _file_functions(stage)
    if tools := getattr(stage, "tools", None):  # offered in every prompt, each defined by its function
        payload["tools"] = [functions[t.function] if t.function in functions else t.function for t in tools]
    return digest(payload)


def reference_key(input_fingerprint: str) -> str:
    """The folder name, beside the prepared data, of the reference log-probs of the checkpoint with this fingerprint."""
    return f"reference-{input_fingerprint[:16]}"


def check_key(sources: list[Source], fmt: str, on_invalid: str) -> str:
    return digest([source_digests(sources), fmt, on_invalid, version("llm-lifecycle"), version("pandera")])
