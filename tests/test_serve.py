"""`lifecycle serve`: a LoRA stage of the quick run answers the official openai client as `generate` answers, streamed
and not, and a chatml reply's tool calls read back as the API's tool_calls."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from stages.common.generation import ChatModel, Sampling
from stages.common.templates import read_replies

from .conftest import QUICK, use_home

QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(quick_run, tmp_path_factory):
    """`lifecycle serve examples/quick.yaml:dpo` (an adapter, served on its base) as a user starts it: (openai
    client, the checkpoint served)."""
    import openai

    root, runs = quick_run
    port = free_port()
    env = os.environ | {"LIFECYCLE_HOME": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    log = tmp_path_factory.mktemp("serve") / "serve.out"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", f"{QUICK}:dpo", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60)
    try:
        deadline = time.monotonic() + 120  # imports and a model load, on a machine that may be busy
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert server.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the server did not come up:\n" + log.read_text()
                time.sleep(0.5)
        with pytest.MonkeyPatch.context() as monkeypatch:
            use_home(monkeypatch, root)
            from flows.cli import _served_model

            checkpoint = _served_model(f"{QUICK}:dpo")[3]
        yield client, checkpoint, log
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_serve_lists_its_model_and_answers_as_generate_does(served) -> None:
    client, checkpoint, log = served
    assert [model.id for model in client.models.list()] == ["quick/dpo"]
    assert "serving quick/dpo at http://127.0.0.1:" in log.read_text()
    assert (checkpoint / "adapter_config.json").exists()  # a LoRA stage: its adapter, applied to the base on load

    local = ChatModel.load(checkpoint)
    expected = local.reply([QUESTION], Sampling(max_new_tokens=12))[0]
    answer = client.chat.completions.create(model="quick/dpo", messages=QUESTION, max_tokens=12, temperature=0)
    choice = answer.choices[0]
    assert choice.message.content.strip() == expected.text.strip()
    assert choice.finish_reason == ("stop" if expected.stopped else "length")
    assert answer.usage.completion_tokens == expected.tokens

    streamed = client.chat.completions.create(
        model="quick/dpo", messages=QUESTION, max_tokens=12, temperature=0, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces).strip() == expected.text.strip()

    # a stop string ends the reply early; a model not served is refused
    first_word = expected.text.split()[0]
    stopped = client.chat.completions.create(
        model="quick/dpo", messages=QUESTION, max_tokens=12, temperature=0, stop=[first_word]
    )
    assert stopped.choices[0].finish_reason == "stop" and len(stopped.choices[0].message.content) < len(expected.text)
    import openai

    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="other", messages=QUESTION, max_tokens=4)
    assert "pinned to 'quick/dpo'" in refused.value.response.text


def test_a_chatml_reply_reads_back_as_text_and_tool_calls(trained_tokenizer: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(trained_tokenizer)
    assert tokenizer.response_template is not None  # stored with the chatml template since it carries one
    tokenizer.response_template = None
    read_replies(tokenizer)  # a checkpoint saved before gets it when served
    prompt = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    calls = (
        'Looking it up.\n<tool_call>\n{"name": "population", "arguments": {"country": "Zorbia"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "population", "arguments": {"country": "Melia"}}\n</tool_call><|im_end|>'
    )
    parsed = tokenizer.parse_response(tokenizer(calls, add_special_tokens=False).input_ids, prefix=prompt)
    assert parsed["content"] == "Looking it up."
    assert [call["function"] for call in parsed["tool_calls"]] == [
        {"name": "population", "arguments": {"country": "Zorbia"}},
        {"name": "population", "arguments": {"country": "Melia"}},
    ]
    plain = tokenizer.parse_response(tokenizer("5.<|im_end|>", add_special_tokens=False).input_ids, prefix=prompt)
    assert plain == {"role": "assistant", "content": "5."}
