"""How long the demo will take on this machine, from a quick measurement, said before it starts.

The measure is a pretraining step of the spec's model at its pretrain stage's shape (forward, backward, optimizer
step), in the precision `auto` chooses here, with the threads a run uses, on this machine as busy as it is now: a few
seconds. Every stage of the demo trains that same model at like shapes, and training is most of its time, so its wall
time scales with this step: the estimate is the wall time of a fresh run on a reference machine times the ratio of
the step here to the step measured there beside that run (`timings.json` keeps both). The quick spec is mostly
start-up and loading, not training steps: its time is given as measured, not scaled.

    python -m examples.estimate examples/toy.yaml                 # the estimate, and the shorter variant
    python -m examples.estimate examples/toy.yaml --record 1150   # after a fresh run that took 1150 s: the reference
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from schemas.load import load_spec

TIMINGS = Path(__file__).parent / "timings.json"
SHORTER = {"toy.yaml": "quick.yaml"}  # the shorter variant of a spec: the same lifecycle on a smaller world
TIMED_STEPS = 3  # at least, after a warm-up step; more while they take under MIN_SECONDS in all
MIN_SECONDS = 2.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def step_seconds(spec_path: Path) -> float:
    """The best of a few pretraining steps of the spec's model at its first stage's shape, warm-up aside."""
    from stages.common.progress import quiet_libraries

    quiet_libraries()  # before the libraries load, as in a stage: the demo's first lines are this estimate's
    import torch
    from transformers import AutoModelForCausalLM

    from schemas.architectures import init_config
    from stages.common.training import use_bf16

    spec = load_spec(spec_path)
    stage = spec.stages[0]
    # the vocabulary the spec's tokenizer stage trains: the output layer is much of a small model's work
    model = AutoModelForCausalLM.from_config(init_config(spec.model.init, vocab_size=spec.tokenizer.train.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(
        model.config.vocab_size, (stage.train.batch_size, stage.packing.block_size), generator=generator
    )
    bf16 = use_bf16(stage.train.precision)
    times: list[float] = []
    while len(times) < TIMED_STEPS + 1 or sum(times[1:]) < MIN_SECONDS:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    return min(times[1:])


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path)
    parser.add_argument("--record", type=float, metavar="SECONDS", help="a fresh run's wall time on this machine")
    parser.add_argument("--step", type=float, help="with --record: the step measured beside that run (default: now)")
    args = parser.parse_args()
    # as `lifecycle run` has it (flows/cli.py): read when torch loads, and much faster beside busy processes
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    timings = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
    step = args.step if args.record is not None and args.step else step_seconds(args.spec)
    if args.record is not None:
        timings[args.spec.name] = {"run_seconds": args.record, "step_seconds": round(step, 4), "cpu": cpu_model()}
        TIMINGS.write_text(json.dumps(timings, indent=2, sort_keys=True) + "\n")
        print(f"{TIMINGS}: {args.spec.name} took {minutes(args.record)} with a step of {step:.3f} s on {cpu_model()}")
        return
    reference = timings.get(args.spec.name)
    if reference is None:
        print(f"{args.spec}: a training step takes {step:.2f} s here; no reference run to scale it by")
        return
    seconds = reference["run_seconds"] * step / reference["step_seconds"]
    print(
        f"{args.spec}: expect about {minutes(seconds)} on this machine ({cpu_model()}): a training step takes "
        f"{step:.2f} s here as busy as it is now, {reference['step_seconds']:.2f} s on the {reference['cpu']} where a "
        f"fresh run took {minutes(reference['run_seconds'])}."
    )
    shorter = SHORTER.get(args.spec.name)
    if shorter and seconds > 15 * 60:
        # the shorter run is mostly start-up and loading, not training steps: its own time, not scaled
        quick = f"; it took {minutes(timings[shorter]['run_seconds'])} there" if shorter in timings else ""
        print(f"A shorter variant, the same lifecycle on a smaller world and model: `make demo-quick`{quick}.")


if __name__ == "__main__":
    main()
