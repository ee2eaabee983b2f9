"""A GRPO step's time, ours (`stages.grpo.run`) against TRL's `GRPOTrainer`, and where our step's time goes.

Both sides in one process, on the same saved model (the demo's 3.5M Llama: a tokenizer trained on the bundled
text, 256 wide, 4 layers, 4 heads, fresh weights unless --checkpoint names a trained folder), the same prompts
(examples/data/rl_prompts.jsonl through the chatml template: the token ids are checked equal on both sides), 8
prompts x 8 completions per optimizer step, max_new_tokens 24, temperature 1.0 (no top-p, no top-k), the same
answer reward (our `AnswerReward` function itself, wrapped for TRL's signature), lr 5e-5 without warmup, beta 0
(no reference model), one update per sample (mu = 1), epsilon 0.2, the "grpo" aggregation, fp32 on the CPU.

One instrument for both: a callback wraps the policy's `generate` when training begins (the timed call is each
trainer's one batched generation of 64 completions per step) and notes the clock at the end of every optimizer
step. A step is the time between two step ends, so the first step (allocations, warm-up) is left out: s/step is
(end of step N - end of step 1) / (N - 1). Sampled tokens are counted as produced (each completion up to and
including its first stop token, never a finished row's padding); generation's share is its time over the
steps' time. Rounds interleave the two sides (ours, TRL, ours, TRL, ...) and the best round of each is kept, so
a neighbour's load hits both alike; the ratio of each back-to-back pair of rounds is printed too, as a check of
the best rounds' ratio when the load comes in bursts.

What a step does differently in the two (same sampling, rewards, advantages and update otherwise):
- TRL replaces the model's LM head with a fused, chunked one for the update's forward (log-probs of the
  completion positions only, without the full [N, T, vocab] logits) and computes each token's entropy too
  (for its `entropy` metric); ours computes the logits of every position and takes the log-softmax of the
  completion's.
- TRL's update forward counts positions from the first column, padding included; ours from each prompt's
  first real token. Rotary positions depend only on the distance between tokens, so on this Llama the two
  give the same log-probs up to rounding (a model with absolute positions would not).
- TRL tokenises the prompts with the chat template at every step (`apply_chat_template` on the batch); ours
  tokenises them once, before training (`grpo.prepare`), and left-pads the prepared ids.
- Masks: both train on each completion up to and including its first stop token (the end of the turn or the
  end of text) and both keep completions cut at max_new_tokens in the loss (TRL's mask_truncated_completions
  is off). TRL masks after the first stop token once generation returns; ours cuts each row at it.
- Rewards: TRL calls the reward function with conversational completions ([{"role": "assistant", ...}]),
  decoded with skip_special_tokens; ours decodes the reply without its stop token. The answer check
  normalises whitespace, so the rewards agree.
- Order of prompts: each side's own seeded sampler (the same pool, not the same prompts at the same step).
With fresh weights a completion seldom ends its turn, so nearly every one runs the full 24 tokens on both
sides (the demo's trained model averaged 8.2; --checkpoint measures such a folder).

    python -m bench.grpo                    # about 2 min idle, under 4 beside busy work
    python -m bench.grpo --checkpoint PATH  # a trained chatml checkpoint folder (its tokenizer inside) instead

The figures go to bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics

# as `lifecycle` sets before torch loads (flows/cli.py): OpenMP threads wait passively, so a busy neighbour
# does not take their cores while they spin (bench/threads.py); both sides run under it
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback

from bench.alignment import setup
from schemas.data import read_files
from schemas.rewards import AnswerReward
from schemas.spec import GRPOStage, ModelInit, TrainSpec
from stages import grpo
from stages.common.checkpoint import load_model
from stages.common.contract import StageInputs
from stages.common.generation import cut_at_stop, stop_ids
from stages.common.reward_functions import reward_functions
from stages.common.templates import conversations, encode_prompt, end_of_turn_id

try:
    import trl
except ImportError as err:  # the bench extra: pip install -c constraints.txt -e '.[bench]'
    trl, TRL_MISSING = None, str(err)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
PROMPTS, GROUP, MAX_NEW, TEMPERATURE, LR = 8, 8, 24, 1.0, 5e-5  # the demo's grpo stage (examples/toy.yaml)
ANSWER = AnswerReward(kind="answer")


@dataclass
class StepClock(TrainerCallback):
    """The end of every optimizer step, and every `generate` of the policy: its seconds and the tokens it sampled."""

    stops: list[int]
    ends: list[float] = field(default_factory=list)
    generations: list[tuple[int, float, int]] = field(default_factory=list)  # (step it ran in, seconds, tokens)
    logs: list[dict] = field(default_factory=list)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        original = model.generate

        def timed(*a, **k):
            started = time.perf_counter()
            output = original(*a, **k)
            seconds = time.perf_counter() - started
            width = k["input_ids"].shape[1]
            self.generations.append(
                (len(self.ends), seconds, sum(len(cut_at_stop(row, self.stops)) for row in output[:, width:].tolist()))
            )
            return output

        model.generate = timed  # on this instance only: both trainers generate through the very object they train

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))

    def figures(self) -> dict[str, float]:
        """Steps 2..N: seconds per step, generation's seconds and share, sampled tokens and tokens/s."""
        steps = len(self.ends) - 1
        if steps < 1 or len(self.generations) != len(self.ends):
            raise RuntimeError(
                f"{len(self.ends)} steps ran {len(self.generations)} generations: each step should generate once"
            )
        elapsed = self.ends[-1] - self.ends[0]
        generating = sum(s for step, s, _ in self.generations if step >= 1)
        tokens = sum(n for step, _, n in self.generations if step >= 1)
        return {
            "s_per_step": elapsed / steps,
            "generation_s": generating / steps,
            "share": generating / elapsed,
            "tokens_per_s": tokens / generating,
            "completion_length": tokens / steps / (PROMPTS * GROUP),
        }


