"""The pipeline spec: the model tree one YAML file is validated into, whole.

Every field has the default a user would pick. Variants are tagged unions on `kind`.
Paths in a spec are relative to the spec file, so a run never depends on the working
directory; `schemas/load.py` reads a file into this tree and resolves them.
"""

from __future__ import annotations

from difflib import get_close_matches
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BeforeValidator, Field, PositiveInt, model_validator

from schemas.architectures import init_config
from schemas.base import Strict
from schemas.benchmarks import Benchmarks
from schemas.formats import Format
from schemas.launch import Launch
from schemas.memory import Memory
from schemas.rewards import AnswerReward, ModelReward, Reward, Tool
from schemas.sources import Source
from schemas.sweep import Sweep, apply

TOKENIZER_STAGE = "tokenizer"
# names the eval report's tables use for their own columns, and the tokenizer's stage
RESERVED_NAMES = (TOKENIZER_STAGE, "checkpoint", "prompt")
# How conversations become text; "tokenizer" is the tokenizer's own chat template (stages/common/templates.py).
TemplateName = Literal["chatml", "llama2", "deepseek", "alpaca", "tokenizer"]
# The columns of the eval stage's table (stages/eval.py says how each is measured); of these, lower is better for
# LOWER_IS_BETTER, higher for the rest.
EvalMetric = Literal[
    "perplexity",
    "response_loss",
    "exact_match",
    "tool_calls",
    "task_accuracy",
    "reward",
    "reward_model",
    "preference_accuracy",
    "preference_margin",
    "reward_margin",
    "kendall_tau",
    "top1",
]
LOWER_IS_BETTER = ("perplexity", "response_loss")
# A benchmark's column, <task>/<metric>: lower is better where lm-eval's metric is a perplexity or bits per byte
BenchmarkMetric = Annotated[str, Field(pattern=r"^[^/\s]+/[^/\s]+$")]
LOWER_IS_BETTER_BENCHMARKS = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def lower_is_better(metric: str) -> bool:
    """Whether the eval table's column `metric` is better lower: perplexity and response loss, and a benchmark's
    perplexities and bits per byte."""
    task, _, measure = metric.rpartition("/")
    return metric in LOWER_IS_BETTER or (bool(task) and measure in LOWER_IS_BETTER_BENCHMARKS)


# A single source (a path, `hf:owner/name` or an object) is accepted where a list is expected.
Sources = Annotated[list[Source], BeforeValidator(lambda value: [value] if isinstance(value, str | dict) else value)]


class ModelInit(Strict):
    """A model built with fresh weights: any transformers architecture with a causal LM head, by its model_type."""

    arch: str = Field("llama", description="a transformers model_type: llama, qwen2, mistral, gemma, phi3, gpt2, ...")
    hidden_size: PositiveInt = Field(256, description="the width of every token's vector; divisible by heads")
    layers: PositiveInt = Field(4, description="transformer blocks")
    heads: PositiveInt = Field(4, description="attention heads")
    kv_heads: PositiveInt | None = Field(None, description="grouped-query attention; default: heads")
    intermediate_size: PositiveInt | None = Field(None, description="default: 8/3 · hidden_size rounded up to 64")
    max_seq_len: PositiveInt = Field(
        512, description="positions the model has: no stage's packing.block_size or max_len may exceed it"
    )
    rope_theta: float = Field(10000.0, gt=0, description="the rotary embeddings' base, for architectures with RoPE")
    tie_embeddings: bool = Field(True, description="the output head shares the input embedding's weights")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="any other field of the architecture's config, "
        "named as transformers names it (e.g. {rms_norm_eps: 1.0e-5})",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelInit:
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by heads {self.heads}")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be divisible by kv_heads {self.kv_heads}")
        if self.arch != "llama" or self.config:
            init_config(self)  # loads transformers (seconds): only a spec that leaves the default Llama pays for it
        return self


class ModelSpec(Strict):
    """Where the first training stage's model comes from: a fresh `init`, or a Hugging Face `path`."""

    init: ModelInit | None = Field(None, description="a fresh model of this shape, trained from scratch")
    path: Path | None = Field(
        None,
        description="a local Hugging Face model folder, or a Hub id (owner/name) read from the local Hugging Face "
        "cache (never downloaded)",
    )
    revision: str | None = Field(
        None, description="a Hub id's branch, tag or commit (default main); resolved to the commit it names"
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.init is None) == (self.path is None):
            raise ValueError("give exactly one of model.init (a fresh model) or model.path (a local checkpoint)")
        if self.revision is not None and self.path is None:
            raise ValueError("model.revision is the revision of a Hub id given as model.path")
        return self


class TokenizerTrain(Strict):
    """A byte-level BPE trained on the text of the spec's data files."""

    vocab_size: int = Field(8192, ge=300, description="at least the 256 byte symbols plus the special tokens")
    min_frequency: PositiveInt = Field(2, description="a pair of symbols seen fewer times is never merged")
    data: Sources = Field(default_factory=list, description="text sources to train on; default: every stage's data")


