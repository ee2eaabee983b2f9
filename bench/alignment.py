"""The alignment stages' two figures, each beside its baseline.

1. DPO step time, precomputed reference log-probs vs a live frozen reference, measured in one
   process on the same model, data and batches (the Trainer's train_runtime / steps, rounds
   interleaved, best round kept). The precomputation itself is a one-time cost, printed apart.
2. Peak memory of LoRA-DPO (reference = the adapters switched off: no second copy) vs LoRA-SFT
   on the same model, each in a fresh process (peak RSS and its rise over the loaded-model RSS).
   SFT is measured twice: at the same rows per step (each DPO row holds a chosen and a rejected
   reply: twice the sequences) and at the same sequences per step.

    python -m bench.alignment                # both; figures go to bench/RESULTS.md by hand
    python -m bench.alignment step-time      # or memory
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, TrainerCallback

from schemas.spec import DPOStage, LoraSpec, ModelInit, SFTStage, TokenizerTrain, TrainSpec
from stages import dpo, sft
from stages import tokenizer as tokenizer_stage
from stages.common.contract import StageInputs
from stages.common.recipe import build_model
from stages.common.training import use_bf16

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"


def setup(workdir: Path, init: ModelInit) -> tuple[Path, Path]:
    """A tokenizer trained on the bundled text and a fresh model of `init`, saved: (tokenizer, model)."""
    texts = [json.loads(line)["text"] for line in (DATA / "pretrain.jsonl").read_text().splitlines()]
    tokenizer = tokenizer_stage.run(TokenizerTrain(vocab_size=1024), texts, "chatml", workdir / "tok").checkpoint
    torch.manual_seed(0)
    model = build_model(init, AutoTokenizer.from_pretrained(tokenizer))
    model.save_pretrained(workdir / "model")
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(workdir / "model")
    return tokenizer, workdir / "model"


def dpo_spec(reference: str, steps: int, batch: int, lora: LoraSpec | None = None) -> DPOStage:
    return DPOStage(
        name="dpo",
        kind="dpo",
        data=[DATA / "preference.jsonl"],
        max_len=128,
        template="chatml",
        reference=reference,
        lora=lora,
        train=TrainSpec(max_steps=steps, batch_size=batch, lr=1e-5, warmup=0.0, logging_steps=steps, save_steps=10_000),
    )


def step_time(args: argparse.Namespace) -> None:
    init = ModelInit(hidden_size=256, layers=4, heads=4, max_seq_len=256)  # the demo's model
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tokenizer, model = setup(workdir, init)
        datasets = dpo.prepare(dpo_spec("frozen", 1, 1), AutoTokenizer.from_pretrained(tokenizer)).datasets
        times: dict[str, list[float]] = {"frozen": [], "precomputed": []}
        precompute = 0.0
        for round_ in range(args.rounds):
            for reference in times:
                spec = dpo_spec(reference, args.steps, args.batch)
                started = time.perf_counter()
                result = dpo.run(
                    spec,
                    StageInputs(model, tokenizer, datasets, reference=workdir / f"ref-{round_}"),
                    workdir / f"{reference}-{round_}",
                )
                if reference == "precomputed":
                    precompute = time.perf_counter() - started - result.metrics["train_runtime"]
                times[reference].append(result.metrics["train_runtime"] / args.steps)
        live, pre = min(times["frozen"]), min(times["precomputed"])
    bf16 = "bf16 autocast" if use_bf16("auto") else "fp32"
    print(
        f"DPO step time, 3.5M Llama (256 wide, 4 layers), {args.batch} pairs per step, max_len 128, {bf16}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.rounds} rounds of {args.steps} "
        "steps"
    )
    print(f"{'reference':<26}{'s/step':>10}{'ratio':>8}")
    print(f"{'live (frozen copy)':<26}{live:>10.4f}{1.0:>8.2f}")
    print(f"{'precomputed':<26}{pre:>10.4f}{pre / live:>8.2f}")
    print(
        f"precomputing the reference log-probs of {len(datasets['train'])} pairs, once: {precompute:.1f} s "
        f"(= {precompute / (live - pre):.0f} steps of savings)"
        if live > pre
        else ""
    )


class PeakRSS(TrainerCallback):
    """The process's resident set size when training starts (model and data loaded)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_one(variant: str, steps: int, batch: int) -> None:
    init = ModelInit(hidden_size=512, layers=8, heads=8, max_seq_len=256)
    lora = LoraSpec(r=16, alpha=32)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tokenizer, model = setup(workdir, init)
        tok = AutoTokenizer.from_pretrained(tokenizer)
        peak = PeakRSS()
        train = TrainSpec(
            max_steps=steps, batch_size=batch, lr=1e-5, warmup=0.0, logging_steps=steps, save_steps=10_000
        )
        if variant == "dpo":
            spec = dpo_spec("adapter-off", steps, batch, lora)
            dpo.run(spec, StageInputs(model, tokenizer, dpo.prepare(spec, tok).datasets, (peak,)), workdir / "run")
        else:  # the same replies as single sequences: prompt + chosen, and prompt + rejected
            rows = [json.loads(line) for line in (DATA / "preference.jsonl").read_text().splitlines()]
            chats = [
                [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[side]}]
                for r in rows
                for side in ("chosen", "rejected")
            ]
            path = workdir / "sft.jsonl"
            path.write_text("".join(json.dumps({"conversations": c}) + "\n" for c in chats))
            spec = SFTStage(
                name="sft",
                kind="sft",
                data=[path],
                max_len=128,
                packing=False,
                template="chatml",
                lora=lora,
                train=train,
            )
            sft.run(spec, StageInputs(model, tokenizer, sft.prepare(spec, tok).datasets, (peak,)), workdir / "run")
        end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mb": end / 1024, "rise_mb": (end - peak.start) / 1024}))


