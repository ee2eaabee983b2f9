"""A stage's checkpoint as an MLflow 3 logged model of its run, and the pipeline's registered model with a version of
each stage's.

Logging. The folder a stage saved (safetensors and config, the tokenizer with its chat template; a PEFT adapter folder
for an unmerged LoRA stage) becomes, as it is, the artifacts of a LoggedModel whose source run is the stage's run: one
upload, to the model's own location (`<experiment>/models/<model id>/artifacts`), and no copy under the run, which
names the model in its outputs and in its tag `lifecycle.model_id`. A merged LoRA stage's adapter is a second model
(`<stage>-adapter`). An adapter names the model it applies to (`lifecycle.base_model_id`), or the user's `model.path`
and its digest. Not `mlflow.transformers.log_model`: it writes the model again in its flavour's layout (an MLmodel file,
the weights in a subfolder of its own), a second format every reader of a checkpoint would have to know, where our
folder is already what every stage, `generate` and `transformers` load. The stage's final metrics are logged with the
model's id, and the eval stage's scores of it too, each with the dataset it was measured on where that is one file: the
model's page lists them with their runs, and its "Datasets used".

Reading. A run is resolved to its model by its tag, a `models:/` URI (`models:/<model id>`, `models:/<name>/<version>`,
`models:/<name>@<alias>`) by the registry, both through the client the caller holds, and the model's artifacts are
downloaded into the home's cache, keyed by model id (a READY model's artifacts do not change). MLflow's own download of
a `models:/` URI resolves it with a client it makes on the process-wide tracking URI
(`ModelsArtifactRepository._get_model_uri_infos`); resolving here keeps every read on the store the caller named. A run
from an older store, whose checkpoint is its run artifact `checkpoint`, is still fetched from there.

The registry: one registered model per pipeline, named like its experiment, with a version of each stage's model.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities import LoggedModel, LoggedModelInput, LoggedModelOutput, LoggedModelStatus, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS, MLFLOW_RUN_NOTE

from schemas.spec import TOKENIZER_STAGE, ModelSpec, lower_is_better
from stages.common.contract import ModelError, StageResult, is_adapter, point_adapter_at
from stages.common.folders import partial_folder, publish
from stages.common.progress import say, transfer
from tasks import seals
from tasks.home import Home
from tasks.keys import folder_digest
from tasks.lineage import TAG, input_run_of
from tasks.plan import PlannedStage

CHECKPOINT = "checkpoint"
ADAPTER = "adapter"
MODEL_ID = f"{TAG}model_id"  # on a stage's run: the logged model of its checkpoint
ADAPTER_MODEL_ID = f"{TAG}adapter_model_id"  # on a merged LoRA stage's run: the logged model of its adapter
ARTIFACT = f"{TAG}artifact"  # on a logged model: checkpoint or adapter, the cache folder it is fetched into
BASE_MODEL_ID = f"{TAG}base_model_id"  # on an adapter's logged model: the model it applies to
BASES = (BASE_MODEL_ID, f"{TAG}base_run", f"{TAG}base_model")  # the tags that can name an adapter's base
BEST = "best"


def model_of(run: Run, artifact: str = CHECKPOINT) -> str | None:
    """The logged model that holds the run's checkpoint (or its adapter); None for a run without one: an eval, or a run
    from before logged models. An unmerged LoRA stage's checkpoint is its adapter."""
    tags = run.data.tags
    if artifact == ADAPTER and ADAPTER_MODEL_ID in tags:
        return tags[ADAPTER_MODEL_ID]
    return tags.get(MODEL_ID)