def stage(steps: int) -> GRPOStage:
    return GRPOStage(
        name="grpo",
        kind="grpo",
        data=[DATA / "rl_prompts.jsonl"],
        template="chatml",
        max_len=128,
        rewards=[ANSWER],
        group_size=GROUP,
        max_new_tokens=MAX_NEW,
        temperature=TEMPERATURE,
        beta=0.0,
        iterations=1,
        eval_samples=0,
        train=TrainSpec(
            max_steps=steps, batch_size=PROMPTS, lr=LR, warmup=0.0, logging_steps=1, save_steps=10**6, precision="fp32"
        ),
    )


def ours(tokenizer: Path, model: Path, steps: int, workdir: Path, stops: list[int]) -> dict[str, float]:
    spec, clock = stage(steps), StepClock(stops)
    datasets = grpo.prepare(spec, AutoTokenizer.from_pretrained(tokenizer)).datasets
    grpo.run(spec, StageInputs(model, tokenizer, datasets, callbacks=(clock,)), workdir)
    logged = [log["generation_seconds"] for log in clock.logs[1:] if "generation_seconds" in log]
    return clock.figures() | {"logged_generation_s": sum(logged) / len(logged) if logged else float("nan")}


def answer_reward():
    """Our answer reward in TRL's signature: the same function scores the same decoded text."""
    score = reward_functions([ANSWER])[0].score

    def answer(prompts, completions, completion_ids, answer, **_) -> list[float]:
        return score(prompts, [c[-1]["content"] for c in completions], answer, list(map(len, completion_ids)))

    return answer


def theirs(
    tokenizer_dir: Path, model_dir: Path, steps: int, workdir: Path, stops: list[int], prompts: Dataset
) -> dict[str, float]:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = load_model(model_dir, tokenizer)
    model.generation_config.eos_token_id = (
        stops  # TRL stops at these and the tokenizer's EOS (one of them): as ours does
    )
    config = trl.GRPOConfig(
        output_dir=str(workdir),
        max_steps=steps,
        per_device_train_batch_size=PROMPTS * GROUP,  # counted in completions
        gradient_accumulation_steps=1,
        num_generations=GROUP,
        max_completion_length=MAX_NEW,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=LR,
        weight_decay=0.01,
        max_grad_norm=1.0,
        warmup_steps=0,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},  # our TrainSpec's defaults
        bf16=False,
        activation_checkpointing=False,
        use_cpu=True,
        use_vllm=False,  # GRPOConfig turns on bf16 and checkpointing
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if config.bf16 or config.gradient_checkpointing:
        raise RuntimeError(
            "GRPOConfig kept bf16 or activation checkpointing on: the two sides would not do the same work"
        )
    clock = StepClock(stops)
    trl.GRPOTrainer(
        model=model,
        reward_funcs=answer_reward(),
        args=config,
        train_dataset=prompts,
        processing_class=tokenizer,
        callbacks=[clock],
    ).train()
    return clock.figures()


