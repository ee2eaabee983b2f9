"""Training steps on a busy machine: OpenMP's wait policy, side by side, idle and beside busy processes.

Each setting runs in its own process (OpenMP reads its settings once, when torch loads): the toy
model at its real size (Llama, hidden 256, 4 layers, batch 16 x 256 tokens), forward + backward +
AdamW steps, tokens/s after a warm-up. "busy" starts N `yes > /dev/null` processes beside it.

    python -m bench.threads                 # idle and beside 2 busy processes
    python -m bench.threads --bf16          # bf16 autocast, as `precision: auto` picks on CPUs with AVX512-BF16
    python -m bench.threads --busy 0 --steps 20
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

SETTINGS = {
    "default (libgomp spins)": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=100000": {"GOMP_SPINCOUNT": "100000"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}


def steps(n: int, bf16: bool) -> float:
    """Tokens/s over `n` training steps of the toy model (bf16 autocast or fp32), after 3 warm-up steps."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 1024, (16, 256))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(n):
        step()
    return n * batch.numel() / (time.perf_counter() - start)


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure(env: dict[str, str], n: int, bf16: bool) -> float:
    child = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    out = subprocess.run(
        [sys.executable, "-m", "bench.threads", "--child", str(n)] + (["--bf16"] if bf16 else []),
        env={**child, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--busy", type=int, default=2, help="busy processes beside the 'busy' rows (0: idle only)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, as `precision: bf16` trains")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(steps(args.child, args.bf16))
        return
    print(
        f"{cpu_model()}, {os.cpu_count()} CPUs, {args.steps} steps of 16 x 256 tokens, "
        f"{'bf16' if args.bf16 else 'fp32'}"
    )
    loads = [0] + ([args.busy] if args.busy else [])
    results: dict[tuple[str, int], float] = {}
    for busy in loads:
        hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(busy)]
        try:
            for name, env in SETTINGS.items():
                results[name, busy] = measure(env, args.steps, args.bf16)
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
    header = "".join(f"{'idle' if b == 0 else f'{b} busy':>22}" for b in loads)
    print(f"{'setting':<26}{header}")
    base = {b: results[next(iter(SETTINGS)), b] for b in loads}
    for name in SETTINGS:
        cells = "".join(f"{results[name, b]:>10.0f} tok/s {results[name, b] / base[b]:>5.2f}x" for b in loads)
        print(f"{name:<26}{cells}")


if __name__ == "__main__":
    main()
