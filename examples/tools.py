"""The toy world's tool, as a spec's `tools` name it (`tools.py:population`, beside the example specs): the lookup
the tool conversations of examples/generate.py call. Each country's number is fixed here, so a prompt's reference
answer (rl_tool_prompts.jsonl) is the number this function gives, which a reply can only know by calling it."""

from __future__ import annotations

import zlib


def population(country: str) -> int:
    """How many people live in a country today."""
    return 1000 + zlib.crc32(country.encode()) % 99000