def log_checkpoints(mlflow: MlflowClient, run_id: str, result: StageResult) -> str | None:
    """The stage's checkpoint (and a merged LoRA stage's adapter) logged as models of its run; the id of the model whose
    metrics the run's final metrics are, or None. A curriculum stage's model is its last part's: named as the stage's
    output, not logged again, and its metrics, the part's, are that model's already."""
    run = mlflow.get_run(run_id)
    step = int(result.counts.get("global_step", 0))
    if result.source_run is not None:
        if (model_id := model_of(mlflow.get_run(result.source_run))) is not None:
            mlflow.log_outputs(run_id, [LoggedModelOutput(model_id, step)])
            digest = mlflow.get_logged_model(model_id).tags.get(seals.DIGEST)
            _name_models(mlflow, run, {MODEL_ID: (model_id, digest)})
        return None
    if result.checkpoint is None:
        return None
    named = {MODEL_ID: _log_model(mlflow, run, run.info.run_name, result.checkpoint, CHECKPOINT, step)}
    if result.adapter is not None:
        named[ADAPTER_MODEL_ID] = _log_model(mlflow, run, f"{run.info.run_name}-adapter", result.adapter, ADAPTER, step)
    _name_models(mlflow, run, named)
    return named[MODEL_ID][0]


def _name_models(mlflow: MlflowClient, run: Run, named: dict[str, tuple[str, str]]) -> None:
    """The run's tags naming its models ({tag: (model id, digest)}), and its seal over them when a key is set."""
    tags = [RunTag(tag, model_id) for tag, (model_id, _) in named.items()]
    seal = seals.run_seal(run.info.run_id, run.data.tags, dict(named.values()))
    mlflow.log_batch(run.info.run_id, tags=tags + ([RunTag(seals.SEAL, seal)] if seal else []))


def _log_model(mlflow: MlflowClient, run: Run, name: str, folder: Path, artifact: str, step: int) -> tuple[str, str]:
    """One folder as a READY logged model of `run`, its content digest recorded with it; a model whose upload fails is
    marked FAILED, never READY. The model's id and digest."""
    tags = run.data.tags
    model_type = _model_type(tags[f"{TAG}kind"], folder)
    digest = seals.checkpoint_digest(folder)
    model_tags = {f"{TAG}{key}": tags[f"{TAG}{key}"] for key in ("stage", "kind", "fingerprint")}
    model_tags |= {ARTIFACT: artifact, seals.DIGEST: digest}
    if is_adapter(folder):
        model_tags |= _base(mlflow, run)
    applies = next((f", on {value}" for key, value in model_tags.items() if key in BASES), "")
    # the model page's description, as the run's: what the stage did, on what, from which input
    model_tags[MLFLOW_RUN_NOTE] = (
        f"The {model_type} of stage **{tags[f'{TAG}stage']}**{applies}. {tags[MLFLOW_RUN_NOTE]}"
    )
    model = mlflow.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run.info.run_id, tags=model_tags, model_type=model_type
    )
    try:
        with transfer(f"model {name} ({model.model_id}) logged to run {run.info.run_id}", "uploaded", folder):
            mlflow.log_model_artifacts(model.model_id, str(folder))
    except BaseException:
        mlflow.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    mlflow.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    mlflow.log_outputs(run.info.run_id, [LoggedModelOutput(model.model_id, step)])
    return model.model_id, digest


def _model_type(kind: str, folder: Path) -> str:
    """What a logged model is, as the Models tab lists it: `generate --model` refuses a tokenizer and a reward model."""
    if kind == TOKENIZER_STAGE:
        return "tokenizer"
    if is_adapter(folder):
        return "lora-adapter"
    return "reward-model" if kind == "reward" else "causal-lm"


def _base(mlflow: MlflowClient, run: Run) -> dict[str, str]:
    """What an adapter trained in `run` applies to, as tags of its model: the input stage's model, or the user's
    model.path and its digest."""
    tags = run.data.tags
    if input_run := input_run_of(run):
        base = model_of(mlflow.get_run(input_run))
        return {BASE_MODEL_ID: base} if base else {f"{TAG}base_run": input_run}
    return {key: tags[key] for key in (f"{TAG}base_model", f"{TAG}base_model_digest") if key in tags}


