"""Sources as users already have them: files of any container, folders, Hub datasets from the local cache,
LLaMA-Factory's dataset_info.json, column mapping, mixing; each read, validated and trained on by one stage."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from schemas.formats import Shape
from schemas.load import SpecError, load_spec
from schemas.mixing import mixed
from schemas.sources import Source, Unresolved, resolve
from schemas.spec import Mix
from tasks.keys import file_digest, source_digests

ALPACA = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Reverse the word.", "input": "cat", "output": "tac", "system": "Be brief."},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def spec_with(tmp_path: Path, data: object, **top: object) -> Path:
    """A spec of one SFT stage from a model folder-free init, its data as given."""
    spec = {
        "name": "sources",
        "model": {"init": {"hidden_size": 64, "layers": 2, "heads": 2, "max_seq_len": 128}},
        "stages": [
            {
                "name": "pretrain",
                "kind": "pretrain",
                "data": str(write_jsonl(tmp_path / "text.jsonl", [{"text": "a"}])),
                "packing": {"block_size": 128},
            },
            {"name": "sft", "kind": "sft", "data": data, "max_len": 128},
        ],
        **top,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))
    return path


def test_a_string_is_a_path_or_a_hub_id_and_a_source_names_one_place() -> None:
    assert Source.model_validate("data/x.jsonl").path == Path("data/x.jsonl")
    assert Source.model_validate("hf:owner/name").hf == "owner/name"
    with pytest.raises(ValueError, match="exactly one of path, hf or dataset"):
        Source.model_validate({"path": "x.jsonl", "hf": "o/n"})
    with pytest.raises(ValueError, match=r"tags \['speaker_tag'\] are unknown"):
        Source.model_validate({"path": "x.jsonl", "tags": {"speaker_tag": "who"}})


def test_columns_rename_the_users_columns_and_a_missing_one_is_named() -> None:
    source = Source(path=Path("x.jsonl"), columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    row = source.mapped({"question": "q", "good": "g", "bad": "b", "id": 7})
    assert row == {"prompt": "q", "chosen": "g", "rejected": "b", "id": 7}
    with pytest.raises(Shape) as err:
        source.mapped({"question": "q", "good": "g"})
    assert err.value.field == "bad" and "the row has: good, question" in err.value.rule
    optional = Source(path=Path("x.jsonl"), columns={"instruction": "q", "input": "context"})
    assert optional.mapped({"q": "Add 2 and 3."}) == {"instruction": "Add 2 and 3."}  # as a row without input


def test_tags_rename_sharegpt_keys_and_speakers_as_llama_factory_does() -> None:
    source = Source(
        path=Path("x.jsonl"),
        tags={"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    )
    row = source.mapped({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    assert row["messages"] == [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]


def test_a_file_a_glob_and_what_is_missing(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.jsonl"):
        write_jsonl(tmp_path / "d" / name, ALPACA)
    assert resolve(Source(path=Path("d/*.jsonl")), tmp_path, None).files == [
        tmp_path / "d" / "a.jsonl",
        tmp_path / "d" / "b.jsonl",
    ]
    with pytest.raises(Unresolved, match="matches no file"):
        resolve(Source(path=Path("d/*.parquet")), tmp_path, None)
    with pytest.raises(SpecError, match=r"stages\[1\]\.data\[0\]: nope.jsonl does not exist"):
        load_spec(spec_with(tmp_path, "nope.jsonl"))


def test_save_to_disk_folders_and_a_dataset_dict_split(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "one"))
    DatasetDict({"train": Dataset.from_list(ALPACA), "test": Dataset.from_list(ALPACA[:1])}).save_to_disk(
        str(tmp_path / "dict")
    )
    (file,) = resolve(Source(path=Path("one")), tmp_path, None).files
    assert file.suffix == ".arrow" and file.parent == tmp_path / "one"
    (file,) = resolve(Source(path=Path("dict"), split="test"), tmp_path, None).files
    assert file.parent == tmp_path / "dict" / "test"
    with pytest.raises(Unresolved, match="has no split 'validation'; it has train, test"):
        resolve(Source(path=Path("dict"), split="validation"), tmp_path, None)


def dataset_repository(folder: Path) -> Path:
    """A dataset repository as the Hub has them: data files, and a card naming two configs' files per split."""
    write_jsonl(folder / "data" / "train-00000.jsonl", ALPACA)
    write_jsonl(folder / "data" / "test-00000.jsonl", ALPACA[:1])
    write_jsonl(folder / "short" / "all.jsonl", ALPACA[1:])
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
        "  - split: test\n    path: data/test-*\n- config_name: short\n  data_files: short/*.jsonl\n---\n# a card\n"
    )
    return folder


