"""Standard benchmarks in an eval stage: lm-evaluation-harness tasks run on every checkpoint the stage scores.

Tasks are named as lm-eval names them (`hellaswag`, `gsm8k`, a group such as `mmlu`), or are the user's own task
YAML files in `folder`. Each task's metrics become columns `<task>/<metric>` of the stage's table. Every field is
part of the stage's fingerprint, and the folder's files by their content.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field, NonNegativeInt, PositiveInt

from schemas.base import Strict


class Task(Strict):
    """One lm-eval task or group, and how it is asked."""

    task: str = Field(min_length=1, description="lm-eval's name of a task or group, or of a task in `folder`")
    chat: bool = Field(
        False,
        description="render each request with the checkpoint's chat template (lm-eval's apply_chat_template); "
        "for tasks that ask questions of a chat model, not for likelihood tasks on plain text",
    )
    fewshot: NonNegativeInt | None = Field(None, description="few-shot examples per request; default: the task's own")


def _named(value: object) -> object:
    return {"task": value} if isinstance(value, str) else value


class Benchmarks(Strict):
    """lm-evaluation-harness tasks every scored checkpoint is run on."""

    tasks: list[Annotated[Task, BeforeValidator(_named)]] = Field(
        min_length=1, description="task names, or {task, chat, fewshot} for a task asked otherwise"
    )
    folder: Path | None = Field(
        None, description="a folder of the user's own lm-eval task YAML files (relative to the spec)"
    )
    limit: PositiveInt | None = Field(None, description="at most this many examples of each task; default: all")
    batch_size: PositiveInt = Field(16, description="requests scored or generated together")
    seed: int = Field(1234, description="the seed of few-shot sampling and of any sampled generation")