def log_input_models(mlflow: MlflowClient, run_id: str, runs: list[Run]) -> None:
    """The models a stage's run starts from or scores, as its model inputs (the UI's lineage from model to run)."""
    if inputs := [LoggedModelInput(model) for run in runs if (model := model_of(run)) is not None]:
        mlflow.log_inputs(run_id, models=list({m.model_id: m for m in inputs}.values()))


def fetch_checkpoint(mlflow: MlflowClient, home: Home, run: Run, artifact: str = CHECKPOINT) -> Path:
    """The run's checkpoint in the cache, downloaded once through its logged model and checked against the run's
    record (`tasks.seals`). `artifact` "adapter" asks for a merged LoRA stage's adapter.

    A run of an older store has no model: its checkpoint is the run artifact `checkpoint`, fetched as before, keyed by
    run (a curriculum stage's is its last part's, which the tag `lifecycle.checkpoint_run` names); with a key set,
    such a run is refused, having no seal."""
    if (model_id := model_of(run, artifact)) is not None:
        model = mlflow.get_logged_model(seals.model_id(model_id, f"the model tag of run {run.info.run_id}"))
        _check_binding(mlflow, run, model)
        return _fetch(mlflow, home, model)
    seals.check_seal(run, {})
    tags = run.data.tags
    if f"{TAG}checkpoint_run" in tags:
        source = seals.run_id(tags[f"{TAG}checkpoint_run"], f"the checkpoint_run tag of run {run.info.run_id}")
        return fetch_checkpoint(mlflow, home, mlflow.get_run(source), artifact)
    if artifact == ADAPTER and not any(f.path == ADAPTER for f in mlflow.list_artifacts(run.info.run_id)):
        artifact = CHECKPOINT  # an unmerged LoRA stage's checkpoint is its adapter
    target = home.cache(artifact, run.info.run_id)
    if not target.exists():
        partial = partial_folder(target)
        with transfer(f"{artifact} of {run.info.run_name} (run {run.info.run_id})", "downloaded", partial):
            mlflow.download_artifacts(run.info.run_id, artifact, str(partial))
        _publish(partial / artifact, partial, target, lambda: _base_of(mlflow, home, run))
    return target


def fetch_model(mlflow: MlflowClient, home: Home, model_id: str) -> Path:
    """A logged model's folder in the cache, downloaded once and checked against its stage run's record."""
    model = mlflow.get_logged_model(model_id)
    _check_binding(mlflow, mlflow.get_run(model.source_run_id), model)
    return _fetch(mlflow, home, model)


def _check_binding(mlflow: MlflowClient, run: Run, model: LoggedModel) -> None:
    """`run` is the stage run `model` holds the checkpoint of: the run names it, the model was logged by that run (or by
    the curriculum part whose checkpoint stands for it) for the same fingerprint, and, with a key, the run's seal
    covers its models as they are recorded now."""
    tags, run_id = run.data.tags, run.info.run_id
    named = {tags[tag] for tag in (MODEL_ID, ADAPTER_MODEL_ID) if tag in tags}
    stage = tags.get(f"{TAG}stage", run.info.run_name)
    if model.model_id not in named:
        raise seals.Refused(f"stage {stage} (run {run_id}) does not name model {model.model_id}; nothing is loaded")
    part = tags.get(f"{TAG}checkpoint_run")
    if model.source_run_id != (part or run_id) or (
        part is None and model.tags.get(f"{TAG}fingerprint") != tags.get(f"{TAG}fingerprint")
    ):
        raise seals.Refused(
            f"stage {stage} (run {run_id}) names model {model.model_id} ({model.name}), which run "
            f"{model.source_run_id} logged for another stage or fingerprint; nothing is loaded"
        )
    # the model in hand is not read again; a merged stage's other model is
    digests = {m: (model if m == model.model_id else mlflow.get_logged_model(m)).tags.get(seals.DIGEST) for m in named}
    seals.check_seal(run, dict(sorted(digests.items())))


