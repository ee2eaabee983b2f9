"""lm-eval through the eval stage beside lm-eval run by hand, on the same checkpoint and tasks: the same scores to
the digit, and the time (goal: ≤ 1.05x by hand's).

By hand is what lm-eval's documentation shows: `simple_evaluate(model="hf", model_args={"pretrained": folder})`
with a TaskManager over the task folder, which loads the folder and indexes lm-eval's own tasks too. Ours is the eval
stage's path: the checkpoint loaded as the stage loads it, `stages.common.benchmarks.Bench` scoring it (an index of the
task folder alone when it holds every task named). Both are timed from the folder to the scores, alternating, in
one process; the lm-eval call alone is shown too.

    python -m bench.benchmarks                       # builds a small checkpoint first (tokenizer, pretrain, SFT)
    python -m bench.benchmarks --checkpoint PATH
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from bench.generate import build_checkpoint
from bench.threads import cpu_model
from schemas.benchmarks import Benchmarks
from stages.common.benchmarks import Bench
from stages.common.checkpoint import load_model

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "examples" / "benchmarks"


def ours(folder: Path, benchmarks: Benchmarks, store: Path) -> tuple[dict[str, float], float, float]:
    """(columns, seconds from the folder, seconds in lm-eval) as the eval stage finds them; a fresh store, so nothing
    is reused."""
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_model(folder, tokenizer).eval()
    bench = Bench("eval", benchmarks, store, {"checkpoint": str(time.time_ns())})
    scores = bench.score(model, tokenizer, "checkpoint", "1/1")
    total = time.perf_counter() - started
    columns = {k: v for task in scores.values() for k, v in task.columns.items()}
    return columns, total, sum(task.seconds for task in scores.values())


def by_hand(folder: Path, benchmarks: Benchmarks) -> tuple[dict[str, float], float, float]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from stages.common.benchmarks import columns_of

    started = time.perf_counter()
    manager = TaskManager(include_path=str(TASKS))
    columns, inside = {}, 0.0
    for task in benchmarks.tasks:
        asked = time.perf_counter()
        found = simple_evaluate(
            model="hf",
            model_args={"pretrained": str(folder), "dtype": "float32"},
            device="cuda" if torch.cuda.is_available() else "cpu",
            tasks=[task.task],
            task_manager=manager,
            apply_chat_template=task.chat,
            limit=benchmarks.limit,
            batch_size=benchmarks.batch_size,
            random_seed=benchmarks.seed,
            numpy_random_seed=benchmarks.seed,
            torch_random_seed=benchmarks.seed,
            fewshot_random_seed=benchmarks.seed,
            bootstrap_iters=0,
        )
        inside += time.perf_counter() - asked
        columns |= columns_of(found["results"])
    return columns, time.perf_counter() - started, inside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    benchmarks = Benchmarks(folder=TASKS, tasks=["toy_facts", {"task": "toy_skills", "chat": True}])
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.checkpoint or build_checkpoint(Path(tmp) / "build", args.steps)
        ways = {
            "eval stage": lambda round_: ours(folder, benchmarks, Path(tmp) / f"store{round_}"),
            "by hand": lambda round_: by_hand(folder, benchmarks),
        }
        found = {name: [] for name in ways}
        for round_ in range(args.rounds):
            for name in list(ways) if round_ % 2 == 0 else list(ways)[::-1]:
                found[name].append(ways[name](round_))
    (mine, *_), (theirs, *_) = found["eval stage"][0], found["by hand"][0]
    assert all(run[0] == mine for run in found["eval stage"] + found["by hand"]), (mine, theirs)
    total = [statistics.median(run[1] for run in found[name]) for name in ("eval stage", "by hand")]
    inside = [statistics.median(run[2] for run in found[name]) for name in ("eval stage", "by hand")]
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"tasks: toy_facts (100 x 4 choices), toy_skills (100 generations, chat); median of {args.rounds} rounds")
    print(f"{'':26}{'eval stage':>12}{'by hand':>12}{'ratio':>8}")
    print(f"{'folder to scores (s)':26}{total[0]:12.2f}{total[1]:12.2f}{total[0] / total[1]:7.2f}x")
    print(f"{'inside lm-eval (s)':26}{inside[0]:12.2f}{inside[1]:12.2f}{inside[0] / inside[1]:7.2f}x")
    print("scores, identical in every round: " + ", ".join(f"{k} {v:.4f}" for k, v in mine.items()))


if __name__ == "__main__":
    main()
