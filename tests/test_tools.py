"""Tool calling end to end: conversations with tools read, rendered as Qwen2.5/Hermes do (text, tokens, the stored
Jinja), trained on calls and answers only, refused by templates that cannot show them, and scored by the eval stage."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer

from schemas.data import read_files
from schemas.sources import Source, resolve
from schemas.spec import EvalStage, SFTStage, TrainSpec
from stages import eval as eval_stage
from stages import sft
from stages.common.contract import StageInputs
from stages.common.templates import IGNORE, TEMPLATES, conversations, encode_conversation, encode_prompt, store_template
from stages.common.tools import Chat, calls_match, chats, parsed_calls, tool_call_accuracy
from stages.tokenizer import corpus_of

from .conftest import FAST

# a calculator, as OpenAI and TRL rows define a tool
MULTIPLY = {
    "type": "function",
    "function": {
        "name": "multiply",
        "description": "Multiply two whole numbers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
TOOLS = [MULTIPLY]


def tool_conversation(rng: random.Random, a: int, b: int) -> dict:
    """A product asked, the calculator called with the question's numbers, its result and the answer: a TRL row."""
    messages = [{"role": "system", "content": "Answer in one sentence."}] if rng.random() < 0.3 else []
    call = {"type": "function", "function": {"name": "multiply", "arguments": {"a": a, "b": b}}}
    messages += [
        {"role": "user", "content": f"What is {a} times {b}?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": str(a * b)},
        {"role": "assistant", "content": f"{a} times {b} equals {a * b}."},
    ]
    return {"conversations": messages, "tools": TOOLS}


CALL = {"type": "function", "function": {"name": "multiply", "arguments": {"a": 12, "b": 34}}}
CHAT = [
    {"role": "user", "content": "What is 12 times 34?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "408"},
    {"role": "assistant", "content": "12 times 34 equals 408."},
]
DEFINITIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(MULTIPLY)
    + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)
CALL_TEXT = '<tool_call>\n{"name": "multiply", "arguments": {"a": 12, "b": 34}}\n</tool_call>'
# Qwen3's rendering of CHAT offered TOOLS (Qwen2.5's but for its default system message: with none given, the system
# turn holds only the tools)
GOLDEN = (
    f"<|im_start|>system\n{DEFINITIONS}<|im_end|>\n<|im_start|>user\nWhat is 12 times 34?<|im_end|>\n"
    f"<|im_start|>assistant\n{CALL_TEXT}<|im_end|>\n"
    "<|im_start|>user\n<tool_response>\n408\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n12 times 34 equals 408.<|im_end|>\n"
)
# conversations the stored Jinja must render token for token as training does, with the tools they offer
WITH_TOOLS = [
    (CHAT, TOOLS),
    ([{"role": "system", "content": "Be brief."}, *CHAT], TOOLS),
    (
        [  # text before the calls, two calls at once and their two results in one turn, then a second round
            {"role": "user", "content": "Multiply 2 by 3 and 4 by 5. ü {content}"},
            {
                "role": "assistant",
                "content": "Both at once.",
                "tool_calls": [
                    {"type": "function", "function": {"name": "multiply", "arguments": {"a": 2, "b": 3}}},
                    {"type": "function", "function": {"name": "multiply", "arguments": {"a": 4, "b": 5}}},
                ],
            },
            {"role": "tool", "content": "6"},
            {"role": "tool", "content": "20"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "content": "408"},
            {"role": "assistant", "content": "6, 20 and 408."},
        ],
        TOOLS,
    ),
    (CHAT[:1] + [{"role": "assistant", "content": "No tool needed."}], TOOLS),  # offered, not called
]


@pytest.fixture
def tok(trained_tokenizer: Path):
    return AutoTokenizer.from_pretrained(trained_tokenizer)


def trained_spans(tok, input_ids: list[int], labels: list[int]) -> list[str]:
    """The text of each run of labelled tokens; a label is its token or IGNORE, nothing else."""
    assert all(label in (IGNORE, token) for token, label in zip(input_ids, labels))
    spans, run = [], []
    for token, label in zip(input_ids, labels):
        if label == IGNORE and run:
            spans.append(tok.decode(run))
            run = []
        elif label != IGNORE:
            run.append(token)
    return spans + ([tok.decode(run)] if run else [])


