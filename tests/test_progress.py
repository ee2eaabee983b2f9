"""What a person reads while a stage trains: the progress line, the one-line reports, and no library dumps."""

from __future__ import annotations

import io
import logging
import os
import re
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import TrainerState

from examples.generate import DATA_DIR
from stages.common.progress import StatusLine, duration, prepared_line, quiet_libraries, size, step_line, transfer
from tests.conftest import FAST, TINY

# `sft  step 20/200  loss 1.234  1,530 tok/s  eta 3m00s` (no ETA at the last step)
STEP_LINE = re.compile(r"^(\S+)  step (\d+)/(\d+)  loss (\S+)  ([\d,]+) tok/s(  eta \S+)?$")


def test_a_step_line_names_the_stage_the_step_the_loss_the_rate_and_the_time_left() -> None:
    # 30,600 tokens in 20 s: 1,530 tok/s; 180 steps left at 1 s a step: 3 minutes
    line = step_line("sft", 20, 200, {"loss": 1.23456}, tokens=30_600, seconds=20.0, steps=20)
    assert line == "sft  step 20/200  loss 1.235  1,530 tok/s  eta 3m00s"
    # before a step of this session is done there is no rate to give
    assert step_line("sft", 0, 200, {}, tokens=0, seconds=0.0, steps=0) == "sft  step 0/200"
    # a resumed stage: 10 steps done in this session of the 110 so far, 10 s: 90 left at 1 s each
    assert step_line("sft", 110, 200, {"loss": 2.0}, 0, 10.0, 10) == "sft  step 110/200  loss 2  eta 1m30s"
    assert step_line("sft", 200, 200, {"loss": 2.0}, 900, 90.0, 100) == "sft  step 200/200  loss 2  10 tok/s"


@pytest.mark.parametrize(
    "seconds, text", [(0.04, "0.0s"), (9.94, "9.9s"), (45.2, "45s"), (130, "2m10s"), (3725, "1h02m")]
)
def test_durations_read_as_a_person_says_them(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_sizes_read_in_decimal_units() -> None:
    assert [size(n) for n in (12, 12_345, 2_345_678, 7.5e12)] == ["12 B", "12.3 kB", "2.3 MB", "7500.0 GB"]


def fake_args(name: str = "sft") -> SimpleNamespace:
    return SimpleNamespace(run_name=name, device=SimpleNamespace(type="cpu"), world_size=1)


def drive(progress, clock: list[float], state: TrainerState, steps: int, log_every: int, tokens_per_step: int) -> None:
    """The Trainer's events for `steps` optimizer steps of 1 s each, a log every `log_every`."""
    args, control = fake_args(), None
    progress.on_train_begin(args, state, control)
    for _ in range(steps):
        clock[0] += 1.0
        state.global_step += 1
        state.num_input_tokens_seen += tokens_per_step
        progress.on_step_end(args, state, control)
        if state.global_step % log_every == 0:
            progress.on_log(args, state, control, logs={"loss": 4.0 / state.global_step, "grad_norm": 1.0})
    progress.on_log(args, state, control, logs={"train_runtime": float(steps), "train_loss": 2.5})
    progress.on_train_end(args, state, control)


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    return now


def test_without_a_terminal_each_logging_step_is_one_compact_line(clock) -> None:
    from stages.common.training import Progress

    out = io.StringIO()
    drive(Progress(out), clock, TrainerState(max_steps=40), steps=40, log_every=10, tokens_per_step=1530)
    lines = out.getvalue().splitlines()
    assert lines == [
        "sft  step 10/40  loss 0.4  1,530 tok/s  eta 30s",
        "sft  step 20/40  loss 0.2  1,530 tok/s  eta 20s",
        "sft  step 30/40  loss 0.1333  1,530 tok/s  eta 10s",
        "sft  step 40/40  loss 0.1  1,530 tok/s",
        "sft  40 steps in 40s on cpu  loss 0.1  1,530 tok/s",
    ]
    assert all(STEP_LINE.match(line) for line in lines[:4])


def test_on_a_terminal_the_line_is_redrawn_in_place_and_ended_before_anything_else(clock) -> None:
    from stages.common.training import Progress

    out = io.StringIO()
    progress = Progress(out, live=True)
    drive(progress, clock, TrainerState(max_steps=4), steps=4, log_every=2, tokens_per_step=100)
    text = out.getvalue()
    assert text.count("\n") == 1  # one line, ended once
    assert drawings(text) == [
        "sft  step 1/4  100 tok/s  eta 3.0s",
        "sft  step 2/4  100 tok/s  eta 2.0s",
        "sft  step 2/4  loss 2  100 tok/s  eta 2.0s",  # the logging step adds its loss
        "sft  step 3/4  loss 2  100 tok/s  eta 1.0s",
        "sft  step 4/4  loss 2  100 tok/s",
        "sft  step 4/4  loss 1  100 tok/s",
        "sft  4 steps in 4.0s on cpu  loss 1  100 tok/s",  # the summary takes the line's place
    ]


def drawings(text: str) -> list[str]:
    """What a terminal showed in turn on a line redrawn in place (rich's cursor and erase codes taken out); the last
    drawing, left on the screen when the line ends, once."""
    shown = text.removeprefix("\x1b[?25l").removesuffix("\n\x1b[?25h").split("\r\x1b[2K")
    assert shown[-1] == shown[-2]  # drawn again as it ends
    return shown[:-1]


def test_only_the_main_process_shows_progress(clock) -> None:
    from stages.common.training import Progress

    out = io.StringIO()
    state = TrainerState(max_steps=4)
    state.is_world_process_zero = False  # rank 1 of a launched stage
    drive(Progress(out), clock, state, steps=4, log_every=2, tokens_per_step=100)
    assert out.getvalue() == ""


def test_an_open_live_line_ends_before_an_error_is_printed() -> None:
    out = io.StringIO()
    status = StatusLine(out, live=True)
    status.update("sft  step 3/40")
    status.close()
    status.close()  # a second close writes nothing more
    assert drawings(out.getvalue()) == ["sft  step 3/40"] and out.getvalue().count("\n") == 1


def test_a_trained_stage_prints_step_lines_and_no_log_dicts(trained_tokenizer: Path, tmp_path: Path, capfd) -> None:
    """A real (tiny) stage through the HF Trainer: its own dict printer is replaced by the progress lines."""
    from transformers import AutoTokenizer

    from schemas.spec import PretrainStage, TrainSpec
    from stages import pretrain
    from stages.common.contract import StageInputs

    spec = PretrainStage(
        name="pretrain",
        kind="pretrain",
        data=[DATA_DIR / "pretrain_heldout.jsonl"],
        heldout=[DATA_DIR / "pretrain_heldout.jsonl"],
        packing={"block_size": 32},
        train=TrainSpec(**FAST | {"logging_steps": 2}, max_steps=4, save_steps=4),
    )
    datasets = pretrain.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer)).datasets
    capfd.readouterr()
    pretrain.run(spec, StageInputs(TINY, trained_tokenizer, datasets), tmp_path)
    out, err = capfd.readouterr()
    assert "{'" not in out + err, out + err
    steps = [m.groups()[:3] for m in map(STEP_LINE.match, err.splitlines()) if m]
    assert steps == [("pretrain", "2", "4"), ("pretrain", "4", "4")], err
    assert re.search(r"^pretrain  4 steps in \S+ on cpu  loss \S+  [\d,]+ tok/s$", err, re.M), err
    assert re.search(r"^pretrain  heldout loss \S+ at step 4$", err, re.M), err  # measured after training


