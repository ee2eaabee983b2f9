"""`lifecycle new`: a first spec for a user's model folder and jsonl files, valid as written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from examples.generate import DATA_DIR
from flows.cli import main
from schemas.data import DataError
from schemas.load import load_spec
from schemas.sources import files_of
from schemas.starter import detect_format, starter_spec
from tasks.checks import check_contracts


def model_folder(root: Path, positions: int = 128, chat_template: bool = True) -> Path:
    """What `new` and `validate` read of a checkpoint: its config and its tokenizer's config."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": positions})
    )
    template = {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"} if chat_template else {}
    (root / "tokenizer_config.json").write_text(json.dumps(template))
    return root


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("pretrain.jsonl", "text"),
        ("sft.jsonl", "conversations"),
        ("preference.jsonl", "preference"),
        ("ranked.jsonl", "ranked"),
        ("rl_prompts.jsonl", "prompts"),
    ],
)
def test_each_bundled_file_is_read_as_its_format(name: str, fmt: str) -> None:
    assert detect_format(DATA_DIR / name) == fmt


def test_labelled_replies_are_unpaired_and_a_stray_row_is_named_by_line_and_field(tmp_path: Path) -> None:
    unpaired = tmp_path / "labelled.jsonl"
    unpaired.write_text('{"prompt": "Hi.", "completion": "Hello.", "label": true}\n')
    assert detect_format(unpaired) == "unpaired"
    stray = tmp_path / "chat.jsonl"
    stray.write_text(
        '{"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}\n'
        '{"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": 7}]}\n'
    )
    with pytest.raises(DataError) as caught:
        detect_format(stray)
    assert f"{stray}:2: messages[1].content: must be a string, not a number (read as conversations" in str(caught.value)


def test_the_written_spec_trains_a_stage_per_format_in_order_and_validates_as_written(tmp_path: Path) -> None:
    model = model_folder(tmp_path / "my-model", positions=128)
    data = tmp_path / "data"
    data.mkdir()
    names = ["sft", "sft_heldout", "preference", "preference_heldout", "ranked", "rl_prompts", "pretrain"]
    for name in names:
        shutil.copy(DATA_DIR / f"{name}.jsonl", data / f"{name}.jsonl")
    out = tmp_path / "spec.yaml"
    assert main(["new", str(model), *(str(data / f"{n}.jsonl") for n in names), "-o", str(out)]) == 0

    spec = load_spec(out)  # the spec's own checks: stage order, inputs, the model's positions, the template
    assert [(s.name, s.kind) for s in spec.stages] == [
        ("pretrain", "pretrain"),
        ("sft", "sft"),
        ("dpo", "dpo"),
        ("pro", "pro"),
        ("grpo", "grpo"),
        ("eval", "eval"),
    ]
    stages = {s.name: s for s in spec.stages}
    assert files_of(stages["sft"].heldout) == [data / "sft_heldout.jsonl"] and stages["pro"].heldout == []
    assert stages["sft"].max_len == 128 and stages["pretrain"].packing.block_size == 128  # the model's positions
    assert stages["sft"].lora is not None and stages["pretrain"].lora is None
    assert spec.template == "tokenizer" and spec.model.path == model
    assert sum(checked.rows for checked in check_contracts(spec)) > 0
    assert main(["new", str(model), str(data / "sft.jsonl"), "-o", str(out)]) == 2  # never overwrites


def test_a_tokenizer_without_a_template_gets_chatml_and_no_heldout_means_no_eval(tmp_path: Path) -> None:
    model = model_folder(tmp_path / "m", positions=4096, chat_template=False)
    text = starter_spec("m", model, [DATA_DIR / "sft.jsonl"], tmp_path)
    (tmp_path / "spec.yaml").write_text(text)
    spec = load_spec(tmp_path / "spec.yaml")
    assert spec.template == "chatml" and [s.kind for s in spec.stages] == ["sft"]
    assert spec.stages[0].max_len == 512  # capped for a first run, below the model's 4096 positions


def test_a_heldout_file_without_its_training_file_is_refused(tmp_path: Path) -> None:
    model = model_folder(tmp_path / "m")
    with pytest.raises(DataError, match="is held-out preference data, and no training file of that format"):
        starter_spec("m", model, [DATA_DIR / "sft.jsonl", DATA_DIR / "preference_heldout.jsonl"], tmp_path)


def test_formats_are_detected_in_every_container(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = [{"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}]
    pq.write_table(pa.Table.from_pylist(chat), tmp_path / "chat.parquet")
    (tmp_path / "pairs.json").write_text(
        json.dumps([{"prompt": "Hi.", "chosen": "Hello.", "rejected": "Go."}], indent=2)
    )
    (tmp_path / "book.md").write_text("# A book\n\nIt begins.\n")
    (tmp_path / "alpaca.csv").write_text("instruction,input,output\nAdd 2 and 3.,,5\n")
    found = {name: detect_format(tmp_path / name) for name in ("chat.parquet", "pairs.json", "book.md", "alpaca.csv")}
    assert found == {
        "chat.parquet": "conversations",
        "pairs.json": "preference",
        "book.md": "text",
        "alpaca.csv": "conversations",
    }
