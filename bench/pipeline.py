"""The spine's three figures, each beside its baseline, measured in one process.

1. pretrain tokens/s through the flow vs a plain HF Trainer script on the same model, data and batch;
2. Prefect + MLflow overhead per stage: the flow on a spec vs the same stage functions called directly;
3. a re-run of a fully finished spec, as a user runs it (`lifecycle run` in a new process).

    python -m bench.pipeline            # prints a table; figures go to bench/RESULTS.md by hand
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tasks.home import Home
from tasks.registry import fetch_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"

# The toy model at its real size, pretraining long enough for a steady throughput reading.
THROUGHPUT_SPEC = f"""
name: bench
model: {{init: {{hidden_size: 256, layers: 4, heads: 4, max_seq_len: 256}}}}
tokenizer: {{train: {{vocab_size: 1024}}}}
stages:
  - name: pretrain
    kind: pretrain
    data: {DATA}/pretrain.jsonl
    packing: {{block_size: 256}}
    train: {{max_steps: 80, batch_size: 16, lr: 0.001, logging_steps: 20, save_steps: 40}}
"""


def fresh_home() -> Path:
    root = Path(tempfile.mkdtemp(prefix="lifecycle-bench-"))
    os.environ["LIFECYCLE_HOME"] = str(root)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["PREFECT_HOME"] = str(root / "prefect")
    Home(root).configure()
    return root


def plain_trainer_tokens_per_second(spec_path: Path, tokenizer_dir: Path, workdir: Path) -> float:
    """The baseline: the same model, packed data and TrainingArguments, in a bare Trainer with no flow around it."""
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, set_seed

    from schemas.data import read_files
    from schemas.load import load_spec
    from stages import pretrain
    from stages.common.recipe import build_model
    from stages.common.training import training_arguments

    spec = load_spec(spec_path)
    stage = spec.stages[0]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    dataset, _ = pretrain.pack(
        read_files(stage.data, "text").frame["text"].to_list(), tokenizer, stage.packing.block_size
    )
    set_seed(stage.train.seed)
    model = build_model(spec.model.init, tokenizer)
    trainer = Trainer(
        model=model,
        args=training_arguments(stage, workdir),
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    output = trainer.train()
    return trainer.state.num_input_tokens_seen / output.metrics["train_runtime"]


def throughput(rounds: int = 2) -> tuple[list[float], list[float]]:
    """Rounds of the flow in a fresh home, then the plain Trainer on the same tokenizer; the best of each is
    compared."""
    from mlflow import MlflowClient

    from flows.lifecycle import lifecycle

    flow_tps, plain_tps = [], []
    for _ in range(rounds):
        root = fresh_home()
        spec_path = root / "bench.yaml"
        spec_path.write_text(THROUGHPUT_SPEC)
        runs = lifecycle(str(spec_path))
        mlflow = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
        flow_tps.append(mlflow.get_run(runs["pretrain"]).data.metrics["train_tokens_per_second"])
        tokenizer_dir = fetch_checkpoint(mlflow, Home(root), mlflow.get_run(runs["tokenizer"]))
        plain_tps.append(plain_trainer_tokens_per_second(spec_path, tokenizer_dir, root / "plain"))
    return flow_tps, plain_tps


def direct_stage_seconds(spec_path: Path, workdir: Path) -> float:
    """The stages of a spec called one after another as plain functions: the work with no orchestration."""
    from transformers import AutoTokenizer

    from schemas.data import check_files
    from schemas.load import load_spec
    from stages import pretrain, sft, tokenizer
    from stages.common.contract import StageInputs

    start = time.perf_counter()
    spec = load_spec(spec_path)
    check_files(spec.data_contracts())
    corpus = tokenizer.corpus_of(spec.tokenizer_corpus(), spec.template)
    tok_dir = tokenizer.run(spec.tokenizer.train, corpus, spec.template, workdir / "tokenizer").checkpoint
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = spec.model.init
    for stage, module in zip(spec.stages, (pretrain, sft)):
        result = module.run(
            stage, StageInputs(model, tok_dir, module.prepare(stage, tok).datasets), workdir / stage.name
        )
        model = result.checkpoint
    return time.perf_counter() - start


def overhead() -> tuple[float, float, int]:
    from flows.lifecycle import lifecycle

    quick = ROOT / "examples" / "quick.yaml"
    root = fresh_home()
    direct = direct_stage_seconds(quick, root / "direct")
    start = time.perf_counter()
    lifecycle(str(quick))
    return time.perf_counter() - start, direct, 3


def rerun_seconds() -> tuple[float, float]:
    """`lifecycle run` on the spec the overhead measurement just finished, in a new process, twice.

    The first one in a home also starts the home's Prefect server (creating its database); the second is
    what every later re-run costs."""
    times = []
    for _ in range(2):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", str(ROOT / "examples" / "quick.yaml")],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=os.environ.copy(),
        )
        times.append(time.perf_counter() - start)
    subprocess.run(
        [sys.executable, "-m", "flows.cli", "stop"], check=True, stdout=subprocess.DEVNULL, env=os.environ.copy()
    )
    return times[0], times[1]


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    flow_runs, plain_runs = throughput()
    flow_tps, plain_tps = max(flow_runs), max(plain_runs)
    flow_s, direct_s, stages = overhead()
    first_rerun_s, rerun_s = rerun_seconds()
    rows = [
        (
            "pretrain tokens/s, flow vs plain Trainer",
            f"{flow_tps:,.0f}",
            f"{plain_tps:,.0f}",
            f"ratio {flow_tps / plain_tps:.3f} (goal >= 1.0); best of {len(flow_runs)}: "
            f"flow {', '.join(f'{t:,.0f}' for t in flow_runs)} / plain {', '.join(f'{t:,.0f}' for t in plain_runs)}",
        ),
        (
            "quick.yaml wall s, flow vs direct calls",
            f"{flow_s:.1f}",
            f"{direct_s:.1f}",
            f"overhead {(flow_s - direct_s) / stages:.2f} s/stage (goal <= 2)",
        ),
        (
            "re-run of a finished spec, s",
            f"{rerun_s:.1f}",
            "-",
            f"goal <= 15 (first in a new home: {first_rerun_s:.1f})",
        ),
    ]
    print(f"\n{'measure':<42} {'ours':>10} {'baseline':>10}  verdict")
    for name, ours, base, verdict in rows:
        print(f"{name:<42} {ours:>10} {base:>10}  {verdict}")


if __name__ == "__main__":
    main()
