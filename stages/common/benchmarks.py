"""An eval stage's benchmarks: lm-evaluation-harness tasks run on each checkpoint the stage has loaded.

lm-eval runs through its Python API on the model already in memory (`HFLM(pretrained=model)`), one
`simple_evaluate` call per task, so each task keeps its own chat flag and few-shot count and its own time.
A task's metrics become columns `<task>/<metric>` (lm-eval's default filter `none` dropped from the name, another
filter kept as `<metric>_<filter>`; stderr left out); a group's own aggregate is a column as its tasks' are.

Scores are kept in the home, keyed by the checkpoint's run, the task and every setting that changes a score
(few-shot count, chat, limit, batch size, seed, the task files, lm-eval's version): a run that scores the same
checkpoint on the same task again reuses them instead of running lm-eval.

Offline is the normal case: a task whose data is a Hugging Face dataset not in the local cache is a problem found
before any model loads (`problems`), naming the task, the dataset and how to fetch it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from schemas.benchmarks import Benchmarks, Task
from schemas.spec import EvalStage, PipelineSpec
from stages.common.progress import duration, say

# dataset builders that read local files: their data is wherever the task's files say, not in the Hub's cache
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "imagefolder", "audiofolder"}


def task_manager(benchmarks: Benchmarks):
    """lm-eval's index of the tasks: the folder's alone where it holds every task named (lm-eval's own thousands of
    task files take seconds to index), else lm-eval's and the folder's."""
    from lm_eval.tasks import TaskManager

    if benchmarks.folder is not None:
        own = TaskManager(include_path=str(benchmarks.folder), include_defaults=False)
        if all(task.task in own.task_index for task in benchmarks.tasks):
            return own
    return TaskManager(include_path=str(benchmarks.folder) if benchmarks.folder is not None else None)


def _leaves(manager, name: str, seen: set[str]) -> list[dict]:
    """The configs of the tasks a name stands for: itself, or every task of a group or tag, recursively."""
    from lm_eval.tasks._index import Kind

    if name in seen or (entry := manager.task_index.get(name)) is None:
        return []
    seen.add(name)
    if entry.kind == Kind.TAG:
        return [c for member, e in manager.task_index.items() if name in e.tags for c in _leaves(manager, member, seen)]
    if entry.kind == Kind.GROUP:
        members = entry.cfg.get("task", []) if entry.cfg else []
        named = [m if isinstance(m, str) else m.get("task", m.get("group")) for m in members]
        return [c for member in named if isinstance(member, str) for c in _leaves(manager, member, seen)]
    return [entry.cfg or {"task": name}]


def _cached(dataset: str) -> bool:
    """Whether a Hub dataset's files or prepared tables lie in the local caches (the hub's, or the datasets')."""
    import datasets
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}").exists() or (
        Path(datasets.config.HF_DATASETS_CACHE) / dataset.replace("/", "___")
    ).exists()


def _missing_data(task: str, config: dict) -> str | None:
    path = config.get("dataset_path")
    local = config.get("custom_dataset") or not path or path in LOCAL_BUILDERS or Path(path).exists()
    if local or _cached(path):
        return None
    name = config.get("dataset_name")
    named = f"{path!r}, {name!r}" if name else repr(path)
    return (
        f"task {task} reads the Hugging Face dataset {path}{f' ({name})' if name else ''}, which is not in the local "
        f'datasets cache: fetch it on a machine with a network (python -c "import datasets; '
        f'datasets.load_dataset({named})"), then copy its ~/.cache/huggingface here, or point HF_HOME at that cache'
    )


def problems(spec: PipelineSpec) -> list[str]:
    """Every benchmark task that does not exist, or whose data this machine does not have, named by stage."""
    found = []
    for i, stage in enumerate(spec.stages):
        if not isinstance(stage, EvalStage) or stage.benchmarks is None:
            continue
        where = f"stages[{i}] ({stage.name}).benchmarks"
        manager = task_manager(stage.benchmarks)
        for task in stage.benchmarks.tasks:
            if task.task not in manager.task_index:
                folder = f" or in {stage.benchmarks.folder}" if stage.benchmarks.folder is not None else ""
                found.append(f"{where}: no lm-eval task or group is named {task.task} (among lm-eval's{folder})")
                continue
            for config in _leaves(manager, task.task, set()):
                if (missing := _missing_data(config.get("task", task.task), config)) is not None:
                    found.append(f"{where}: {missing}")
    return found


