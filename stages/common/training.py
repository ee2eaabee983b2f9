"""The HF Trainer set up the same way for every training stage.

Precision, schedule, clipping, accumulation, seeding and in-stage checkpoints come from one
`TrainSpec`; `fit` resumes from the last complete checkpoint in the work folder, so a stage
killed mid-training continues where it stopped instead of starting again.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TextIO

import torch
from torch import Tensor
from transformers import PreTrainedModel, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from schemas.errors import LifecycleError
from schemas.launch import FSDP
from schemas.memory import Memory
from schemas.spec import StageBase, TrainingStage
from stages.common.contract import TRAINER_STATE
from stages.common.progress import StatusLine, duration, step_line


def cpu_has_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), so autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(precision: str) -> bool:
    if precision != "auto":
        return precision == "bf16"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def world_size() -> int:
    """The number of ranks this stage runs as: torchrun says so in the environment; 1 in the flow's own process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def main_process() -> bool:
    """Rank 0, the one that saves and records (every process when not launched)."""
    return int(os.environ.get("RANK", "0")) == 0


def fsdp_arguments(fsdp: FSDP) -> dict:
    """The Trainer's FSDP2 settings (through Accelerate): each decoder layer (the model's `_no_split_modules`) a unit
    of its own, sharded fully, or gradients and optimizer state only while the gathered parameters stay."""
    return {
        "fsdp": f"{'full_shard' if fsdp.reshard_after_forward else 'shard_grad_op'} auto_wrap",
        "fsdp_config": {
            "fsdp_version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": fsdp.reshard_after_forward,
        },
    }


def training_arguments(spec: TrainingStage, output_dir: Path) -> TrainingArguments:
    """The Trainer's settings from the stage's `train`; under torchrun, `batch_size` is shared among the ranks and
    `launch.deepspeed` is handed to the Trainer, so one optimizer step sees the same rows however the stage runs."""
    train, launch, memory = spec.train, spec.launch, spec.memory or Memory()
    launched = "LOCAL_RANK" in os.environ
    per_rank = train.batch_size // world_size()
    return TrainingArguments(
        output_dir=str(output_dir),
        run_name=spec.name,  # named in the messages of a stage that diverges
        per_device_train_batch_size=per_rank,
        per_device_eval_batch_size=per_rank,
        deepspeed=str(launch.deepspeed_config())
        if launched and launch is not None and launch.deepspeed is not None
        else None,
        **(fsdp_arguments(launch.fsdp) if launched and launch is not None and launch.fsdp is not None else {}),
        ddp_backend="gloo" if launched and not torch.cuda.is_available() else None,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": train.min_lr_ratio},
        warmup_steps=train.warmup,
        bf16=use_bf16(train.precision),
        use_cpu=not torch.cuda.is_available(),
        logging_steps=train.logging_steps,
        # a NaN loss is logged as NaN (and stops the stage), not hidden behind the mean so far
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=2,
        eval_strategy="no",
        seed=train.seed,
        data_seed=train.seed,
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,  # the collators pick their columns; objectives read more than the model's inputs
        dataloader_num_workers=0,
        disable_tqdm=True,
        optim=train.optimizer,
        neftune_noise_alpha=train.neftune_noise_alpha,
        activation_checkpointing=memory.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if memory.gradient_checkpointing else None,
        torch_compile=memory.torch_compile,
        use_liger_kernel=memory.liger,
    )


def complete(folder: Path) -> bool:
    """The Trainer writes its state file last, and not atomically: a checkpoint is complete when that file parses."""
    try:
        return "global_step" in json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete in-stage checkpoint; incomplete ones (killed mid-save) are removed, by rank 0 alone."""
    saved = []
    for folder in output_dir.glob("checkpoint-*"):
        if complete(folder):
            saved.append(folder)
        elif main_process():
            shutil.rmtree(folder, ignore_errors=True)
    return max(saved, key=lambda f: int(f.name.split("-")[1]), default=None)


def fit(trainer: Trainer, measure: Callable[[], dict[str, float]] | None = None) -> tuple[dict[str, float], int]:
    """Train, resuming from the last complete checkpoint; return the metrics and the step resumed from.

    `measure` gives the stage's own held-out measures of the model: taken before training (named with the suffix
    `_before`) and after, so each stage's record shows what it changed."""
    before = {f"{name}_before": value for name, value in measure().items()} if measure else {}
    checkpoint = last_checkpoint(Path(trainer.args.output_dir))
    resumed_from, tokens_before = 0, 0
    if checkpoint:
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        resumed_from, tokens_before = state["global_step"], state.get("num_input_tokens_seen", 0)
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    metrics = {k: float(v) for k, v in output.metrics.items() if isinstance(v, (int, float))}
    # since this process began training: runtime counts only since the resume
    tokens = trainer.state.num_input_tokens_seen - tokens_before
    if tokens and metrics.get("train_runtime"):
        metrics["train_tokens_per_second"] = tokens / metrics["train_runtime"]
    return metrics | before | (measure() if measure else {}), resumed_from


