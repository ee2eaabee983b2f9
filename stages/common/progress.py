"""What a person watching a run reads: where each stage is, and little else.

On a terminal a training stage is one line rewritten in place (stage, step / total, loss, tokens/s, ETA); without
one (CI, a Prefect worker, a file) the same line is printed once per logging step, so a log file reads as a table.
Data preparation and checkpoint transfers say what they did in one line each. Everything goes to stderr, beside
Prefect's own lines; stdout keeps what a command answers.

The libraries' own output is cut to what a user can act on by `quiet_libraries`, each cut with its reason. This
module loads none of those libraries: the flow imports it before they load. The Trainer's events reach the line
through `stages.common.training.Progress`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from stages.common.contract import Prepared

REFRESH_SECONDS = 0.2  # the live line is redrawn at most this often: a fast stage's steps would flood a slow terminal


def say(line: str, stream: TextIO | None = None) -> None:
    """One line of progress, on stderr (resolved when called, so a redirected stderr is honoured)."""
    print(line, file=stream or sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """1.2s, 45s, 2m10s, 1h02m: as precise as a person waiting needs."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def size(n_bytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    raise AssertionError("unreachable")


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@contextmanager
def transfer(what: str, verb: str, folder: Path) -> Iterator[None]:
    """One line once a folder has moved to or from the store: `what: 12.3 MB <verb> in 1.2s`. MLflow's own bar counts
    files, not bytes, and ends before a person can read it."""
    started = time.monotonic()
    yield
    say(f"{what}: {size(folder_size(folder))} {verb} in {duration(time.monotonic() - started)}")


def prepared_line(stage: str, prepared: Prepared, seconds: float) -> str:
    """`prepare sft: 1,335 train rows, 66 heldout rows (3 train dropped) in 1.4s`: the rows each split trains or
    measures on, and whatever preparation cut or dropped (the full counts are logged with the stage's run)."""
    splits = [f"{len(prepared.datasets[s]):,} {s} rows" for s in ("train", "heldout") if s in prepared.datasets]
    cut = [
        f"{value:,.0f} {name.replace('_', ' ')}"
        for name, value in prepared.counts.items()
        if value and name.endswith(("dropped", "truncated"))
    ]
    if prepared.rejected:
        cut.append(f"{len(prepared.rejected):,} invalid rows skipped")
    cut_text = f" ({', '.join(cut)})" if cut else ""
    return f"prepare {stage}: {', '.join(splits)}{cut_text} in {duration(seconds)}"


def short_of_a_batch(stage: str, prepared: Prepared, batch_size: int) -> None:
    """Say so when the training split holds fewer rows than one batch: every step then trains on those same rows, a
    smaller batch than the spec asks for, so its steps, rate and loss mean less than they seem to."""
    rows = len(prepared.datasets["train"]) if "train" in prepared.datasets else 0  # a streamed corpus: unknown
    if 0 < rows < batch_size:
        say(
            f"prepare {stage}: warning: {rows:,} train rows, fewer than one batch (train.batch_size {batch_size}): "
            f"every step trains on the same {rows:,}; give more rows, or set batch_size to {rows} or less"
        )


def step_line(stage: str, step: int, total: int, figures: dict[str, float], tokens: int, seconds: float, steps: int):
    """`sft  step 20/200  loss 1.234  1,530 tok/s  eta 2m10s`: where a stage is. `tokens`, `seconds` and `steps` are
    counted since this process began training (a resumed stage's rate and ETA start at the resume); rate and ETA are
    left out until a step is done, the ETA at the last step."""
    parts = [stage, f"step {step}/{total}", *(f"{name} {value:.4g}" for name, value in figures.items())]
    if steps > 0 and seconds > 0:
        if tokens:
            parts.append(f"{tokens / seconds:,.0f} tok/s")
        if step < total:
            parts.append(f"eta {duration((total - step) * seconds / steps)}")
    return "  ".join(parts)


