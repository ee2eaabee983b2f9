"""The toy world's benchmark data for lm-evaluation-harness: its task files name `toy.rows` as their
`custom_dataset`, so the rows are read from the bundled data wherever the project lies (lm-eval would read a relative
`data_files` path against the working folder)."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict

DATA = Path(__file__).resolve().parents[1] / "data"


def rows(file: str, **_: object) -> DatasetDict:
    """The rows of examples/data/<file> as the task's test split (lm-eval passes its metadata too: not used)."""
    return DatasetDict({"test": Dataset.from_json(str(DATA / file))})