class TokenizerSpec(Strict):
    """The tokenizer every stage uses: trained by the pipeline's first step, or a folder of your own."""

    train: TokenizerTrain | None = Field(None, description="train a new tokenizer")
    path: Path | None = Field(None, description="a local Hugging Face tokenizer folder")

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerSpec:
        if (self.train is None) == (self.path is None):
            raise ValueError("give exactly one of tokenizer.train or tokenizer.path")
        return self


Optimizer = Literal["adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit", "adafactor"]


class TrainSpec(Strict):
    """Optimisation settings shared by every training stage."""

    lr: float = Field(3e-4, gt=0, description="the peak learning rate, reached after warmup")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine schedule floor, as a fraction of lr")
    warmup: float = Field(0.05, ge=0, description="warmup steps; below 1, a fraction of all steps")
    weight_decay: float = Field(0.01, ge=0, description="AdamW's decoupled weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradients are clipped to this global norm")
    batch_size: PositiveInt = Field(
        16,
        description="rows of one micro-step across every process (grpo: prompts); each of the world_size "
        "processes takes batch_size / world_size",
    )
    grad_accum: PositiveInt = Field(1, description="micro-steps whose gradients make one optimizer step")
    epochs: float = Field(1.0, gt=0, description="passes over the data; fractions allowed")
    max_steps: PositiveInt | None = Field(None, description="overrides epochs when set")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 where the device multiplies bf16 natively"
    )
    save_steps: PositiveInt = Field(100, description="in-stage checkpoint interval; a re-run resumes from the last one")
    logging_steps: PositiveInt = Field(10, description="training metrics are logged every this many steps")
    seed: int = Field(0, description="seeds fresh weights, data order, dropout and sampling")
    optimizer: Optimizer = Field(
        "adamw_torch_fused",
        description="the Trainer's optimizer, by its name: AdamW (fused kernel, or torch's loop), AdamW with 8-bit "
        "state (bitsandbytes; paged: CUDA), or Adafactor (factored second moments, a fraction of AdamW's state)",
    )
    neftune_noise_alpha: float | None = Field(
        None,
        gt=0,
        description="NEFTune: uniform noise of this scale (alpha / sqrt(length · width)) on the input embeddings "
        "while training (the Trainer's); 5 is the paper's common choice for SFT",
    )


class LoraSpec(Strict):
    """Low-rank adapters (PEFT) on the stage's input model: only the adapters train."""

    r: PositiveInt = Field(8, description="the rank of each adapter")
    alpha: float = Field(16.0, gt=0, description="the adapter's scale is alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapters' input")
    targets: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="module names to adapt (e.g. [q_proj, v_proj]), or every linear layer but the output head",
    )
    merge: bool = Field(False, description="also log the input model with the adapter merged in (merge_and_unload)")
    quantize: Literal["4bit", "8bit"] | None = Field(
        None,
        description="the frozen base loaded in 4-bit NF4 with double quantization (QLoRA, Dettmers et al. 2023) or "
        "8-bit through bitsandbytes; the adapters train in full precision, a merge is made on the full-precision base",
    )


class Mix(Strict):
    """How a stage's data sources become one training set, each source's `weight` its share (default 1)."""

    strategy: Literal["concatenate", "interleave"] = Field(
        "concatenate",
        description="concatenate: every source in order, each row weight times (a fraction of a row: a seeded "
        "sample); interleave: rows drawn from the sources at random with probabilities in proportion to their "
        "weights, until `until`",
    )
    until: Literal["first_exhausted", "all_exhausted"] = Field(
        "first_exhausted",
        description="interleave stops when the first source runs out (down-sampled to the shortest), or when every "
        "source has run out once, the others starting over (up-sampled to the longest)",
    )
    seed: int = Field(0, description="seeds the sampling; recorded with the stage")


class StageBase(Strict):
    """What every stage has: a name, its input, what to do with bad data."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="unique; names the MLflow run and the work folder")
    from_: str | None = Field(
        None, alias="from", description="the stage whose output is this stage's input; default: the previous one"
    )
    on_invalid: Literal["fail", "skip"] = Field(
        "fail",
        description=(
            "fail: a bad row stops the run before any model loads; skip: bad rows are dropped, logged and counted"
        ),
    )

    def files(self) -> dict[str, tuple[list[Source], Format]]:
        """Every data field of the stage: its sources and the format they must have."""
        raise NotImplementedError

    def reward_stages(self) -> list[str]:
        """The reward stages whose models this stage scores replies with (their checkpoints are among its inputs)."""
        return []

    def model_stages(self) -> list[str]:
        """Every stage besides its input whose model this stage loads: its reward stages, a distillation's teacher."""
        return self.reward_stages()


