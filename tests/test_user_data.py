"""A user's data as they already have it, read unchanged and trained on: every container, source and shape of
docs/data.md in one spec, each stage trained a few steps on the tiny shared models.

The rows are written here, in the shapes LLaMA-Factory, TRL and OpenAI document (never copied from them)."""

from __future__ import annotations

import csv
import gzip
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from transformers import AutoTokenizer

from schemas.data import DataError, read_files
from schemas.load import load_spec
from stages import dpo, kto, pretrain, sft
from stages.common.contract import StageInputs
from tests.conftest import FAST, TINY, stage_run

SUBJECTS = ["cat", "sun", "map", "pen", "box", "cup", "hat", "jam"]
CALC = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Adds two numbers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
    },
}


def write(path: Path, rows: list[dict]) -> Path:
    """Rows in the container the path's suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in row.items()})
    elif path.name.endswith(".json"):
        path.write_text(json.dumps(rows, indent=2))  # an array, pretty-printed as exports are
    elif path.name.endswith(".jsonl.gz"):
        path.write_bytes(gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode()))
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def upper(word: str) -> tuple[str, str]:
    return f"Write {word} in capital letters.", f"The word {word} in capital letters is {word.upper()}."


@pytest.fixture(scope="module")
def user_world(tmp_path_factory, monkeypatch_module) -> Path:
    """A folder of a user's data in every container and shape, a LLaMA-Factory dataset_info.json, a Hub dataset in
    the Hugging Face cache, and the spec that reads them all."""
    import huggingface_hub.constants
    from datasets import Dataset

    root = tmp_path_factory.mktemp("user")
    asks = [upper(word) for word in SUBJECTS]
    # SFT: alpaca as a JSON array, sharegpt in parquet (custom speaker names, through dataset_info's tags),
    # OpenAI messages in csv with content parts, tool calls in gzipped JSON Lines, a save_to_disk folder, the Hub
    write(root / "alpaca.json", [{"instruction": q, "input": "", "output": a, "history": []} for q, a in asks[:4]])
    write(
        root / "lf" / "chats.parquet",
        [{"dialog": [{"speaker": "person", "text": q}, {"speaker": "bot", "text": a}]} for q, a in asks[4:]],
    )
    (root / "lf" / "dataset_info.json").write_text(
        json.dumps(
            {
                "chats": {
                    "file_name": "chats.parquet",
                    "formatting": "sharegpt",
                    "columns": {"messages": "dialog"},
                    "tags": {
                        "role_tag": "speaker",
                        "content_tag": "text",
                        "user_tag": "person",
                        "assistant_tag": "bot",
                    },
                },
                "feedback": {
                    "file_name": "feedback.json",
                    "formatting": "sharegpt",
                    "columns": {"messages": "messages", "kto_tag": "ok"},
                    "tags": {
                        "role_tag": "role",
                        "content_tag": "content",
                        "user_tag": "user",
                        "assistant_tag": "assistant",
                    },
                },
            }
        )
    )
    write(
        root / "openai.csv",
        [
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": q}]},
                    {"role": "assistant", "content": a},
                ]
            }
            for q, a in asks[:4]
        ],
    )
    write(
        root / "tools.jsonl.gz",
        [
            {
                "tools": [CALC],
                "messages": [
                    {"role": "user", "content": f"What is {i} + {i + 2}?"},
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [
                            {
                                "type": "function",
                                "function": {"name": "add", "arguments": json.dumps({"a": i, "b": i + 2})},
                            }
                        ],
                    },
                    {"role": "tool", "content": str(2 * i + 2)},
                    {"role": "assistant", "content": f"{i} + {i + 2} is {2 * i + 2}."},
                ],
            }
            for i in range(4)
        ],
    )
    Dataset.from_list(
        [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in asks]
    ).save_to_disk(str(root / "saved"))
    cache = root / "hub"
    commit = "1234abcd" * 5
    snapshot = cache / "datasets--someone--chats" / "snapshots" / commit
    write(
        snapshot / "data" / "train-00000-of-00001.parquet",
        [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in asks],
    )
    (cache / "datasets--someone--chats" / "refs").mkdir()
    (cache / "datasets--someone--chats" / "refs" / "main").write_text(commit)
    monkeypatch_module.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    # preference: sharegpt pairs in parquet, chosen_messages in a JSON array, the user's own column names in csv
    wrong = [f"The word {w} in capital letters is {w.lower()}." for w in SUBJECTS]
    write(
        root / "pairs.parquet",
        [
            {
                "conversations": [{"from": "human", "value": q}],
                "chosen": {"from": "gpt", "value": a},
                "rejected": {"from": "gpt", "value": b},
            }
            for (q, a), b in zip(asks[:4], wrong)
        ],
    )
    write(
        root / "pairs.json",
        [
            {
                "chosen_messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                "rejected_messages": [{"role": "user", "content": q}, {"role": "assistant", "content": b}],
            }
            for (q, a), b in zip(asks[4:], wrong[4:])
        ],
    )
    write(root / "pairs.csv", [{"question": q, "good": a, "bad": b} for (q, a), b in zip(asks, wrong)])
    # unpaired feedback: labelled conversations (LLaMA-Factory's kto_tag), TRL's rows in parquet
    write(
        root / "lf" / "feedback.json",
        [
            {
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a if i % 2 else b}],
                "ok": bool(i % 2),
            }
            for i, ((q, a), b) in enumerate(zip(asks, wrong))
        ],
    )
    write(root / "unpaired.parquet", [{"prompt": q, "completion": a, "label": True} for q, a in asks[:4]])
    # pretrain text: paragraphs of a Markdown file, lines of a text file
    (root / "notes.md").write_text(
        "\n\n".join(f"# {w}\nThe word {w} is short.\nIt has three letters." for w in SUBJECTS)
    )
    (root / "lines.txt").write_text("".join(f"{w} {w.upper()} {w[::-1]}\n" for w in SUBJECTS))
    spec = {
        "name": "user-data",
        "model": {"init": TINY.model_dump()},
        "dataset_info": "lf/dataset_info.json",
        "stages": [
            {
                "name": "pretrain",
                "kind": "pretrain",
                "data": [{"path": "notes.md", "documents": "paragraph"}, "lines.txt"],
                "packing": {"block_size": 32},
            },
            {
                "name": "sft",
                "kind": "sft",
                "max_len": 128,
                "mix": {"strategy": "concatenate", "seed": 3},
                "data": [
                    "alpaca.json",
                    {"dataset": "chats"},
                    "openai.csv",
                    {"path": "tools.jsonl.gz", "weight": 2},
                    "saved",
                    "hf:someone/chats",
                ],
            },
            {
                "name": "dpo",
                "kind": "dpo",
                "max_len": 128,
                "data": [
                    "pairs.parquet",
                    "pairs.json",
                    {"path": "pairs.csv", "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}},
                ],
            },
            {
                "name": "kto",
                "kind": "kto",
                "from": "sft",
                "max_len": 128,
                "data": [{"dataset": "feedback"}, "unpaired.parquet"],
            },
        ],
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return root / "spec.yaml"


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_every_source_reads_as_the_user_wrote_it_and_each_is_counted(user_world: Path) -> None:
    spec = load_spec(user_world)
    stage = spec.stages[1]
    read = read_files(stage.data, "conversations", stage.on_invalid, stage.mix)
    names = [
        "alpaca.json",
        "chats.parquet",
        "openai.csv",
        "tools.jsonl.gz",
        "saved",
        "hf:someone/chats (train)",
    ]
    rows = [4, 4, 4, 4, 8, 8]
    for i, (name, n) in enumerate(zip(names, rows)):
        key = f"source/{i}-{name}".replace("(", "_").replace(")", "_")
        assert read.counts[f"{key}/rows"] == n and read.counts[f"{key}/rejected"] == 0, key
    assert read.counts["source/3-tools.jsonl.gz/used"] == 8  # weight 2: every row twice
    assert len(read.frame) == sum(rows) + 4
    assert read.frame["roles"].to_list()[0] == ["user", "assistant"]
    # the sharegpt speakers of dataset_info's tags, the csv's content parts, the Hub dataset at its cached commit
    chats = read.frame.slice(4, 4)["contents"].to_list()
    assert chats[0] == list(upper("box"))
    assert spec.stages[1].data[5].revision == "1234abcd" * 5
    calls = [c for c in read.frame["calls"].to_list() if any(c)][0]
    assert json.loads(calls[1]) == [{"name": "add", "arguments": {"a": 0, "b": 2}}]


def test_a_mapped_column_missing_from_a_file_is_named_with_the_file(user_world: Path, tmp_path: Path) -> None:
    spec = load_spec(user_world)
    dpo_stage = spec.stages[2]
    wrong = dpo_stage.data[2].model_copy(update={"columns": {"prompt": "query", "chosen": "good", "rejected": "bad"}})
    with pytest.raises(DataError) as err:
        read_files([wrong], "preference")
    # every row of a csv has the file's columns: one problem for the file, not one a row
    assert [str(problem) for problem in err.value.problems] == [
        f"{user_world.parent / 'pairs.csv'}:0: query: is not a column of this file (columns maps it; the file has: "
        "bad, good, question)"
    ]


def test_each_stage_trains_on_the_users_own_files(
    user_world: Path, trained_tokenizer: Path, pretrained, chat_model: Path, tmp_path: Path
) -> None:
    spec = load_spec(user_world)
    tok = AutoTokenizer.from_pretrained(trained_tokenizer)
    short = dict(train={"max_steps": 4, **FAST, "batch_size": 4})

    def trained(module, stage, model: Path):
        stage = stage.model_copy(
            update={**short, "template": "chatml", "train": stage.train.model_copy(update=short["train"])}
        )
        prepared = module.prepare(stage, tok)
        result = module.run(
            stage,
            StageInputs(model, trained_tokenizer, prepared.datasets, reference=tmp_path / stage.name),
            tmp_path / stage.name,
        )
        return prepared, result

    prepared, result = trained(pretrain, spec.stages[0], TINY)
    assert prepared.counts["train_source/0-notes.md/rows"] == len(SUBJECTS)  # a paragraph each
    assert prepared.counts["train_source/1-lines.txt/rows"] == len(SUBJECTS)  # a line each
    assert math.isfinite(result.metrics["train_loss"])
    prepared, result = trained(sft, spec.stages[1], pretrained.checkpoint)
    assert result.counts["train_rows"] > 0 and math.isfinite(result.metrics["train_loss"])
    prepared, result = trained(dpo, spec.stages[2], chat_model)
    assert len(prepared.datasets["train"]) == 16 and math.isfinite(result.metrics["train_loss"])
    prepared, result = trained(kto, spec.stages[3], chat_model)
    assert prepared.counts["train_source/0-feedback.json/rows"] == len(SUBJECTS)
    assert math.isfinite(result.metrics["train_loss"])


def test_the_run_records_each_source_as_a_dataset_with_its_origin(user_world: Path, tmp_path: Path) -> None:
    from tasks.lineage import log_data_inputs

    spec = load_spec(user_world)
    mlflow, run_id = stage_run(tmp_path)
    log_data_inputs(mlflow, run_id, {"train": spec.stages[1].data})
    given = {d.dataset.name: d.dataset for d in mlflow.get_run(run_id).inputs.dataset_inputs}
    hub = given["hf:someone/chats (train)"]
    assert hub.source_type == "hugging_face" and json.loads(hub.source)["revision"] == "1234abcd" * 5
    assert given["alpaca.json"].source_type == "local" and len(given) == 6