def test_a_dataset_repository_folder_by_its_cards_configs_and_splits(tmp_path: Path) -> None:
    repo = dataset_repository(tmp_path / "repo")
    assert resolve(Source(path=repo), tmp_path, None).files == [repo / "data" / "train-00000.jsonl"]
    assert resolve(Source(path=repo, split="test"), tmp_path, None).files == [repo / "data" / "test-00000.jsonl"]
    assert resolve(Source(path=repo, config="short"), tmp_path, None).files == [repo / "short" / "all.jsonl"]
    with pytest.raises(Unresolved, match="'nope' not found"):
        resolve(Source(path=repo, config="nope"), tmp_path, None)


def hub_cache(cache: Path, repo_id: str, commit: str = "c0ffee" * 6 + "abcd") -> Path:
    """A Hub dataset in a Hugging Face cache, laid out as huggingface_hub lays out what it downloaded."""
    folder = cache / f"datasets--{repo_id.replace('/', '--')}"
    dataset_repository(folder / "snapshots" / commit)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    return folder / "snapshots" / commit


def test_a_hub_dataset_is_read_from_the_cache_at_its_commit_and_never_fetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = hub_cache(tmp_path / "hub", "someone/things")
    found = resolve(Source.model_validate("hf:someone/things"), tmp_path, None)
    assert found.files == [snapshot / "data" / "train-00000.jsonl"]
    assert found.revision == snapshot.name  # the commit read, so new data upstream is a new digest
    with pytest.raises(Unresolved) as err:
        resolve(Source(hf="someone/other", revision="v2"), tmp_path, None)
    message = str(err.value)
    assert "someone/other at revision v2 is not in the local Hugging Face cache" in message
    assert "hf download someone/other --repo-type dataset --revision v2" in message


def test_llama_factory_dataset_info_names_files_hub_ids_columns_and_tags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_cache(tmp_path / "hub", "someone/things")
    write_jsonl(tmp_path / "data" / "qa.jsonl", [{"q": "Add 2 and 3.", "a": "5"}])
    write_jsonl(tmp_path / "data" / "chat.jsonl", [{"dialog": [{"role": "user", "content": "hi"}]}])
    info = {
        "qa": {"file_name": "qa.jsonl", "columns": {"prompt": "q", "response": "a"}},
        "chat": {
            "file_name": "chat.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "dialog"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        },
        "hub": {"hf_hub_url": "someone/things", "split": "test"},
    }
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(info))
    base = Path("data/dataset_info.json")
    qa = resolve(Source(dataset="qa"), tmp_path, base)
    assert qa.files == [tmp_path / "data" / "qa.jsonl"]
    assert qa.columns == {"instruction": "q", "output": "a"}
    chat = resolve(Source(dataset="chat", info=base), tmp_path, None)
    assert chat.columns == {"conversations": "dialog"} and chat.tags["user_tag"] == "user"
    hub = resolve(Source(dataset="hub"), tmp_path, base)
    assert hub.hf == "someone/things" and hub.files[0].name == "test-00000.jsonl"
    with pytest.raises(Unresolved, match="has no dataset 'gone'; it has qa, chat, hub"):
        resolve(Source(dataset="gone"), tmp_path, base)


def test_a_plain_files_digest_is_its_contents_and_reading_settings_change_it(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", ALPACA)
    assert source_digests([Source(path=path)]) == [file_digest(path)]  # finished stages of older specs stay reused
    mapped = source_digests([Source(path=path, columns={"output": "answer"})])
    weighted = source_digests([Source(path=path, weight=2.0)])
    assert len({file_digest(path), mapped[0], weighted[0]}) == 3


def test_mixing_concatenates_by_weight_or_interleaves_until_one_or_all_run_out() -> None:
    a, b = pl.DataFrame({"x": list(range(10))}), pl.DataFrame({"x": list(range(100, 104))})
    frame, used = mixed([a, b], [2.0, 0.5], Mix(seed=1))
    assert used == [20, 2] and frame["x"].to_list()[:20] == list(range(10)) * 2
    assert set(frame["x"].to_list()[20:]) <= set(range(100, 104))
    assert mixed([a, b], [2.0, 0.5], Mix(seed=1))[0].equals(frame)  # seeded
    frame, used = mixed([a, b], [1.0, 1.0], Mix(strategy="interleave"))
    assert used[1] == 4 and used[0] < 10  # stopped when b ran out
    assert frame.filter(pl.col("x") >= 100)["x"].to_list() == [100, 101, 102, 103]
    frame, used = mixed([a, b], [1.0, 1.0], Mix(strategy="interleave", until="all_exhausted"))
    assert used[0] == 10 and used[1] >= 4  # b started over until a ran out too
    assert frame.filter(pl.col("x") < 100)["x"].to_list() == list(range(10))