class TrainingStage(StageBase):
    """A stage that trains its input model on `data`, measured on `heldout`."""

    data_format: ClassVar[Format]
    data: Sources = Field(
        min_length=1,
        description="sources of training rows: files (any container, glob patterns too), folders, hf:owner/name, "
        "LLaMA-Factory dataset names (docs/data.md)",
    )
    heldout: Sources = Field(default_factory=list, description="held-out sources the stage is measured on")
    mix: Mix = Field(Mix(), description="how several data sources make one training set")
    train: TrainSpec = Field(TrainSpec(), description="optimisation settings")
    lora: LoraSpec | None = Field(None, description="train low-rank adapters instead of every weight")
    input: Literal["model", "adapter"] = Field(
        "model", description="from a stage with lora.merge: its merged model, or its adapter applied to its base"
    )
    launch: Launch | None = Field(
        None,
        description="run under torchrun (DDP) or DeepSpeed ZeRO; default: the pipeline's launch, "
        "else one process. Not part of the fingerprint",
    )
    memory: Memory | None = Field(
        None,
        description="gradient checkpointing, the attention kernel, torch.compile, Liger; default: the pipeline's "
        "memory, else none of them. Not part of the fingerprint",
    )

    def files(self) -> dict[str, tuple[list[Source], Format]]:
        return {"data": (self.data, self.data_format), "heldout": (self.heldout, self.data_format)}

    @property
    def sampled(self) -> bool:
        """The training set is a seeded sample of the sources (`mix.seed` draws it): several sources, or a weight."""
        return len(self.data) > 1 or any(source.weight not in (None, 1.0) for source in self.data)

    @model_validator(mode="after")
    def _neftune_for_sft(self) -> TrainingStage:
        if self.train.neftune_noise_alpha is not None and self.kind != "sft":
            raise ValueError(
                f"train.neftune_noise_alpha: NEFTune is noise on the embeddings of the conversations an sft stage "
                f"learns; a {self.kind} stage would score its data under that noise"
            )
        return self


class Packing(Strict):
    """How a pretrain stage cuts its text into training rows."""

    block_size: PositiveInt = Field(512, description="tokens per block; at most model.init.max_seq_len")


class PretrainStage(TrainingStage):
    """Causal LM on raw text: documents joined with EOS and cut into blocks."""

    kind: Literal["pretrain"]
    data_format: ClassVar[Format] = "text"
    packing: Packing = Field(Packing(), description="documents joined with EOS and cut into blocks")
    streaming: bool = Field(
        False, description="read data as a stream at flat memory (corpora larger than memory); needs train.max_steps"
    )
    shuffle_buffer: PositiveInt = Field(1024, description="blocks held for shuffling a stream")

    @model_validator(mode="after")
    def _stream_has_an_end(self) -> PretrainStage:
        if self.streaming and self.train.max_steps is None:
            raise ValueError("a streaming stage needs train.max_steps: a stream has no length to count epochs in")
        if self.streaming and (self.mix != Mix() or any(source.weight is not None for source in self.data)):
            raise ValueError("a streaming stage reads its sources in order: mix and source weights are not applied")
        return self


class ChatStage(TrainingStage):
    """A stage whose examples are rendered through a chat template."""

    max_len: PositiveInt = Field(
        512, description="tokens per example (prompt and reply); longer ones are cut and counted"
    )
    template: TemplateName | None = Field(None, description="default: the pipeline's template")


class ConversationStage(ChatStage):
    """A stage that learns the assistant turns of conversations."""

    data_format: ClassVar[Format] = "conversations"
    packing: bool = Field(
        True, description="best-fit whole conversations into rows of max_len; attention never crosses one"
    )
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="what happens to a conversation longer than max_len (counted)"
    )
    eval_samples: int = Field(64, ge=0, description="held-out conversations answered greedily for exact match")


class SFTStage(ConversationStage):
    """Supervised fine-tuning on conversations; loss on every assistant turn only."""

    kind: Literal["sft"]


class DistillStage(ConversationStage):
    """Knowledge distillation: the student (the input stage's model, or a fresh `student`) learns the teacher's
    next-token distributions on the assistant turns of conversations, not only the tokens written there."""

    kind: Literal["distill"]
    teacher: str = Field(
        description="an earlier stage of this spec, a model folder, or a models:/ URI; it must share the "
        "pipeline's tokenizer"
    )
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl",
        description="between the teacher's distribution P and the student's Q per token: KL(P||Q) (mode-covering), "
        "KL(Q||P) (mode-seeking), or GKD's generalised JSD weighted by beta",
    )
    beta: float = Field(0.5, gt=0, lt=1, description="the JSD's weight of the teacher in the mixture")
    temperature: float = Field(1.0, gt=0, description="both distributions softened by logits / temperature")
    on_policy: float = Field(
        0.0,
        ge=0,
        le=1,
        description="the share of steps whose replies the student samples itself, to the data's prompts, and learns "
        "the teacher's distributions on (GKD's lambda); 0: the data's replies only (off-policy)",
    )
    max_new_tokens: PositiveInt = Field(48, description="tokens per reply the student samples at most (on_policy)")
    student: ModelInit | None = Field(
        None,
        description="a fresh student of this shape (with the pipeline's tokenizer) instead of the input stage's "
        "model: a smaller model learning from a bigger one",
    )

    @model_validator(mode="after")
    def _one_student(self) -> DistillStage:
        if self.student is not None and self.from_ is not None:
            raise ValueError(
                f"a fresh student starts from no stage, so `from: {self.from_}` has nothing to give it: drop `from` to "
                "train the fresh student, or `student` to distil into the model of stage " + repr(self.from_)
            )
        return self

    def model_stages(self) -> list[str]:
        return [] if self.teacher_is_outside() else [self.teacher]

    def teacher_is_outside(self) -> bool:
        """The teacher is a model folder or a models:/ URI, not a stage of the spec."""
        return self.teacher.startswith("models:/") or "/" in self.teacher or self.teacher.startswith(".")


