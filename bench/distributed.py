"""Launched stages side by side: 1 process vs 2 ranks (DDP, ZeRO-2, ZeRO-3) on the same global batch.

One pretrain stage on the bundled text, the same weights, data and global batch each way, run through
the same launch path a spec's `launch:` takes (torchrun, rank 0 records). Printed per way: tokens/s of
the whole stage's training (all ranks' tokens), the ratio to one process, and the largest rank's peak
resident memory, where ZeRO's sharding of the optimizer state (ZeRO-2) and the weights (ZeRO-3) shows.
A model of 26M parameters by default, so the optimizer state (2 x 4 bytes per parameter) is large
against the ~0.5 GiB every Python process with torch holds anyway.

    python -m bench.distributed                       # hidden 512, 8 layers, 12 steps
    python -m bench.distributed --hidden 256 --layers 4 --steps 20
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

from mlflow import MlflowClient

from bench.threads import cpu_model
from examples.generate import DATA_DIR
from schemas.launch import DeepSpeed, Launch
from schemas.spec import ModelInit, PretrainStage, TokenizerTrain, TrainSpec
from stages.common.contract import StageInputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8, help="global batch, in blocks of 128 tokens")
    args = parser.parse_args()

    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from stages import pretrain, tokenizer
    from tasks.step_metrics import StepMetrics
    from tasks.torchrun import launch_stage

    root = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    texts = [json.loads(line)["text"] for line in (DATA_DIR / "pretrain.jsonl").read_text().splitlines()]
    tok = tokenizer.run(TokenizerTrain(vocab_size=1024), texts, "chatml", root / "tokenizer").checkpoint
    init = ModelInit(hidden_size=args.hidden, layers=args.layers, heads=args.hidden // 64, max_seq_len=128)
    train = TrainSpec(
        max_steps=args.steps,
        batch_size=args.batch,
        lr=1e-3,
        warmup=0.0,
        precision="fp32",
        save_steps=10**6,
        logging_steps=args.steps,
    )

    def stage(launch: Launch | None) -> PretrainStage:
        return PretrainStage(
            name="pretrain",
            kind="pretrain",
            data=[DATA_DIR / "pretrain.jsonl"],
            packing={"block_size": 128},
            train=train,
            launch=launch,
        )

    prepared = root / "datasets"
    pretrain.prepare(stage(None), AutoTokenizer.from_pretrained(tok)).datasets.save_to_disk(str(prepared))
    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = mlflow.create_experiment("bench", artifact_location=(root / "artifacts").as_uri())
    print(
        f"CPU: {cpu_model()}; pretrain, Llama hidden {args.hidden} x {args.layers} layers, global batch {args.batch} "
        "x 128 tokens, "
        f"{args.steps} steps, fp32"
    )
    print(f"{'way':<24}{'tokens/s':>10}{'vs 1 process':>14}{'peak RSS / rank':>17}{'final loss':>12}")
    baseline = None
    for name, launch in [
        ("1 process", None),
        ("2 ranks, DDP", Launch(processes=2)),
        ("2 ranks, ZeRO-2", Launch(processes=2, deepspeed=DeepSpeed(zero=2))),
        ("2 ranks, ZeRO-3", Launch(processes=2, deepspeed=DeepSpeed(zero=3))),
    ]:
        run_id = mlflow.create_run(experiment, run_name=name).info.run_id
        workdir = root / name.replace(" ", "-").replace(",", "")
        if launch is None:
            inputs = StageInputs(init, tok, load_from_disk(str(prepared)), callbacks=(StepMetrics(mlflow, run_id),))
            metrics = pretrain.run(stage(None), inputs, workdir).metrics
            # this process's own peak: it includes the tokenizer and data preparation above, as a rank's includes its
            # loading
            metrics["rank_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        else:
            metrics = launch_stage(stage(launch), StageInputs(init, tok, None), prepared, workdir, root, run_id).metrics
        speed = metrics["train_tokens_per_second"]
        baseline = baseline or speed
        print(
            f"{name:<24}{speed:>10.0f}{speed / baseline:>13.2f}x{metrics['rank_peak_rss_mib']:>13.0f} "
            f"MiB{metrics['train_loss']:>12.4f}"
        )
    print(f"(work under {root})")


if __name__ == "__main__":
    main()