class StatusLine:
    """A line that follows a task: on a terminal redrawn in place (rich's live display), elsewhere printed at the
    moments that matter.

    `live`: redraw in place; by default, whether the stream (stderr unless given) is a terminal."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None):
        self._stream, self._live = stream, live
        self._display = None  # rich's Live while a line is drawn and not yet ended
        self.drawn = 0.0  # when it was last drawn

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    @property
    def live(self) -> bool:
        return self.stream.isatty() if self._live is None else self._live

    @property
    def open(self) -> bool:
        """A live line is drawn and not yet ended."""
        return self._display is not None

    def update(self, text: str) -> None:
        """A moment between the ones that matter (a step): redrawn on a terminal, at most every REFRESH_SECONDS."""
        if self.live and time.monotonic() - self.drawn >= REFRESH_SECONDS:
            self._draw(text)

    def mark(self, text: str) -> None:
        """A moment that matters (a logging step): redrawn on a terminal, a line of its own elsewhere."""
        if self.live:
            self._draw(text)
        else:
            say(text, self.stream)

    def finish(self, text: str) -> None:
        """The task's last word (a summary): in place of the live line on a terminal, a line of its own elsewhere."""
        if self.live:
            self._draw(text)
        else:
            say(text, self.stream)
        self.close()

    def note(self, text: str) -> None:
        """A line that stays (a measure): printed below the live line, which ends first."""
        self.close()
        say(text, self.stream)

    def close(self) -> None:
        """End an open live line, so whatever is printed next (an error) starts on a line of its own."""
        if self._display is not None:
            self._display.stop()
            self._display = None

    def _draw(self, text: str) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        if self._display is None:
            # the line as given, cut to the terminal's width (a wrapped line cannot be redrawn in place); drawn when
            # told, not by rich's timer, and the streams left alone: Prefect's log handlers hold the real stderr
            console = Console(file=self.stream, force_terminal=True, color_system=None, highlight=False)
            self._display = Live(console=console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False)
            self._display.start()
        self._display.update(Text(text, no_wrap=True, overflow="ellipsis"), refresh=True)
        self.drawn = time.monotonic()


def quiet_libraries() -> None:
    """Cut the libraries' output to what a user can act on; once per process that trains, before they load.

    The progress-bar switches are environment variables, read when each library loads and inherited by a launched
    stage's ranks; the log and warning filters below are this process's. Every cut names one message or one kind
    of bar: warnings a user can act on are left as they are."""
    # transformers' bar per weight file loaded or saved, datasets' per dataset saved or mapped, MLflow's per artifact
    # count: dozens a run, each over before it can be read, and carriage returns in a log file. The progress lines
    # above say what each step did instead. A user who wants them back sets the variable.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow the hub's switch
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # a library imported before this ran read its switch already: told through its own call (the user's "0" wins)
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1" and "datasets" in sys.modules:
        from datasets.utils import disable_progress_bars

        disable_progress_bars()
    # DeepSpeed guesses its accelerator when transformers' Trainer imports it, and warns in every process without a
    # GPU. It guesses as torch does (CUDA when torch sees one), and the stage's summary line names the device it
    # trained on; the launched ranks are told outright (DS_ACCELERATOR, tasks/torchrun.py) and never guess.
    _drop(logging.getLogger("DeepSpeed"), "Setting accelerator to CPU")
    # Two in-stage saves less than a second apart (a short stage) look to the Trainer like a filesystem without
    # mtimes; it then orders checkpoints by step number, as `last_checkpoint` does anyway.
    _drop(logging.getLogger("transformers.trainer_utils"), "mtime may not be reliable")
    # bitsandbytes (lora.quantize) on a CPU with AVX512-BF16 looks for a faster 4-bit kernel that the `kernels` package
    # would download from the Hub, and says it runs without it: the pipeline downloads nothing while it runs.
    _drop(logging.getLogger("bitsandbytes.backends.cpu.ops"), "Failed to load CPU gemm_4bit_forward")
    # MLflow's system-metrics monitor says at INFO that it starts, that it found no GPU, that it stops and that it
    # stopped: four lines a stage, where the run's system/* metrics say what it measured. Its warnings stay.
    logging.getLogger("mlflow.system_metrics.system_metrics_monitor").setLevel(logging.WARNING)
    # One library calling another's deprecated API: nothing a user of this pipeline can change, and shown again and
    # again (each time a library changes the warning filters, Python forgets what it has shown). PEFT reads
    # `is_gradient_checkpointing` on every model it wraps; DeepSpeed's ZeRO gathers and scatters with the old
    # collectives, on every rank, at every step.
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
    warnings.filterwarnings(
        "ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", FutureWarning
    )


def _drop(logger: logging.Logger, message_start: str) -> None:
    """Leave out one message of a logger (once, however often this is called)."""
    if not any(getattr(f, "message_start", None) == message_start for f in logger.filters):
        logger.addFilter(_Drop(message_start))


class _Drop(logging.Filter):
    def __init__(self, message_start: str):
        super().__init__()
        self.message_start = message_start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.message_start)