class ReferenceStage(ChatStage):
    """A stage whose objective compares the policy with a reference: the input model as it came in."""

    reference: Literal["auto", "frozen", "adapter-off", "precomputed"] = Field(
        "auto",
        description="frozen: a copy of the input model; adapter-off: the input model under the LoRA adapter "
        "(no second copy); precomputed: log-probs computed once and cached with the prepared data; auto: adapter-off "
        "with lora, else frozen",
    )

    @model_validator(mode="after")
    def _reference_has_adapter(self) -> ReferenceStage:
        if self.reference == "adapter-off" and self.lora is None:
            raise ValueError(
                "reference adapter-off needs a lora block: without an adapter there is nothing to switch off"
            )
        return self

    def reference_strategy(self) -> str | None:
        """How the reference log-probs are had."""
        if self.reference == "auto":
            return "adapter-off" if self.lora is not None else "frozen"
        return self.reference


class DPOStage(ReferenceStage):
    """Direct preference optimisation and its variants, on {prompt, chosen, rejected} pairs."""

    kind: Literal["dpo"]
    data_format: ClassVar[Format] = "preference"
    beta: float = Field(0.1, gt=0, description="the KL strength (sigmoid, ipo, hinge); SimPO's beta; ORPO's lambda")
    loss: Literal["sigmoid", "ipo", "hinge", "orpo", "simpo"] = Field(
        "sigmoid",
        description="sigmoid: DPO; ipo: IPO; hinge: SLiC; orpo and simpo: ORPO and SimPO, which need no reference",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="cDPO: the assumed share of flipped labels (sigmoid only)"
    )
    gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin")
    logps: Literal["sum", "mean"] | None = Field(
        None,
        description="a reply's log-prob: summed or averaged over its tokens; default: sum for sigmoid and hinge; "
        "mean for ipo (as TRL uses it: on summed log-probs its squared loss grows with the reply's length; sum may "
        "still be chosen); mean for orpo and simpo, which are defined on means only",
    )

    @model_validator(mode="after")
    def _variant_fits(self) -> DPOStage:
        free = self.loss in ("orpo", "simpo")
        if free and self.reference != "auto":
            raise ValueError(f"loss {self.loss} is reference-free: leave reference unset")
        if free and self.logps == "sum":
            raise ValueError(f"loss {self.loss} is defined on length-averaged log-probs: logps must be mean")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"label_smoothing is cDPO's, defined for loss sigmoid only, not {self.loss}")
        return self

    def reference_strategy(self) -> str | None:
        """How the reference log-probs are had; None for the reference-free losses."""
        return None if self.loss in ("orpo", "simpo") else super().reference_strategy()

    def mean_logps(self) -> bool:
        return self.logps == "mean" or (self.logps is None and self.loss in ("ipo", "orpo", "simpo"))


class KTOStage(ReferenceStage):
    """Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on completions labelled desirable or undesirable.

    Data: unpaired rows {prompt, completion, label: true|false} (TRL's), or preference pairs, each split into two
    rows (chosen desirable, rejected undesirable). The shape is recognised line by line, so a file may mix both."""

    kind: Literal["kto"]
    data_format: ClassVar[Format] = "unpaired"
    beta: float = Field(0.1, gt=0, description="the KL strength: the implied reward is beta · log π/π_ref")
    desirable_weight: float = Field(
        1.0,
        gt=0,
        description="lambda_D, the weight of a desirable completion's loss; the paper "
        "advises lambda_D·n_D / (lambda_U·n_U) in [1, 4/3]: the stage logs that ratio and warns outside it",
    )
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U, the weight of an undesirable completion's loss")


class PROStage(ChatStage):
    """Preference Ranking Optimization (Song et al. 2023) on ranked lists, with a list-length curriculum."""

    kind: Literal["pro"]
    data_format: ClassVar[Format] = "ranked"
    sft_weight: float = Field(0.05, ge=0, description="weight of the SFT term on the best candidate, times (n-1)^2")
    reward_weighting: bool = Field(True, description="scale each comparison by the score difference, as the paper does")
    curriculum: list[Annotated[int, Field(ge=2)]] = Field(
        default_factory=list,
        description="list lengths of successive sub-stages, each a child run fed by the last "
        "(e.g. [2, 3, 4]); default: one run on the longest lists",
    )

    @model_validator(mode="after")
    def _curriculum_grows(self) -> PROStage:
        if any(b <= a for a, b in zip(self.curriculum, self.curriculum[1:])):
            raise ValueError(f"curriculum {self.curriculum} must grow strictly: each sub-stage ranks longer lists")
        return self


