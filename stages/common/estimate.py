"""A training stage's peak memory on one device, estimated from the model's config before anything loads.

The model is built on the meta device (shapes, no storage) to count its parameters and the share LoRA trains.
The peak is the sum of:

    weights       every parameter in float32 (stages load in float32; bf16 is autocast); ZeRO-3 shards them
    gradients     float32, one per trained parameter; ZeRO-2/3 shard them
    optimizer     AdamW 8 bytes per trained parameter (two moments), 8-bit AdamW 2, Adafactor its factored rows
                  and columns; ZeRO-2/3 shard it, offload moves it off a GPU
    reference     a frozen copy of the input model (reference: frozen), or the reward models GRPO scores with
    activations   what the backward pass keeps, per token of a micro-step: per layer, ACTIVATION_BYTES
                  (hidden, key/value and MLP widths; bf16 autocast keeps half-width copies of the matmul inputs);
                  under gradient checkpointing only each layer's input, plus one layer recomputed at a time;
                  eager attention keeps its probabilities too (heads × row length per token)
    logits        per token, LOGIT_BYTES × vocabulary (the logits, their float32 copy, the log-softmax and its
                  gradient); a reward model's head has one output
    step          the optimizer step's temporaries (torch's foreach AdamW: a copy of every trained parameter;
                  Adafactor: three of the largest), held after the activations and logits are freed: the peak is
                  the larger of the two moments
    runtime       the process itself: Python, torch, transformers, Prefect and MLflow loaded (CPU only)

A micro-step's tokens per rank: batch_size / world_size rows of the stage's row length (pretrain: block_size;
sft: max_len; dpo, kto and reward: a pair, 2 × max_len; pro and tuna: a list, its longest length × max_len;
grpo: group_size completions of each prompt, max_len each). The coefficients are measured
(`python -m bench.memory`, bench/RESULTS.md): the estimate is within 20 % of the peak measured on CPU for the
models there.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from schemas.architectures import init_config
from schemas.load import SpecError
from schemas.spec import (
    DistillStage,
    DPOStage,
    GRPOStage,
    KTOStage,
    PipelineSpec,
    PPOStage,
    PretrainStage,
    PROStage,
    RewardStage,
    RolloutStage,
    TrainingStage,
    TunaStage,
)
from stages.common.training import attention, use_bf16

GIB = 1 << 30
# bytes per weight of a quantized linear layer: NF4 with double quantization (a block of 64 has a float8 scale, the
# scales a float32 per 256 blocks), and int8 with a float32 scale per row (small beside the row)
QUANTIZED_BYTES = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}
# bytes the backward pass keeps per token and layer, per unit of width: (hidden, key/value, MLP) in bf16 autocast and
# in float32 (measured, bench/memory.py)
ACTIVATION_BYTES = {True: (34, 8, 10), False: (40, 8, 16)}
LOGIT_BYTES = {True: 14, False: 12}  # per token and vocabulary entry
PHASES = ("activations", "logits", "step")  # parts held at different moments of a training step
RUNTIME_CPU = 0.6 * GIB  # the process before any model loads
LIST_LENGTH = 4  # a tuna stage's candidates per list, as the bundled ranked data has them


def _size(count: float) -> str:
    """Bytes in the unit that shows them: a tiny model's weights as MiB, not 0.00 GiB."""
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}" if count < 10 * scale else f"{count / scale:.1f} {unit}"
    return f"{count / 1024:.0f} KiB"


@dataclass(frozen=True)
class Estimate:
    """A stage's estimated peak on one device, by part (bytes), against what the device has."""

    stage: str
    parts: dict[str, float]
    device: str
    capacity: float

    @property
    def total(self) -> float:
        """The larger of the two peaks: the backward pass's (activations and logits held) and the optimizer
        step's (its temporaries, after both are freed)."""
        held = sum(value for name, value in self.parts.items() if name not in PHASES)
        return held + max(self.parts["activations"] + self.parts["logits"], self.parts["step"])

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def line(self) -> str:
        parts = ", ".join(f"{name} {_size(value)}" for name, value in self.parts.items() if value)
        verdict = "fits" if self.fits else "DOES NOT FIT"
        return f"{self.stage}: about {_size(self.total)} of {_size(self.capacity)} ({self.device}) {verdict}: {parts}"

    def advice(self) -> str:
        """What to change, for the largest parts first."""
        remedies = {
            "activations": "lower train.batch_size (raise train.grad_accum to keep the batch), shorten the rows, or "
            "set memory.gradient_checkpointing",
            "logits": "lower train.batch_size or shorten the rows (the logits grow with the vocabulary)",
            "optimizer": "train LoRA adapters (lora:), use train.optimizer adamw_8bit or adafactor, or shard with "
            "launch.deepspeed zero 2 (offload: true on a GPU)",
            "gradients": "train LoRA adapters (lora:) or shard with launch.deepspeed zero 2",
            "weights": "shard with launch.deepspeed zero 3 or launch.fsdp, load the base in 4 bits (lora.quantize), "
            "or start from a smaller model",
            "reference": "use reference: precomputed (or adapter-off with lora)",
            "teacher": "distil from a smaller teacher",
            "value": "train LoRA adapters (lora:): the value model gets adapters of its own too",
            "step": "use train.optimizer adamw_torch_fused (its step makes no temporaries)",
        }
        ranked = sorted((value, name) for name, value in self.parts.items() if name in remedies)
        return "; ".join(remedies[name] for _, name in reversed(ranked[-2:]))


