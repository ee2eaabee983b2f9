"""The tokenizer stage: a byte-level BPE trained on the spec's own text, or the user's own, chat template inside.

Byte-level means every string encodes (no unknown token); the special tokens delimit
documents and chat turns and are never split.

A user's tokenizer is adopted as it is, given only what the pipeline needs and it lacks: the
template's turn markers (chatml's <|im_start|> and <|im_end|>), an EOS where the template ends
replies with one, and a pad token that is never a token a reply is trained to end with (Llama 3
and Mistral ship without one; padding with the end-of-turn token would hide it from a reward
model, which reads each row's last non-pad token). What was added is written beside it
(`ADDED_TOKENS`): the model's embeddings grow by those rows when it loads (stages/common/checkpoint.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from schemas.data import read_source
from schemas.sources import Source
from schemas.spec import PipelineSpec, TokenizerTrain
from stages.common.contract import ADDED_TOKENS, StageResult
from stages.common.streaming import documents
from stages.common.templates import (
    BOS,
    EOS,
    IM_END,
    IM_START,
    OWN_TEMPLATE,
    PAD,
    SPECIAL_TOKENS,
    TEMPLATES,
    end_of_turn_id,
    store_template,
    tool_texts,
)
from stages.common.tools import chats, holds_tools

# tokens that tokenizers in the wild reserve for padding; the first one present is the pad, else "<|pad|>" is added
PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")


def corpus_of(files: list[tuple[Source, str, str]], template: str) -> Iterator[str]:
    """The tokenizer's corpus: pretrain documents (streamed: a corpus may not fit in memory), every message, every
    reply, and a conversation's tools as the template writes them (the definitions with its instructions, the calls:
    text every such conversation repeats)."""
    for source, fmt, on_invalid in files:
        if fmt == "text":
            yield from documents([source], on_invalid)
            continue
        frame = read_source(source, fmt, on_invalid).frame
        for column in ("contents", "prompt_contents", "completions"):
            if column in frame.columns:
                for texts in frame[column]:
                    yield from (text for text in texts if text)
        for column in ("chosen", "rejected"):
            if column in frame.columns:
                yield from (text for text in frame[column] if text)
        if fmt == "conversations" and holds_tools(frame):
            for chat in chats(frame):
                yield from tool_texts(chat, template)


def build(spec: PipelineSpec, workdir: Path) -> StageResult:
    """The spec's tokenizer: the user's, adopted, or one trained on the spec's own text."""
    if spec.tokenizer.path is not None:
        return adopt(spec.tokenizer.path, spec.template, workdir)
    return run(spec.tokenizer.train, corpus_of(spec.tokenizer_corpus(), spec.template), spec.template, workdir)


def run(spec: TokenizerTrain, corpus: Iterable[str], template: str, workdir: Path) -> StageResult:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=spec.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_END],
        model_max_length=1 << 30,
    )
    store_template(tokenizer, template)
    folder = workdir / "tokenizer"
    tokenizer.save_pretrained(folder)
    return StageResult(checkpoint=folder, metrics={"vocab_size": float(len(tokenizer))})


def _safe_pad(tokenizer, turn_end: int) -> str | None:
    """A pad token the tokenizer already has and no reply ends with: its pad, a reserved one, or its unknown token."""
    unsafe = {turn_end, tokenizer.eos_token_id, tokenizer.bos_token_id}
    vocab = tokenizer.get_vocab()
    for token in (tokenizer.pad_token, *PAD_NAMES, tokenizer.unk_token):
        if token is not None and token in vocab and vocab[token] not in unsafe:
            return token
    return None


def adopt(path: Path, template: str, workdir: Path) -> StageResult:
    """A user's tokenizer, given what the template and padding need and it lacks; what was added is recorded beside
    it."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = tokenizer.get_vocab()
    added: list[str] = []
    if template == "chatml":
        added += [t for t in (IM_START, IM_END) if t not in vocab]
        if added:
            tokenizer.add_special_tokens({"extra_special_tokens": added}, replace_extra_special_tokens=False)
    elif template != OWN_TEMPLATE and "{eos}" in TEMPLATES[template].reply and tokenizer.eos_token is None:
        added.append(EOS if EOS not in vocab else "</s>")
        tokenizer.add_special_tokens({"eos_token": added[-1]})
    store_template(tokenizer, template)
    pad = _safe_pad(tokenizer, end_of_turn_id(tokenizer, template))
    if pad is None:
        pad = "<|pad|>"
        added.append(pad)
    tokenizer.add_special_tokens({"pad_token": pad})
    folder = workdir / "tokenizer"
    tokenizer.save_pretrained(folder)
    (folder / ADDED_TOKENS).write_text(
        json.dumps({token: tokenizer.convert_tokens_to_ids(token) for token in added}, indent=2)
    )
    return StageResult(
        checkpoint=folder, metrics={"vocab_size": float(len(tokenizer)), "added_tokens": float(len(added))}
    )