class TunaStage(ChatStage):
    """Tuna (Li et al. 2023): a margin ranking loss over ranked lists plus MLE on every candidate."""

    kind: Literal["tuna"]
    data_format: ClassVar[Format] = "ranked"
    margin: float = Field(0.1, ge=0, description="the score margin per rank of distance")
    mle_weight: float = Field(1.0, ge=0, description="weight of the token-mean MLE over every candidate")


class RewardStage(ChatStage):
    """A reward model: a scalar head on the input model, trained on pairs with the Bradley-Terry loss."""

    kind: Literal["reward"]
    data_format: ClassVar[Format] = "preference"


class RolloutStage(ChatStage):
    """A stage that learns from its own samples: each step the policy answers prompts, the spec's rewards score the
    replies (which may call the spec's tools on the way), and the policy is trained on what they scored."""

    data_format: ClassVar[Format] = "prompts"
    rewards: list[Reward] = Field(
        default_factory=lambda: [AnswerReward(kind="answer")],
        min_length=1,
        description="summed with their weights; default: the reference answer appears in the reply",
    )
    tools: list[Tool] = Field(
        default_factory=list,
        description="Python functions a reply may call: offered with every prompt, a call executed and its result "
        "given back as a tool turn before the reply goes on (never trained on)",
    )
    max_tool_turns: PositiveInt = Field(
        2, description="tool turns a reply may take at most; a call past them ends the reply unanswered"
    )
    temperature: float = Field(1.0, gt=0, description="sampling temperature; the log-probs are taken at it too")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling's probability mass; 1: all of it")
    max_new_tokens: PositiveInt = Field(
        48,
        description="tokens per reply turn at most; prompts longer than max_len - max_new_tokens are left out, and "
        "a tool turn that would leave less room than that ends the reply",
    )
    iterations: PositiveInt = Field(
        1, description="updates on the same samples (mu); above 1 the importance ratio moves away from 1"
    )
    beta: float = Field(0.0, ge=0, description="weight of the KL to the reference; 0: no reference at all")
    reference: Literal["auto", "frozen", "adapter-off"] = Field(
        "auto",
        description="with beta > 0: a frozen copy of the input model, or (lora) the adapters switched off; auto picks",
    )
    eval_samples: int = Field(
        64, ge=0, description="held-out prompts answered greedily, before and after, for accuracy and reward"
    )
    log_samples: PositiveInt = Field(
        10, description="every this many steps, a batch's completions and their rewards are kept"
    )

    @model_validator(mode="after")
    def _reference_fits(self) -> RolloutStage:
        if self.reference == "adapter-off" and self.lora is None:
            raise ValueError(
                "reference adapter-off needs a lora block: without an adapter there is nothing to switch off"
            )
        if self.reference != "auto" and self.beta == 0:
            raise ValueError(f"reference {self.reference} is used only with beta > 0 (the KL term); beta is 0")
        names = [tool.name() for tool in self.tools]
        if twice := next((name for name in names if names.count(name) > 1), None):
            raise ValueError(f"tools: two functions are named {twice!r}; a call names the tool by it")
        return self

    def reference_strategy(self) -> str | None:
        if self.beta == 0:
            return None
        if self.reference == "auto":
            return "adapter-off" if self.lora is not None else "frozen"
        return self.reference

    def reward_stages(self) -> list[str]:
        return list(dict.fromkeys(r.stage for r in self.rewards if isinstance(r, ModelReward)))