def _fetch(mlflow: MlflowClient, home: Home, model: LoggedModel) -> Path:
    """A logged model's folder in the cache, its content checked against the digest recorded with it: after the
    download, before it is published; and on every later read of the cache entry. An adapter is made to name the
    fetched folder of the model it was trained on as its base, so it loads on this machine."""
    model_id, artifact, recorded = model.model_id, model.tags.get(ARTIFACT, CHECKPOINT), model.tags.get(seals.DIGEST)
    if artifact not in (CHECKPOINT, ADAPTER):
        raise seals.Refused(f"model {model.name} ({model_id}): its tag {ARTIFACT} is {artifact!r}, not a folder kind")
    what = f"model {model.name} ({model_id}) of run {model.source_run_id}"
    target = home.cache(artifact, model_id)
    if target.exists():
        seals.check_folder(target, recorded, what + " in the cache")
        return target
    if model.status != LoggedModelStatus.READY:
        raise ModelError(
            f"model {model.name} ({model_id}) is {model.status}: its upload did not finish; run the spec again to log "
            "its stage anew"
        )
    partial = partial_folder(target)
    if (stored := _local_folder(model.artifact_location)) is not None:
        with transfer(f"model {model.name} ({model_id})", "linked from the local store", partial):
            local = _linked(stored, partial / stored.name)
    else:
        with transfer(f"model {model.name} ({model_id})", "downloaded", partial):
            local = download_artifacts(
                artifact_uri=model.artifact_location, dst_path=str(partial), tracking_uri=mlflow.tracking_uri
            )
    try:
        seals.check_folder(Path(local), recorded, what)
    except seals.Refused:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _publish(Path(local), partial, target, lambda: _base_of(mlflow, home, mlflow.get_run(model.source_run_id)))
    return target


def _local_folder(uri: str) -> Path | None:
    """The folder a `file://` artifact location is on this machine; None for a server's or an object store's."""
    if not uri.startswith("file://"):
        return None
    folder = Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))
    return folder if folder.is_dir() else None


def _linked(stored: Path, folder: Path) -> str:
    """A logged model of a local store in the cache as hard links to its files, not a second copy on the same disk:
    the files are written once by the stage and never changed in place. An adapter's config is copied, since it is
    rewritten to name this machine's base folder; across file systems every file is copied."""
    for path in sorted(stored.rglob("*")):
        target = folder / path.relative_to(stored)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if path.name == seals.ADAPTER_CONFIG:
                raise OSError("copied, not linked")
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
    return str(folder)


def _publish(folder: Path, partial: Path, target: Path, base: Callable[[], Path]) -> None:
    """Publish a downloaded checkpoint `folder` (inside `partial`) at `target`; an adapter first names `base()`."""
    if is_adapter(folder):
        point_adapter_at(folder, base())
    publish(folder, target)
    shutil.rmtree(partial, ignore_errors=True)


def record_base_model(mlflow: MlflowClient, run_id: str, model: ModelSpec) -> None:
    """Name the spec's model.path, and its content digest, as the base of a first stage (its adapter applies to it);
    a Hub model also by its id and the commit it was read at."""
    path = model.path
    tags = [RunTag(f"{TAG}base_model", str(path)), RunTag(f"{TAG}base_model_digest", folder_digest(path))]
    if model.revision is not None:  # a Hugging Face cache snapshot: <cache>/models--owner--name/snapshots/<commit>
        repo_id = path.parent.parent.name.removeprefix("models--").replace("--", "/")
        tags += [RunTag(f"{TAG}base_model_id", repo_id), RunTag(f"{TAG}base_model_revision", model.revision)]
    mlflow.log_batch(run_id, tags=tags)


