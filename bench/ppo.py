"""A PPO rollout-and-update cycle's time, ours (`stages.ppo.run`) against TRL's `PPOTrainer`, side by side.

Both sides in one process, on the same saved model (the demo's 3.5M Llama as bench/grpo.py builds it: a tokenizer
trained on the bundled text, 256 wide, 4 layers, 4 heads, fresh weights) as the policy and, as a frozen copy, the
reference; the same reward model (those weights as a sequence classifier with one output, its fresh head seeded,
saved to a folder), which also starts the value model on both sides (ours: `value_model: reward`); the same prompts
(examples/data/rl_prompts.jsonl through the chatml template: the token ids are checked equal on both sides). A cycle:
8 prompts, one reply each (max_new_tokens / response_length 24, temperature 1.0, no top-p, no top-k), scored, then 2
PPO updates on that batch (ours: iterations 2 with train.batch_size 8, so one rollout feeds two optimizer steps;
TRL: num_ppo_epochs 2, num_mini_batches 1). KL coefficient 0.05 (k1, per token), clip 0.2, value clip 0.2, value
loss weight 0.1, gamma 1, lambda 0.95, no reward whitening, lr 5e-5 for the policy and the value model without
warmup, the cosine schedule to 0.1 of it, AdamW (fused) with weight decay 0.01, fp32 on the CPU.

TRL removed its PPOTrainer in 1.13 (huggingface/trl#7020; the installed TRL, which bench/grpo.py measures against,
has none), so the baseline is the last release that has it, TRL 1.12.0's `trl.experimental.ppo`, imported whole
from a folder of its own under another name beside the installed TRL (its helpers are 1.12.0's too):

    .venv/bin/pip install --no-deps --target /tmp/trl-1.12.0 'trl==1.12.0'
    python -m bench.ppo --trl /tmp/trl-1.12.0     # about 3 min beside busy work on 2 cores

Without --trl (and without a PPOTrainer in the installed TRL) only our cycle is measured.

One instrument for both (bench/grpo.py's `StepClock`, counted in cycles): a callback wraps the policy's `generate`
when training begins (each side's one batched generation of 8 replies per cycle) and notes the clock at the end of
every optimizer step (ours: two per cycle) or update (TRL's loop ends a step once per update, after its 2 optimizer
steps); a cycle ends at its last. The first cycle (allocations, warm-up) is left out: s/cycle is (end of cycle N -
end of cycle 1) / (N - 1); generation's share is its time over the cycles' time; sampled tokens are counted up to and
including each reply's first stop token. Rounds interleave the two sides (ours, TRL, ours, TRL, ...), the best
round of each is kept, and the ratio of each back-to-back pair of rounds is printed too.

What a cycle does differently in the two (the same sampling, rewards, advantages and losses otherwise):
- Old log-probs: TRL takes the sampling policy's log-probs from `generate`'s own scores (output_scores, each step's
  logits over the temperature); ours runs one more no-grad forward of the policy over prompts and replies after
  generation (`Samples.logps`): one policy forward per cycle more than TRL.
- Forwards: TRL's reference, value and reward forwards and its update's forward keep every layer's hidden states
  (output_hidden_states), and its reference forward and both of its update's (policy, value backbone) build a KV
  cache they never read; its value head runs on every position. Ours asks for no cache, and its value head runs on
  the reply positions only. TRL also takes each update's softmax over the vocabulary for its entropy figure.
- Reward: TRL scores the sampled ids as they are (prompt + reply, cut after its first <|im_end|>) at the reply's
  last token; ours decodes the reply and renders prompt and reply again through the reward model's chat template
  (the turn closed by <|im_end|>), re-tokenised, and scores its last token: a tokenizer round trip, a few more
  tokens. TRL's missing_eos_penalty is off (ours has none).
- Stop tokens: both stop generating at <|im_end|> and <|endoftext|> (TRL sets its one stop_token_id as the
  generation config's EOS; the bench gives that config both, as ours does). TRL cuts a reply after its first
  <|im_end|> and takes <|endoftext|>, which is also the pad token, for padding, so a reply ending with it is masked
  from it on; ours trains every reply up to and including its first stop token. With fresh weights a reply seldom
  stops, so nearly every one runs the full 24 tokens on both sides.
- Masks and padding: TRL finds padding by the pad id, ours by the attention mask; both count positions from each
  prompt's first real token. TRL's values and value loss reach one position past the reply's end (padding_mask_p1).
- Optimizers: TRL has one AdamW over policy and value model, no gradient clipping, its schedule stepped once per
  update; ours has the Trainer's AdamW (fused) for the policy and a second `torch.optim.AdamW` (its default CPU
  loop) for the value model, each clipped to norm 1.0, the schedule stepped per optimizer step.
- Loops: TRL's own loop over its own dataloader, its stats kept per minibatch and logged once per update; ours the
  HF Trainer's (a sampler handing each 8 prompts over twice, the samples buffered for the second step, a finite-loss
  check and the recorded figures per step), logging every 2nd step: once per cycle too.
- Garbage collection: TRL's loop calls `gc.collect()` twice per update, a full collection whose cost grows with
  the objects the process holds (0.36 s each on the busy 2-core machine the figures in the module's report came
  from, with only torch, transformers, datasets and TRL loaded; this process holds about 10% more objects, our
  stages' modules too). Ours never collects in its loop.
- Order of prompts: each side's own seeded shuffle (the same pool, not the same prompts in the same cycle).

The figures go to bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import statistics
import sys

# as bench/grpo.py: OpenMP threads wait passively (set before torch loads), on both sides
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # TRL's PPOTrainer lives under trl.experimental

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from bench.alignment import setup
from bench.grpo import StepClock, load, machine
from schemas.rewards import ModelReward
from schemas.spec import ModelInit, PPOStage, TrainSpec
from stages import ppo
from stages.common.checkpoint import load_model
from stages.common.contract import StageInputs
from stages.common.generation import cut_at_stop, stop_ids
from stages.common.templates import end_of_turn_id

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
PROMPTS, EPOCHS, MAX_NEW, TEMPERATURE, LR = 8, 2, 24, 1.0, 5e-5
KL, CLIP, VALUE_CLIP, VALUE_WEIGHT, GAMMA, LAM = 0.05, 0.2, 0.2, 0.1, 1.0, 0.95
REWARD = "reward"  # the reward stage's name our spec gives the reward model's folder
ALIAS = "trl_with_ppo"  # the module name a TRL release given by --trl is imported as, beside the installed `trl`


@dataclass
class CycleClock(StepClock):
    """bench/grpo.py's clock counted in rollout-and-update cycles of `per_cycle` step ends each; the policy's
    `generate` is wrapped where either trainer calls it (TRL hands its callbacks its policy-and-value wrapper, and asks
    `generate` for a dict with the scores)."""

    per_cycle: int = 1

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        policy = getattr(model, "policy", model)
        original = policy.generate

        def timed(*a, **k):
            started = time.perf_counter()
            output = original(*a, **k)
            seconds = time.perf_counter() - started
            sequences, width = getattr(output, "sequences", output), k["input_ids"].shape[1]
            tokens = sum(len(cut_at_stop(row, self.stops)) for row in sequences[:, width:].tolist())
            self.generations.append((len(self.ends) // self.per_cycle, seconds, tokens))
            return output

        policy.generate = timed  # on this instance only: both generate through the very object they train

    def figures(self) -> dict[str, float]:
        """Cycles 2..N: seconds per cycle, generation's seconds and share, sampled tokens and tokens/s."""
        ends = self.ends[self.per_cycle - 1 :: self.per_cycle]
        cycles = len(ends) - 1
        if cycles < 1 or len(self.generations) != len(ends):
            raise RuntimeError(
                f"{len(ends)} cycles ran {len(self.generations)} generations: each cycle should generate once"
            )
        elapsed = ends[-1] - ends[0]
        generating = sum(s for cycle, s, _ in self.generations if cycle >= 1)
        tokens = sum(n for cycle, _, n in self.generations if cycle >= 1)
        return {
            "s_per_cycle": elapsed / cycles,
            "generation_s": generating / cycles,
            "share": generating / elapsed,
            "tokens_per_s": tokens / generating,
            "reply_length": tokens / cycles / PROMPTS,
        }


