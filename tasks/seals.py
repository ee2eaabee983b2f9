"""Checkpoints verified before they load: every folder the pipeline fetches from the store is checked against the
record its stage made of it, and that record is sealed with the team's key when one is set.

The record. When a stage's checkpoint is logged, the full-content digest of its folder (`checkpoint_digest`) is the
logged model's tag `lifecycle.digest`, and the stage's run names its models in its tags (`lifecycle.model_id`,
`lifecycle.adapter_model_id`). With a key (`LIFECYCLE_SIGNING_KEY`, or a file named by `LIFECYCLE_SIGNING_KEY_FILE`,
as a secret is mounted), the run's tag `lifecycle.seal` is an HMAC-SHA256 over the run's id, its fingerprint and each
model's id and digest. A mirrored in-stage checkpoint (`tasks.mirror`) has its digest and seal on the run the same way.

The checks, before anything is published into the home's cache or loaded:

- the downloaded folder's digest equals the model's recorded digest (a changed artifact is refused);
- the run names the model it is asked for: the model's source run is that run (or, for a curriculum stage, the part
  whose checkpoint stands for it), so a run's model tag moved to another checkpoint is refused;
- with a key: the run's seal is the seal of its id, fingerprint and models as they are now, so a forged run, a moved
  tag or a changed digest tag fails; a model or mirror recorded without a seal is refused.

Without a key the digests still catch a corrupted or replaced artifact, but whoever can write to the tracking server
can write a digest too: a team set-up sets the key on every worker (deployments/compose.yaml).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from pathlib import Path

from mlflow.entities import Run

from schemas.errors import LifecycleError
from tasks.keys import content_digest

KEY = "LIFECYCLE_SIGNING_KEY"
KEY_FILE = "LIFECYCLE_SIGNING_KEY_FILE"
DIGEST = "lifecycle.digest"  # on a logged model: the digest of its folder
SEAL = "lifecycle.seal"  # on a stage run: the HMAC of its id, fingerprint and models
MIRROR_DIGEST = "lifecycle.mirror_digest"  # on a run that mirrored an in-stage checkpoint: that folder's digest
MIRROR_SEAL = "lifecycle.mirror_seal"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_ID = re.compile(r"m-[0-9a-f]{32}")  # MLflow's logged-model ids
RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow's run ids


class Refused(LifecycleError):
    """A checkpoint, mirror or tag that does not match the record its stage made: nothing of it is loaded."""


def signing_key() -> bytes | None:
    """The team's key: $LIFECYCLE_SIGNING_KEY, or the content of the file $LIFECYCLE_SIGNING_KEY_FILE names; None when
    neither is set."""
    if key := os.environ.get(KEY):
        return key.encode()
    if path := os.environ.get(KEY_FILE):
        try:
            key = Path(path).read_text().strip()
        except OSError as err:
            raise Refused(f"{KEY_FILE} names {path}, which cannot be read ({err.strerror})") from None
        if not key:
            raise Refused(f"{KEY_FILE} names {path}, which is empty")
        return key.encode()
    return None


def checkpoint_digest(folder: Path) -> str:
    """sha256 over every file of a checkpoint folder, by relative path, each read in full now (never a memo: a file
    rewritten in place keeps its size and can be given back its time). An adapter's `base_model_name_or_path` is left
    out: it names a folder of the machine that loads it, rewritten on each one (`stages.common.contract.
    point_adapter_at`)."""
    sha = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name == ADAPTER_CONFIG and path.parent == folder:
            config = json.loads(path.read_text())
            config.pop("base_model_name_or_path", None)
            content = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
        else:
            content = content_digest(path)
        sha.update(f"{path.relative_to(folder).as_posix()}\0{content}\n".encode())
    return sha.hexdigest()


def _mac(key: bytes, record: dict) -> str:
    return hmac.new(key, json.dumps(record, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def _record(run_id: str, tags: dict[str, str], models: dict[str, str | None]) -> dict:
    """What a stage run's seal covers: its id, fingerprint, models ({id: digest}) and, for a first stage's adapter,
    the user's base model it applies to (its path and digest)."""
    base = {key: tags.get(f"lifecycle.{key}") for key in ("base_model", "base_model_digest")}
    return {"run": run_id, "fingerprint": tags.get("lifecycle.fingerprint"), "models": models, "base": base}


def run_seal(run_id: str, tags: dict[str, str], models: dict[str, str]) -> str | None:
    """The seal of a stage run's record (`_record`, from its tags as they are); None without a key."""
    key = signing_key()
    return None if key is None else _mac(key, _record(run_id, tags, models))


def mirror_seal(run_id: str, step: int, digest: str) -> str | None:
    key = signing_key()
    return None if key is None else _mac(key, {"run": run_id, "mirror": step, "digest": digest})


def check_seal(run: Run, models: dict[str, str | None]) -> None:
    """With a key: the run's seal is that of its id, fingerprint and `models` ({id: recorded digest}) as they are."""
    key = signing_key()
    if key is None:
        return
    tags, run_id = run.data.tags, run.info.run_id
    stage = tags.get("lifecycle.stage", run.info.run_name)
    if missing := [model for model, digest in models.items() if digest is None]:
        raise Refused(
            f"stage {stage} (run {run_id}): model {missing[0]} has no recorded digest (logged before checkpoints were "
            "sealed, or its tag removed); nothing of it is loaded: run its stage again"
        )
    expected = _mac(key, _record(run_id, tags, models))
    if SEAL not in tags:
        raise Refused(f"stage {stage} (run {run_id}) has no seal: it was not recorded by a worker holding this key")
    if not hmac.compare_digest(tags[SEAL], expected):
        raise Refused(
            f"stage {stage} (run {run_id}): its seal does not match its fingerprint, models ({', '.join(models)}) "
            "and base: the record was changed after the stage made it; nothing of it is loaded"
        )


def check_folder(folder: Path, recorded: str | None, what: str) -> None:
    """The folder's content is what was recorded of it (no record: a store from before digests, accepted without a
    key)."""
    if recorded is None:
        return
    found = checkpoint_digest(folder)
    if found != recorded:
        raise Refused(
            f"{what}: its files hold sha256 {found[:16]}…, the record says {recorded[:16]}…: changed since it was "
            "logged; nothing of it is loaded"
        )


def model_id(value: str, where: str) -> str:
    """A tag's value that names a logged model, checked to be one."""
    if not MODEL_ID.fullmatch(value):
        raise Refused(f"{where} is {value!r}, not a logged model's id (m- and 32 hex digits)")
    return value


def run_id(value: str, where: str) -> str:
    if not RUN_ID.fullmatch(value):
        raise Refused(f"{where} is {value!r}, not a run id (32 hex digits)")
    return value