def test_prepare_and_transfer_lines(tmp_path: Path, capsys) -> None:
    from datasets import Dataset, DatasetDict

    from schemas.data import Problem
    from stages.common.contract import Prepared

    prepared = Prepared(
        DatasetDict({"train": Dataset.from_dict({"x": list(range(1234))}), "heldout": Dataset.from_dict({"x": [1]})}),
        rejected=[Problem(Path("a.jsonl"), 3, "text", "missing")],
        counts={"train_dropped": 2.0, "train_truncated": 0.0, "train_row_fill": 0.96},
    )
    assert prepared_line("sft", prepared, 1.44) == (
        "prepare sft: 1,234 train rows, 1 heldout rows (2 train dropped, 1 invalid rows skipped) in 1.4s"
    )
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 2_500_000)
    with transfer("checkpoint of sft (run abc)", "downloaded", tmp_path):
        pass
    assert re.fullmatch(r"checkpoint of sft \(run abc\): 2\.5 MB downloaded in \d\.\ds\n", capsys.readouterr().err)


def test_quiet_libraries_drops_the_named_messages_and_keeps_the_rest(monkeypatch) -> None:
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, "")  # so that the test's end restores the variable as it was
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")  # a user's choice stands
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        quiet_libraries()
        quiet_libraries()  # once per process is the intent; twice must change nothing
        for message in (
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
            "`torch.distributed.reduce_scatter_tensor` is deprecated.",
            "`Trainer.tokenizer` is deprecated",  # any other: a user may act on it
        ):
            warnings.warn(message, FutureWarning, stacklevel=1)
    assert [str(w.message) for w in shown] == ["`Trainer.tokenizer` is deprecated"]
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "true"
    deepspeed = logging.getLogger("DeepSpeed")
    assert sum(getattr(f, "message_start", "").startswith("Setting accelerator") for f in deepspeed.filters) == 1
    shown_logs: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: shown_logs.append(record.getMessage())
    monkeypatch.setattr(deepspeed, "handlers", [handler])  # in place of DeepSpeed's own, if it has loaded
    deepspeed.warning("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
    deepspeed.warning("zero.Init: the model does not fit")
    assert shown_logs == ["zero.Init: the model does not fit"]