def _capacity() -> tuple[str, float]:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), float(torch.cuda.get_device_properties(0).total_memory)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # a container's memory limit (cgroup v2), where lower
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        total = min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        pass
    return "cpu", float(total)


def model_config(spec: PipelineSpec) -> PretrainedConfig:
    """The config of the pipeline's model, as the first training stage loads or builds it."""
    if spec.model.path is not None:
        return AutoConfig.from_pretrained(spec.model.path)
    if spec.tokenizer.path is not None:
        files = json.loads((spec.tokenizer.path / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = len(files["model"]["vocab"]) + len(files.get("added_tokens", []))
    else:
        vocab = spec.tokenizer.train.vocab_size
    return init_config(spec.model.init, vocab_size=vocab)


@dataclass(frozen=True)
class Shapes:
    """What the estimate reads from a model: parameter counts and the widths activations scale with."""

    parameters: int
    matrices: list[tuple[str, int, int]]  # every linear layer but the output head: (name, in, out)
    factored: int  # Adafactor's state: rows + columns of each matrix, every element of each vector
    largest: int  # elements of the largest parameter
    layers: int
    hidden: int
    kv: int
    mlp: int
    heads: int
    vocab: int

    @classmethod
    def of(cls, config: PretrainedConfig) -> Shapes:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        head = model.get_output_embeddings()
        matrices = [
            (name, module.in_features, module.out_features)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        ]
        factored = sum(sum(p.shape) if p.dim() == 2 else p.numel() for p in model.parameters())
        hidden = config.hidden_size
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
        return cls(
            parameters=model.num_parameters(),
            matrices=matrices,
            factored=factored,
            largest=max(p.numel() for p in model.parameters()),
            layers=config.num_hidden_layers,
            hidden=hidden,
            kv=hidden // heads * kv_heads,
            mlp=mlp,
            heads=heads,
            vocab=config.vocab_size,
        )

    def lora_parameters(self, stage: TrainingStage) -> int:
        targets = stage.lora.targets
        chosen = [
            (i, o)
            for name, i, o in self.matrices
            if targets == "all-linear" or any(name.split(".")[-1] == target for target in targets)
        ]
        return sum(stage.lora.r * (i + o) for i, o in chosen)


def _row_tokens(stage: TrainingStage) -> int:
    """Tokens of one training row of the stage, pairs and lists counted whole."""
    if isinstance(stage, PretrainStage):
        return stage.packing.block_size
    if isinstance(stage, (DPOStage, KTOStage, RewardStage)):
        return 2 * stage.max_len
    if isinstance(stage, PROStage):
        return max(stage.curriculum or [LIST_LENGTH]) * stage.max_len
    if isinstance(stage, TunaStage):
        return LIST_LENGTH * stage.max_len
    if isinstance(stage, GRPOStage):
        return stage.group_size * stage.max_len
    return stage.max_len  # a ppo stage's one reply per prompt too


def _row_length(stage: TrainingStage) -> int:
    """The longest sequence attention runs over."""
    return stage.packing.block_size if isinstance(stage, PretrainStage) else stage.max_len


def estimate(
    stage: TrainingStage, shapes: Shapes, device: tuple[str, float] | None = None, teacher: Shapes | None = None
) -> Estimate:
    """The stage's estimated peak on one device (`device`: its name and bytes; default: this machine's). `shapes`: the
    model it trains; `teacher`: a distillation's teacher (default: the same shapes)."""
    name, capacity = device or _capacity()
    on_gpu = name != "cpu"
    launch, memory, train = stage.launch, stage.memory, stage.train
    world = launch.world_size if launch is not None else 1
    zero = launch.zero_stage() if launch is not None else 0
    deepspeed = launch.deepspeed if launch is not None else None
    if isinstance(deepspeed, Path):  # a config of the user's own
        offload = "offload_optimizer" in deepspeed.read_text()
    else:
        offload = deepspeed is not None and deepspeed.offload
    bf16 = use_bf16(train.precision)
    trained = shapes.lora_parameters(stage) if stage.lora is not None else shapes.parameters
    optimizer_bytes = {
        "adamw_torch_fused": 8 * trained,
        "adamw_torch": 8 * trained,
        "adamw_8bit": 2 * trained,
        "paged_adamw_8bit": 2 * trained,
        "adafactor": 4 * (shapes.factored if stage.lora is None else trained),
    }[train.optimizer]
    # the step's temporaries: torch's foreach AdamW a float32 copy of every trained parameter, Adafactor three of
    # the one it updates (the largest, the embedding, at the peak); fused kernels and 8-bit state next to nothing
    step = {"adamw_torch": 4 * trained, "adafactor": 12 * (shapes.largest if stage.lora is None else 0)}.get(
        train.optimizer, 0
    )
    weights = 4 * shapes.parameters + (4 * trained if stage.lora is not None else 0)
    if stage.lora is not None and stage.lora.quantize is not None:  # the base's linear layers in 4 or 8 bits
        linear = sum(i * o for _, i, o in shapes.matrices)
        weights -= (4 - QUANTIZED_BYTES[stage.lora.quantize]) * linear
    gradients = 4 * trained
    if zero >= 2:
        gradients /= world
        optimizer_bytes /= world
        step /= world
    if zero >= 3:
        weights /= world
    if offload and on_gpu:
        optimizer_bytes = step = 0
    reference = 0
    if isinstance(stage, (DPOStage, KTOStage, RolloutStage)) and _frozen_reference(stage):
        reference = 4 * shapes.parameters
    value = 0
    if isinstance(stage, PPOStage):  # a second model of the same shape, trained by torch's AdamW (foreach)
        value_trained = trained if stage.lora is not None else shapes.parameters
        value = 4 * shapes.parameters + (4 * value_trained if stage.lora is not None else 0) + 20 * value_trained
    frozen_teacher = 4 * (teacher or shapes).parameters if isinstance(stage, DistillStage) else 0
    tokens = max(train.batch_size // world, 1) * _row_tokens(stage)
    per_hidden, per_kv, per_mlp = ACTIVATION_BYTES[bf16]
    layer = per_hidden * shapes.hidden + per_kv * shapes.kv + per_mlp * shapes.mlp
    if memory is not None and memory.gradient_checkpointing:
        activations = tokens * (shapes.layers * 4 * shapes.hidden + layer)
    else:
        activations = tokens * shapes.layers * layer
    if attention(stage) == "eager":
        activations += tokens * shapes.layers * shapes.heads * _row_length(stage) * 8
    logits = 0 if isinstance(stage, RewardStage) else tokens * shapes.vocab * LOGIT_BYTES[bf16]
    if isinstance(stage, DistillStage):  # the teacher's logits beside the student's, and both as float32 in the loss
        logits *= 2
    parts = {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer_bytes,
        "reference": reference,
        "value": value,
        "teacher": frozen_teacher,
        "activations": activations,
        "logits": logits,
        "step": step,
        "runtime": 0 if on_gpu else RUNTIME_CPU,
    }
    if not on_gpu and launch is not None:  # every rank of a node shares its memory
        parts = {part: value * launch.processes for part, value in parts.items()}
    return Estimate(stage.name, parts, name, capacity)


def _frozen_reference(stage: DPOStage | KTOStage | RolloutStage) -> bool:
    if isinstance(stage, RolloutStage):
        return stage.beta > 0 and (stage.reference == "frozen" or (stage.reference == "auto" and stage.lora is None))
    return stage.reference_strategy() == "frozen"


def estimates(spec: PipelineSpec, device: tuple[str, float] | None = None) -> list[Estimate]:
    """Every training stage's estimate; LoRA and the reference as each stage sets them, one model shape for all but a
    distillation's fresh student."""
    shapes = Shapes.of(model_config(spec))
    found = []
    for stage in spec.training_stages():
        if isinstance(stage, DistillStage) and stage.student is not None:  # a fresh student of its own shape
            student = Shapes.of(init_config(stage.student, vocab_size=shapes.vocab))
            found.append(estimate(stage, student, device, shapes))
        else:
            found.append(estimate(stage, shapes, device))
    return found


def check(spec: PipelineSpec, path: Path, device: tuple[str, float] | None = None) -> list[Estimate]:
    """Every training stage's estimate; a SpecError naming each stage that cannot fit and what to change."""
    found = estimates(spec, device)
    if too_big := [e for e in found if not e.fits]:
        raise SpecError(
            f"{path}: {len(too_big)} stage(s) would not fit in memory (estimated before anything loads)\n  "
            + "\n  ".join(f"{e.line()}\n    to fit: {e.advice()}" for e in too_big)
        )
    return found
