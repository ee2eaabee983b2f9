"""Your own model: a local checkpoint of each common architecture, with its own tokenizer and template, through
LoRA-SFT (unmerged) -> DPO with LoRA on that adapter -> eval -> generate, under the real flow and MLflow store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from mlflow import MlflowClient

from examples.checkpoints import build
from examples.generate import DATA_DIR
from schemas.load import SpecError, load_spec
from tests.conftest import ROOT, cli_env, use_home

# family: the pipeline template it runs with (its own where it has one) and the tokens the pipeline must add;
# llama (no pad token, EOS is not the end-of-turn token) runs as a user runs it: examples/own/llama3.yaml, by the CLI
FAMILIES = {
    "qwen2": ("tokenizer", []),  # ChatML of its own, a pad token, tied embeddings
    "mistral": ("llama2", []),  # no template: a pipeline one, with the tokenizer's <s> and </s>; pad: <unk>
    # pad is EOS (<|end|> ends a turn): pretraining would mask EOS, so a pad is added
    "phi3": (
        "tokenizer",
        ["<|pad|>"],
    ),
    "gpt2": ("chatml", ["<|im_start|>", "<|im_end|>", "<|pad|>"]),  # one special token for everything
}

SPEC = """
name: own-{family}
model: {{path: {model}}}
tokenizer: {{path: {model}}}
template: {template}
stages:
  - name: sft
    kind: sft
    data: {data}/sft.jsonl
    heldout: {data}/sft_heldout.jsonl
    max_len: 192
    eval_samples: 4
    lora: {{r: 8, alpha: 16, targets: all-linear}}
    train: {{max_steps: 12, batch_size: 8, lr: 0.003, logging_steps: 4, save_steps: 6, precision: fp32}}
  - name: dpo
    kind: dpo
    data: {data}/preference.jsonl
    heldout: {data}/preference_heldout.jsonl
    max_len: 128
    lora: {{r: 4, alpha: 8}}
    train: {{max_steps: 6, batch_size: 4, lr: 0.001, logging_steps: 3, save_steps: 6, precision: fp32}}
  - name: eval
    kind: eval
    checkpoints: [sft, dpo]
    limit: 8
    max_new_tokens: 8
"""


COMMIT = "0123456789abcdef" * 2 + "01234567"


def hub_cache(cache: Path, repo_id: str) -> Path:
    """The snapshot folder a Hugging Face cache keeps `repo_id` at (its main branch at COMMIT), made empty."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


def test_a_hub_model_is_read_from_the_cache_or_named_with_how_to_fetch_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = tmp_path / "spec.yaml"
    body = "name: hub\nmodel: {path: someone/tiny-qwen2, revision: v2}\ntokenizer: {path: someone/tiny-qwen2}\n"
    spec.write_text(body + f"stages: [{{name: sft, kind: sft, max_len: 128, data: {DATA_DIR / 'sft.jsonl'}}}]\n")
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert (
        "model.path: someone/tiny-qwen2 is not a folder here (looked for "
        f"{tmp_path / 'someone' / 'tiny-qwen2'}), and the Hub model someone/tiny-qwen2 at revision v2 is not in the "
        f"local Hugging Face cache ({tmp_path / 'hub'}), and nothing is downloaded while a pipeline runs: on a machine "
        "with a network, fetch it with `hf download someone/tiny-qwen2 --revision v2`, then run again"
    ) in str(err.value)
    snapshot = build("qwen2", hub_cache(tmp_path / "hub", "someone/tiny-qwen2"))
    (snapshot.parent.parent / "refs" / "v2").write_text(COMMIT)  # the tag names the commit the snapshot holds
    resolved = load_spec(spec)
    assert (resolved.model.path, resolved.model.revision, resolved.tokenizer.path) == (snapshot, COMMIT, snapshot)


