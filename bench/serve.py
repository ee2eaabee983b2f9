"""`lifecycle serve` beside `transformers serve` on the same model: requests per second and time to first token.

Both are transformers' server; ours hands it the pipeline's model already loaded (tasks/serve.py), theirs loads
the folder itself. The goal is that the wrapper costs nothing: ≥ 0.95x on both figures. Each server runs alone in
its own process (the other stopped), in rounds that alternate which goes first, and every reply of ours must equal
theirs (greedy, same model, same template).

    python -m bench.serve                       # builds a small checkpoint first (tokenizer, pretrain, SFT)
    python -m bench.serve --checkpoint PATH     # or serves a given checkpoint folder
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from bench.generate import build_checkpoint
from bench.threads import cpu_model
from tasks.export import save_chat_model

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "What is 12 + 7?",
    "Write rain in capital letters.",
    "Reverse the letters of ship.",
    "Name the capital city of Quarania.",
    "Add 6 and 23.",
    "Compute 19 plus 2.",
    "Write bird in capital letters.",
    "Reverse the letters of jam.",
]


def served_folder(checkpoint: Path, out: Path) -> Path:
    """The checkpoint as `transformers serve` must be given it to answer as ours does: the folder `lifecycle export`
    writes (merged, stopping at the end of the turn, reading tool calls back), less the model card."""
    save_chat_model(checkpoint, out)
    return out


def start(command: list[str], port: int, model: str, log: Path) -> tuple[subprocess.Popen, openai.OpenAI]:
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120)
    deadline = time.monotonic() + 180
    while True:
        try:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0
            )
            return server, client
        except openai.APIConnectionError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(command)} did not come up:\n{log.read_text()}") from None
            time.sleep(0.5)


def stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


def ask(client: openai.OpenAI, model: str, question: str, max_tokens: int) -> str:
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0
    )
    return answer.choices[0].message.content


def first_token(client: openai.OpenAI, model: str, question: str, max_tokens: int) -> float:
    started = time.perf_counter()
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
    )
    seconds = None
    for chunk in stream:
        if seconds is None and chunk.choices and chunk.choices[0].delta.content:
            seconds = time.perf_counter() - started
    return seconds if seconds is not None else time.perf_counter() - started


def measure(client: openai.OpenAI, model: str, requests: int, clients: int, max_tokens: int) -> dict:
    asked = [QUESTIONS[i % len(QUESTIONS)] for i in range(requests)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        replies = list(pool.map(lambda q: ask(client, model, q, max_tokens), asked))
    rate = requests / (time.perf_counter() - started)
    ttft = statistics.median(first_token(client, model, q, max_tokens) for q in QUESTIONS)
    return {"rate": rate, "ttft": ttft, "replies": dict(zip(asked, replies))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--steps", type=int, default=150, help="SFT steps of the checkpoint built when none is given")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--clients", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint or build_checkpoint(work / "build", args.steps)
        folder = served_folder(checkpoint, work / "served")
        ours = (
            [
                sys.executable,
                "-c",
                "import sys; from tasks.serve import server; "
                "server('bench/model', sys.argv[1], port=int(sys.argv[2])).run()",
                str(folder),
                "8811",
            ],
            8811,
            "bench/model",
        )
        theirs = (
            [
                str(Path(sys.executable).parent / "transformers"),
                "serve",
                str(folder),
                "--port",
                "8812",
                "--host",
                "127.0.0.1",
                "--device",
                "cpu",
            ],
            8812,
            str(folder),
        )
        found: dict[str, list[dict]] = {"lifecycle serve": [], "transformers serve": []}
        for round_ in range(args.rounds):
            order = [("lifecycle serve", ours), ("transformers serve", theirs)]
            for name, (command, port, model) in order if round_ % 2 == 0 else order[::-1]:
                server, client = start(command, port, model, work / f"{port}.log")
                try:
                    measure(client, model, len(QUESTIONS), 1, args.max_tokens)  # warm: first requests pay setup
                    found[name].append(measure(client, model, args.requests, args.clients, args.max_tokens))
                finally:
                    stop(server)
    mine, base = found["lifecycle serve"], found["transformers serve"]
    assert all(m["replies"] == b["replies"] for m, b in zip(mine, base)), "the two servers answered differently"
    rate = (statistics.mean(m["rate"] for m in mine), statistics.mean(b["rate"] for b in base))
    ttft = (statistics.mean(m["ttft"] for m in mine), statistics.mean(b["ttft"] for b in base))
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores")
    print(f"{args.requests} requests, {args.clients} in flight, max_tokens {args.max_tokens}, {args.rounds} rounds")
    print(f"{'':22}{'lifecycle serve':>16}{'transformers serve':>20}{'ratio':>8}")
    print(f"{'requests/s':22}{rate[0]:16.2f}{rate[1]:20.2f}{rate[0] / rate[1]:7.2f}x")
    print(f"{'first token (median)':22}{ttft[0] * 1000:14.1f}ms{ttft[1] * 1000:18.1f}ms{ttft[1] / ttft[0]:7.2f}x")
    for i, (m, b) in enumerate(zip(mine, base), 1):
        print(
            f"  round {i}: {m['rate']:.2f} vs {b['rate']:.2f} requests/s, "
            f"first token {m['ttft'] * 1000:.1f} vs {b['ttft'] * 1000:.1f} ms"
        )
    print("replies: identical on every request")


if __name__ == "__main__":
    main()