def conversational(tokenizer_dir: Path) -> tuple[Dataset, int, int]:
    """The prompts as TRL takes them (messages and answers), and how many render to the ids our stage prepares for
    them."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    read = read_files([DATA / "rl_prompts.jsonl"], "prompts", "fail")
    messages, answers = conversations(read.frame, "prompt_"), read.frame["answer"].to_list()
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    same = sum(list(ids) == encode_prompt(m, tokenizer, "chatml") for ids, m in zip(rendered, messages))
    return Dataset.from_dict({"prompt": messages, "answer": answers}), same, len(messages)


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "unknown CPU"
    )
    bf16 = "with" if "avx512_bf16" in cpuinfo else "without"
    return (
        f"{model} ({os.cpu_count()} cores, {bf16} avx512_bf16), torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, TRL {trl.__version__ if trl else 'not installed'}"
    )


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="a trained checkpoint folder with its tokenizer; default: the demo's model, fresh",
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="optimizer steps per round (the first is warm-up, not timed)"
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="rounds of each side, interleaved; the best of each is shown"
    )
    args = parser.parse_args()
    print(machine())
    if trl is None:
        print(
            f"TRL is not installed ({TRL_MISSING}), so only our step is measured: "
            f".venv/bin/pip install -c constraints.txt -e '.[bench]' installs it without touching torch"
        )
    print(f"load average before: {load()}")

    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        workdir = Path(tmp)
        if args.checkpoint:
            tokenizer, model = args.checkpoint, args.checkpoint
        else:
            # the demo's model
            tokenizer, model = setup(workdir, ModelInit(hidden_size=256, layers=4, heads=4, max_seq_len=256))
        tok = AutoTokenizer.from_pretrained(tokenizer)
        stops = stop_ids(tok, end_of_turn_id(tok, "chatml"))
        params = sum(p.numel() for p in load_model(model, tok).parameters())
        prompts, same, total = conversational(tokenizer)
        print(
            f"prompts: {total}, of which {same} render to the same token ids through TRL's apply_chat_template as "
            "through ours"
        )
        sides = {"ours": lambda r: ours(tokenizer, model, args.steps, workdir / f"ours-{r}", stops)}
        if trl is not None:
            sides["TRL"] = lambda r: theirs(tokenizer, model, args.steps, workdir / f"trl-{r}", stops, prompts)
        best: dict[str, dict[str, float]] = {}
        rounds: dict[str, list[float]] = {}  # each round's s/step, in order
        failed: dict[str, str] = {}  # TRL's error where its trainer cannot run this model or setup: said, not hidden
        for round_ in range(args.rounds):
            for name, run in [(n, r) for n, r in sides.items() if n not in failed]:
                try:
                    with contextlib.redirect_stdout(
                        io.StringIO()
                    ):  # the Trainers print every step's log; the clock keeps them
                        found = run(round_)
                except Exception as err:
                    if name == "ours":
                        raise
                    failed[name] = f"{type(err).__name__}: {err}"
                    continue
                print(
                    f"  round {round_ + 1} {name:<5} {found['s_per_step']:.3f} s/step, generation "
                    f"{found['share']:.0%}, "
                    f"{found['tokens_per_s']:,.0f} sampled tokens/s, load {load()}"
                )
                rounds.setdefault(name, []).append(found["s_per_step"])
                if name not in best or found["s_per_step"] < best[name]["s_per_step"]:
                    best[name] = found

    print(
        "\nGRPO step, "
        f"{'the checkpoint ' + str(args.checkpoint) if args.checkpoint else 'the demo 3.5M Llama, fresh weights'} "
        f"({params / 1e6:.2f}M parameters), "
        f"{PROMPTS} prompts x {GROUP} completions, max_new_tokens {MAX_NEW}, temperature {TEMPERATURE}, beta 0, mu 1, "
        "fp32; "
        f"steps 2..{args.steps} of the best of {args.rounds} rounds"
    )
    for name, why in failed.items():
        print(f"{name}'s GRPOTrainer could not run here, so there is no baseline: {why}")
    base = best.get("TRL")
    print(
        f"{'trainer':<8}{'s/step':>9}{'vs TRL':>8}{'generation s':>14}{'share':>7}"
        f"{'tokens/s':>10}{'completion len':>16}"
    )
    for name, f in best.items():
        ratio = f"{f['s_per_step'] / base['s_per_step']:.2f}" if base else "-"
        print(
            f"{name:<8}{f['s_per_step']:>9.3f}{ratio:>8}{f['generation_s']:>14.3f}{f['share']:>7.0%}{f['tokens_per_s']:>10,.0f}"
            f"{f['completion_length']:>16.1f}"
        )
    if base and len(rounds["TRL"]) == len(rounds["ours"]):
        paired = sorted(o / t for o, t in zip(rounds["ours"], rounds["TRL"]))
        print(
            f"ours / TRL round by round (each pair ran back to back): {', '.join(f'{r:.2f}' for r in paired)}; "
            f"median {statistics.median(paired):.2f}"
        )
    print(f"our stage's own logged generation_seconds, same steps: {best['ours']['logged_generation_s']:.3f} s")
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
