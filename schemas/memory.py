"""How a training stage spends memory and time: settings that change neither what it learns nor its fingerprint.

Each is handed to the library that owns it (the HF Trainer, `from_pretrained`'s attention choice), not
re-implemented here. Settings that change the numbers (the optimizer, NEFTune's noise) are `train` fields,
in the fingerprint; these are not: a stage finished with gradient checkpointing is reused by a run without it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.base import Strict

Attention = Literal["auto", "sdpa", "eager", "flash_attention_2"]


class Memory(Strict):
    """Memory and speed settings of a training stage; what one needs and the machine lacks is a spec error."""

    gradient_checkpointing: bool = Field(
        False,
        description="keep only each layer's input and recompute the rest in the backward pass (use_reentrant: false): "
        "activations shrink by about the layer count, a step costs about a third more",
    )
    attention: Attention = Field(
        "auto",
        description="the attention kernel: auto picks flash_attention_2 where a GPU, the flash-attn package and a "
        "bf16 stage allow it, else sdpa where the architecture has it, else eager; the stage records its choice",
    )
    torch_compile: bool = Field(False, description="compile the model with torch.compile (the Trainer's)")
    liger: bool = Field(
        False, description="Liger's fused kernels (RMSNorm, RoPE, SwiGLU, fused cross-entropy): a GPU and liger-kernel"
    )