@dataclass(frozen=True)
class Scores:
    """One task's columns for one checkpoint, and the seconds lm-eval took to find them (when first measured)."""

    columns: dict[str, float]
    seconds: float


def columns_of(results: dict[str, dict]) -> dict[str, float]:
    """lm-eval's results as columns `<task>/<metric>`: each task's and group's numbers, stderr left out."""
    columns = {}
    for name, measured in results.items():
        for key, value in measured.items():
            metric, _, kept = key.partition(",")
            if not kept or metric.endswith("_stderr"):
                continue
            label = metric if kept == "none" else f"{metric}_{kept}"
            columns[f"{name}/{label}"] = float(value) if isinstance(value, int | float) else math.nan
    return columns


def _key(benchmarks: Benchmarks, task: Task, identity: str) -> str:
    settings = benchmarks.model_dump(mode="json", exclude={"tasks", "folder"}) | task.model_dump(mode="json")
    return hashlib.sha256(json.dumps({"checkpoint": identity, "task": settings}, sort_keys=True).encode()).hexdigest()


def run_task(model, tokenizer, benchmarks: Benchmarks, task: Task, manager) -> dict[str, float]:
    """One task on one loaded model, through lm-eval's own evaluator."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=benchmarks.batch_size)
    found = simple_evaluate(
        model=lm,
        tasks=[task.task],
        task_manager=manager,
        num_fewshot=task.fewshot,
        limit=benchmarks.limit,
        apply_chat_template=task.chat,
        random_seed=benchmarks.seed,
        numpy_random_seed=benchmarks.seed,
        torch_random_seed=benchmarks.seed,
        fewshot_random_seed=benchmarks.seed,
        log_samples=False,
        bootstrap_iters=0,
        verbosity="WARNING",
    )
    return columns_of(found["results"])


class Bench:
    """The benchmarks of one eval stage over its checkpoints: progress, an estimate of the time left, and the
    scores kept in `store` (a folder of the home) so an unchanged checkpoint and task are never run twice.

    `identities`: by checkpoint name, what its scores depend on beyond the task settings (the caller's digest of
    the run that made it, the task folder's files and lm-eval's version)."""

    def __init__(self, stage: str, benchmarks: Benchmarks, store: Path, identities: dict[str, str]):
        self.stage, self.benchmarks, self.store, self.identities = stage, benchmarks, store, identities
        self.manager = task_manager(benchmarks)
        self.left = len(identities) * len(benchmarks.tasks)  # task runs still to do
        self.spent: list[float] = []  # seconds of each task run measured so far

    def score(self, model, tokenizer, name: str, number: str) -> dict[str, Scores]:
        """Every task on one loaded checkpoint (`name`; `number`: "i/n" for the progress), by task name."""
        found = {}
        for task in self.benchmarks.tasks:
            self.left -= 1
            kept = self.store / f"{_key(self.benchmarks, task, self.identities[name])}.json"
            what = f"{self.stage}  {task.task} on {name} ({number})"
            if kept.exists():
                found[task.task] = Scores(**json.loads(kept.read_text()))
                say(f"{what}: reused, measured before in {duration(found[task.task].seconds)}")
                continue
            say(f"{what} ...")
            started = time.monotonic()
            scores = Scores(run_task(model, tokenizer, self.benchmarks, task, self.manager), time.monotonic() - started)
            self.spent.append(scores.seconds)
            left = sum(self.spent) / len(self.spent) * self.left
            say(f"{what} in {duration(scores.seconds)}; about {duration(left)} of benchmarks left")
            self.store.mkdir(parents=True, exist_ok=True)
            partial = kept.with_suffix(".partial")
            partial.write_text(json.dumps({"columns": scores.columns, "seconds": scores.seconds}))
            partial.replace(kept)
            found[task.task] = scores
        return found