def stage(cycles: int) -> PPOStage:
    return PPOStage(
        name="ppo",
        kind="ppo",
        data=[DATA / "rl_prompts.jsonl"],
        template="chatml",
        max_len=128,
        rewards=[ModelReward(kind="reward_model", stage=REWARD)],
        value_model=REWARD,
        max_new_tokens=MAX_NEW,
        temperature=TEMPERATURE,
        beta=KL,
        reference="frozen",
        iterations=EPOCHS,
        gamma=GAMMA,
        lam=LAM,
        epsilon=CLIP,
        value_clip=VALUE_CLIP,
        value_weight=VALUE_WEIGHT,
        eval_samples=0,
        train=TrainSpec(
            max_steps=cycles * EPOCHS,
            batch_size=PROMPTS,
            lr=LR,
            warmup=0.0,
            logging_steps=EPOCHS,  # once per cycle, as TRL logs once per update
            save_steps=10**6,
            precision="fp32",
        ),
    )


def reward_model(model: Path, tokenizer: Path, folder: Path) -> Path:
    """The policy's weights as a sequence classifier with one output (its head fresh, seeded), saved with the
    tokenizer and its chat template: the reward model and the value model's start, on both sides."""
    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    scorer = load_model(model, tok, AutoModelForSequenceClassification, num_labels=1)
    scorer.config.pad_token_id = tok.pad_token_id
    scorer.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def ours(tokenizer: Path, model: Path, scorer: Path, cycles: int, workdir: Path, stops: list[int]) -> dict[str, float]:
    spec, clock = stage(cycles), CycleClock(stops, per_cycle=EPOCHS)
    datasets = ppo.prepare(spec, AutoTokenizer.from_pretrained(tokenizer)).datasets
    ppo.run(spec, StageInputs(model, tokenizer, datasets, callbacks=(clock,), stage_models={REWARD: scorer}), workdir)
    logged = [log["generation_seconds"] for log in clock.logs[1:] if "generation_seconds" in log]
    return clock.figures() | {"logged_generation_s": sum(logged) / len(logged) if logged else float("nan")}


