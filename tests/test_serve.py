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

from flows.cli import main
from stages.common.generation import ChatModel, Sampling
from stages.common.templates import read_replies

from .conftest import QUICK, cli_env, use_home

QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(source: str, env: dict[str, str], log: Path):
    """`lifecycle serve SOURCE` as a user starts it, once it answers: (its process, an openai client of it)."""
    import openai

    port = free_port()
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", source, "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60)
    deadline = time.monotonic() + 120  # imports and a model load, on a machine that may be busy
    while True:
        try:
            client.models.list()
            return server, client
        except openai.APIConnectionError:
            if server.poll() is not None or time.monotonic() > deadline:
                stop(server)
                raise AssertionError("the server did not come up:\n" + log.read_text()) from None
            time.sleep(0.5)


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def served(quick_run, tmp_path_factory):
    """`lifecycle serve examples/quick.yaml:dpo` (an adapter, served on its base): (openai client, the checkpoint
    served, the server's output)."""
    root, runs = quick_run
    env = os.environ | {"LIFECYCLE_HOME": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    log = tmp_path_factory.mktemp("serve") / "serve.out"
    server, client = start(f"{QUICK}:dpo", env, log)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            use_home(monkeypatch, root)
            from flows.cli import _served_model

            checkpoint = _served_model(f"{QUICK}:dpo")[3]
        yield client, checkpoint, log
    finally:
        stop(server)


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


def test_an_exported_folder_is_served_with_no_store_and_answers_the_same(
    served, quick_run, tmp_path: Path, monkeypatch
) -> None:
    client, _, _ = served
    root, _ = quick_run
    use_home(monkeypatch, root)
    out = tmp_path / "dpo-export"
    assert main(["export", f"{QUICK}:dpo", str(out)]) == 0
    gone = tmp_path / "no-store"  # a home and a store that do not exist: the folder is all the server reads
    env = cli_env(gone) | {"MLFLOW_TRACKING_URI": f"sqlite:///{gone / 'nothing.db'}"}
    server, exported = start(str(out), env, tmp_path / "export.out")
    try:
        assert [model.id for model in exported.models.list()] == ["dpo-export"]
        asked = dict(messages=QUESTION, max_tokens=12, temperature=0)
        theirs = exported.chat.completions.create(model="dpo-export", **asked).choices[0].message.content
        assert theirs == client.chat.completions.create(model="quick/dpo", **asked).choices[0].message.content
    finally:
        stop(server)
    assert not list(gone.rglob("*.db"))  # no store was opened (the command makes the home folder, and only that)


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
