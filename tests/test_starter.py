"""`lifecycle new`: a first spec for a user's model folder and jsonl files, valid as written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from examples.generate import DATA_DIR
from flows.cli import main
from schemas.data import DataError
from schemas.load import SpecError, load_spec
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
    assert detect_format(DATA_DIR / name).format == fmt


def test_labelled_replies_are_unpaired_and_a_stray_row_is_named_by_line_and_field(tmp_path: Path) -> None:
    unpaired = tmp_path / "labelled.jsonl"
    unpaired.write_text('{"prompt": "Hi.", "completion": "Hello.", "label": true}\n')
    assert detect_format(unpaired) == ("unpaired", 1)
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
    # the reference as an installed tool gives it, not a path in this repository
    assert "`lifecycle spec-doc`" in out.read_text() and "docs/" not in out.read_text()
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
    found = {
        name: detect_format(tmp_path / name).format for name in ("chat.parquet", "pairs.json", "book.md", "alpaca.csv")
    }
    assert found == {
        "chat.parquet": "conversations",
        "pairs.json": "preference",
        "book.md": "text",
        "alpaca.csv": "conversations",
    }


def first_rows(source: Path, n: int, out: Path) -> Path:
    out.write_text("".join(source.read_text().splitlines(keepends=True)[:n]))
    return out


def test_a_file_whose_rows_fit_different_formats_is_refused_with_the_rows_that_differ(tmp_path: Path) -> None:
    pairs = [json.loads(line) for line in (DATA_DIR / "preference.jsonl").read_text().splitlines()[:23]]
    path = tmp_path / "pairs.jsonl"

    def halves(rows: list[dict]) -> list[dict]:
        """Pairs without their rejected reply: rows that fit the prompts format."""
        return [{key: value for key, value in row.items() if key != "rejected"} for row in rows]

    def write(rows: list[dict]) -> None:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    write([*pairs[:4], *halves(pairs[4:5]), *pairs[5:12]])
    model = model_folder(tmp_path / "m")
    out = tmp_path / "spec.yaml"
    with pytest.raises(DataError) as caught:  # one such row once made the file a GRPO stage's, and validate passed
        starter_spec("m", model, [path], tmp_path)
    assert str(caught.value).splitlines()[1] == (
        f"{path}:5: rejected: required; line 5 reads as prompts, not as preference like 11 of the file's 12 rows: "
        "give every row of a file one format, or split the file by format"
    )
    assert main(["new", str(model), str(path), "-o", str(out)]) == 2 and not out.exists()

    write([*pairs[:5], *halves(pairs[5:12])])  # most rows are prompts now: the whole pairs are the rows that differ
    with pytest.raises(DataError) as caught:
        detect_format(path)
    assert str(caught.value).splitlines()[1] == (
        f"{path}:1: (row): lines 1, 2, 3, 4, 5 (5 rows) read as preference, not as prompts like 7 of the file's 12 "
        "rows: give every row of a file one format, or split the file by format"
    )

    write([*pairs[:16], *halves(pairs[16:23])])  # a few rows named, then a count
    with pytest.raises(DataError) as caught:
        detect_format(path)
    assert str(caught.value).splitlines()[1] == (
        f"{path}:17: rejected: required; lines 17, 18, 19, 20, 21 and 2 more (7 rows) read as prompts, not as "
        "preference like 16 of the file's 23 rows: give every row of a file one format, or split the file by format"
    )


def test_a_model_folder_that_does_not_exist_is_refused_unless_a_hub_id_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub.constants

    out = tmp_path / "spec.yaml"
    missing = tmp_path / "no-such-model"
    assert main(["new", str(missing), str(DATA_DIR / "sft.jsonl"), "-o", str(out)]) == 2 and not out.exists()
    assert capsys.readouterr().err == f"error: model: {missing} is not a folder (looked for {missing})\n"

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match="the Hub model someone/tiny at revision main is not in the local Hugging"):
        starter_spec("tiny", Path("someone/tiny"), [DATA_DIR / "sft.jsonl"], tmp_path)
    commit = "0123456789abcdef" * 2 + "01234567"
    repo = tmp_path / "hub" / "models--someone--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    model_folder(repo / "snapshots" / commit, positions=256)
    (tmp_path / "specs").mkdir()
    spec_path = tmp_path / "specs" / "spec.yaml"  # written in another folder: the id is written as the id
    spec_path.write_text(starter_spec("tiny", Path("someone/tiny"), [DATA_DIR / "sft.jsonl"], spec_path.parent))
    assert "model: {path: someone/tiny}  # a Hub model, read from the local Hugging Face cache" in spec_path.read_text()
    spec = load_spec(spec_path)
    assert spec.model.path == repo / "snapshots" / commit and spec.model.revision == commit
    assert spec.template == "tokenizer" and spec.stages[0].max_len == 256  # read from the snapshot


def test_a_few_rows_get_a_batch_and_steps_they_can_fill_and_the_spec_validates(tmp_path: Path) -> None:
    model = model_folder(tmp_path / "m")
    twelve = first_rows(DATA_DIR / "sft.jsonl", 12, tmp_path / "sft.jsonl")
    three = first_rows(DATA_DIR / "preference.jsonl", 3, tmp_path / "pairs.jsonl")
    out = tmp_path / "spec.yaml"
    out.write_text(starter_spec("m", model, [twelve, three, DATA_DIR / "rl_prompts.jsonl"], tmp_path))
    text = out.read_text()
    assert "    # a first run on 12 row(s): 3 passes in batches of 8; more steps need more rows, or it" in text
    trains = {stage.name: stage.train for stage in load_spec(out).stages}
    assert (trains["sft"].batch_size, trains["sft"].max_steps, trains["sft"].logging_steps) == (8, 6, 1)
    assert (trains["dpo"].batch_size, trains["dpo"].max_steps, trains["dpo"].save_steps) == (3, 3, 3)
    assert (trains["grpo"].batch_size, trains["grpo"].max_steps, trains["grpo"].save_steps) == (8, 200, 50)


def test_prepare_warns_when_a_stage_has_fewer_rows_than_one_batch(
    trained_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoTokenizer

    from schemas.spec import SFTStage, TrainSpec
    from stages import sft

    data = first_rows(DATA_DIR / "sft.jsonl", 3, tmp_path / "sft.jsonl")
    tok = AutoTokenizer.from_pretrained(trained_tokenizer)
    spec = SFTStage(name="tiny-sft", kind="sft", data=[data], max_len=128, template="chatml", train=TrainSpec())
    assert len(sft.prepare(spec, tok).datasets["train"]) == 3
    assert capsys.readouterr().err == (
        "prepare tiny-sft: warning: 3 train rows, fewer than one batch (train.batch_size 16): every step trains on "
        "the same 3; give more rows, or set batch_size to 3 or less\n"
    )
    sft.prepare(spec.model_copy(update={"train": TrainSpec(batch_size=3)}), tok)
    assert capsys.readouterr().err == ""