class GRPOStage(RolloutStage):
    """Group Relative Policy Optimization (Shao et al. 2024) on prompts, with rewards computed from each completion.

    Each step takes `train.batch_size` prompts, samples `group_size` completions of each from the current policy,
    scores them, and trains on the group-normalised advantages with a clipped importance ratio."""

    kind: Literal["grpo"]
    group_size: int = Field(8, ge=2, description="completions sampled per prompt")
    scale: Literal["group", "batch", "none"] = Field(
        "group",
        description=(
            "advantages: reward minus the group's mean, divided by the group's std, the batch's, or nothing (Dr. GRPO)"
        ),
    )
    advantage: Literal["grpo", "rloo"] = Field(
        "grpo",
        description="the baseline a reward is measured against: its group's mean (GRPO), or the mean of the other "
        "completions of its prompt (RLOO; scale defaults to none then, as in RLOO's paper)",
    )
    ratio: Literal["token", "sequence"] = Field(
        "token",
        description="the importance ratio per token (GRPO, PPO) or per completion, the geometric mean of its "
        "tokens' (GSPO; clip it far tighter, e.g. epsilon_low 3e-4, epsilon_high 4e-4)",
    )
    epsilon_low: float = Field(0.2, gt=0, lt=1, description="the ratio is clipped below at 1 - epsilon_low")
    epsilon_high: float = Field(0.2, gt=0, description="and above at 1 + epsilon_high (DAPO raises it, e.g. 0.28)")
    beta: float = Field(0.0, ge=0, description="weight of the k3 KL estimate to the reference; 0: no reference at all")
    aggregation: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "grpo",
        description="grpo: mean over each completion's tokens, then over completions; dapo: mean over every token "
        "of the batch; dr_grpo: sum over tokens divided by completions x max_new_tokens",
    )

    @model_validator(mode="before")
    @classmethod
    def _rloo_scales_nothing_unless_told(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("advantage") == "rloo" and "scale" not in data:
            return data | {"scale": "none"}
        return data


class PPOStage(RolloutStage):
    """Proximal Policy Optimization for language models (Ouyang et al. 2022): one sampled reply per prompt, a learned
    value model, GAE advantages and clipped policy and value losses.

    Each step takes `train.batch_size` prompts and samples one reply each. A reply's reward is its score on its last
    token and a KL penalty to the reference on every token (beta); the value model's estimates turn them into GAE
    advantages, and the policy and value model are trained on them `iterations` times."""

    kind: Literal["ppo"]
    value_model: str = Field(
        "policy",
        description="what the value model starts from: policy (the input model with a fresh scalar head) or the "
        "name of an earlier reward stage (its model, head included)",
    )
    beta: float = Field(0.05, ge=0, description="the KL penalty per token in the reward; 0: no reference at all")
    gamma: float = Field(1.0, gt=0, le=1, description="GAE's discount per token")
    lam: float = Field(0.95, ge=0, le=1, description="GAE's lambda: 1 is the Monte-Carlo return, 0 one-step TD")
    epsilon: float = Field(0.2, gt=0, lt=1, description="the policy's ratio is clipped to 1 ± epsilon")
    value_clip: float = Field(0.2, gt=0, description="a value estimate moves at most this far from the rollout's")
    value_weight: float = Field(0.1, gt=0, description="the value loss's factor in the loss (c_v)")
    value_lr: float | None = Field(None, gt=0, description="the value model's learning rate; default: train.lr")

    def model_stages(self) -> list[str]:
        return self.reward_stages() + ([self.value_model] if self.value_model != "policy" else [])


class EvalStage(StageBase):
    """Scores checkpoints side by side on the same held-out data; trains nothing."""

    kind: Literal["eval"]
    checkpoints: list[str] = Field(
        default_factory=list, description="stages to score; default: every stage of the lineage"
    )
    text: Sources = Field(
        default_factory=list, description="held-out text: perplexity; default: the scored stages' held-out text"
    )
    conversations: Sources = Field(
        default_factory=list,
        description="held-out conversations: response loss, exact match, and tool_calls where they call tools",
    )
    prompts: Sources = Field(default_factory=list, description="prompts with reference answers: task accuracy")
    preference: Sources = Field(
        default_factory=list, description="held-out pairs: preference accuracy and reward margin"
    )
    ranked: Sources = Field(default_factory=list, description="held-out ranked lists: Kendall tau and top-1")
    samples: list[str] = Field(
        default_factory=list,
        description="prompts every checkpoint answers, shown side by side; default: the first few held-out prompts",
    )
    limit: PositiveInt = Field(200, description="at most this many rows of each file are scored")
    max_len: PositiveInt = Field(512, description="tokens per scored text block, conversation or candidate")
    max_new_tokens: PositiveInt = Field(48, description="tokens per greedy reply at most")
    template: TemplateName | None = Field(None, description="default: the pipeline's template")
    reward_model: str | None = Field(
        None,
        description="the reward stage whose model scores every checkpoint's greedy replies to "
        "the held-out prompts (column reward_model); default: the last reward stage before this one",
    )
    rewards: list[Reward] = Field(
        default_factory=list,
        description="rewards of the greedy replies to the held-out prompts "
        "(column reward, their weighted sum); default: those of the last grpo stage it scores",
    )
    benchmarks: Benchmarks | None = Field(
        None,
        description="lm-evaluation-harness tasks run on every scored checkpoint: columns <task>/<metric>; their data "
        "must be in the local datasets cache (a task folder's own files need nothing)",
    )
    best_by: EvalMetric | BenchmarkMetric | None = Field(
        "exact_match",
        description="the metric whose best checkpoint gets the registry alias `best`: a column of the table, a "
        "benchmark's as <task>/<metric> (lower is better for perplexity, response_loss and a benchmark's "
        "perplexities and bits_per_byte, higher for the rest; a tie goes to the earlier stage); null: no alias. Not "
        "part of the fingerprint: changing it moves the alias without scoring again",
    )

    @model_validator(mode="after")
    def _best_by_a_benchmark_it_runs(self) -> EvalStage:
        # a task of a group the benchmarks run is named by lm-eval alone: only a stage without benchmarks is refused
        if self.best_by is not None and "/" in self.best_by and self.benchmarks is None:
            raise ValueError(f"best_by {self.best_by} is a benchmark's column, and this stage has no benchmarks")
        return self

    def files(self) -> dict[str, tuple[list[Source], Format]]:
        return {fmt: (getattr(self, fmt), fmt) for fmt in ("text", "conversations", "prompts", "preference", "ranked")}

    def reward_stages(self) -> list[str]:
        named = [self.reward_model] if self.reward_model else []
        return list(dict.fromkeys(named + [r.stage for r in self.rewards if isinstance(r, ModelReward)]))


Stage = Annotated[
    PretrainStage
    | SFTStage
    | DistillStage
    | DPOStage
    | KTOStage
    | PROStage
    | TunaStage
    | RewardStage
    | GRPOStage
    | PPOStage
    | EvalStage,
    Field(discriminator="kind"),
]
# each kind once, in the union's order: the tag of every stage model
STAGE_KINDS = tuple(get_args(model.model_fields["kind"].annotation)[0] for model in get_args(get_args(Stage)[0]))


def _what_from_may_name(wanted: str, name: str, earlier: list[str], later: list[str]) -> str:
    """The rest of the message of a `from` naming no earlier stage: why not, the nearest earlier stage, every one."""
    if wanted == name:
        why = "; a stage cannot start from itself"
    elif wanted in later:
        why = f"; {wanted} comes after it: move it before, or name an earlier stage"
    else:
        close = get_close_matches(wanted, earlier, n=1)
        why = f"; did you mean {close[0]}?" if close else ""
    first = "; it is the first stage: leave out from"
    return why + (f" (the stages before it: {', '.join(earlier)})" if earlier else first)


class PipelineSpec(Strict):
    """The whole spec file: a model, its tokenizer, and the stages that train and evaluate it, run in order."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="names the MLflow experiment")
    model: ModelSpec = Field(description="the model the first training stage starts from")
    tokenizer: TokenizerSpec = Field(
        TokenizerSpec(train=TokenizerTrain()), description="default: a BPE trained on the spec's data"
    )
    template: TemplateName = Field(
        "chatml",
        description="how conversations become text in every stage that names none; tokenizer: the tokenizer's own "
        "chat template",
    )
    launch: Launch | None = Field(
        None, description="every training stage's launch (but grpo's) unless the stage gives its own"
    )
    memory: Memory | None = Field(None, description="every training stage's memory unless the stage gives its own")
    stages: list[Stage] = Field(
        min_length=1, description="run in order; each starts from the previous training stage unless it names `from`"
    )
    dataset_info: Path | None = Field(
        None, description="a LLaMA-Factory dataset_info.json whose datasets sources name by `dataset`"
    )
    registry: bool = Field(
        True,
        description="register each stage's model as a version of the MLflow registered model named like the "
        "pipeline (aliases: each stage's name, and `best`); false: logged models only",
    )
    sweep: Sweep | None = Field(
        None,
        description="branches of the pipeline: stage fields to try, each over several seeds; stages the branches "
        "share run once",
    )

    @model_validator(mode="after")
    def _stages_link(self) -> PipelineSpec:
        seen: dict[str, Stage] = {}
        for i, stage in enumerate(self.stages):
            if stage.name in seen or stage.name in RESERVED_NAMES:
                raise ValueError(
                    f"stages[{i}].name {stage.name!r} is used twice (or is reserved); stage names must be unique"
                )
            if stage.from_ is not None and stage.from_ not in seen:
                raise ValueError(
                    f"stages[{i}].from names {stage.from_!r}, which is not an earlier stage"
                    + _what_from_may_name(stage.from_, stage.name, list(seen), [s.name for s in self.stages[i + 1 :]])
                )
            for name in stage.reward_stages():
                if not isinstance(seen.get(name), RewardStage):
                    raise ValueError(
                        f"stages[{i}] ({stage.name}) scores with the reward model of {name!r}, which is not an earlier "
                        "reward stage"
                    )
            if isinstance(stage, PPOStage) and stage.value_model != "policy":
                if not isinstance(seen.get(stage.value_model), RewardStage):
                    raise ValueError(
                        f"stages[{i}].value_model names {stage.value_model!r}, which is not an earlier reward stage "
                        "(or policy: the input model with a fresh head)"
                    )
            if isinstance(stage, DistillStage) and not stage.teacher_is_outside():
                teacher = seen.get(stage.teacher)
                if not isinstance(teacher, TrainingStage) or isinstance(teacher, RewardStage):
                    raise ValueError(
                        f"stages[{i}] ({stage.name}) learns from teacher {stage.teacher!r}, which is not an earlier "
                        f"language-model stage (a model folder is written as a path: ./{stage.teacher})"
                    )
            seen[stage.name] = stage
            if isinstance(stage, EvalStage):
                for name in stage.checkpoints:
                    if not isinstance(seen.get(name), TrainingStage) or name == stage.name:
                        raise ValueError(
                            f"stages[{i}].checkpoints names {name!r}, which is not an earlier training stage"
                        )
                    if isinstance(seen[name], RewardStage):
                        raise ValueError(
                            f"stages[{i}].checkpoints names {name!r}, a reward model: it scores text, it is not a "
                            "language model"
                        )
                continue
            input_stage = self.input_of(stage)
            fresh = isinstance(stage, PretrainStage) or (isinstance(stage, DistillStage) and stage.student is not None)
            if input_stage is None and self.model.init is not None and not fresh:
                raise ValueError(
                    f"stages[{i}] ({stage.name}, kind {stage.kind}) needs a trained model to start from: "
                    "begin with a pretrain stage, or give model.path"
                )
            if input_stage is None and self.model.init is not None and stage.lora is not None:
                raise ValueError(
                    f"stages[{i}].lora: adapters on freshly initialised weights learn nothing a full pretrain would "
                    "not; "
                    "use lora on a trained model"
                )
            if isinstance(input_stage, RewardStage):
                raise ValueError(
                    f"stages[{i}] ({stage.name}) would start from reward stage {input_stage.name!r}, which is a "
                    "scorer, not a language model: give `from` the stage to continue"
                )
            if stage.input == "adapter" and (input_stage is None or input_stage.lora is None):
                raise ValueError(
                    f"stages[{i}].input adapter needs an input stage with lora, and "
                    f"{input_stage.name if input_stage else 'model'} has none"
                )
        if self.model.path is not None and self.tokenizer.path is None:
            raise ValueError(
                "model.path needs tokenizer.path (usually the same folder): a newly trained tokenizer "
                "would not match the model's embeddings"
            )
        if self.model.init is not None:
            for i, stage in enumerate(self.stages):
                if isinstance(stage, PretrainStage) and stage.packing.block_size > self.model.init.max_seq_len:
                    raise ValueError(
                        f"stages[{i}].packing.block_size {stage.packing.block_size} exceeds model.init.max_seq_len "
                        f"{self.model.init.max_seq_len}"
                    )
                if "max_len" in stage.model_fields_set and stage.max_len > self.model.init.max_seq_len:
                    raise ValueError(
                        f"stages[{i}].max_len {stage.max_len} exceeds model.init.max_seq_len "
                        f"{self.model.init.max_seq_len}"
                    )
        if self.sweep is not None:
            for point in self.sweep.point_list():  # every key names a stage field and every value fits it
                apply(self, point, self.sweep.seeds[0] if self.sweep.seeds else None)
        return self

    def training_stages(self) -> list[TrainingStage]:
        return [stage for stage in self.stages if isinstance(stage, TrainingStage)]

    def input_of(self, stage: Stage) -> TrainingStage | None:
        """The stage whose checkpoint feeds `stage`: `from` if given, else the previous training stage; none for a
        distillation into a fresh student."""
        if isinstance(stage, DistillStage) and stage.student is not None:
            return None
        if stage.from_ is not None:
            return next(s for s in self.stages if s.name == stage.from_)
        earlier = [s for s in self.stages[: self.stages.index(stage)] if isinstance(s, TrainingStage)]
        return earlier[-1] if earlier else None

    def scored_by(self, stage: EvalStage) -> list[TrainingStage]:
        """The checkpoints an eval stage scores: the ones it names, else every earlier language-model stage."""
        earlier = self.stages[: self.stages.index(stage)]
        names = stage.checkpoints or [
            s.name for s in earlier if isinstance(s, TrainingStage) and not isinstance(s, RewardStage)
        ]
        return [s for s in earlier if s.name in names]

    def tokenizer_corpus(self) -> list[tuple[Source, str, str]]:
        """The sources a trained tokenizer learns from: (source, format, on_invalid); the given text sources, else
        every stage's data, each source once: a stage added on a file another stage reads leaves the tokenizer, and
        every finished stage trained with it, as they were."""
        if self.tokenizer.train is not None and self.tokenizer.train.data:
            return [(source, "text", "fail") for source in self.tokenizer.train.data]
        # a source's weight says how often a stage samples it, not what it holds: the tokenizer reads it once
        return list(
            dict.fromkeys(
                (source.model_copy(update={"weight": None}), stage.data_format, stage.on_invalid)
                for stage in self.training_stages()
                for source in stage.data
            )
        )

    def data_contracts(self) -> list[tuple[Source, str, str]]:
        """Every data source read whole, once: (source, the format it must have, what to do with a bad row).

        Streamed corpora are left out: they are checked line by line at flat memory instead (`streamed`)."""
        streamed = self.streamed()
        files = [
            (source, fmt, stage.on_invalid)
            for stage in self.stages
            for field, (sources, fmt) in stage.files().items()
            if not (stage in streamed and field == "data")
            for source in sources
        ]
        if self.tokenizer.train is not None and self.tokenizer.train.data:
            files += self.tokenizer_corpus()
        return list(dict.fromkeys(files))

    def streamed(self) -> list[PretrainStage]:
        return [stage for stage in self.stages if isinstance(stage, PretrainStage) and stage.streaming]
