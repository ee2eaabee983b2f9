"""From a spec file to a validated, resolved `PipelineSpec`: YAML read, the model tree validated, every path
made absolute against the spec's folder, defaults that depend on other stages filled in, and the checks that
need the files (a model you bring, how stages are launched). `load_spec` raises `SpecError`, whose message names
each bad field by its path (`stages[1].train.lr`) and says what is allowed: the field, kind or stage nearest a
misspelt one, and the line and column of a YAML syntax error.
"""

from __future__ import annotations

import glob
import json
import re
from difflib import SequenceMatcher
from pathlib import Path
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from schemas.architectures import own_model_problems
from schemas.errors import LifecycleError
from schemas.memory import Memory
from schemas.rewards import PythonReward
from schemas.sources import Source, Unresolved, expand, hub_snapshot, resolve
from schemas.spec import (
    ChatStage,
    DistillStage,
    EvalStage,
    PipelineSpec,
    ReferenceStage,
    RewardStage,
    RolloutStage,
    TokenizerSpec,
    TrainingStage,
)


class SpecError(LifecycleError, ValueError):
    """A spec that cannot run, with one line per problem."""


def _members(annotation: object) -> list[type[BaseModel]]:
    """The models a field may hold, through Optional, Annotated, list and unions: where a misspelt key is looked up."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) is Annotated:
        return _members(get_args(annotation)[0])
    return [model for arg in get_args(annotation) for model in _members(arg)]


def _tags(model: type[BaseModel]) -> tuple[str, ...]:
    """The `kind` values that pick `model` out of a tagged union (a stage, a reward)."""
    field = model.model_fields.get("kind")
    return get_args(field.annotation) if field is not None and get_origin(field.annotation) is Literal else ()


def _keys(model: type[BaseModel]) -> dict[str, object]:
    """The keys a spec gives `model` (a field's alias where it has one: `from`), each with its field's annotation."""
    return {field.alias or name: field.annotation for name, field in model.model_fields.items()}


def _union(annotation: object) -> bool:
    """Whether a field holds one of several types (None aside): pydantic names the branch in an error's location."""
    if get_origin(annotation) is Annotated:
        return _union(get_args(annotation)[0])
    return get_origin(annotation) in (Union, UnionType) and len(set(get_args(annotation)) - {type(None)}) > 1


def _walk(loc: tuple) -> tuple[str, list[type[BaseModel]]]:
    """The path of a pydantic error's location as the user writes it (`stages[1].train.lr`), and the models that may
    stand there. The union branch pydantic puts in a location (a stage's kind, a member's class name, a type's schema)
    is left out of the path, which it adds nothing to, but a kind or a class name says whose fields apply."""
    out, models, union = "", [PipelineSpec], False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        if branch := [m for m in models if part == m.__name__ or (len(models) > 1 and part in _tags(m))]:
            models, union = branch, False
            continue
        if union and not any(part in _keys(m) for m in models):
            union = False  # the label of a member that is no model: `lax-or-strict[...]` for a Path
            continue
        out += f".{part}" if out else str(part)
        annotations = [_keys(m)[part] for m in models if part in _keys(m)]
        models = [member for annotation in annotations for member in _members(annotation)]
        union = any(_union(annotation) for annotation in annotations)
    return out, models


def _suggest(word: object, choices: list[str]) -> str:
    """`; did you mean x?` for the choice nearest a misspelt `word` (as difflib's get_close_matches scores them; of
    equally near ones, the first listed: dpp is dpo before ppo); nothing where none is near."""
    scored = [(SequenceMatcher(None, str(word), choice).ratio(), -i, choice) for i, choice in enumerate(choices)]
    score, _, choice = max(scored, default=(0.0, 0, ""))
    return f"; did you mean {choice}?" if score >= 0.6 else ""


def _hint(error: ErrorDetails) -> str:
    """What to write instead, for the errors a typo makes: an unknown key (the nearest field, else every field
    there), an unknown or missing kind (the nearest kind, or every kind). A `from` naming no earlier stage says what it
    may name where the spec checks it (`PipelineSpec._stages_link`)."""
    kind, loc = error["type"], error["loc"]
    if kind == "extra_forbidden":
        _, models = _walk(loc[:-1])
        keys = list(dict.fromkeys(key for model in models for key in _keys(model)))
        if not keys:
            return ""
        tags = [tag for model in models for tag in _tags(model)]
        where = f" of kind {tags[0]}" if len(tags) == 1 else " here"
        return _suggest(loc[-1], keys) or f"; the fields{where}: {', '.join(keys)}"
    if kind == "union_tag_invalid":
        return _suggest(error["ctx"]["tag"], [tag for model in _walk(loc)[1] for tag in _tags(model)])
    if kind == "union_tag_not_found":
        return f"; give kind, one of {', '.join(tag for model in _walk(loc)[1] for tag in _tags(model))}"
    return ""


def _problem(error: ErrorDetails) -> str:
    """One line of a spec's problems: where, what pydantic says is wrong, the value given, and what to write."""
    got = f" (got {error['input']!r})" if error["type"] != "missing" and not isinstance(error["input"], dict) else ""
    message = error["msg"].removeprefix("Value error, ")
    # a check of the whole spec names its own fields (`stages[1].from names ...`): no `(top level):` before it
    where = f"{_walk(error['loc'])[0]}: " if error["loc"] else ""
    return f"{where}{message}{got}{_hint(error)}"


def _marked(lines: list[str], mark: yaml.Mark) -> str:
    """The line a YAML mark points into, numbered, with a caret under its column."""
    shown = lines[mark.line] if mark.line < len(lines) else ""
    # a tab before the column stays a tab, so the caret lines up as the terminal draws the line
    caret = "".join(c if c == "\t" else " " for c in shown[: mark.column]) + "^"
    number = str(mark.line + 1)
    return f"\n  {number} | {shown}\n  {' ' * len(number)} | {caret}"


def _yaml_problem(path: Path, text: str, err: yaml.YAMLError) -> str:
    """A YAML syntax error as `file:line:column` and what the parser expected, with the line it stopped on (and the
    line where what it was reading began: an unclosed bracket is found lines after it)."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return f"{path}: not valid YAML: {err}"
    lines = text.splitlines()
    message = f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {err.problem}"
    start = err.context_mark
    if err.context and start is not None:
        message += f" ({err.context} that starts at line {start.line + 1}, column {start.column + 1})"
        if start.line != mark.line:
            message += _marked(lines, start)
    return message + _marked(lines, mark)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _from_hub(path: Path, base: Path, revision: str | None) -> bool:
    """Whether a model or tokenizer path names a Hub id: owner/name, and no such folder here (or a revision given)."""
    return bool(HUB_ID.match(str(path))) and (revision is not None or not (base / path).is_dir())


def folder_or_snapshot(
    path: Path, base: Path, where: str, missing: list[str], revision: str | None = None
) -> tuple[Path, str | None]:
    """A model or tokenizer folder, and None: the local one; or a Hub id's snapshot in the Hugging Face cache at
    `revision`, and the commit it holds."""
    resolved = path if path.is_absolute() else (base / path).resolve()
    if _from_hub(path, base, revision):
        try:
            snapshot = hub_snapshot(str(path), revision, "model")
            return snapshot, snapshot.name
        except Unresolved as err:
            missing.append(f"{where}: {path} is not a folder here (looked for {resolved}), and {err}")
    elif not resolved.is_dir():
        missing.append(f"{where}: {path} is not a folder (looked for {resolved})")
    return resolved, None


def _eval_defaults(spec: PipelineSpec, stage: EvalStage) -> EvalStage:
    """An eval stage's unnamed checkpoints, data and rewards filled in: every scored stage, every held-out file they
    have, the last earlier reward stage's model, the last scored grpo or ppo stage's rewards."""
    scored = spec.scored_by(stage)
    update: dict[str, object] = {"checkpoints": [s.name for s in scored]}
    for fmt in ("text", "conversations", "prompts", "preference", "ranked"):
        if not getattr(stage, fmt):
            update[fmt] = list(dict.fromkeys(source for s in scored if s.data_format == fmt for source in s.heldout))
    earlier = spec.stages[: spec.stages.index(stage)]
    if stage.reward_model is None and (reward := [s for s in earlier if isinstance(s, RewardStage)]):
        update["reward_model"] = reward[-1].name
    if not stage.rewards and (rollout := [s for s in scored if isinstance(s, RolloutStage)]):
        update["rewards"] = rollout[-1].rewards
    return stage.model_copy(update=update)


def _resolve(spec: PipelineSpec, base: Path) -> PipelineSpec:
    """Every data path made absolute against the spec's folder and expanded into the files it names; templates and
    eval defaults filled in."""

    def fix(path: Path, where: str) -> list[Path]:
        resolved = path if path.is_absolute() else (base / path).resolve()
        files = expand([resolved])
        if not files:
            missing.append(
                f"{where}: {path} does not exist (looked for {resolved})"
                if glob.escape(str(path)) == str(path)
                else f"{where}: {path} matches no file (looked for {resolved})"
            )
        return files

    def found(sources: list[Source], where: str) -> list[Source]:
        """Each source with the files it reads; what names nothing readable is a problem of its field."""
        resolved = []
        for i, source in enumerate(sources):
            try:
                resolved.append(resolve(source, base, spec.dataset_info))
            except Unresolved as err:
                missing.append(f"{where}[{i}]: {err}")
        return resolved

    missing: list[str] = []
    stages = []
    for i, stage in enumerate(spec.stages):
        update = {field: found(sources, f"stages[{i}].{field}") for field, (sources, _) in stage.files().items()}
        if isinstance(stage, (ChatStage, EvalStage)):
            update["template"] = stage.template or spec.template
        if isinstance(stage, EvalStage) and stage.benchmarks is not None and stage.benchmarks.folder is not None:
            folder = stage.benchmarks.folder
            resolved = folder if folder.is_absolute() else (base / folder).resolve()
            if not resolved.is_dir():
                missing.append(f"stages[{i}].benchmarks.folder: {folder} is not a folder (looked for {resolved})")
            update["benchmarks"] = stage.benchmarks.model_copy(update={"folder": resolved})
        if isinstance(stage, (RolloutStage, EvalStage)):
            update |= _functions_found(stage, i, base, missing)
        if isinstance(stage, TrainingStage):
            # the pipeline's launch is every training stage's but the rollout stages', which run in one process for now
            update["launch"] = launch = stage.launch or (spec.launch if not isinstance(stage, RolloutStage) else None)
            update["memory"] = stage.memory or spec.memory or Memory()
            if launch is not None and isinstance(launch.deepspeed, Path):
                config = fix(launch.deepspeed, f"stages[{i}].launch.deepspeed")
                update["launch"] = launch.model_copy(update={"deepspeed": config[0] if config else launch.deepspeed})
        stages.append(stage.model_copy(update=update))
    spec = spec.model_copy(update={"stages": stages})
    for i, stage in enumerate(stages):
        if isinstance(stage, EvalStage):
            stages[i] = _eval_defaults(spec, stage)
    model = spec.model
    if model.path is not None:
        folder, commit = folder_or_snapshot(model.path, base, "model.path", missing, model.revision)
        model = model.model_copy(update={"path": folder, "revision": commit})
    tokenizer = spec.tokenizer
    if tokenizer.path is not None:
        # a tokenizer named like the model is the model's, at the model's revision
        revision = model.revision if spec.tokenizer.path == spec.model.path else None
        folder, _ = folder_or_snapshot(tokenizer.path, base, "tokenizer.path", missing, revision)
        tokenizer = tokenizer.model_copy(update={"path": folder})
    elif tokenizer.train is not None and tokenizer.train.data:
        train = tokenizer.train.model_copy(update={"data": found(tokenizer.train.data, "tokenizer.train.data")})
        tokenizer = tokenizer.model_copy(update={"train": train})
    for i, stage in enumerate(stages):
        if isinstance(stage, DistillStage) and stage.teacher_is_outside():
            stages[i] = _outside_teacher(stage, i, base, tokenizer, missing)
    if missing:
        raise SpecError("\n".join(missing))
    return spec.model_copy(update={"stages": stages, "model": model, "tokenizer": tokenizer})


def _file_function(function: str, base: Path, where: str, missing: list[str]) -> str:
    """`file.py:name` with the file made absolute against the spec's folder (and refused when there is no such file);
    `module:name` as it is (imported where the stage runs)."""
    module, name = function.rsplit(":", 1)
    if not module.endswith(".py"):
        return function
    path = Path(module) if Path(module).is_absolute() else (base / module).resolve()
    if not path.is_file():
        missing.append(f"{where}: {module} is not a file (looked for {path})")
    return f"{path}:{name}"


def _functions_found(stage: RolloutStage | EvalStage, i: int, base: Path, missing: list[str]) -> dict[str, list]:
    """A stage's Python rewards and tools (an eval stage's rewards) with their files found: the fields to update."""
    update: dict[str, list] = {
        "rewards": [
            reward.model_copy(
                update={"function": _file_function(reward.function, base, f"stages[{i}].rewards[{j}]", missing)}
            )
            if isinstance(reward, PythonReward)
            else reward
            for j, reward in enumerate(stage.rewards)
        ]
    }
    if isinstance(stage, RolloutStage):
        update["tools"] = [
            tool.model_copy(
                update={"function": _file_function(tool.function, base, f"stages[{i}].tools[{j}]", missing)}
            )
            for j, tool in enumerate(stage.tools)
        ]
    return update


def _outside_teacher(
    stage: DistillStage, i: int, base: Path, tokenizer: TokenizerSpec, missing: list[str]
) -> DistillStage:
    """A teacher from outside the spec: a folder made absolute, and refused unless it shares the pipeline's
    tokenizer (a models:/ URI's is checked when the stage loads it)."""
    where = f"stages[{i}].teacher"
    if stage.teacher.startswith("models:/"):
        return stage
    folder, _ = folder_or_snapshot(Path(stage.teacher), base, where, missing)
    if not folder.is_dir():
        return stage
    if tokenizer.path is None:
        missing.append(
            f"{where}: {stage.teacher} cannot teach this pipeline: the pipeline trains a tokenizer of its own, which "
            "no outside model shares (a teacher's distributions are over its own tokens); name a stage of this spec "
            "as the teacher, or give tokenizer.path"
        )
    elif (differs := tokenizer_difference(folder, tokenizer.path)) is not None:
        missing.append(
            f"{where}: {stage.teacher} does not share the pipeline's tokenizer ({tokenizer.path}): {differs}"
        )
    return stage.model_copy(update={"teacher": str(folder)})


def tokenizer_difference(teacher: Path, pipeline: Path) -> str | None:
    """How two tokenizer folders' vocabularies differ (tokenizer.json's), in words; None when they agree or when a
    folder holds no tokenizer.json to compare (the stage compares the loaded tokenizers then)."""
    try:
        vocabularies = [
            json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"] for folder in (teacher, pipeline)
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    theirs, ours = vocabularies
    if theirs == ours:
        return None
    if len(theirs) != len(ours):
        return f"{len(theirs)} tokens against {len(ours)}"
    token = next(t for t in ours if theirs.get(t) != ours[t])
    return f"token {token!r} is {theirs.get(token)} there and {ours[token]} here"


def _launch_problems(spec: PipelineSpec) -> list[str]:
    """A launch the stage cannot run under: a batch the ranks cannot share evenly, a config that is not one, a frozen
    reference under ZeRO-3."""
    problems = []
    for i, stage in enumerate(spec.stages):
        launch = getattr(stage, "launch", None)
        if launch is None:
            continue
        where = f"stages[{i}] ({stage.name})"
        if stage.train.batch_size % launch.world_size:
            problems.append(
                f"{where}: train.batch_size {stage.train.batch_size} is the batch of all {launch.world_size} processes "
                f"together and must divide evenly among them"
            )
        try:
            zero = launch.zero_stage()
        except ValueError as err:
            problems.append(f"{where}.launch.deepspeed: {launch.deepspeed} is not a DeepSpeed JSON config ({err})")
            continue
        if isinstance(stage, RolloutStage):
            problems.append(
                f"{where}: a {stage.kind} stage runs in one process for now (its sampling is not sharded among ranks): "
                "leave launch out of it"
            )
        sharded = launch.deepspeed is not None or launch.fsdp is not None
        if sharded and stage.lora is not None and stage.lora.quantize is not None:
            engine = "DeepSpeed" if launch.deepspeed is not None else "FSDP"
            problems.append(
                f"{where}: lora.quantize places the whole quantized base on each process's device, which {engine} "
                "does not shard; run it under torchrun (DDP) or in one process"
            )
        if zero == 3 and isinstance(stage, ReferenceStage) and stage.reference_strategy() == "frozen":
            problems.append(
                f"{where}: a frozen reference copy is not sharded under ZeRO-3 or FSDP (every rank would hold the "
                "whole model again); use reference: precomputed, or lora with reference: adapter-off"
            )
    return problems


def load_spec(path: Path) -> PipelineSpec:
    """Read, validate and resolve a spec file; raise SpecError with every problem found."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SpecError(f"{path}: cannot read the spec ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise SpecError(f"{path}: not UTF-8 text (byte {err.start}): is it the spec?") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(_yaml_problem(path, text, err)) from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a mapping with name, model and stages")
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as err:
        problems = [_problem(e) for e in err.errors()]
        raise SpecError(f"{path}: {len(problems)} problem(s) in the spec\n  " + "\n  ".join(problems)) from None
    try:
        spec = _resolve(spec, path.resolve().parent)
    except SpecError as err:
        raise SpecError(f"{path}: missing files\n  " + str(err).replace("\n", "\n  ")) from None
    if problems := own_model_problems(spec):
        raise SpecError(
            f"{path}: {len(problems)} problem(s) with the model or tokenizer it names\n  " + "\n  ".join(problems)
        )
    if problems := _launch_problems(spec):
        raise SpecError(f"{path}: {len(problems)} problem(s) with how stages are launched\n  " + "\n  ".join(problems))
    return spec
