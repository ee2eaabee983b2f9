"""Packing: documents share rows but never attention, and the row plans are valid and tight."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from examples.generate import DATA_DIR
from schemas.spec import TokenizerTrain
from stages import tokenizer as tokenizer_stage
from stages.common.packing import PackedCollator, best_fit, concat_chunk, pack_examples, tokenize_documents
from stages.common.templates import IGNORE

PAD = 0
VOCAB = 97


def tiny_llama(attention: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=PAD,
    )
    model = LlamaForCausalLM(config).float().eval()
    model.config._attn_implementation = attention
    return model


def documents(lengths: list[int], seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def packed_row(docs: list[list[int]]) -> dict[str, list[int]]:
    return {
        "input_ids": sum(docs, []),
        "labels": sum(docs, []),
        "position_ids": sum((list(range(len(d))) for d in docs), []),
    }


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_document_has_the_logits_it_has_alone(attention: str) -> None:
    model = tiny_llama(attention)
    first, second = documents([7, 11, 5], seed=1), documents([13, 4], seed=2)
    batch = PackedCollator(pad_id=PAD)([packed_row(first), packed_row(second)])  # the second row ends in 6 pads
    assert batch["input_ids"].shape == (2, 23)

    with torch.no_grad():
        packed = model(**batch)
        for row, docs in enumerate([first, second]):
            start = 0
            for doc in docs:  # first, middle and last document of a row, and one before padding
                alone = model(torch.tensor([doc])).logits[0]
                torch.testing.assert_close(packed.logits[row, start : start + len(doc)], alone, atol=1e-5, rtol=0)
                start += len(doc)
    assert torch.isfinite(packed.logits).all() and torch.isfinite(packed.loss)


def test_a_flattened_batch_keeps_documents_apart_too() -> None:
    model = tiny_llama("sdpa")
    first, second = documents([7, 11, 5], seed=1), documents([13, 4], seed=2)
    batch = PackedCollator(pad_id=PAD, flatten=True)([packed_row(first), packed_row(second)])
    assert batch["input_ids"].shape == (1, 40) and batch["position_ids"][0, 23].item() == 0
    with torch.no_grad():
        flat = model(**batch).logits[0]
        alone = model(torch.tensor([second[0]])).logits[0]
    torch.testing.assert_close(flat[23:36], alone, atol=1e-5, rtol=0)


def test_padding_at_the_row_end_leaves_loss_and_gradients_finite() -> None:
    model = tiny_llama("sdpa").train()
    batch = PackedCollator(pad_id=PAD, pad_to_multiple_of=16)(
        [packed_row(documents([3, 2], seed=3)), packed_row(documents([9], seed=4))]
    )
    assert batch["input_ids"].shape == (2, 16)
    model(**batch).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_positions_restart_and_no_document_predicts_the_next_ones_first_token() -> None:
    row = {"input_ids": [11, 12, 13, 21, 22], "labels": [IGNORE, 12, 13, 21, 22], "position_ids": [0, 1, 2, 0, 1]}
    batch = PackedCollator(pad_id=PAD)([row, {"input_ids": [31, 32, 33, 34, 35, 36, 37]}])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]]
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, PAD, PAD], [31, 32, 33, 34, 35, 36, 37]]
    # the loss shifts labels by one, so labels[3] (21) would be predicted from 13, the end of the previous document
    assert batch["labels"].tolist() == [[IGNORE, 12, 13, IGNORE, 22, IGNORE, IGNORE], [IGNORE, 32, 33, 34, 35, 36, 37]]
    assert batch["use_cache"] is False  # a KV cache would switch off transformers' packed-sequence masking


def test_best_fit_golden_case() -> None:
    # longest first: 5 opens row 0 (3 left), 4 opens row 1 (4 left), the first 3 fits row 0 exactly,
    # the second 3 goes to row 1 (1 left), and the 1 closes row 1
    plan = best_fit([5, 4, 3, 3, 1], max_len=8)
    assert plan.rows == [[0, 2], [1, 3, 4]] and (plan.truncated, plan.dropped) == (0, 0)


def test_best_fit_places_every_example_once_within_max_len_and_tightly() -> None:
    rng = random.Random(0)
    for low, high in [(1, 256), (10, 60), (200, 256)]:
        lengths = [rng.randint(low, high) for _ in range(3000)]
        plan = best_fit(lengths, max_len=256)
        assert sorted(i for row in plan.rows for i in row) == list(range(len(lengths)))
        assert max(sum(lengths[i] for i in row) for row in plan.rows) <= 256
        # items over half a row cannot share one, so the bound is the larger of the two counts
        lower_bound = max(math.ceil(sum(lengths) / 256), sum(length > 128 for length in lengths))
        assert len(plan.rows) <= math.ceil(lower_bound * 1.01) + 1
        assert best_fit(lengths, max_len=256) == plan


def test_overlong_examples_are_truncated_or_dropped_and_counted() -> None:
    truncated = best_fit([10, 3, 12, 2], max_len=8, overlong="truncate")
    assert (truncated.truncated, truncated.dropped) == (2, 0)
    assert sorted(i for row in truncated.rows for i in row) == [0, 1, 2, 3]
    dropped = best_fit([10, 3, 12, 2], max_len=8, overlong="drop")
    assert (dropped.truncated, dropped.dropped) == (0, 2) and dropped.rows == [[1, 3]]
    with pytest.raises(ValueError, match="overlong"):
        best_fit([1], max_len=8, overlong="wrap")


def test_pack_examples_keeps_every_example_whole_with_its_labels() -> None:
    input_ids = [list(range(100 + i * 10, 100 + i * 10 + n)) for i, n in enumerate([4, 7, 2, 12, 5])]
    labels = [[IGNORE] * 2 + ids[2:] for ids in input_ids]
    packed = pack_examples(input_ids, labels, max_len=10, overlong="truncate")
    assert (packed.examples, packed.truncated, packed.dropped) == (5, 1, 0)
    assert packed.fill == pytest.approx((4 + 7 + 2 + 10 + 5) / (len(packed.dataset) * 10))

    recovered = []
    for row in packed.dataset:
        assert len(row["input_ids"]) <= 10
        starts = [t for t, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        recovered += [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts, starts[1:])]
    expected = [(ids[:10], lab[:10]) for ids, lab in zip(input_ids, labels)]
    assert sorted(recovered) == sorted(expected)

    assert pack_examples(input_ids, labels, max_len=10, overlong="drop").dropped == 1


def test_concat_chunk_golden_case() -> None:
    blocks = concat_chunk([[1, 2, 3], [4], [5, 6]], eos_id=0, block_size=4)
    # the stream 1 2 3 EOS 4 EOS 5 6 EOS: two full blocks, one tail token dropped
    assert blocks.input_ids.tolist() == [[1, 2, 3, 0], [4, 0, 5, 6]] and blocks.dropped_tokens == 1
    assert blocks.to_dataset()["input_ids"][:] == [[1, 2, 3, 0], [4, 0, 5, 6]]
    exact = concat_chunk([[1, 2], [3]], eos_id=9, block_size=5)
    assert exact.input_ids.tolist() == [[1, 2, 9, 3, 9]] and exact.dropped_tokens == 0
    assert concat_chunk([[1]], eos_id=9, block_size=4).input_ids.shape == (0, 4)


def test_fast_tokenization_matches_the_tokenizer_call(tmp_path: Path) -> None:
    texts = [json.loads(line)["text"] for line in (DATA_DIR / "pretrain.jsonl").read_text().splitlines()[:300]]
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_stage.run(TokenizerTrain(vocab_size=300), texts, "chatml", tmp_path).checkpoint
    )
    assert tokenize_documents(texts, tokenizer) == tokenizer(texts, add_special_tokens=False)["input_ids"]


def test_the_trainer_trains_on_packed_rows(tmp_path: Path) -> None:
    examples = documents([5, 9, 3, 14, 7, 2, 11, 6], seed=5)
    packed = pack_examples(examples, examples, max_len=16)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=tiny_llama("sdpa").train(),
        args=args,
        train_dataset=packed.dataset,
        data_collator=PackedCollator(pad_id=PAD),
    )
    assert math.isfinite(trainer.train().training_loss)
