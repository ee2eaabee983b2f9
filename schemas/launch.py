"""How many processes a training stage runs in, and under which engine.

A stage with `launch` runs under `torchrun` as `processes` ranks on each of `nodes` machines:
plain DDP, DeepSpeed ZeRO-2/3, or PyTorch's FSDP2 (`fully_shard`), the last two through the HF
Trainer's integrations (FSDP2 through Accelerate; it runs on CPU with gloo too). `train.batch_size` is
the batch of one optimizer micro-step across every rank, so each rank takes
`batch_size / world_size` rows and the result does not depend on the launch: `launch` is not
part of a stage's fingerprint, and a stage finished on 8 processes is reused by a run on 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from schemas.base import Strict

# The DeepSpeed configs the `{zero, offload}` form names; every size in them is "auto", filled by the HF Trainer from
# `train`.
DEEPSPEED_CONFIGS = Path(__file__).resolve().parent.parent / "deployments" / "deepspeed"


class DeepSpeed(Strict):
    """One of the DeepSpeed configs shipped in deployments/deepspeed/."""

    zero: Literal[2, 3] = Field(2, description="2: optimizer state and gradients sharded; 3: the parameters too")
    offload: bool = Field(False, description="keep the optimizer state (and with zero 3 the parameters) in CPU memory")

    def config(self) -> Path:
        return DEEPSPEED_CONFIGS / f"zero{self.zero}{'_offload' if self.offload else ''}.json"


class FSDP(Strict):
    """PyTorch's FSDP2: every decoder layer's parameters, gradients and optimizer state sharded among the ranks."""

    reshard_after_forward: bool = Field(
        True,
        description="free each layer's gathered parameters after its forward and gather them again for the "
        "backward (ZeRO-3's memory); false: keep them until the backward (ZeRO-2's, less communication)",
    )


class Launch(Strict):
    """How many processes a training stage runs in, under torchrun: plain DDP, DeepSpeed ZeRO-2/3, or FSDP2."""

    processes: PositiveInt = Field(1, description="ranks on each node (one per GPU on a GPU machine)")
    nodes: PositiveInt = Field(
        1, description="machines; every node but the first runs `lifecycle join` (docs/scale-out.md)"
    )
    master: str = Field(
        "127.0.0.1:29500",
        pattern=r"^[^:\s]+:\d+$",
        description="host:port of the first node, where the other nodes meet it (torchrun's static rendezvous)",
    )
    deepspeed: DeepSpeed | Path | None = Field(
        None,
        description=(
            "{zero: 2|3, offload: bool} for a shipped config, or the path of a DeepSpeed JSON config of your own"
        ),
    )

    fsdp: FSDP | None = Field(None, description="shard with PyTorch's FSDP2 (`{}` for its defaults) instead of DDP")

    @property
    def world_size(self) -> int:
        return self.processes * self.nodes

    def deepspeed_config(self) -> Path | None:
        """The DeepSpeed JSON config the Trainer gets; None for plain DDP."""
        return self.deepspeed.config() if isinstance(self.deepspeed, DeepSpeed) else self.deepspeed

    def zero_stage(self) -> int:
        """What the ranks shard, as ZeRO stages say it: 0 for DDP; DeepSpeed's stage (a config of one's own is read
        for it); for FSDP2, 3 when it reshards after the forward (parameters sharded), else 2."""
        if self.deepspeed is None:
            return 0 if self.fsdp is None else (3 if self.fsdp.reshard_after_forward else 2)
        if isinstance(self.deepspeed, DeepSpeed):
            return self.deepspeed.zero
        return int(json.loads(self.deepspeed.read_text()).get("zero_optimization", {}).get("stage", 0))

    @model_validator(mode="after")
    def _launched(self) -> Launch:
        if self.deepspeed is not None and self.fsdp is not None:
            raise ValueError("launch takes one sharding engine: deepspeed or fsdp, not both")
        if self.world_size == 1 and self.deepspeed is None:
            raise ValueError("launch with one process and no deepspeed changes nothing: leave launch out")
        return self
