"""Generation's figure beside its baseline, measured in one process: batched greedy generation
(left-padded, `stages.common.generation.generate`) vs one prompt at a time, on the same checkpoint, the
same prompts and the same max_new_tokens.

Tokens are counted as the model produced them: each reply up to and including its end-of-turn
token, never the padding a finished row gets while the rest of its batch goes on. Greedy replies
must not depend on the batch, so each batched run is also checked against the one-at-a-time replies.

    python -m bench.generate                       # builds a small checkpoint first (tokenizer, pretrain, SFT)
    python -m bench.generate --checkpoint PATH     # or measures a given checkpoint folder
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from schemas.spec import ModelInit, PretrainStage, SFTStage, TokenizerTrain, TrainSpec
from stages import pretrain, sft
from stages import tokenizer as tokenizer_stage
from stages.common.contract import StageInputs
from stages.common.generation import ChatModel, Sampling, generate

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"

# the toy model at its real size (as bench/pipeline.py), trained just long enough to answer and end its turns
MODEL = ModelInit(hidden_size=256, layers=4, heads=4, max_seq_len=256)
TRAIN = dict(batch_size=16, lr=1e-3, warmup=0.0, logging_steps=20, save_steps=10**6)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_checkpoint(workdir: Path, steps: int) -> Path:
    """A tokenizer, a pretrain and an SFT through the stage modules, as the pipeline makes them: the SFT checkpoint."""
    texts = [row["text"] for row in read_jsonl(DATA / "pretrain.jsonl")]
    tok_dir = tokenizer_stage.run(TokenizerTrain(vocab_size=1024), texts, "chatml", workdir / "tokenizer").checkpoint
    tok = AutoTokenizer.from_pretrained(tok_dir)
    pre_spec = PretrainStage(
        name="pretrain",
        kind="pretrain",
        data=[DATA / "pretrain.jsonl"],
        packing={"block_size": 256},
        train=TrainSpec(max_steps=steps, **TRAIN),
    )
    pre = pretrain.run(
        pre_spec, StageInputs(MODEL, tok_dir, pretrain.prepare(pre_spec, tok).datasets), workdir / "pretrain"
    )
    sft_spec = SFTStage(
        name="sft",
        kind="sft",
        data=[DATA / "sft.jsonl"],
        max_len=256,
        template="chatml",
        train=TrainSpec(max_steps=steps, **TRAIN),
    )
    return sft.run(
        sft_spec, StageInputs(pre.checkpoint, tok_dir, sft.prepare(sft_spec, tok).datasets), workdir / "sft"
    ).checkpoint


def timed(
    chat: ChatModel, prompts: list[list[int]], sampling: Sampling, batch_size: int
) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    generated = generate(chat.model, prompts, chat.stops, chat.pad_id, sampling, batch_size)
    return generated, time.perf_counter() - start


def slots(generated: list[list[int]], batch_size: int) -> int:
    """Positions the batches computed: every row of a batch runs as long as its longest reply."""
    return sum(
        max(map(len, generated[i : i + batch_size])) * len(generated[i : i + batch_size])
        for i in range(0, len(generated), batch_size)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint folder; default: build a small one")
    parser.add_argument(
        "--train-steps", type=int, default=60, help="pretrain and SFT steps when building the checkpoint"
    )
    parser.add_argument(
        "--prompts", type=int, default=64, help="held-out prompts answered (examples/data/rl_prompts_heldout.jsonl)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="8,64", help="batched runs to compare with one at a time")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of every mode; the best of each is shown")
    args = parser.parse_args()

    checkpoint = args.checkpoint or build_checkpoint(Path(tempfile.mkdtemp(prefix="bench-generate-")), args.train_steps)
    chat = ChatModel.load(checkpoint)
    rows = read_jsonl(DATA / "rl_prompts_heldout.jsonl")[: args.prompts]
    prompts = [chat.prompt_ids([{"role": "user", "content": row["prompt"]}]) for row in rows]
    greedy = Sampling(max_new_tokens=args.max_new_tokens)
    # warm-up: first-call allocations are not timed
    generate(chat.model, prompts[:4], chat.stops, chat.pad_id, greedy, 4)

    # rounds interleave the modes, so a neighbour's load hits them alike; the best round of each is compared
    sizes = [1, *(int(b) for b in args.batch_sizes.split(","))]
    best: dict[int, tuple[list[list[int]], float]] = {}
    for _ in range(args.rounds):
        for batch_size in sizes:
            generated, seconds = timed(chat, prompts, greedy, batch_size)
            if batch_size not in best or seconds < best[batch_size][1]:
                best[batch_size] = (generated, seconds)
    single, single_s = best[1]
    results = [("one at a time" if b == 1 else "batched, left-padded", b, *best[b]) for b in sizes]

    params = sum(p.numel() for p in chat.model.parameters())
    print(
        f"\ngeneration: {checkpoint}\nLlama {params / 1e6:.2f}M params, float32, greedy, {len(prompts)} prompts "
        f"(mean {sum(map(len, prompts)) / len(prompts):.0f} tokens), max_new_tokens {args.max_new_tokens}, "
        f"{chat.model.device}, torch {torch.__version__} with {torch.get_num_threads()} threads, best of "
        f"{args.rounds} rounds"
    )
    print(
        f"\n{'mode':<22} {'batch':>5} {'tokens':>7} {'ended turn':>10} {'fill':>6} {'seconds':>8} {'tokens/s':>9} "
        f"{'speed-up':>8}  same replies"
    )
    single_tps = sum(map(len, single)) / single_s
    for mode, batch_size, generated, seconds in results:
        tokens = sum(map(len, generated))
        ended = sum(bool(ids) and ids[-1] in chat.stops for ids in generated)
        same = sum(a == b for a, b in zip(generated, single))
        print(
            f"{mode:<22} {batch_size:>5} {tokens:>7} {ended:>5}/{len(generated):<4} "
            f"{tokens / slots(generated, batch_size):>6.2f} "
            f"{seconds:>8.2f} {tokens / seconds:>9.1f} {tokens / seconds / single_tps:>7.2f}x  {same}/{len(generated)}"
        )


if __name__ == "__main__":
    main()
