"""Golden renderings and masks of every chat template, and the Jinja form that makes inference render alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from examples.generate import DATA_DIR
from schemas.spec import TokenizerTrain
from stages import tokenizer as tokenizer_stage
from stages.common.marked import GREEN, render_marked
from stages.common.templates import (
    IGNORE,
    TEMPLATES,
    encode_completion,
    encode_conversation,
    encode_prompt,
    end_of_turn_id,
    jinja,
    store_template,
)

from .test_tools import WITH_TOOLS

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Reverse the letters of cat."},
    {"role": "assistant", "content": "tac"},
]
E = "<|endoftext|>"  # the trained tokenizer's BOS and EOS

# the whole rendering of CHAT, then the text its labels train
GOLDEN = {
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\nReverse the letters of cat.<|im_end|>\n"
        "<|im_start|>assistant\ntac<|im_end|>\n",
        "5<|im_end|>tac<|im_end|>",
    ),
    "llama2": (
        f"{E}[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2 + 3? [/INST] 5 {E}"
        f"{E}[INST] Reverse the letters of cat. [/INST] tac {E}",
        f" 5 {E} tac {E}",
    ),
    "deepseek": (
        f"{E}Be brief.\n\nUser: What is 2 + 3?\n\nAssistant: 5{E}User: Reverse the letters of cat.\n\nAssistant: "
        f"tac{E}",
        f" 5{E} tac{E}",
    ),
    "alpaca": (
        f"Be brief.\n\n### Instruction:\nWhat is 2 + 3?\n\n### Response:\n5{E}"
        f"### Instruction:\nReverse the letters of cat.\n\n### Response:\ntac{E}",
        f"5{E}tac{E}",
    ),
}

# what encode_completion(CHAT[:-1], "tac") trains: the earlier reply "5" is prompt
LAST_REPLY = {"chatml": "tac<|im_end|>", "llama2": f" tac {E}", "deepseek": f" tac{E}", "alpaca": f"tac{E}"}

# conversations whose piece boundaries could tokenize differently from the whole string
HARD = [
    CHAT,
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The capital of Samoria is Uxkel."}],
    [{"role": "user", "content": "Spaces:  "}, {"role": "assistant", "content": "  two leading, one trailing "}],
    [{"role": "user", "content": "lines\n"}, {"role": "assistant", "content": "\n\nafter blank lines\n"}],
    [
        {"role": "user", "content": "braces {content} {eos} {{x}}"},
        {"role": "assistant", "content": "!? {system} ü 中文 😀"},
    ],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Reverse the letters of lamp.", "input": "lamp"},
        {"role": "assistant", "content": "pmal"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    texts = [json.loads(line)["text"] for line in (DATA_DIR / "pretrain.jsonl").read_text().splitlines()]
    return tokenizer_stage.run(
        TokenizerTrain(vocab_size=512), texts, "chatml", tmp_path_factory.mktemp("tok")
    ).checkpoint


@pytest.fixture
def tok(tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def trained_text(tok, input_ids: list[int], labels: list[int]) -> str:
    assert all(label in (IGNORE, token) for token, label in zip(input_ids, labels))
    return tok.decode([token for token, label in zip(input_ids, labels) if label != IGNORE])


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_assistant_turn_is_trained_and_nothing_else(tok, template: str) -> None:
    rendering, trained = GOLDEN[template]
    input_ids, labels = encode_conversation(CHAT, tok, max_len=512, template=template)
    assert tok.decode(input_ids) == rendering
    assert trained_text(tok, input_ids, labels) == trained


@pytest.mark.parametrize("template", TEMPLATES)
def test_the_prompt_ends_where_the_trained_reply_begins(tok, template: str) -> None:
    prompt = encode_prompt(CHAT[:-1], tok, template)
    input_ids, labels = encode_conversation(CHAT, tok, max_len=512, template=template)
    assert input_ids[: len(prompt)] == prompt
    assert labels[len(prompt) - 1] == IGNORE and labels[len(prompt)] != IGNORE


@pytest.mark.parametrize("template", TEMPLATES)
def test_stored_jinja_renders_token_for_token_as_training(tok, template: str) -> None:
    store_template(tok, template)
    # conversations offering tools too, where the template shows them (tests/test_tools.py: the refusals elsewhere)
    for messages, tools in [(m, None) for m in HARD] + (WITH_TOOLS if TEMPLATES[template].tools else []):
        input_ids, _ = encode_conversation(messages, tok, max_len=1 << 20, template=template, tools=tools)
        assert list(tok.apply_chat_template(messages, tools=tools, tokenize=True)["input_ids"]) == input_ids
        prompt = tok.apply_chat_template(messages[:-1], tools=tools, tokenize=True, add_generation_prompt=True)
        assert list(prompt["input_ids"]) == encode_prompt(messages[:-1], tok, template, tools)
        # piece by piece equals the whole string read at once
        rendered = tok.apply_chat_template(messages, tools=tools, tokenize=False)
        assert tok(rendered, add_special_tokens=False)["input_ids"] == input_ids


@pytest.mark.parametrize("template", TEMPLATES)
def test_truncation_keeps_the_first_max_len_tokens(tok, template: str) -> None:
    input_ids, labels = encode_conversation(CHAT, tok, max_len=512, template=template)
    for max_len in (1, 10, len(input_ids) - 1, len(input_ids), len(input_ids) + 5):
        assert encode_conversation(CHAT, tok, max_len=max_len, template=template) == (
            input_ids[:max_len],
            labels[:max_len],
        )
    prompt = encode_prompt(CHAT[:-1], tok, template)
    cut_ids, cut_labels = encode_completion(CHAT[:-1], "tac", tok, max_len=len(prompt), template=template)
    assert cut_ids == prompt and set(cut_labels) == {IGNORE}  # the whole budget went to the prompt: nothing to learn


@pytest.mark.parametrize("template", TEMPLATES)
def test_a_completion_trains_only_itself(tok, template: str) -> None:
    input_ids, labels = encode_completion(CHAT[:-1], "tac", tok, max_len=512, template=template)
    assert input_ids == encode_conversation(CHAT, tok, max_len=512, template=template)[0]
    assert trained_text(tok, input_ids, labels) == LAST_REPLY[template]
    prompt = encode_prompt(CHAT[:-1], tok, template)
    assert labels[: len(prompt)] == [IGNORE] * len(prompt)


def test_alpaca_shows_a_separate_input_under_its_own_heading(tok) -> None:
    messages = HARD[-1]
    input_ids, labels = encode_conversation(messages, tok, max_len=512, template="alpaca")
    assert (
        tok.decode(input_ids)
        == f"S\n\n### Instruction:\nReverse the letters of lamp.\n\n### Input:\nlamp\n\n### Response:\npmal{E}"
    )
    assert trained_text(tok, input_ids, labels) == f"pmal{E}"
    chatml_ids, _ = encode_conversation(messages, tok, max_len=512, template="chatml")
    assert "<|im_start|>user\nReverse the letters of lamp.\nlamp<|im_end|>" in tok.decode(chatml_ids)


@pytest.mark.parametrize("template", TEMPLATES)
def test_the_tokenizer_template_finds_the_same_spans_as_ours(tok, template: str) -> None:
    store_template(tok, template)
    for messages in HARD:
        assert encode_conversation(messages, tok, 512, "tokenizer") == encode_conversation(messages, tok, 512, template)
        assert encode_prompt(messages[:-1], tok, "tokenizer") == encode_prompt(messages[:-1], tok, template)
        assert encode_completion(messages[:-1], "ok", tok, 512, "tokenizer") == encode_completion(
            messages[:-1], "ok", tok, 512, template
        )
    assert end_of_turn_id(tok, "tokenizer") == end_of_turn_id(tok, template)


def test_the_tokenizer_template_needs_a_template_that_keeps_its_prefixes(tok) -> None:
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template|has none"):
        encode_conversation(CHAT, tok, 512, "tokenizer")
    with pytest.raises(ValueError, match="has none"):
        store_template(tok, "tokenizer")
    # the generation prompt says "Assistant:", the rendered turn "assistant:": no prefix to find the reply after
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )
    with pytest.raises(ValueError, match="not prefix-stable"):
        encode_conversation(CHAT, tok, 512, "tokenizer")
    # a prompt ending in a space splits " 5" (one token when read whole) into two
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(ValueError, match="inside a token"):
        encode_conversation(CHAT, tok, 512, "tokenizer")


def test_malformed_conversations_and_unknown_templates_are_refused(tok) -> None:
    with pytest.raises(ValueError, match="alternating"):
        encode_conversation(CHAT[:1] + CHAT[2:], tok, 512)
    with pytest.raises(ValueError, match="alternating"):
        encode_conversation([CHAT[1], CHAT[0], CHAT[2]], tok, 512)
    with pytest.raises(ValueError, match="unknown template"):
        encode_conversation(CHAT, tok, 512, "vicuna")
    with pytest.raises(ValueError, match="tokenizer's own"):
        jinja("tokenizer")


def test_generation_stops_at_each_templates_end_of_turn(tok) -> None:
    assert tok.convert_ids_to_tokens(end_of_turn_id(tok, "chatml")) == "<|im_end|>"
    assert {tok.convert_ids_to_tokens(end_of_turn_id(tok, t)) for t in ("llama2", "deepseek", "alpaca")} == {E}


def test_inspect_marks_the_trained_spans(tok) -> None:
    input_ids, labels = encode_conversation(CHAT, tok, max_len=512)
    assert render_marked(input_ids, labels, tok, colour=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n⟦5<|im_end|>⟧\n<|im_start|>user\nReverse the letters of cat.<|im_end|>\n"
        "<|im_start|>assistant\n⟦tac<|im_end|>⟧\n"
    )
    coloured = render_marked(input_ids, labels, tok, colour=True)
    assert f"{GREEN}tac<|im_end|>" in coloured and "⟦" not in coloured
