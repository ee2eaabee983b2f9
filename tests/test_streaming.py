"""The streamed pretrain corpus: readers partition it, order is seeded, blocks match `pack`, bad lines are named."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorForLanguageModeling

from examples.generate import DATA_DIR
from schemas.data import DataError
from schemas.spec import ModelInit, PretrainStage, TokenizerTrain, TrainSpec
from stages import pretrain, tokenizer
from stages.common import streaming
from stages.common.recipe import build_model
from stages.common.streaming import StreamingTextDataset, check_corpus
from stages.common.training import make_trainer

TEXTS = [json.loads(line)["text"] for line in (DATA_DIR / "pretrain.jsonl").read_text().splitlines()]

# Spawned, not forked: earlier tests in the same session leave threads running (Prefect's test
# server client, MLflow's sqlite pool), and a forked worker of a threaded process may die at start.
WORKERS = "spawn"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tokenizer.run(TokenizerTrain(vocab_size=512), TEXTS, "chatml", tmp_path_factory.mktemp("tok")).checkpoint
    return AutoTokenizer.from_pretrained(folder)


def write_corpus(folder: Path, texts: list[str], files: int) -> list[Path]:
    """`texts` dealt into `files` jsonl files in order: file i holds a contiguous run."""
    folder.mkdir(parents=True, exist_ok=True)
    per_file = -(-len(texts) // files)
    paths = []
    for i in range(files):
        path = folder / f"part-{i:02d}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[i * per_file : (i + 1) * per_file]))
        paths.append(path)
    return paths


def packed(texts: list[str], tok, block_size: int) -> list[list[int]]:
    """The blocks of the in-memory pretrain path."""
    blocks, _ = pretrain.pack(texts, tok, block_size)
    return blocks["input_ids"]


def documents(dataset: StreamingTextDataset, eos: int) -> list[tuple[int, ...]]:
    """With block_size 1 and no shuffle a reader's stream is its documents' tokens, each closed by EOS."""
    docs, current = [], []
    for example in dataset:
        token = int(example["input_ids"])
        if token == eos:
            docs.append(tuple(current))
            current = []
        else:
            current.append(token)
    assert not current
    return docs


def as_workers(monkeypatch: pytest.MonkeyPatch, worker: int, workers: int) -> None:
    """This process as DataLoader worker `worker` of `workers`, for our reader and for the library alike."""
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=workers))


@pytest.mark.parametrize("files", [3, 6], ids=["fewer-files-than-readers", "more-files-than-readers"])
def test_two_ranks_by_two_workers_see_every_document_once(tok, tmp_path, monkeypatch, files: int) -> None:
    texts = TEXTS[:120]
    paths = write_corpus(tmp_path, texts, files)
    expected = Counter(tuple(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    tokenised: list[int] = []
    tokenize = streaming.tokenize_documents
    monkeypatch.setattr(
        streaming, "tokenize_documents", lambda batch, t: tokenised.append(len(batch)) or tokenize(batch, t)
    )
    seen: list[list[tuple[int, ...]]] = []
    for rank in range(2):
        dataset = StreamingTextDataset(paths, tok, block_size=1, shuffle_buffer=0, rank=rank, world_size=2)
        for worker in range(2):
            as_workers(monkeypatch, worker, 2)
            seen.append(documents(dataset, tok.eos_token_id))
    assert Counter(doc for reader in seen for doc in reader) == expected
    assert sum(tokenised) == len(texts)  # each document tokenised by one reader only, not by every rank
    assert all(len(reader) > 0 for reader in seen)
    assert max(map(len, seen)) - min(map(len, seen)) <= len(texts) // files  # balanced to within one file


@pytest.mark.parametrize("files", [3, 5], ids=["fewer-files-than-readers", "more-files-than-readers"])
def test_real_dataloader_workers_partition_the_shuffled_corpus_and_sum_skips(tok, tmp_path, files: int) -> None:
    paths = write_corpus(tmp_path, TEXTS[:80], files)
    with open(paths[1], "a") as handle:
        handle.write('{"text": ""}\n{"txt": "misspelt"}\n')
    whole = StreamingTextDataset(paths, tok, block_size=1, shuffle_buffer=16, seed=3, on_invalid="skip", world_size=1)
    tokens: Counter[int] = Counter()
    skipped = 0
    for rank in range(2):
        dataset = StreamingTextDataset(
            paths, tok, block_size=1, shuffle_buffer=16, seed=3, on_invalid="skip", rank=rank, world_size=2
        )
        # batched: one transfer per batch, not per token
        for batch in DataLoader(dataset, batch_size=256, num_workers=2, multiprocessing_context=WORKERS):
            tokens.update(batch["input_ids"].flatten().tolist())
        skipped += dataset.skipped  # counted in the workers, read here through shared memory
    assert tokens == Counter(int(example["input_ids"]) for example in whole)
    assert skipped == whole.skipped == 2


def test_persistent_workers_see_the_epoch_set_after_they_started(tok, tmp_path) -> None:
    paths = write_corpus(tmp_path, TEXTS[:60], 2)
    dataset = StreamingTextDataset(paths, tok, block_size=8, shuffle_buffer=32, world_size=1)
    loader = DataLoader(dataset, batch_size=16, num_workers=2, persistent_workers=True, multiprocessing_context=WORKERS)
    epochs = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        epochs.append(torch.cat([batch["input_ids"] for batch in loader]).tolist())
    reference = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        reference.append(
            torch.cat(
                [
                    batch["input_ids"]
                    for batch in DataLoader(dataset, batch_size=16, num_workers=2, multiprocessing_context=WORKERS)
                ]
            ).tolist()
        )
    assert epochs[0] != epochs[1] and epochs == reference


def test_rank_and_world_size_come_from_torch_distributed_unless_given(tok, monkeypatch) -> None:
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    files = [DATA_DIR / "pretrain.jsonl"]
    assert (StreamingTextDataset(files, tok, 64).rank, StreamingTextDataset(files, tok, 64).world_size) == (1, 4)
    explicit = StreamingTextDataset(files, tok, 64, rank=0, world_size=1)
    assert (explicit.rank, explicit.world_size) == (0, 1)
    with pytest.raises(ValueError, match="rank must be in"):
        StreamingTextDataset(files, tok, 64, rank=2, world_size=2)


def test_unshuffled_blocks_equal_pack_of_the_same_documents(tok, tmp_path) -> None:
    texts = TEXTS[:300]
    paths = write_corpus(tmp_path, texts, 3)
    dataset = StreamingTextDataset([str(tmp_path / "part-*.jsonl")], tok, block_size=64, shuffle_buffer=0)
    assert [file.path for file in dataset.files] == paths
    blocks = [example["input_ids"].tolist() for example in dataset]
    assert blocks == packed(texts, tok, 64)
    example = next(iter(dataset))
    assert example["input_ids"].dtype == torch.long and torch.equal(example["labels"], example["input_ids"])


def test_order_is_fixed_by_seed_and_changes_with_epoch(tok, tmp_path) -> None:
    paths = write_corpus(tmp_path, TEXTS[:200], 1)

    def order(seed: int, epoch: int = 0) -> list[list[int]]:
        dataset = StreamingTextDataset(paths, tok, block_size=32, shuffle_buffer=64, seed=seed)
        dataset.set_epoch(epoch)
        return [example["input_ids"].tolist() for example in dataset]

    first = order(seed=7)
    assert first == order(seed=7)
    assert sorted(first) == sorted(packed(TEXTS[:200], tok, 32))  # shuffled after packing: each block once
    assert first != order(seed=8)
    next_epoch = order(seed=7, epoch=1)
    assert next_epoch != first and sorted(next_epoch) == sorted(first)  # one file: the same blocks, reordered
    assert first != [
        example["input_ids"].tolist() for example in StreamingTextDataset(paths, tok, 32, shuffle_buffer=0)
    ]


def test_shuffled_passes_over_several_files_pack_every_token_once(tok, tmp_path) -> None:
    # enough batches per file for a Packer called from several threads at once to show: fed by the library's
    # interleaving of sources (max_buffer_input_shards=10), passes gave 44,983 to 50,181 blocks for 39,836
    paths = write_corpus(tmp_path, TEXTS, 4)
    held = Counter(token for ids in tok(TEXTS, add_special_tokens=False)["input_ids"] for token in ids)
    held[tok.eos_token_id] = len(TEXTS)
    dataset = StreamingTextDataset(paths, tok, block_size=8, shuffle_buffer=64, seed=1)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        blocks = [example["input_ids"].tolist() for example in dataset]
        assert len(blocks) == len(packed(TEXTS, tok, 8))  # the same count in any file order: one tail dropped
        assert not Counter(token for block in blocks for token in block) - held  # no token repeated


BAD_LINES = [
    (b'{"text": "fine"}\n{"text": "cut off\n', 2, "(line): not valid JSON"),
    (b'{"text": "fine"}\n\n{"text": "  "}\n', 3, "text: must not be empty"),
    (b'{"body": "no text"}\n', 1, "text: required"),
    (b'{"text": 5}\n', 1, "text: must be a string, not a number"),
    (b'["text"]\n', 1, "(line): must be a JSON object"),
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', 2, "(line): not valid UTF-8 at byte 13"),
    (b'{"text": "\\ud800 alone"}\n', 1, "text: holds an unpaired surrogate escape"),
    (b'{"text": ' + b"[" * 100_000 + b"\n", 1, "(line): not readable: JSON nested too deeply"),
]


@pytest.mark.parametrize("content, line, message", BAD_LINES, ids=[m.split(": ")[-1] for _, _, m in BAD_LINES])
def test_a_bad_line_is_named_by_file_and_line(tok, tmp_path, content: bytes, line: int, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        list(StreamingTextDataset([path], tok, block_size=4))
    assert f"{path}:{line}: {message}" in str(caught.value)


def test_skip_policy_counts_bad_lines_and_keeps_the_rest(tok, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(streaming, "MAX_TEXT_LINE_BYTES", 1000)
    good = TEXTS[:40]
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"text": t}).encode() for t in good]
    lines[5:5] = [b'{"text": ""}', b"not json", b'{"text": "caf\xe9"}', json.dumps({"text": "long " * 5000}).encode()]
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")  # a BOM and CRLF are fine
    dataset = StreamingTextDataset([path], tok, block_size=16, shuffle_buffer=0, on_invalid="skip")
    assert [example["input_ids"].tolist() for example in dataset] == packed(good, tok, 16)
    assert dataset.skipped == 4
    long = tmp_path / "long.jsonl"
    long.write_bytes(b'{"text": "short"}\n' + lines[8] + b"\n")
    with pytest.raises(
        DataError, match=rf"{long.name}:2: \(line\): is {len(lines[8]):,} bytes, over the 1,000-byte limit"
    ):
        list(StreamingTextDataset([long], tok, block_size=16))


def test_corpus_check_lists_every_problem_and_missing_patterns(tmp_path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": ""}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "two"}\nnot json\n{"text": "three"}\n')
    with pytest.raises(DataError) as caught:
        check_corpus([tmp_path / "*.jsonl"])
    assert "2 problem(s) in 2 data file(s)" in str(caught.value)
    assert f"{tmp_path / 'b.jsonl'}:2: (line): not valid JSON" in str(caught.value)
    counted = check_corpus([tmp_path / "*.jsonl"], on_invalid="skip")
    assert (counted.files, counted.rows, counted.invalid) == (2, 3, 2)
    with pytest.raises(
        DataError, match=r"nothing-\*\.jsonl:0: \(file\): no file has this path or matches this pattern"
    ):
        check_corpus([tmp_path / "nothing-*.jsonl"])


def test_the_trainer_runs_on_the_stream_and_sets_each_epoch(tok, tmp_path) -> None:
    paths = write_corpus(tmp_path / "data", TEXTS[:20], 2)
    dataset = StreamingTextDataset(paths, tok, block_size=32, shuffle_buffer=16, world_size=1)
    blocks_per_epoch = sum(1 for _ in dataset)
    batch = 8
    train = TrainSpec(
        max_steps=blocks_per_epoch // batch + 2,
        batch_size=batch,
        lr=1e-3,
        warmup=0.0,
        precision="fp32",
        save_steps=1000,
    )
    stage = PretrainStage(name="stream", kind="pretrain", data=paths, train=train)
    model = build_model(ModelInit(hidden_size=64, layers=2, heads=2, max_seq_len=64), tok)
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    trainer = make_trainer(stage, model, tok, tmp_path, {"train": dataset}, collator, ())
    output = trainer.train()
    assert trainer.state.global_step == train.max_steps and output.training_loss > 0
    assert dataset.epoch == 1  # the Trainer ran out of blocks once and started epoch 1 through set_epoch