def chosen(trainer: Trainer) -> dict[str, str]:
    """What the stage's settings chose on this machine, recorded as its run's tags: the attention kernel it ran with
    (`memory.attention: auto`'s choice) and its precision (`train.precision: auto`'s: bf16 autocast or fp32)."""
    return {
        "attention": unwrapped(trainer.model).config._attn_implementation,
        "precision": "bf16" if trainer.args.bf16 else "fp32",
    }


class Progress(TrainerCallback):
    """The stage's progress line (`stages.common.progress`) from the Trainer's events, on the main process only.

    Each step redraws the line on a terminal, each logging step prints it elsewhere; the end-of-training summary
    ends it (in its place, on a terminal); a held-out measure is a line of its own."""

    FIGURES = ("loss", "reward")  # GRPO's loss is ~0 by construction on-policy: its mean reward says how it goes

    def __init__(self, stream: TextIO | None = None, live: bool | None = None):
        self.status = StatusLine(stream, live)
        self.figures: dict[str, float] = {}
        self.started, self.start_step, self.start_tokens = time.monotonic(), 0, 0

    def line(self, args, state) -> str:
        return step_line(
            args.run_name,
            state.global_step,
            state.max_steps,
            self.figures,
            state.num_input_tokens_seen - self.start_tokens,
            time.monotonic() - self.started,
            state.global_step - self.start_step,
        )

    def on_train_begin(self, args, state, control, **kwargs):
        # a resumed stage's state is loaded by now: its rate and ETA count from here
        self.started, self.start_step = time.monotonic(), state.global_step
        self.start_tokens, self.figures = state.num_input_tokens_seen, {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.status.update(self.line(args, state))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:  # a training step's log
            self.figures = {name: float(logs[name]) for name in self.FIGURES if name in logs}
            self.status.mark(self.line(args, state))
        elif "train_runtime" in logs:  # the end-of-training summary: the last step's figures, the rate since the resume
            seconds, tokens = logs["train_runtime"], state.num_input_tokens_seen - self.start_tokens
            where = args.device.type + (f" x{args.world_size}" if args.world_size > 1 else "")
            self.status.finish(
                f"{args.run_name}  {state.global_step - self.start_step} steps in {duration(seconds)} on {where}"
                + "".join(f"  {name} {value:.4g}" for name, value in self.figures.items())
                + (f"  {tokens / seconds:,.0f} tok/s" if tokens and seconds else "")
            )
        elif "eval_loss" in logs:  # a held-out measure, before or after training
            self.status.note(f"{args.run_name}  heldout loss {logs['eval_loss']:.4g} at step {state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        self.status.close()


class Diverged(LifecycleError):
    """A training step whose loss or gradient norm is not finite: the stage stops there, before the optimizer step."""


class StageTrainer(Trainer):
    """The HF Trainer, stopped at the first step whose loss is not finite (or, at a save, whose weights are not).

    A diverged stage must never be recorded as a success: the Trainer would go on and log `loss: 0` or NaN
    while the weights fill with NaN, and every later stage would train on them. The check costs one
    host sync per micro-step, as the Trainer's own NaN filter does."""

    last_finite: tuple[int, float] | None = None  # (step, loss) of the last finite training loss

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the Trainer's own display prints every log as a Python dict (PrinterCallback, as disable_tqdm asks; the
        # tqdm ProgressCallback otherwise writes the same dicts under its bar): one progress line instead
        self.remove_callback(PrinterCallback)
        self.progress = Progress()
        self.add_callback(self.progress)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.progress.status.close()  # a stage that fails mid-line has its error start on a line of its own

    def training_step(self, model, inputs, num_items_in_batch=None) -> Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        value = float(loss)
        if not math.isfinite(value):
            self.diverged(self.state.global_step + 1, f"the loss is {value}")
        self.last_finite = (self.state.global_step + 1, value)
        return loss

    def _save_checkpoint(self, model, trial) -> None:
        # the weights a save would keep must be finite: a NaN gradient with a finite loss fills them with NaN
        if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
            self.diverged(self.state.global_step, "its weights are not finite (a gradient was not)")
        super()._save_checkpoint(model, trial)

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        if self.is_deepspeed_enabled and self.deepspeed is None:
            # before training the weights are still whole on every rank (the engine that shards them is built by
            # `train`),
            # so they are evaluated as they are: DeepSpeed below ZeRO-3 refuses to build an inference engine, and under
            # ZeRO-3 the one it builds leaves the training engine unset
            self.is_deepspeed_enabled = False
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                self.is_deepspeed_enabled = True
        return super().evaluate(*args, **kwargs)

    def diverged(self, step: int, what: str) -> None:
        saved = last_checkpoint(Path(self.args.output_dir))
        raise Diverged(
            f"stage {self.args.run_name} diverged at step {step}: {what}"
            + (
                f" (last finite loss {self.last_finite[1]:.4g} at step {self.last_finite[0]})"
                if self.last_finite
                else ""
            )
            + (f"; the last good in-stage checkpoint is {saved}" if saved else "; no in-stage checkpoint was saved")
            + ". Nothing was marked finished: lower train.lr (or raise train.warmup), then run again."
        )


class ObjectiveTrainer(StageTrainer):
    """The Trainer for an objective of our own: `compute_loss` returns the batch mean of a pure loss.

    Per-step figures an objective records (rewards, margins, accuracies) are averaged over the
    batches since the last log and logged with the loss. The loss is not normalised by the number
    of items in the batch the way an HF model's own loss is, so the Trainer must scale it for
    gradient accumulation itself: `model_accepts_loss_kwargs` is turned off.
    """

    def __init__(self, *args, spec: StageBase, **kwargs):
        super().__init__(*args, **kwargs)
        self.spec = spec  # the stage's settings: beta, margins, weights
        self.model_accepts_loss_kwargs = False
        self._recorded: dict[str, list[float]] = defaultdict(list)

    def record(self, **figures: Tensor | float) -> None:
        if self.model.training:
            for name, value in figures.items():
                self._recorded[name].append(float(value.float().mean()) if isinstance(value, Tensor) else float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log, not the end-of-training summary
            logs |= {name: sum(values) / len(values) for name, values in self._recorded.items() if values}
            self._recorded.clear()
        super().log(logs, start_time)


def unwrapped(model) -> PreTrainedModel:
    """A PEFT model's base model; any other model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attention(stage: TrainingStage) -> str | None:
    """The attention kernel the stage asks for; None for auto where flash attention is out of reach: the
    architecture's default (transformers picks sdpa where the architecture has it, else eager)."""
    chosen = (stage.memory or Memory()).attention
    if chosen != "auto":
        return chosen
    usable = torch.cuda.is_available() and use_bf16(stage.train.precision)
    return "flash_attention_2" if usable and importlib.util.find_spec("flash_attn") is not None else None


def make_trainer(
    stage: TrainingStage,
    model: PreTrainedModel,
    tokenizer,
    workdir: Path,
    datasets: Mapping,
    collator,
    callbacks: tuple[TrainerCallback, ...],
    trainer_class: type[StageTrainer] = StageTrainer,
    **extra,
) -> StageTrainer:
    """The stage's Trainer (its arguments from `training_arguments`, its folder workdir/trainer), the model set to the
    stage's attention kernel."""
    if (kernel := attention(stage)) is not None:
        unwrapped(model).set_attn_implementation(kernel)
    return trainer_class(
        model=model,
        args=training_arguments(stage, workdir / "trainer"),
        train_dataset=datasets["train"],
        eval_dataset=datasets["heldout"] if "heldout" in datasets else None,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=list(callbacks),
        **extra,
    )
