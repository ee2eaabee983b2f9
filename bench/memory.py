"""Memory at real model sizes: the estimate `lifecycle validate` prints against the peak measured, and each memory
setting's peak and tokens/s beside a hand-configured HF Trainer doing the same steps.

Each case runs in a fresh process (so its peak RSS is its own): Python with torch, transformers, Prefect and MLflow
loaded as in a stage's process, a model built from a config (random weights), `--steps` optimizer steps on random
token rows of the stage's length through the stage's own Trainer (`make_trainer`, as a pretrain stage sets it up),
or, for the baseline, through `Trainer(TrainingArguments(...))` written by hand with the same batch, precision and
optimizer. Peak: the process's maximum RSS (CPU) or torch.cuda.max_memory_allocated (GPU). tokens/s: over the
steps after the first.

    python -m bench.memory                        # the 0.5B Qwen2 and 1B Llama cases (about 15 min on 2 cores)
    python -m bench.memory --cases tiny           # a 20M model, seconds
    python -m bench.memory --cases qlora          # LoRA r16 on the 0.5B Qwen2: base in float32, 8 bits, 4 bits

A LoRA case's base is written by a process of its own first, then loaded as a stage loads its input (quantized
through bitsandbytes for QLoRA), so the full-precision model is never in the measured process's memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

# (architecture, config fields, stage fields): a Qwen2-0.5B and a Llama-3.2-1B shape (random weights), and a small one
MODELS = {
    "qwen2-0.5b": (
        "qwen2",
        dict(
            hidden_size=896,
            layers=24,
            heads=14,
            kv_heads=2,
            intermediate_size=4864,
            max_seq_len=1024,
            rope_theta=1e6,
            config={"vocab_size": 151936},
        ),
    ),
    "llama-1b": (
        "llama",
        dict(
            hidden_size=2048,
            layers=16,
            heads=32,
            kv_heads=8,
            intermediate_size=8192,
            max_seq_len=1024,
            rope_theta=5e5,
            config={"vocab_size": 128256},
        ),
    ),
    "tiny": ("llama", dict(hidden_size=256, layers=4, heads=4, max_seq_len=512, config={"vocab_size": 32000})),
}
# name -> (model, batch rows, row length, train fields, memory fields)
CASES = {
    "qwen2-0.5b": [
        ("qwen2-0.5b", 2, 512, {}, {}),
        ("qwen2-0.5b", 2, 512, {}, {"gradient_checkpointing": True}),
        ("qwen2-0.5b", 2, 512, {"optimizer": "adafactor"}, {}),
        ("qwen2-0.5b", 4, 512, {}, {"gradient_checkpointing": True}),
    ],
    "llama-1b": [
        ("llama-1b", 1, 512, {"optimizer": "adafactor"}, {}),
        ("llama-1b", 2, 512, {"optimizer": "adafactor"}, {"gradient_checkpointing": True}),
    ],
    "tiny": [("tiny", 8, 256, {}, {}), ("tiny", 8, 256, {}, {"gradient_checkpointing": True})],
    # LoRA against QLoRA (`lora.quantize`): the frozen base in float32, in 8 bits and in 4 bits
    "qlora": [
        ("qwen2-0.5b", 2, 512, {}, {}, {"r": 16}),
        ("qwen2-0.5b", 2, 512, {}, {}, {"r": 16, "quantize": "8bit"}),
        ("qwen2-0.5b", 2, 512, {}, {}, {"r": 16, "quantize": "4bit"}),
    ],
}


def stage_of(model: str, batch: int, length: int, train: dict, memory: dict, steps: int, lora: dict | None = None):
    from schemas.memory import Memory
    from schemas.spec import PretrainStage, TrainSpec

    return PretrainStage(
        name="bench",
        kind="pretrain",
        data=["unused.jsonl"],
        packing={"block_size": length},
        train=TrainSpec(batch_size=batch, max_steps=steps, warmup=0, save_steps=10_000, logging_steps=1, **train),
        memory=Memory(**memory),
        lora=lora,
    )


def child(case: dict) -> dict:
    """One case in this process: the figures as a dict."""
    import mlflow  # noqa: F401  (a stage's process has them loaded)
    import prefect  # noqa: F401
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from schemas.architectures import init_config
    from schemas.spec import ModelInit
    from stages.common.estimate import Shapes, estimate
    from stages.common.training import make_trainer, use_bf16

    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    arch, fields = MODELS[case["model"]]
    config = init_config(ModelInit(arch=arch, **fields))
    stage = stage_of(
        case["model"], case["batch"], case["length"], case["train"], case["memory"], case["steps"], case["lora"]
    )
    device = ("cpu", 0.0) if not torch.cuda.is_available() else (torch.cuda.get_device_name(0), 0.0)
    predicted = estimate(stage, Shapes.of(config), device)
    base = Path(case["workdir"]) / "base"
    if stage.lora is None or case.get("make_base"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        if case.get("make_base"):  # a LoRA case's input checkpoint, written by a process of its own
            model.save_pretrained(base)
            return {}
    else:  # loaded as a stage loads its input (quantized when asked), then adapted: the full model never in memory
        from stages.common import checkpoint

        quantized = checkpoint.quantized(stage.lora, use_bf16("auto")) if stage.lora.quantize else {}
        model = checkpoint.with_lora(AutoModelForCausalLM.from_pretrained(base, **quantized), stage.lora)
    rows = case["batch"] * case["steps"]
    data = Dataset.from_dict(
        {"input_ids": torch.randint(0, config.vocab_size, (rows, case["length"])).tolist()}
    ).with_format("torch")

    def collate(batch: list[dict]) -> dict:
        ids = torch.stack([row["input_ids"] for row in batch])
        return {"input_ids": ids, "labels": ids.clone()}

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    workdir = Path(case["workdir"])
    if case["engine"] == "stage":
        trainer = make_trainer(stage, model, None, workdir, {"train": data}, collate, (Clock(),))
    else:  # the baseline: the HF Trainer configured by hand for the same steps
        args = TrainingArguments(
            output_dir=str(workdir / "hand"),
            per_device_train_batch_size=case["batch"],
            max_steps=case["steps"],
            learning_rate=3e-4,
            bf16=use_bf16("auto"),
            use_cpu=not torch.cuda.is_available(),
            optim=stage.train.optimizer,
            gradient_checkpointing=stage.memory.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Clock()])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    peak = (
        torch.cuda.max_memory_allocated()
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    steady = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else times[-1] - start
    return {
        "peak": peak,
        "baseline_rss": baseline_rss,
        "estimate": predicted.total,
        "parts": predicted.parts,
        "tokens_per_second": case["batch"] * case["length"] / steady,
        "parameters": model.num_parameters(),
    }


def run_case(case: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--child", json.dumps(case)], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["qwen2-0.5b", "llama-1b"], choices=list(CASES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--baseline", action="store_true", help="also run each case through a hand-made Trainer")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import tempfile

    print(f"machine: {cpu_model()}, {len(__import__('os').sched_getaffinity(0))} cores")
    header = f"{'case':52} {'estimate':>9} {'measured':>9} {'error':>7} {'tok/s':>8}"
    print(header)
    for name in args.cases:
        for model, batch, length, train, memory, *lora in CASES[name]:
            lora = lora[0] if lora else None
            settings = ",".join([*(f"{k}={v}" for k, v in train.items()), *(k for k, v in memory.items() if v)])
            settings += f"{',' if settings else ''}lora {lora.get('quantize', 'fp32 base')}" if lora else ""
            engines = ["stage", "hand"] if args.baseline else ["stage"]
            for engine in engines:
                with tempfile.TemporaryDirectory() as workdir:
                    case = dict(
                        model=model,
                        batch=batch,
                        length=length,
                        train=train,
                        memory=memory,
                        steps=args.steps,
                        engine=engine,
                        workdir=workdir,
                        lora=lora,
                    )
                    if lora is not None:
                        run_case(case | {"make_base": True})
                    got = run_case(case)
                label = f"{model} {batch}x{length} {settings or 'defaults'} [{engine}]"
                error = got["estimate"] / got["peak"] - 1
                print(
                    f"{label:52} {got['estimate'] / 2**30:8.2f}G {got['peak'] / 2**30:8.2f}G {error:+7.1%} "
                    f"{got['tokens_per_second']:8.0f}",
                    flush=True,
                )
                if engine == "stage":
                    parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in got["parts"].items() if v)
                    print(f"    estimate: {parts} GiB; runtime measured {got['baseline_rss'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
