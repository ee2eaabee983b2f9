"""Packing's two figures, each beside its baseline, measured in one process.

1. tokenize + pack MB/s: `tokenize_documents` + `concat_chunk` vs the classic
   `datasets.map(tokenize, batched=True)` + `map(group_texts, batched=True)` recipe, on the
   bundled pretrain corpus repeated to a few tens of MB;
2. SFT useful tokens/s with the HF Trainer: best-fit packed rows (`pack_examples` +
   `PackedCollator`) vs dynamically padded examples (`DataCollatorForSeq2Seq`, as the SFT stage
   pads), same model, same batch token budget, on mixed-length chat data.

    python -m bench.packing                 # both; figures go to bench/RESULTS.md by hand
    python -m bench.packing tokenize        # or sft: one of them
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from itertools import chain
from pathlib import Path

import datasets
import torch
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback, set_seed

from schemas.spec import ModelInit, SFTStage, TokenizerTrain, TrainSpec
from stages import tokenizer as tokenizer_stage
from stages.common.packing import PackedCollator, concat_chunk, pack_examples, tokenize_documents
from stages.common.recipe import build_model
from stages.common.templates import IGNORE, encode_conversation
from stages.common.training import training_arguments

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_tokenizer(workdir: Path):
    texts = [row["text"] for row in read_jsonl(DATA / "pretrain.jsonl")]
    return AutoTokenizer.from_pretrained(
        tokenizer_stage.run(TokenizerTrain(vocab_size=1024), texts, "chatml", workdir).checkpoint
    )


# ---------------------------------------------------------------- 1. tokenize + pack


def classic_recipe(corpus: datasets.Dataset, tokenizer, block_size: int) -> datasets.Dataset:
    """run_clm.py's recipe, writing the same training data as ours (EOS after each document, input_ids only)."""
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict) -> dict:
        return {"input_ids": [ids + [eos] for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]]}

    def group_texts(batch: dict) -> dict:
        stream = list(chain(*batch["input_ids"]))
        usable = len(stream) // block_size * block_size  # per map batch of 1,000 documents, as in run_clm.py
        return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}

    return corpus.map(tokenize, batched=True, remove_columns=["text"]).map(group_texts, batched=True)


def bench_tokenize(tokenizer, megabytes: float, block_size: int) -> dict[str, float]:
    texts = [row["text"] for row in read_jsonl(DATA / "pretrain.jsonl")]
    size = sum(len(t.encode()) for t in texts) / 1e6
    corpus = texts * max(1, round(megabytes / size))
    size = sum(len(t.encode()) for t in corpus) / 1e6
    # both start from text in memory; reading is not timed
    corpus_dataset = datasets.Dataset.from_dict({"text": corpus})

    started = time.perf_counter()
    ours = concat_chunk(tokenize_documents(corpus, tokenizer), tokenizer.eos_token_id, block_size)
    ours_dataset = ours.to_dataset()
    ours_s = time.perf_counter() - started

    started = time.perf_counter()
    classic = classic_recipe(corpus_dataset, tokenizer, block_size)
    classic_s = time.perf_counter() - started

    assert ours_dataset[0]["input_ids"] == classic[0]["input_ids"]  # the same stream, cut the same way
    return {
        "corpus_mb": size,
        "ours_mb_s": size / ours_s,
        "classic_mb_s": size / classic_s,
        "ours_blocks": len(ours_dataset),
        "classic_blocks": len(classic),
    }


# ---------------------------------------------------------------- 2. packed vs padded SFT


def mixed_length_chats(count: int, seed: int) -> list[list[dict]]:
    """Chats of 1 to 8 bundled conversations (geometric, mostly short): the long tail that makes padding expensive."""
    conversations = [row["conversations"] for row in read_jsonl(DATA / "sft.jsonl")]
    rng = random.Random(seed)
    chats = []
    for _ in range(count):
        k = 1
        while k < 8 and rng.random() < 0.6:
            k += 1
        picked = rng.sample(conversations, k)
        # one conversation continued by the others' turns; only the first keeps its system message
        chats.append(picked[0] + [m for conversation in picked[1:] for m in conversation if m["role"] != "system"])
    return chats


class TokenCounter:
    """Wraps a collator and records, per batch, the tokens that are not padding and the tokens that carry a label."""

    def __init__(self, collator) -> None:
        self.collator = collator
        self.batches: list[tuple[int, int]] = []

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.collator(rows)
        real = sum(len(row["input_ids"]) for row in rows)
        trained = int((batch["labels"][:, 1:] != IGNORE).sum())  # the first label of a row is never predicted
        self.batches.append((real, trained))
        return batch


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.ends.append(time.perf_counter())