def _base_of(mlflow: MlflowClient, home: Home, run: Run) -> Path:
    """The folder an adapter trained in `run` applies to: its input run's checkpoint, or the user's base model,
    unchanged."""
    tags = run.data.tags
    if input_run := input_run_of(run):
        return fetch_checkpoint(mlflow, home, mlflow.get_run(input_run))
    stage, base, digest = tags.get(f"{TAG}stage"), Path(tags[f"{TAG}base_model"]), tags[f"{TAG}base_model_digest"]
    if not (base / "config.json").exists():
        raise ModelError(
            f"stage {stage}: its adapter (run {run.info.run_id}) applies to the base model {base} "
            f"(sha256 {digest[:12]}), which is not on this machine: copy that checkpoint to {base}"
        )
    if folder_digest(base) != digest:
        raise ModelError(
            f"stage {stage}: its adapter (run {run.info.run_id}) applies to the base model {base} as it was "
            f"(sha256 {digest[:12]}), and that folder has changed since: restore it, or run the spec again to train "
            "on it as it is"
        )
    return base


def fetch_language_model(mlflow: MlflowClient, home: Home, uri: str) -> Path:
    """The language model a `models:/` URI names, fetched (an adapter, onto its base); a tokenizer or a reward model
    is refused."""
    model = mlflow.get_logged_model(model_id_of(mlflow, uri))
    if model.model_type in ("tokenizer", "reward-model"):
        raise ModelError(f"{uri} is a {model.model_type} (stage {model.name}), not a language model; name one that is")
    return fetch_model(mlflow, home, model.model_id)


def model_id_of(mlflow: MlflowClient, uri: str) -> str:
    """The logged model a `models:/` URI names: `models:/<model id>`, `models:/<name>/<version>` or
    `models:/<name>@<alias>` (a registered version of a model this tool logged)."""
    path = uri.removeprefix("models:/")
    forms = "models:/<model id>, models:/<name>/<version> or models:/<name>@<alias>"
    if path == uri or not path:
        raise ModelError(f"{uri} is not a models:/ URI; give {forms}")
    try:
        if "@" in path:
            version = mlflow.get_model_version_by_alias(*path.split("@", 1))
        elif "/" in path:
            version = mlflow.get_model_version(*path.split("/", 1))
        else:
            return mlflow.get_logged_model(path).model_id
    except MlflowException as err:
        raise ModelError(f"{uri}: no such model in the store at {mlflow.tracking_uri} ({err.message})") from None
    # a SQL registry keeps a version's model only as its source, `models:/<model id>` (ModelVersion.model_id unset)
    model_id = version.model_id or version.source.removeprefix("models:/")
    if not model_id.startswith("m-"):
        raise ModelError(f"{uri} (version {version.version} of {version.name}) names no logged model: {version.source}")
    return model_id


# ---------------------------------------------------------------- the registry


def register(
    mlflow: MlflowClient, pipeline: str, stage: PlannedStage, run_id: str, input_version: str | None
) -> str | None:
    """The stage's model as a version of the pipeline's registered model, once: a run already registered keeps its
    version (a re-run that reuses the stage adds none). Its number, or None for a stage without a model to register:
    the tokenizer (every checkpoint carries it), an eval, a run from before logged models.

    One registered model per pipeline, not one per `<pipeline>-<stage>`: the eval's `best` names one checkpoint of the
    lineage, whichever stage made it, and an alias lives in one registered model. With one per stage, `best` would sit
    on one name of ten and jump between them, and no URI would say "this pipeline's best"; in one, it is
    `models:/<pipeline>@best`, each stage's current version is the alias of its name (`models:/quick@sft`), and the
    version list reads as the lineage, in the order stages finished. Each version's tags say what it is: the stage,
    its kind and fingerprint, and the version of its input stage's model (`lifecycle.input_version`). A stage whose
    name MLflow keeps for itself (`latest`, `v<n>`) or that is `best` gets no alias of its name."""
    run = mlflow.get_run(run_id)
    if stage.kind == TOKENIZER_STAGE or (model_id := model_of(run)) is None:
        return None
    _registered_model(mlflow, pipeline)
    version = _version_of(mlflow, pipeline, run_id)
    if version is None:
        tags = {f"{TAG}stage": stage.name, f"{TAG}kind": stage.kind, f"{TAG}fingerprint": stage.fingerprint}
        if input_version is not None:
            tags[f"{TAG}input_version"] = input_version
        # the registry resolves a models:/ source on the process's tracking URI, which `Home.configure` points at the
        # store this client writes to
        created = mlflow.create_model_version(
            pipeline,
            f"models:/{model_id}",
            run_id=run_id,
            tags=tags,
            description=run.data.tags.get(MLFLOW_RUN_NOTE),
            model_id=model_id,
        )
        version = _version_of(mlflow, pipeline, run_id)
        if version != str(created.version):  # another process registered the run at the same moment: the first stands
            mlflow.delete_model_version(pipeline, str(created.version))
        else:
            _name_version_on_model(mlflow, model_id, pipeline, version)
    if not re.fullmatch(r"latest|best|[vV]\d+", stage.name):
        mlflow.set_registered_model_alias(pipeline, stage.name, version)
    return version


