"""Tiny local checkpoints as users bring them: five architectures, each with its own tokenizer and template.

    python -m examples.checkpoints llama examples/own/my-llama    # what examples/own/llama3.yaml trains

Nothing is downloaded: each tokenizer is a byte-level BPE trained on the bundled text with its
family's special tokens and chat template, and each model is built from a config with fresh
weights. What differs between them is what a pipeline must cope with:

- llama: untied embeddings, no pad token, BOS added to every encoding, EOS (`<|end_of_text|>`) is
  not the end-of-turn token (`<|eot_id|>`), a Llama-3-style template without `{% generation %}` markers;
- qwen2: tied embeddings, grouped-query attention, a ChatML template of its own, a pad token;
- mistral: `<s>`/`</s>`/`<unk>`, no pad, no chat template (pipelines pick one of theirs);
- phi3: fused qkv and gate_up projections, `<|end|>` ends a turn, pad is EOS;
- gpt2: Conv1D layers, learned positions, one special token for everything, no template.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from examples.generate import DATA_DIR

LLAMA3_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' "
    "-}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' "
    "-}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
PHI3_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)

# family: (config, special tokens, tokenizer's named tokens, chat template)
FAMILIES: dict[str, tuple[dict, list[str], dict[str, str], str | None]] = {
    "llama": (
        dict(
            model_type="llama",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        ),
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
        LLAMA3_TEMPLATE,
    ),
    "qwen2": (
        dict(
            model_type="qwen2",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        ),
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        QWEN2_TEMPLATE,
    ),
    "mistral": (
        dict(
            model_type="mistral",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            sliding_window=None,
        ),
        ["<unk>", "<s>", "</s>"],
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        None,
    ),
    "phi3": (
        dict(
            model_type="phi3",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            pad_token_id=None,
        ),
        ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        PHI3_TEMPLATE,
    ),
    "gpt2": (
        dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=256),
        ["<|endoftext|>"],
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
        None,
    ),
}


def corpus() -> list[str]:
    texts = [json.loads(line)["text"] for line in (DATA_DIR / "pretrain.jsonl").read_text().splitlines()]
    for line in (DATA_DIR / "sft.jsonl").read_text().splitlines():
        texts += [message["content"] for message in json.loads(line)["conversations"]]
    return texts


def build(family: str, folder: Path, vocab_size: int = 384) -> Path:
    """A checkpoint folder of `family` (model, tokenizer and, where the family has one, its chat template)."""
    config, special, named, template = FAMILIES[family]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus(),
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    if family == "llama":  # as Llama 3's does: BOS before every encoding
        bos = named["bos_token"]
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bpe.token_to_id(bos))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, model_max_length=config.get("max_position_embeddings", 256), **named
    )
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    ids = {
        f"{role}_token_id": tokenizer.convert_tokens_to_ids(named[f"{role}_token"])
        for role in ("bos", "eos", "pad")
        if f"{role}_token" in named
    }
    settings = {k: v for k, v in config.items() if k != "model_type"}
    model_config = AutoConfig.for_model(config["model_type"], vocab_size=len(tokenizer), **(settings | ids))
    AutoModelForCausalLM.from_config(model_config).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Build a tiny local checkpoint of one architecture, with its tokenizer."
    )
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    print(f"{args.family} checkpoint written to {build(args.family, args.folder)}")


if __name__ == "__main__":
    main()
