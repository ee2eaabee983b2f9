"""What a model learns from an example: its decoded tokens with the trained spans marked.

Trained text is green and context dim on a terminal; in a log (no colour) trained spans are
wrapped in ⟦ ⟧. Special tokens are shown, since the end-of-turn marker is part of what is learned.
"""

from __future__ import annotations

from itertools import groupby

from stages.common.templates import IGNORE

GREEN, DIM, RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"
OPEN, CLOSE = "⟦", "⟧"


def render_marked(input_ids: list[int], labels: list[int], tokenizer, colour: bool) -> str:
    """The decoded example, trained spans marked (green on a terminal, ⟦ ⟧ without colour)."""
    if len(input_ids) != len(labels):
        raise ValueError(f"input_ids and labels differ in length ({len(input_ids)} and {len(labels)})")
    shown: list[str] = []
    # runs are decoded whole, not token by token: a character may span several byte-level tokens
    for trained, run in groupby(zip(input_ids, labels), key=lambda pair: pair[1] != IGNORE):
        text = tokenizer.decode([token for token, _ in run], skip_special_tokens=False)
        if colour:
            shown.append(f"{GREEN if trained else DIM}{text}{RESET}")
        else:
            shown.append(f"{OPEN}{text}{CLOSE}" if trained else text)
    return "".join(shown)