@pytest.mark.parametrize("family", FAMILIES)
def test_own_checkpoint_goes_through_lora_sft_dpo_eval_and_generate(
    family, prefect_harness, prefect_api, tmp_path, monkeypatch
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.lifecycle import lifecycle
    from stages.common.contract import ADDED_TOKENS, adapter_base
    from tasks.home import Home
    from tasks.keys import folder_digest
    from tasks.registry import fetch_checkpoint

    template, added = FAMILIES[family]
    if family == "qwen2":  # named by its Hub id, read from a Hugging Face cache that holds it
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # and in the commands it runs
        model_dir = build(family, hub_cache(tmp_path / "hub", "someone/tiny-qwen2"))
        named = "someone/tiny-qwen2"
    else:
        model_dir = named = build(family, tmp_path / family)
    original = AutoTokenizer.from_pretrained(model_dir)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(family=family, model=named, template=template, data=DATA_DIR))
    root = tmp_path / "home"
    use_home(monkeypatch, root)
    runs = lifecycle(str(spec))

    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    home = Home(root)
    tokenizer_dir = fetch_checkpoint(mlflow, home, mlflow.get_run(runs["tokenizer"]))
    assert list(json.loads((tokenizer_dir / ADDED_TOKENS).read_text())) == added
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tokenizer) == len(original) + len(added)
    # the pad is none of the tokens a text begins or ends with, nor the end of a turn: padding never hides them
    vocab = tokenizer.get_vocab()
    ends = {tokenizer.bos_token_id, tokenizer.eos_token_id} | {
        vocab[t] for t in ("<|eot_id|>", "<|im_end|>", "<|end|>") if t in vocab
    }
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in ends

    # the SFT adapter names the user's folder, and its digest, as its base; fetched, it still does
    sft_run = mlflow.get_run(runs["sft"])
    assert sft_run.data.tags["lifecycle.base_model"] == str(model_dir)
    assert sft_run.data.tags["lifecycle.base_model_digest"] == folder_digest(model_dir)
    if family == "qwen2":  # the Hub model's id and the commit it was read at are the run's input
        assert sft_run.data.tags["lifecycle.base_model_id"] == "someone/tiny-qwen2"
        assert sft_run.data.tags["lifecycle.base_model_revision"] == COMMIT
    sft = fetch_checkpoint(mlflow, home, sft_run)
    assert adapter_base(sft) == model_dir
    assert sft_run.data.metrics["heldout_loss"] < sft_run.data.metrics["heldout_loss_before"]

    # as the ecosystem loads it: the base resized to the tokenizer, then PEFT; the same model the pipeline loads
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base.resize_token_embeddings(len(tokenizer))
    merged = PeftModel.from_pretrained(base, sft).merge_and_unload()
    from stages.common.checkpoint import load_model

    ours = load_model(sft, tokenizer)
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Where is Mira?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert (merged(**probe).logits - ours(**probe).logits).abs().max() < 1e-4
    # served elsewhere, it renders the same
    assert AutoTokenizer.from_pretrained(sft).chat_template == tokenizer.chat_template

    dpo = mlflow.get_run(runs["dpo"])
    assert dpo.info.status == "FINISHED" and "rewards/accuracy" in dpo.data.metrics
    assert adapter_base(fetch_checkpoint(mlflow, home, dpo)) == sft  # an adapter on the SFT adapter on the user's model
    # the eval's score of each adapter, on its logged model
    for name in ("sft", "dpo"):
        model = mlflow.get_logged_model(mlflow.get_run(runs[name]).data.tags["lifecycle.model_id"])
        assert ("eval/response_loss", runs["eval"]) in {(m.key, m.run_id) for m in model.metrics}, name

    answered = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "generate",
            str(spec),
            "--stage",
            "dpo",
            "--max-new-tokens",
            "6",
            "Where is Mira?",
        ],
        cwd=ROOT,
        env=cli_env(root, prefect_api),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.startswith("> Where is Mira?\n")


def test_shipped_own_model_spec_runs_from_the_command_line_and_answers(prefect_api, tmp_path) -> None:
    """examples/own/llama3.yaml as the README gives it: a Llama-3-style checkpoint, LoRA-SFT, DPO on the adapter, eval,
    generate."""
    from tasks.keys import folder_digest

    own = tmp_path / "examples" / "own"
    own.mkdir(parents=True)
    (tmp_path / "examples" / "data").symlink_to(DATA_DIR)
    spec = own / "llama3.yaml"
    spec.write_text((ROOT / "examples" / "own" / "llama3.yaml").read_text())
    model_dir = build("llama", own / "my-llama")
    root = tmp_path / "home"
    env = cli_env(root, prefect_api)

    def lifecycle(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )

    ran = lifecycle("run", str(spec))
    assert ran.returncode == 0, ran.stderr[-3000:]
    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in mlflow.search_runs([mlflow.get_experiment_by_name("own-llama3").experiment_id])}
    assert {name: r.info.status for name, r in runs.items()} == dict.fromkeys(
        ["own-llama3", "tokenizer", "sft", "dpo", "eval"], "FINISHED"
    )
    assert runs["tokenizer"].data.metrics["added_tokens"] == 1  # a pad: Llama 3 has none, and EOS must stay EOS
    assert runs["sft"].data.tags["lifecycle.base_model"] == str(model_dir)
    assert runs["sft"].data.tags["lifecycle.base_model_digest"] == folder_digest(model_dir)
    assert runs["sft"].data.metrics["heldout_loss"] < runs["sft"].data.metrics["heldout_loss_before"]
    answered = lifecycle("generate", str(spec), "--stage", "dpo", "--max-new-tokens", "8", "Where is Mira?")
    assert answered.returncode == 0, answered.stderr[-3000:]
    assert answered.stdout.startswith("> Where is Mira?\n") and len(answered.stdout.splitlines()) >= 2

    # the base moved away: the spec says so before anything loads, and the adapter names the folder it needs
    model_dir.rename(own / "elsewhere")
    again = lifecycle("generate", str(spec), "--stage", "sft", "Where is Mira?")
    assert again.returncode == 2 and f"model.path: my-llama is not a folder (looked for {model_dir})" in again.stderr
    adapter = next((root / "cache" / "checkpoint").glob("*/adapter_config.json")).parent
    direct = lifecycle("generate", "--checkpoint", str(adapter), "Where is Mira?")
    assert direct.returncode == 2 and f"applies to the base model {model_dir}, which is not there" in direct.stderr


def test_lora_target_that_matches_nothing_names_the_layers_that_exist(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from schemas.spec import LoraSpec
    from stages.common.checkpoint import ModelError, with_lora

    model = AutoModelForCausalLM.from_pretrained(build("phi3", tmp_path / "phi3"))
    with pytest.raises(
        ModelError,
        match=r"lora.targets \['q_proj'\] match no layer of this phi3 model; its adaptable layers are "
        r"\['down_proj', 'gate_up_proj', 'o_proj', 'qkv_proj'\]",
    ):
        with_lora(model, LoraSpec(targets=["q_proj", "qkv_proj"]))
