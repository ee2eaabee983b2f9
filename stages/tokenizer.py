"""The tokenizer stage: a byte-level BPE trained on the spec's own text, chat template inside.

Byte-level means every string encodes (no unknown token); the special tokens delimit
documents and chat turns and are never split.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from schemas.spec import TokenizerTrain
from stages.contract import StageResult
from stages.templates import BOS, EOS, IM_END, PAD, SPECIAL_TOKENS, store_template


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
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        additional_special_tokens=[IM_END], model_max_length=1 << 30)
    store_template(tokenizer, template)
    folder = workdir / "tokenizer"
    tokenizer.save_pretrained(folder)
    return StageResult(checkpoint=folder, metrics={"vocab_size": float(len(tokenizer))})


def adopt(path: Path, template: str, workdir: Path) -> StageResult:
    """A user's tokenizer, given the chat tokens and template our stages render with if it lacks them."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or EOS
    store_template(tokenizer, template)
    folder = workdir / "tokenizer"
    tokenizer.save_pretrained(folder)
    return StageResult(checkpoint=folder, metrics={"vocab_size": float(len(tokenizer)), "added_tokens": float(len(missing))})