def memory(args: argparse.Namespace) -> None:
    cases = [
        ("LoRA-SFT, same rows", "sft", args.batch),
        ("LoRA-SFT, same sequences", "sft", 2 * args.batch),
        ("LoRA-DPO, adapter-off ref", "dpo", args.batch),
    ]
    found = {}
    for label, variant, batch in cases:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.alignment",
                "memory-one",
                "--variant",
                variant,
                "--batch",
                str(batch),
                "--steps",
                str(args.steps),
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
        found[label] = json.loads(out.strip().splitlines()[-1])
    base = found["LoRA-SFT, same sequences"]
    print(
        f"Peak memory, 25M Llama (512 wide, 8 layers), LoRA r=16 on every linear layer, max_len 128, {args.steps} "
        "steps, "
        f"one fresh process each (peak RSS; rise = peak − RSS when training starts)"
    )
    print(f"{'run':<28}{'rows/step':>10}{'peak MB':>10}{'rise MB':>10}{'peak vs SFT same seqs':>24}")
    for (label, _variant, batch), figures in zip(cases, found.values()):
        print(
            f"{label:<28}{batch:>10}{figures['peak_mb']:>10.0f}{figures['rise_mb']:>10.0f}"
            f"{figures['peak_mb'] / base['peak_mb']:>24.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="which")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    one = sub.add_parser("memory-one")
    one.add_argument("--variant", choices=["dpo", "sft"], required=True)
    one.add_argument("--batch", type=int, default=16)
    one.add_argument("--steps", type=int, default=20)
    sub.add_parser("step-time")
    sub.add_parser("memory")
    args = parser.parse_args()
    if args.which == "memory-one":
        memory_one(args.variant, args.steps, args.batch)
        return
    if args.which in (None, "step-time"):
        step_time(args)
    if args.which in (None, "memory"):
        memory(args)


if __name__ == "__main__":
    main()