def trl_ppo(folder: Path | None) -> tuple[ModuleType | None, str]:
    """TRL's `experimental.ppo` module and where it came from: the installed TRL's where it still has one, else the
    release in `folder` (a `pip install --no-deps --target` folder), imported whole as `ALIAS` beside the installed
    TRL, so its PPO runs with its own helpers; (None, why) without either."""
    try:
        import trl
    except ImportError as err:
        trl, installed = None, f"TRL is not installed ({err})"
    if trl is not None:
        try:
            return importlib.import_module("trl.experimental.ppo"), f"trl {trl.__version__} (installed)"
        except ImportError:
            installed = f"the installed TRL {trl.__version__} has no PPOTrainer (removed in 1.13)"
    if folder is None:
        return None, f"{installed}; --trl names a folder holding TRL 1.12.0, the last release with it"
    found = importlib.util.spec_from_file_location(
        ALIAS, folder / "trl" / "__init__.py", submodule_search_locations=[str(folder / "trl")]
    )
    if found is None:
        raise SystemExit(f"--trl {folder}: no trl package in it (pip install --no-deps --target {folder} trl==1.12.0)")
    package = importlib.util.module_from_spec(found)
    sys.modules[ALIAS] = package
    found.loader.exec_module(package)
    released = sorted(p.name.removesuffix(".dist-info") for p in folder.glob("trl-*.dist-info"))
    return importlib.import_module(f"{ALIAS}.experimental.ppo"), f"{', '.join(released) or 'trl'} from {folder}"


def theirs(
    ppo_module: ModuleType,
    tokenizer_dir: Path,
    model_dir: Path,
    scorer: Path,
    cycles: int,
    workdir: Path,
    stops: list[int],
    prompts: Dataset,
) -> dict[str, float]:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.padding_side = "left"  # TRL's collator pads, and its generation reads the pad ids as the mask
    policy, reference = load_model(model_dir, tokenizer), load_model(model_dir, tokenizer)
    reward, value = (load_model(scorer, tokenizer, AutoModelForSequenceClassification, num_labels=1) for _ in range(2))
    config = ppo_module.PPOConfig(
        output_dir=str(workdir),
        total_episodes=cycles * PROMPTS,
        per_device_train_batch_size=PROMPTS,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=EPOCHS,
        local_rollout_forward_batch_size=PROMPTS,
        response_length=MAX_NEW,
        temperature=TEMPERATURE,
        stop_token_id=end_of_turn_id(tokenizer, "chatml"),
        missing_eos_penalty=None,
        kl_coef=KL,
        kl_estimator="k1",
        cliprange=CLIP,
        cliprange_value=VALUE_CLIP,
        vf_coef=VALUE_WEIGHT,
        gamma=GAMMA,
        lam=LAM,
        whiten_rewards=False,
        learning_rate=LR,
        weight_decay=0.01,
        warmup_steps=0,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},  # our TrainSpec's defaults
        optim="adamw_torch_fused",  # our TrainSpec's default
        bf16=False,
        gradient_checkpointing=False,  # PPOConfig turns on both
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        num_sample_generations=0,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    clock = CycleClock(stops)
    trainer = ppo_module.PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward,
        train_dataset=prompts,
        value_model=value,
        callbacks=[clock],
    )
    policy.generation_config.eos_token_id = stops  # TRL set its one stop id: both stop tokens, as ours stops
    if trainer.accelerator.mixed_precision != "no" or policy.is_activation_checkpointing:
        raise RuntimeError("TRL's PPOTrainer kept bf16 or activation checkpointing on: the sides would differ")
    trainer.train()
    return clock.figures()


