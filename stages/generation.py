"""Greedy answers through the chat template, batched with left padding."""

from __future__ import annotations

import torch

from stages.templates import encode_prompt, end_of_turn_id


@torch.no_grad()
def answer(model, tokenizer, prompts: list[list[dict]], template: str, max_new_tokens: int = 32, batch_size: int = 32) -> list[str]:
    """The model's greedy reply to each conversation-so-far, rendered as in training, stopping at the end of its turn."""
    stop = end_of_turn_id(tokenizer, template)
    model.eval()
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(messages, tokenizer, template) for messages in prompts[start:start + batch_size]]
        width = max(map(len, encoded))
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in encoded])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        output = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                pad_token_id=tokenizer.pad_token_id)
        replies += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return [reply.strip() for reply in replies]


def exact_match(model, tokenizer, conversations: list[list[dict]], template: str) -> float:
    """Share of conversations whose last assistant turn the model reproduces exactly."""
    if not conversations:
        return float("nan")
    replies = answer(model, tokenizer, [c[:-1] for c in conversations], template)
    return sum(r == c[-1]["content"].strip() for r, c in zip(replies, conversations)) / len(conversations)
