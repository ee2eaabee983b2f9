"""A rollout with tools, step by step: a reply's call run, its result appended as a tool turn that is not trained,
the reply going on after it, and what a failing, slow, unknown or malformed call gives back. The policy is a scripted
one (it writes the turns given, through the real tokenizer, template and tools), so every token can be checked."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoTokenizer

from schemas.rewards import Tool
from schemas.spec import GRPOStage
from stages.common.generation import Sampling
from stages.common.reward_functions import reward_functions
from stages.common.rollouts import rollout
from stages.common.templates import after_calls, encode_prompt
from stages.common.tools import Toolbox, definition


def population(country: str) -> int:
    """How many people live in a country today.

    The second paragraph is not part of the description."""
    return {"Doluia": 93472}.get(country, 5)


def failing(country: str) -> str:
    """Always fails."""
    raise KeyError(country)


def bundle() -> dict:
    """A value JSON cannot write as it is."""
    return {"ids": {3}}


def exits() -> str:
    """Stops the interpreter, or would."""
    raise SystemExit(3)


def slow(seconds: float = 5.0) -> str:
    """Sleeps."""
    time.sleep(seconds)
    return "done"


class Scripted(torch.nn.Module):
    """A policy that writes the given turns, in order, one per generate call and row (each ended by the end of turn)."""

    def __init__(self, tokenizer, turns: list[list[str]], end: int):
        super().__init__()
        self.turns = [[tokenizer(t, add_special_tokens=False)["input_ids"] + [end] for t in row] for row in turns]
        self.calls = 0
        self.seen: list[list[int]] = []
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    def generate(self, input_ids, attention_mask, generation_config):
        written = []
        for ids, mask in zip(input_ids, attention_mask):
            self.seen.append(ids[mask.bool()].tolist())
        for row in self.active:
            written.append(self.turns[row][self.calls])
        self.calls += 1
        width = max(map(len, written))
        padded = [w + [generation_config.pad_token_id] * (width - len(w)) for w in written]
        return torch.cat([input_ids, torch.tensor(padded)], 1)


def stage(**fields) -> GRPOStage:
    here = f"{__name__}"
    return GRPOStage(
        name="grpo",
        kind="grpo",
        data=["unused.jsonl"],
        template="chatml",
        max_len=fields.pop("max_len", 4096),  # the tools' definitions are long in a 512-token vocabulary
        max_new_tokens=32,
        tools=[
            {"function": f"{here}:population"},
            {"function": f"{here}:failing"},
            {"function": f"{here}:slow", "timeout": 0.2},
            {"function": f"{here}:bundle"},
            {"function": f"{here}:exits"},
        ],
        rewards=[{"kind": "answer"}],
        **fields,
    )


def go_prompt(trained_tokenizer, **fields):
    """The tokenizer, a stage with the test's tools, the end of turn, and one conversation ("Go.") as messages and as
    the prompt the policy continues."""
    tokenizer = AutoTokenizer.from_pretrained(trained_tokenizer)
    spec = stage(**fields)
    tools = Toolbox(spec.tools)
    messages = [[{"role": "user", "content": "Go."}]]
    prompts = [encode_prompt(messages[0], tokenizer, "chatml", tools.definitions)]
    return tokenizer, spec, tools, tokenizer.convert_tokens_to_ids("<|im_end|>"), messages, prompts


CALL = '<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def test_a_call_is_run_its_result_is_an_untrained_tool_turn_and_the_reply_goes_on(trained_tokenizer) -> None:
    tokenizer = AutoTokenizer.from_pretrained(trained_tokenizer)
    spec = stage()
    tools = Toolbox(spec.tools)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    messages = [[{"role": "user", "content": "How many people live in Doluia?"}], [{"role": "user", "content": "Hi"}]]
    prompts = [encode_prompt(m, tokenizer, "chatml", tools.definitions) for m in messages]
    call = CALL.format(name="population", arguments='{"country": "Doluia"}')
    policy = Scripted(tokenizer, [[call, "Doluia has 93472 people."], ["Hello."]], end)
    policy.active = [0, 1]

    original = policy.generate

    def generate(input_ids, attention_mask, generation_config):  # the second turn is the first row's alone
        out = original(input_ids, attention_mask, generation_config)
        policy.active = [0]
        return out

    policy.generate = generate
    rewards = reward_functions(spec.rewards)
    replies = rollout(policy, tokenizer, prompts, messages, ["93472", "Hello"], spec, rewards, tools, Sampling())

    first_turn = tokenizer(call, add_special_tokens=False)["input_ids"] + [end]
    result_turn = after_calls(
        messages[0],
        [{"name": "population", "arguments": {"country": "Doluia"}}],
        ["93472"],
        tokenizer,
        "chatml",
        tools.definitions,
    )
    second_turn = tokenizer("Doluia has 93472 people.", add_special_tokens=False)["input_ids"] + [end]
    assert replies.completions[0] == first_turn + result_turn + second_turn
    assert replies.trained[0] == [1] * len(first_turn) + [0] * len(result_turn) + [1] * len(second_turn)
    # the tool turn as the template writes it, ending in the assistant header the policy continues after
    text = tokenizer.decode(result_turn)
    assert "<tool_response>\n93472\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")
    # the second turn was generated from the prompt, the call and the tool turn
    assert policy.seen[-1] == prompts[0] + first_turn + result_turn
    assert replies.tool_calls == [1, 0] and replies.stopped == [True, True]
    assert replies.total.tolist() == [1.0, 1.0]  # the answer read back; "Hello." contains Hello
    assert "[tool] 93472" in replies.shown[0] and "93472" not in replies.texts[0].split("\n")[0]


@pytest.mark.parametrize(
    ("call", "result"),
    [
        (CALL.format(name="failing", arguments='{"country": "x"}'), "error: failing raised KeyError: 'x'"),
        (CALL.format(name="slow", arguments="{}"), "error: slow ran past its 0.2 s time limit"),
        (
            CALL.format(name="weather", arguments="{}"),
            "error: there is no tool 'weather'; the tools are population, failing, slow, bundle, exits",
        ),
        (
            "<tool_call>\nnot json\n</tool_call>",
            'error: the call is not JSON of the form {"name": ..., "arguments": {...}}',
        ),
        (
            '<tool_call>\n{"name": "population"}\n</tool_call>',
            "error: population raised TypeError: population() missing 1 required positional argument: 'country'",
        ),
        (CALL.format(name="bundle", arguments="{}"), '{"ids": "{3}"}'),
        (CALL.format(name="exits", arguments="{}"), "error: exits raised SystemExit: 3"),
    ],
    ids=["raises", "too-slow", "unknown", "malformed", "no-arguments", "odd-value", "exits"],
)
def test_a_call_that_fails_gives_an_error_result_not_a_crash(trained_tokenizer, call, result) -> None:
    tokenizer, spec, tools, end, messages, prompts = go_prompt(trained_tokenizer, max_tool_turns=1)
    policy = Scripted(tokenizer, [[call, "Sorry."]], end)
    policy.active = [0]
    started = time.monotonic()
    replies = rollout(
        policy, tokenizer, prompts, messages, ["x"], spec, reward_functions(spec.rewards), tools, Sampling()
    )
    assert time.monotonic() - started < 3  # a slow tool is waited for 0.2 s, not 5
    assert f"[tool] {result}" in replies.shown[0] and replies.tool_calls == [1]
    assert replies.texts[0].endswith("Sorry.")


def test_calls_past_max_tool_turns_end_the_reply(trained_tokenizer) -> None:
    tokenizer, spec, tools, end, messages, prompts = go_prompt(trained_tokenizer, max_tool_turns=1)
    call = CALL.format(name="population", arguments='{"country": "Doluia"}')
    policy = Scripted(tokenizer, [[call, call, "never"]], end)
    policy.active = [0]
    replies = rollout(
        policy, tokenizer, prompts, messages, ["x"], spec, reward_functions(spec.rewards), tools, Sampling()
    )
    assert policy.calls == 2 and replies.tool_calls == [1]  # the second call is the reply's end, unanswered
    assert replies.trained[0][-1] == 1  # it ends on the policy's own end of turn


def test_a_tool_is_offered_as_its_function_describes_itself() -> None:
    assert definition(population, "population") == {
        "type": "function",
        "function": {
            "name": "population",
            "description": "How many people live in a country today.",
            "parameters": {"type": "object", "properties": {"country": {"type": "string"}}, "required": ["country"]},
        },
    }
    assert definition(slow, "slow")["function"]["parameters"]["required"] == []

    def odd(when: complex) -> str:
        return ""

    from stages.common.tools import FunctionError

    with pytest.raises(FunctionError, match="tool odd: parameter when is annotated"):
        definition(odd, "odd")
    with pytest.raises(FunctionError, match=r"tool nowhere:missing: cannot import it"):
        Toolbox([Tool(function="nowhere:missing")])


def test_a_call_without_room_left_for_its_result_and_a_reply_ends_the_reply_there(trained_tokenizer) -> None:
    tokenizer, spec, tools, end, messages, prompts = go_prompt(trained_tokenizer)
    call = CALL.format(name="population", arguments='{"country": "Doluia"}')
    written = len(tokenizer(call, add_special_tokens=False)["input_ids"]) + 1
    tight = stage(max_len=len(prompts[0]) + written + spec.max_new_tokens)  # the result's turn does not fit
    policy = Scripted(tokenizer, [[call, "never"]], end)
    policy.active = [0]
    replies = rollout(
        policy, tokenizer, prompts, messages, ["x"], tight, reward_functions(spec.rewards), tools, Sampling()
    )
    assert policy.calls == 1 and replies.stopped == [False] and len(replies.completions[0]) == written