# ---------------------------------------------------------------- rendering and labels


def test_chatml_renders_tools_calls_and_results_as_qwen_does_and_trains_calls_and_answers(tok) -> None:
    input_ids, labels = encode_conversation(CHAT, tok, max_len=4096, tools=TOOLS)
    assert tok.decode(input_ids) == GOLDEN
    # the call and the answer, each with its end-of-turn marker; the tools, the question and the result are context
    assert trained_spans(tok, input_ids, labels) == [f"{CALL_TEXT}<|im_end|>", "12 times 34 equals 408.<|im_end|>"]
    result = tok("<tool_response>\n408\n</tool_response>", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(input_ids)) if input_ids[i : i + len(result)] == result)
    assert labels[start : start + len(result)] == [IGNORE] * len(result)
    # a system message comes first in the system turn, the tools after it
    with_system, _ = encode_conversation([{"role": "system", "content": "Be brief."}, *CHAT], tok, 4096, tools=TOOLS)
    assert tok.decode(with_system).startswith(f"<|im_start|>system\nBe brief.\n\n{DEFINITIONS}<|im_end|>\n")


def test_the_prompt_before_a_call_ends_where_the_trained_call_begins(tok) -> None:
    prompt = encode_prompt(CHAT[:1], tok, "chatml", TOOLS)
    input_ids, labels = encode_conversation(CHAT, tok, max_len=4096, tools=TOOLS)
    assert input_ids[: len(prompt)] == prompt and tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert labels[len(prompt) - 1] == IGNORE and labels[len(prompt)] != IGNORE
    # after the tool's result, the prompt is the whole turn of results and the assistant header
    after_result = encode_prompt(CHAT[:3], tok, "chatml", TOOLS)
    assert tok.decode(after_result).endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_prompts_before_each_turn_and_the_tokenizer_template_render_tools_as_training(tok) -> None:
    store_template(tok, "chatml")
    for messages, tools in WITH_TOOLS:
        input_ids, _ = encode_conversation(messages, tok, max_len=1 << 20, tools=tools)
        assert list(tok.apply_chat_template(messages, tools=tools, tokenize=True)["input_ids"]) == input_ids
        for end in (i for i, m in enumerate(messages) if m["role"] == "assistant"):
            prompt = tok.apply_chat_template(messages[:end], tools=tools, tokenize=True, add_generation_prompt=True)
            assert list(prompt["input_ids"]) == encode_prompt(messages[:end], tok, "chatml", tools)
    # the tokenizer template (a user's Qwen-like template: here ours, stored) finds the same spans, tools passed on
    for messages, tools in WITH_TOOLS:
        assert encode_conversation(messages, tok, 4096, "tokenizer", tools) == encode_conversation(
            messages, tok, 4096, "chatml", tools
        )


@pytest.mark.parametrize("template", [name for name, spec in TEMPLATES.items() if spec.tools is None])
def test_templates_without_tools_refuse_them_by_name(tok, template: str) -> None:
    refusal = f"the {template} template cannot show tools.*use the chatml template.*or the tokenizer template"
    with pytest.raises(ValueError, match=refusal):
        encode_conversation(CHAT, tok, 512, template, TOOLS)
    with pytest.raises(ValueError, match=refusal):  # calls without definitions are refused too
        encode_conversation(CHAT, tok, 512, template)
    with pytest.raises(ValueError, match=refusal):
        encode_prompt(CHAT[:1], tok, template, TOOLS)
    store_template(tok, template)
    with pytest.raises(TemplateError, match=f"the {template} template cannot show tools"):
        tok.apply_chat_template(CHAT[:1], tools=TOOLS, tokenize=False)
    assert encode_conversation(CHAT[:1] + CHAT[-1:], tok, 512, template)  # without tools it renders as ever


