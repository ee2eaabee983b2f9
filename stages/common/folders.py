"""Folders written whole or not at all: built beside their place, then moved there in one step.

Every layer that writes a folder a reader may look for (a prepared dataset, a fetched checkpoint, a mirror, a
reference's log-probs, an export) builds it with `partial_folder` and `publish`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def partial_folder(target: Path) -> Path:
    """An empty folder beside `target` to build it in, named for this process: a kill never leaves a half-written
    folder where a reader looks for `target`, and two processes never write into the same one."""
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def publish(partial: Path, target: Path) -> Path:
    """Move a folder built at `partial` to `target` in one step; if another process published it first, keep theirs
    (the same content: targets are named by what they hold)."""
    try:
        partial.rename(target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(partial)
    return target