def tokenized(tokenizer_dir: Path) -> tuple[Dataset, int, int]:
    """The prompts as TRL's PPOTrainer takes them (`input_ids`, rendered by the tokenizer's chat template), and how
    many equal the ids our stage prepares for them."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prepared = ppo.prepare(stage(1), tokenizer).datasets["train"]
    rendered = tokenizer.apply_chat_template(
        list(prepared["messages"]), add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    same = sum(list(ids) == list(own) for ids, own in zip(rendered, prepared["prompt_ids"]))
    return Dataset.from_dict({"input_ids": [list(ids) for ids in rendered]}), same, len(rendered)


@contextlib.contextmanager
def quiet():
    """Both streams swallowed: the trainers' logs and progress lines, transformers' load reports and deprecation
    warnings (an error still propagates, and is printed once the streams are back)."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its handler holds the stderr it started with
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--trl",
        type=Path,
        help="a folder holding TRL 1.12.0 (pip install --no-deps --target FOLDER 'trl==1.12.0'): the baseline, "
        "where the installed TRL has no PPOTrainer",
    )
    parser.add_argument(
        "--cycles", type=int, default=10, help="rollout-and-update cycles per round (the first is warm-up, not timed)"
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="rounds of each side, interleaved; the best of each is shown"
    )
    args = parser.parse_args()
    baseline, origin = trl_ppo(args.trl)
    print(machine())
    print(f"PPO baseline: {origin}" if baseline else f"no baseline, only our cycle is measured: {origin}")
    print(f"load average before: {load()}")

    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        workdir = Path(tmp)
        with quiet():  # the tokenizer's training, the fresh head's load report
            tokenizer, model = setup(workdir, ModelInit(hidden_size=256, layers=4, heads=4, max_seq_len=256))
            scorer = reward_model(model, tokenizer, workdir / "reward")
            tok = AutoTokenizer.from_pretrained(tokenizer)
            params = sum(p.numel() for p in load_model(model, tok).parameters())
        stops = stop_ids(tok, end_of_turn_id(tok, "chatml"))
        prompts, same, total = tokenized(tokenizer)
        print(f"prompts: {total}, of which {same} render to the same token ids through the tokenizer's chat template")
        sides = {"ours": lambda r: ours(tokenizer, model, scorer, args.cycles, workdir / f"ours-{r}", stops)}
        if baseline is not None:
            sides["TRL"] = lambda r: theirs(
                baseline, tokenizer, model, scorer, args.cycles, workdir / f"trl-{r}", stops, prompts
            )
        best: dict[str, dict[str, float]] = {}
        rounds: dict[str, list[float]] = {}  # each round's s/cycle, in order
        failed: dict[str, str] = {}  # TRL's error where its trainer cannot run this setup: said, not hidden
        for round_ in range(args.rounds):
            for name, run in [(n, r) for n, r in sides.items() if n not in failed]:
                try:
                    with quiet():  # the trainers print their logs; the clock keeps them
                        found = run(round_)
                except Exception as err:
                    if name == "ours":
                        raise
                    failed[name] = f"{type(err).__name__}: {err}"
                    continue
                print(
                    f"  round {round_ + 1} {name:<5} {found['s_per_cycle']:.3f} s/cycle, generation "
                    f"{found['share']:.0%}, {found['tokens_per_s']:,.0f} sampled tokens/s, load {load()}"
                )
                rounds.setdefault(name, []).append(found["s_per_cycle"])
                if name not in best or found["s_per_cycle"] < best[name]["s_per_cycle"]:
                    best[name] = found

    print(
        f"\nPPO cycle (rollout of {PROMPTS} prompts x 1 reply, then {EPOCHS} updates on it), the demo 3.5M Llama, "
        f"fresh weights ({params / 1e6:.2f}M parameters; reward and value model the same weights with a scalar "
        f"head), max_new_tokens {MAX_NEW}, temperature {TEMPERATURE}, kl {KL}, fp32; cycles 2..{args.cycles} of the "
        f"best of {args.rounds} rounds"
    )
    for name, why in failed.items():
        print(f"{name}'s PPOTrainer could not run here, so there is no baseline: {why}")
    base = best.get("TRL")
    print(f"{'trainer':<8}{'s/cycle':>9}{'vs TRL':>8}{'generation s':>14}{'share':>7}{'tokens/s':>10}{'reply len':>11}")
    for name, f in best.items():
        ratio = f"{f['s_per_cycle'] / base['s_per_cycle']:.2f}" if base else "-"
        print(
            f"{name:<8}{f['s_per_cycle']:>9.3f}{ratio:>8}{f['generation_s']:>14.3f}{f['share']:>7.0%}"
            f"{f['tokens_per_s']:>10,.0f}{f['reply_length']:>11.1f}"
        )
    if base and len(rounds["TRL"]) == len(rounds["ours"]):
        paired = [o / t for o, t in zip(rounds["ours"], rounds["TRL"])]
        print(
            f"ours / TRL round by round (each pair ran back to back): {', '.join(f'{r:.2f}' for r in paired)}; "
            f"median {statistics.median(paired):.2f}"
        )
    print(f"our stage's own logged generation_seconds, same cycles: {best['ours']['logged_generation_s']:.3f} s")
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