def _registered_model(mlflow: MlflowClient, name: str) -> None:
    try:
        mlflow.create_registered_model(
            name,
            tags={f"{TAG}pipeline": name},
            description=f"Pipeline **{name}**: a version of each stage's model, in the order the stages finished; "
            f"aliases: each stage's name, and `{BEST}` (the eval stage's choice).",
        )
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def _version_of(mlflow: MlflowClient, name: str, run_id: str) -> str | None:
    """The first version registered for the run, if any."""
    found = mlflow.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return str(min(int(v.version) for v in found)) if found else None


def _name_version_on_model(mlflow: MlflowClient, model_id: str, name: str, version: str) -> None:
    """List the version on its logged model's page (the UI reads the tag `mlflow.modelVersions`, as
    `mlflow.register_model` writes it)."""
    listed = json.loads(mlflow.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    mlflow.set_logged_model_tags(
        model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*listed, {"name": name, "version": version}])}
    )


def mark_best(
    mlflow: MlflowClient, pipeline: str, evaluation: str, table: dict, metric: str, versions: dict[str, str]
) -> str | None:
    """Point the alias `best` at the version of the checkpoint the eval table (a log_table JSON, a row per checkpoint)
    scores best by `metric`; of equals, the earlier checkpoint. No checkpoint measured on it, or every one scoring the
    same: the alias is removed, so it never names a lineage this eval did not score, nor one no better than the rest.
    The version, or None; the registered model's tag `lifecycle.best` says which checkpoint and why, as a sentence."""
    columns, rows = table["columns"], table["data"]
    scored = []
    if metric in columns:
        at, named = columns.index(metric), columns.index("checkpoint")
        scored = [
            (row[at], row[named])
            for row in rows
            if isinstance(row[at], int | float) and math.isfinite(row[at]) and row[named] in versions
        ]
    values = {value for value, _ in scored}
    if not scored or (len(scored) > 1 and len(values) == 1):
        try:
            mlflow.delete_registered_model_alias(pipeline, BEST)
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
        why = (
            f"No version is best: eval {evaluation} measured no checkpoint's {metric}."
            if not scored
            else f"No version is best: all {len(scored)} checkpoints scored {metric} {scored[0][0]:.4g} in eval "
            f"{evaluation}."
        )
        mlflow.set_registered_model_tag(pipeline, f"{TAG}best", why)
        say(f"registry {pipeline}: no alias {BEST}. {why}")
        return None
    lower = lower_is_better(metric)
    value, name = (min if lower else max)(scored, key=lambda pair: pair[0])  # the first of equals: the earlier stage
    mlflow.set_registered_model_alias(pipeline, BEST, versions[name])
    why = (
        f"{name} (version {versions[name]}) is best: {metric} {value:.4g}, the {'lowest' if lower else 'highest'} of "
        f"{len(scored)} checkpoints in eval {evaluation}."
    )
    mlflow.set_registered_model_tag(pipeline, f"{TAG}best", why)
    return versions[name]