def test_a_tokenizer_template_that_ignores_tools_is_refused(tok) -> None:
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(ValueError, match="does not show the tools offered"):
        encode_conversation(CHAT, tok, 4096, "tokenizer", TOOLS)
    with pytest.raises(ValueError, match=r"does not show the tool calls of message 1 \(multiply\)"):
        encode_conversation(CHAT, tok, 4096, "tokenizer")


def test_tool_turns_must_follow_a_call(tok) -> None:
    answered_without_call = [CHAT[0], {"role": "tool", "content": "408"}, CHAT[3]]
    with pytest.raises(ValueError, match="followed by one or more tool turns"):
        encode_conversation(answered_without_call, tok, 512, tools=TOOLS)
    with pytest.raises(ValueError, match="alternating"):  # a call's results come before the next user turn
        encode_conversation([*CHAT[:2], CHAT[0], *CHAT[2:]], tok, 512, tools=TOOLS)


# ---------------------------------------------------------------- reading


def test_conversation_rows_read_with_their_tools_and_calls(tmp_path: Path) -> None:
    rows = [tool_conversation(random.Random(0), 12, 34), {"conversations": CHAT[:1] + CHAT[-1:]}]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    frame = read_files([path], "conversations").frame
    read = chats(frame)
    assert read[0] == Chat(rows[0]["conversations"], TOOLS)
    assert read[1] == Chat(CHAT[:1] + CHAT[-1:], None)
    # a frame from before tools (no calls or tools columns) reads as conversations without them
    assert chats(frame.tail(1).drop("calls", "tools")) == [read[1]]
    with pytest.raises(ValueError, match="hold tools or tool calls"):
        conversations(frame)
    assert conversations(frame.tail(1)) == [read[1].messages]


def test_the_tokenizer_learns_the_tool_dialect_as_the_template_writes_it(tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"conversations": CHAT, "tools": TOOLS}) + "\n")
    source = resolve(Source(path=path), tmp_path, None)
    texts = list(corpus_of([(source, "conversations", "fail")], "chatml"))
    assert DEFINITIONS in texts and CALL_TEXT in texts  # the instructions and the calls, not bare JSON
    assert "What is 12 times 34?" in texts and "408" in texts
    assert DEFINITIONS not in corpus_of([(source, "conversations", "fail")], "llama2")  # it cannot show tools


# ---------------------------------------------------------------- scoring held-out calls


@pytest.mark.parametrize(
    ("reply", "right"),
    [
        (CALL_TEXT, True),
        ('<tool_call>\n{"arguments": {"b": 34, "a": 12}, "name": "multiply"}\n</tool_call>', True),  # keys any order
        ('Let me see.\n<tool_call>{"name": "multiply", "arguments": "{\\"a\\": 12, \\"b\\": 34}"}</tool_call>', True),
        ('<tool_call>\n{"name": "multiply", "arguments": {"a": 12, "b": 43}}\n</tool_call>', False),  # wrong args
        ('<tool_call>\n{"name": "multiply", "arguments": {"a": 12}}\n</tool_call>', False),
        ('<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 34}}\n</tool_call>', False),  # wrong tool
        ("12 times 34 equals 408.", False),  # no call
        ('<tool_call>\n{"name": "multiply", "arguments": {"a": 12, "b": 34}}', False),  # never closed
        ('<tool_call>\n{"name": "multiply", "arguments": {"a": 12, "b": 34}\n</tool_call>', False),  # not JSON
        (CALL_TEXT + "\n" + CALL_TEXT, False),  # one call too many
    ],
)
def test_a_reply_is_right_when_its_calls_equal_the_reference(reply: str, right: bool) -> None:
    assert calls_match(reply, [CALL]) is right


def test_parallel_calls_match_in_any_order_and_the_share_counts_turns() -> None:
    other = {"type": "function", "function": {"name": "multiply", "arguments": {"a": 4, "b": 5}}}
    both = CALL_TEXT + '\n<tool_call>\n{"name": "multiply", "arguments": {"a": 4, "b": 5}}\n</tool_call>'
    assert calls_match(both, [other, CALL]) and not calls_match(CALL_TEXT, [other, CALL])
    assert parsed_calls("<tool_call>[1, 2]</tool_call>") == [None]
    assert tool_call_accuracy([CALL_TEXT, "no call", both], [[CALL], [CALL], [CALL, other]]) == pytest.approx(2 / 3)
    assert math.isnan(tool_call_accuracy([], []))


