"""`lifecycle gc`: what a home holds that nothing will read again, found against the store's record and removed.

- A work folder (`work/<pipeline>/<stage>-<fingerprint>`) of a stage that has a FINISHED run: its model is a logged
  model now, fetched into the cache when a stage needs it, so the folder serves nothing (a run finished before
  work folders were emptied at the end of a stage left its saved model and in-stage checkpoints there).
- In the work folder of a stage that did not finish: every in-stage checkpoint but the newest complete one, the one a
  re-run resumes from (each holds the optimizer's state, twice the weights). With `--unfinished` the whole folder:
  the stage then starts from step 0 when it runs again.
- A cache entry of a checkpoint whose logged model (or run, for a store from before logged models) is no longer in the
  store, and any entry left half-written by a process that died.

A stage being run right now (its run RUNNING and alive) is never touched. Prepared datasets, data checks and
benchmark scores are keyed by content, so a re-run of any spec finds them: they are listed with their size, not
removed.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException

from stages.common.progress import folder_size
from stages.common.training import complete
from tasks.home import Home, running
from tasks.lineage import TAG, alive

CHECKPOINT = re.compile(r"checkpoint-(\d+)")
PARTIAL = re.compile(r".*\.partial-(\d+)")


@dataclass(frozen=True)
class Found:
    path: Path
    size: int
    why: str
    removed: bool  # removed (or, in a dry run, to be removed); False: kept, listed for what it holds


def _stage_runs(mlflow: MlflowClient, experiments: list[str], folder: Path) -> list:
    """The runs of the stage whose work folder is `folder` (`<stage>-<first 16 hex of its fingerprint>`)."""
    stage, _, prefix = folder.name.rpartition("-")
    if not experiments or not stage or not re.fullmatch(r"[0-9a-f]{16}", prefix):
        return []
    query = f"tags.`{TAG}stage` = '{stage}' and tags.`{TAG}fingerprint` LIKE '{prefix}%'"
    return mlflow.search_runs(experiments, query, max_results=100)


def _newest_complete(trainer: Path) -> Path | None:
    """The in-stage checkpoint a re-run resumes from (`stages.common.training.last_checkpoint`'s rule)."""
    saved = [c for c in trainer.glob("checkpoint-*") if CHECKPOINT.fullmatch(c.name) and complete(c)]
    return max(saved, key=lambda c: int(c.name.split("-")[1]), default=None)


def work_folders(mlflow: MlflowClient, home: Home, experiments: list[str], unfinished: bool) -> list[Found]:
    found = []
    for folder in sorted((home.root / "work").glob("*/*")):
        if not folder.is_dir():
            continue
        runs = _stage_runs(mlflow, experiments, folder)
        if any(run.info.status == "RUNNING" and alive(run) for run in runs):
            found.append(Found(folder, folder_size(folder), "a stage being run right now", False))
        elif finished := next((run for run in runs if run.info.status == "FINISHED"), None):
            found.append(Found(folder, folder_size(folder), f"finished as run {finished.info.run_id}", True))
        elif unfinished:
            found.append(Found(folder, folder_size(folder), "a stage that did not finish (--unfinished)", True))
        else:
            newest = _newest_complete(folder / "trainer")
            for other in sorted((folder / "trainer").glob("checkpoint-*")):
                if other != newest:
                    why = (
                        f"an in-stage checkpoint older than {newest.name}"
                        if complete(other)
                        else "cut short: incomplete"
                    )
                    found.append(Found(other, folder_size(other), why, True))
            if newest is not None:
                found.append(Found(newest, folder_size(newest), "where a re-run of this stage resumes", False))
    return found


def cache_entries(mlflow: MlflowClient, home: Home) -> list[Found]:
    found = []
    cache = home.root / "cache"
    for entry in sorted(cache.glob("*/*")):
        if (partial := PARTIAL.fullmatch(entry.name)) and not running(int(partial.group(1))):
            found.append(Found(entry, folder_size(entry), "left half-written by a process that died", True))
        elif entry.parent.name in ("checkpoint", "adapter") and not partial:
            if (why := _orphan(mlflow, entry.name)) is not None:
                found.append(Found(entry, folder_size(entry), why, True))
        elif entry.parent.name in ("datasets", "checked", "benchmarks") and not partial:
            found.append(Found(entry, folder_size(entry), f"{entry.parent.name}, keyed by content: kept", False))
    return found


def _orphan(mlflow: MlflowClient, key: str) -> str | None:
    """Why a checkpoint cache entry serves nothing any more, or None while its model (or run) is in the store."""
    try:
        if key.startswith("m-"):
            model = mlflow.get_logged_model(key)
            return None if model.status == LoggedModelStatus.READY else f"its model {key} is {model.status}"
        mlflow.get_run(key)
        return None
    except MlflowException:
        return f"{'model' if key.startswith('m-') else 'run'} {key} is not in the store"


def collect(mlflow: MlflowClient, home: Home, dry_run: bool, unfinished: bool = False) -> list[Found]:
    """Everything found, and, unless `dry_run`, what is to go removed."""
    experiments = [e.experiment_id for e in mlflow.search_experiments(max_results=1000)]
    found = work_folders(mlflow, home, experiments, unfinished) + cache_entries(mlflow, home)
    if not dry_run:
        for item in found:
            if item.removed:
                shutil.rmtree(item.path, ignore_errors=True)
    return found