def train_throughput(
    tokenizer, dataset: datasets.Dataset, collator, batch_size: int, warmup: int, steps: int, workdir: Path
) -> dict[str, float]:
    """Useful tokens/s over `steps` optimizer steps after `warmup` (one batch per step, no accumulation)."""
    set_seed(0)
    model = build_model(ModelInit(hidden_size=256, layers=4, heads=4, max_seq_len=512), tokenizer)
    spec = SFTStage(
        name="packing",
        kind="sft",
        data=["unused.jsonl"],
        train=TrainSpec(
            batch_size=batch_size,
            precision="bf16",
            max_steps=warmup + steps,
            lr=1e-3,
            warmup=0.0,
            save_steps=10**6,
            logging_steps=10**6,
        ),
    )
    counter, clock = TokenCounter(collator), StepClock()
    # the tokenizer tells the Trainer which id is padding
    trainer = Trainer(
        model=model,
        args=training_arguments(spec, workdir),
        train_dataset=dataset,
        data_collator=counter,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    seconds = clock.ends[-1] - clock.ends[warmup - 1]
    measured = counter.batches[warmup : warmup + steps]  # batch i is step i + 1's, whatever the loader prefetched
    return {
        "real_tokens_s": sum(r for r, _ in measured) / seconds,
        "trained_tokens_s": sum(t for _, t in measured) / seconds,
        "step_s": seconds / steps,
        "parameters": model.num_parameters(),
    }


def bench_sft(tokenizer, max_len: int, batch_rows: int, warmup: int, steps: int, workdir: Path) -> dict:
    chats = mixed_length_chats(count=4000, seed=0)
    encoded = [encode_conversation(chat, tokenizer, max_len=10**9) for chat in chats]
    input_ids, labels = [ids for ids, _ in encoded], [lab for _, lab in encoded]
    lengths = [len(ids) for ids in input_ids]

    packed = pack_examples(input_ids, labels, max_len=max_len, overlong="truncate")
    padded = datasets.Dataset.from_dict(
        {"input_ids": [ids[:max_len] for ids in input_ids], "labels": [lab[:max_len] for lab in labels]}
    )
    # the same budget: at most batch_rows × max_len tokens a step either way (padded batches pad to their longest)
    return {
        "examples": len(chats),
        "mean_len": sum(lengths) / len(lengths),
        "max_len_seen": max(lengths),
        "truncated": packed.truncated,
        "rows": len(packed.dataset),
        "fill": packed.fill,
        "packed": train_throughput(
            tokenizer,
            packed.dataset,
            PackedCollator(pad_id=tokenizer.pad_token_id),
            batch_rows,
            warmup,
            steps,
            workdir / "packed",
        ),
        "padded": train_throughput(
            tokenizer,
            padded,
            DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE),
            batch_rows,
            warmup,
            steps,
            workdir / "padded",
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="?", choices=["tokenize", "sft", "both"], default="both")
    parser.add_argument("--megabytes", type=float, default=24.0, help="corpus size for the tokenize+pack figure")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--batch-rows", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    datasets.disable_progress_bars()  # a progress bar per map call would bury the table

    workdir = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    tokenizer = train_tokenizer(workdir)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.which in ("tokenize", "both"):
        r = bench_tokenize(tokenizer, args.megabytes, args.block_size)
        print(f"\n1. tokenize + pack, {r['corpus_mb']:.1f} MB, block {args.block_size}")
        print(f"   concat_chunk (tokenize_documents)      {r['ours_mb_s']:7.2f} MB/s   {r['ours_blocks']:>7} blocks")
        print(
            f"   datasets.map + group_texts             {r['classic_mb_s']:7.2f} MB/s   {r['classic_blocks']:>7} blocks"
        )
        print(f"   ratio                                  {r['ours_mb_s'] / r['classic_mb_s']:7.2f}x")
    if args.which in ("sft", "both"):
        r = bench_sft(tokenizer, args.max_len, args.batch_rows, args.warmup, args.steps, workdir)
        packed, padded = r["packed"], r["padded"]
        print(
            f"\n2. SFT, Llama {packed['parameters'] / 1e6:.2f}M params, bf16 autocast, "
            f"{args.batch_rows} × {args.max_len} tokens a step at most, {args.steps} steps after {args.warmup}"
        )
        print(
            f"   {r['examples']} chats, mean {r['mean_len']:.0f} tokens, longest {r['max_len_seen']}, "
            f"{r['truncated']} truncated; "
            f"{r['rows']} packed rows, fill {r['fill']:.3f}"
        )
        print(f"   {'':28} {'tokens/s':>10} {'trained tok/s':>14} {'s/step':>8}")
        for name, figures in (("packed (best fit)", packed), ("padded (dynamic)", padded)):
            print(
                f"   {name:28} {figures['real_tokens_s']:10.0f} {figures['trained_tokens_s']:14.0f} "
                f"{figures['step_s']:8.2f}"
            )
        print(
            f"   {'ratio':28} {packed['real_tokens_s'] / padded['real_tokens_s']:9.2f}x "
            f"{packed['trained_tokens_s'] / padded['trained_tokens_s']:13.2f}x"
        )


if __name__ == "__main__":
    main()
