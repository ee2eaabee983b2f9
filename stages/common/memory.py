"""What a stage's memory and optimizer settings need from the machine.

Checked before anything loads (`problems`), so a setting the machine cannot honour is a spec error naming it, not
a crash after the data is prepared.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch

from schemas.load import SpecError
from schemas.spec import PipelineSpec, TrainingStage
from stages.common import benchmarks
from stages.common.training import use_bf16


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _stage_problems(stage: TrainingStage) -> list[str]:
    memory, train = stage.memory, stage.train
    gpu = torch.cuda.is_available()
    needs: list[tuple[bool, str, str]] = []  # (asked, setting, what it lacks)
    if memory is not None:
        flash = memory.attention == "flash_attention_2"
        needs += [
            (flash and not gpu, "memory.attention flash_attention_2", "a CUDA GPU, and this machine has none"),
            (
                flash and not _installed("flash_attn"),
                "memory.attention flash_attention_2",
                "the flash-attn package (pip install flash-attn)",
            ),
            (
                flash and not use_bf16(train.precision),
                "memory.attention flash_attention_2",
                "bf16 (train.precision bf16, or auto on a GPU that has it)",
            ),
            (memory.liger and not gpu, "memory.liger", "a CUDA GPU, and this machine has none"),
            (memory.liger and not _installed("liger_kernel"), "memory.liger", "the liger-kernel package"),
            (
                memory.torch_compile and not gpu and not any(map(shutil.which, ("c++", "g++", "clang++"))),
                "memory.torch_compile",
                "a C++ compiler on a CPU machine (torch.compile builds its CPU kernels with one)",
            ),
        ]
    eight_bit = train.optimizer in ("adamw_8bit", "paged_adamw_8bit")
    optimizer = f"train.optimizer {train.optimizer}"
    needs += [
        (eight_bit and not _installed("bitsandbytes"), optimizer, "the bitsandbytes package"),
        (train.optimizer == "paged_adamw_8bit" and not gpu, "train.optimizer paged_adamw_8bit", "a CUDA GPU"),
    ]
    return [f"{setting} needs {lacking}" for asked, setting, lacking in needs if asked]


def problems(spec: PipelineSpec) -> list[str]:
    """Every memory or optimizer setting of a training stage that this machine cannot honour, named by stage."""
    return [
        f"stages[{i}] ({stage.name}): {problem}"
        for i, stage in enumerate(spec.stages)
        if isinstance(stage, TrainingStage)
        for problem in _stage_problems(stage)
    ]


def check(spec: PipelineSpec, path: Path) -> None:
    """Raise a SpecError naming every setting this machine cannot honour: memory and optimizer settings, and
    benchmarks whose tasks or data it does not have."""
    if found := problems(spec) + benchmarks.problems(spec):
        raise SpecError(f"{path}: {len(found)} setting(s) this machine cannot honour\n  " + "\n  ".join(found))
