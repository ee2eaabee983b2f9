"""Chat templates: how a conversation becomes tokens, and which tokens are trained.

A conversation is tokenized turn by turn, so the trained spans are exact token ranges
(never recovered from character offsets). The same template is stored in the tokenizer
as a Jinja chat template, so `tokenizer.apply_chat_template` at inference renders a prompt
exactly as training did; a test checks the two agree token for token.
"""

from __future__ import annotations

IGNORE = -100  # label of a token that carries no loss

BOS, EOS, PAD = "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chatml_segments(messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces: each assistant reply and its end marker are trained."""
    pieces: list[tuple[str, bool]] = []
    for message in messages:
        pieces.append((f"{IM_START}{message['role']}\n", False))
        if message["role"] == "assistant":
            pieces.append((f"{message['content']}{IM_END}", True))
            pieces.append(("\n", False))
        else:
            pieces.append((f"{message['content']}{IM_END}\n", False))
    return pieces


def encode_conversation(messages: list[dict], tokenizer, max_len: int) -> tuple[list[int], list[int]]:
    """input_ids and labels (IGNORE outside assistant replies), truncated to max_len tokens."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in chatml_segments(messages):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trained else [IGNORE] * len(ids)
    return input_ids[:max_len], labels[:max_len]


def encode_prompt(messages: list[dict], tokenizer) -> list[int]:
    """The tokens a model continues to answer: the conversation so far plus the assistant header."""
    ids: list[int] = []
    for text, _ in chatml_segments(messages):
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + tokenizer(f"{IM_START}assistant\n", add_special_tokens=False)["input_ids"]