def test_eval_scores_each_calling_turn_of_the_held_out_conversations(tok, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "heldout.jsonl"
    rng = random.Random(0)
    rows = [tool_conversation(rng, a, b) for a, b in ((12, 34), (56, 78), (90, 12))]
    rows.append({"conversations": CHAT[:1] + CHAT[-1:]})  # no calls: not a calling turn
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = EvalStage(name="eval", kind="eval", conversations=[path], max_len=4096, template="chatml")
    data = eval_stage.held_out(spec, tok)
    assert data.columns(spec) == ["response_loss", "exact_match", "tool_calls"]
    assert [(before.messages, before.tools) for before, _ in data.tool_turns] == [
        (row["conversations"][:-3], TOOLS) for row in rows[:3]
    ]
    # hand-made greedy replies: the right call, a wrong argument, no call at all
    made = {
        "12": CALL_TEXT,
        "56": '<tool_call>\n{"name": "multiply", "arguments": {"a": 56, "b": 87}}\n</tool_call>',
        "90": "90 times 12 equals 1080.",
    }

    def hand_made(model, tokenizer, prompts, template, max_new_tokens, tools=None):
        assert tools == [TOOLS] * len(prompts)
        return [made[re.search(r"\d+", messages[-1]["content"]).group()] for messages in prompts]

    monkeypatch.setattr(eval_stage, "answer", hand_made)
    monkeypatch.setattr(eval_stage, "exact_match", lambda *args, **kwargs: 0.0)
    monkeypatch.setattr(eval_stage, "labelled_logp", lambda *args: (-1.0, 1.0))
    found, _, _ = eval_stage.measure(None, tok, data, spec)
    assert found["tool_calls"] == pytest.approx(1 / 3)
    # held-out conversations without calls have no tool_calls column
    plain = spec.model_copy(update={"conversations": [path]})
    path.write_text(json.dumps(rows[-1]) + "\n")
    assert eval_stage.held_out(plain, tok).columns(plain) == ["response_loss", "exact_match"]


# ---------------------------------------------------------------- a real SFT run


def test_sft_on_tool_conversations_learns_the_calls(trained_tokenizer: Path, pretrained, train_seed, tmp_path) -> None:
    rng = random.Random(train_seed)
    rows = [tool_conversation(rng, rng.randint(10, 99), rng.randint(10, 99)) for _ in range(40)]
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows[:32]))
    heldout.write_text("".join(json.dumps(row) + "\n" for row in rows[32:]))
    spec = SFTStage(
        name="sft-tools",
        kind="sft",
        data=[train],
        heldout=[heldout],
        max_len=1024,
        eval_samples=2,
        template="chatml",
        train=TrainSpec(max_steps=12, seed=train_seed, **(FAST | {"batch_size": 2})),
    )
    tok = AutoTokenizer.from_pretrained(trained_tokenizer)
    prepared = sft.prepare(spec, tok)
    assert prepared.counts["train_truncated"] == 0
    result = sft.run(spec, StageInputs(pretrained.checkpoint, trained_tokenizer, prepared.datasets), tmp_path / "out")
    # measured on CPU, fp32: held-out response loss 6.74 -> 4.71 with seed 0 (6.97 -> 4.70, 6.78 -> 4.67 with seeds 1
    # and 2), falls of 2.0 to 2.3 clearing 1.0 by a whole nat
    assert result.metrics["heldout_loss"] < result.metrics["heldout_loss_before"] - 1.0
    stored = AutoTokenizer.from_pretrained(result.checkpoint)
    assert (
        list(stored.apply_chat_template(CHAT, tools=TOOLS, tokenize=True)["input_ids"])
        == encode_conversation(CHAT, stored, 4096, tools=TOOLS)[0]
    )
