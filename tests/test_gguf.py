"""GGUF export on tiny Llama and Qwen2 folders: the file read back by gguf-py's reader and by transformers' GGUF
loader (an implementation of llama.cpp's layout that is not ours) gives the checkpoint's tensors, logits and tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

import tasks.gguf as gguf_export
from schemas.architectures import init_config
from schemas.spec import ModelInit
from tasks.gguf import check_gguf, deinterleave_rope, interleave_rope, write_gguf

IDS = [[1, 87, 85, 329, 201, 42, 308, 78, 81, 314, 2, 201]]


def model_folder(folder: Path, tokenizer_dir: Path, arch: str, tied: bool, seed: int = 0, **save) -> Path:
    """A 2-layer, 64-wide model of `arch` saved as `lifecycle export` saves one: safetensors, the tokenizer with its
    chat template, and a generation config that stops at EOS and at the end of a turn."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    init = ModelInit(arch=arch, hidden_size=64, layers=2, heads=4, kv_heads=2, max_seq_len=128, tie_embeddings=tied)
    config = init_config(init, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.save_pretrained(folder, safe_serialization=True, **save)
    tokenizer.save_pretrained(folder)
    return folder


def metadata(reader: gguf.GGUFReader, key: str):
    return reader.get_field(key).contents()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_round_trip(arch, tied, trained_tokenizer, tmp_path):
    folder = model_folder(tmp_path / "model", trained_tokenizer, arch, tied)
    out = write_gguf(folder, tmp_path / "model.gguf")

    assert out == tmp_path / "model.gguf" and sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.gguf"]
    reader = gguf.GGUFReader(out)
    config = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert metadata(reader, "general.architecture") == arch
    assert {key: metadata(reader, f"{arch}.{key}") for key in ("block_count", "context_length", "vocab_size")} == {
        "block_count": 2,
        "context_length": 128,
        "vocab_size": len(tokenizer),
    }
    assert metadata(reader, f"{arch}.embedding_length") == 64
    assert metadata(reader, f"{arch}.feed_forward_length") == config["intermediate_size"]
    assert metadata(reader, f"{arch}.attention.head_count") == 4
    assert metadata(reader, f"{arch}.attention.head_count_kv") == 2
    assert metadata(reader, f"{arch}.rope.freq_base") == 10000.0
    assert metadata(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert metadata(reader, "tokenizer.ggml.model") == "gpt2"
    assert metadata(reader, "tokenizer.ggml.pre") == "gpt2"  # the pipeline's BPE splits as GPT-2 does
    assert metadata(reader, "tokenizer.ggml.tokens") == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    control, normal = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL
    # <|endoftext|>, <|im_start|>, <|im_end|>, then the bytes
    assert metadata(reader, "tokenizer.ggml.token_type")[:4] == [control, control, control, normal]
    merges = json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    assert metadata(reader, "tokenizer.ggml.merges") == [" ".join(pair) for pair in merges]
    assert metadata(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert metadata(reader, "tokenizer.ggml.eot_token_id") == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert metadata(reader, "tokenizer.chat_template") == tokenizer.chat_template

    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert ("output.weight" in tensors) is not tied
    assert len(tensors) == 3 + 9 * 2 - tied + (3 * 2 if arch == "qwen2" else 0)  # embedding, norm, output; q/k/v biases
    model = AutoModelForCausalLM.from_pretrained(folder)
    embedding = tensors["token_embd.weight"].data
    assert np.array_equal(embedding, model.get_input_embeddings().weight.detach().numpy())
    q_rows = torch.from_numpy(np.array(tensors["blk.0.attn_q.weight"].data))
    q_proj = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert torch.equal(deinterleave_rope(q_rows, 4) if arch == "llama" else q_rows, q_proj)

    # transformers reads llama.cpp's layout (names, metadata, Llama's interleaved q and k) with code of its own
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name)
    with torch.no_grad():
        assert torch.equal(loaded(torch.tensor(IDS)).logits, model(torch.tensor(IDS)).logits)
    if arch == "llama":  # for qwen2 transformers applies Qwen2's own split whatever tokenizer.ggml.pre says
        text = "<|im_start|>user\nHello there, 1234?<|im_end|>\n"
        from_file = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
        assert from_file(text).input_ids == tokenizer(text).input_ids


def test_rope_interleaving_gives_llama_cpp_rotation_the_same_scores():
    """q·k after Hugging Face's rotation (each head's halves rotated against each other) equals q·k after llama.cpp's
    (neighbouring pairs rotated) on the interleaved rows: the attention a GGUF Llama computes is the checkpoint's."""
    heads, head_dim, width, position = 2, 8, 6, 5.0
    torch.manual_seed(0)
    wq, wk, x = torch.randn(heads * head_dim, width), torch.randn(heads * head_dim, width), torch.randn(width)
    angles = position * 10000.0 ** (-torch.arange(head_dim // 2) / (head_dim // 2))
    cos, sin = torch.cos(angles), torch.sin(angles)

    def halves_rotated(vector):  # per head: (a, b) -> (a cos - b sin, b cos + a sin)
        a, b = vector.reshape(heads, 2, head_dim // 2).unbind(1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def pairs_rotated(vector):  # per head: (a0, b0, a1, b1, ...) rotated pair by pair
        a, b = vector.reshape(heads, head_dim // 2, 2).unbind(-1)
        return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).reshape(heads, head_dim)

    hf = (halves_rotated(wq @ x) * halves_rotated(wk @ x)).sum(-1)
    ggml = (pairs_rotated(interleave_rope(wq, heads) @ x) * pairs_rotated(interleave_rope(wk, heads) @ x)).sum(-1)
    torch.testing.assert_close(ggml, hf)
    assert torch.equal(deinterleave_rope(interleave_rope(wq, heads), heads), wq)


@pytest.mark.parametrize(
    ("source", "dtype", "written"),
    [
        (torch.bfloat16, "checkpoint", gguf.GGMLQuantizationType.BF16),
        (torch.float16, "checkpoint", gguf.GGMLQuantizationType.F16),
        (torch.bfloat16, "f32", gguf.GGMLQuantizationType.F32),
    ],
    ids=["bf16", "f16", "bf16-as-f32"],
)
def test_float_types_and_shards(source, dtype, written, trained_tokenizer, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(trained_tokenizer)
    folder = tmp_path / "model"
    model = AutoModelForCausalLM.from_config(
        init_config(ModelInit(hidden_size=64, layers=2, heads=4, max_seq_len=128), vocab_size=len(tokenizer))
    ).to(source)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="40KB")
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").exists()

    out = write_gguf(folder, tmp_path / "model.gguf", dtype=dtype)  # checks every value against the shards

    types = {tensor.name: tensor.tensor_type for tensor in gguf.GGUFReader(out).tensors}
    assert types["token_embd.weight"] == types["blk.1.attn_q.weight"] == written
    assert types["blk.1.attn_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_check_names_the_first_mismatch(trained_tokenizer, tmp_path):
    out = write_gguf(model_folder(tmp_path / "a", trained_tokenizer, "llama", tied=False), tmp_path / "a.gguf")
    other = model_folder(tmp_path / "b", trained_tokenizer, "llama", tied=False, seed=1)
    with pytest.raises(ValueError, match=r"a\.gguf: .* differs from .*b's"):
        check_gguf(out, other)
    qwen = model_folder(tmp_path / "c", trained_tokenizer, "qwen2", tied=False)
    with pytest.raises(ValueError, match="architecture llama, and .* holds a qwen2 model"):
        check_gguf(out, qwen)


def test_unsupported_architecture_is_refused_before_writing(trained_tokenizer, tmp_path):
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512)).save_pretrained(folder)
    shutil.copytree(trained_tokenizer, folder, dirs_exist_ok=True)
    with pytest.raises(
        ValueError, match=r"gpt2: the model is a GPT2LMHeadModel .* LlamaForCausalLM and Qwen2ForCausalLM"
    ):
        write_gguf(folder, tmp_path / "model.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_tokenizer_not_byte_level_bpe_is_refused_before_writing(trained_tokenizer, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = model_folder(tmp_path / "model", trained_tokenizer, "llama", tied=True)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(512)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(folder / "tokenizer.json"))
    refusal = r"not a byte-level BPE \(its model is WordLevel, its pre-tokenizer Whitespace\)"
    with pytest.raises(ValueError, match=refusal):
        write_gguf(folder, tmp_path / "model.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_write_leaves_no_file(trained_tokenizer, tmp_path, monkeypatch):
    folder = model_folder(tmp_path / "model", trained_tokenizer, "qwen2", tied=True)
    written = []

    def failing_check(path: Path, folder: Path) -> None:
        written.append(path.stat().st_size)
        raise ValueError(f"{path}: blk.0.attn_q.weight differs")

    monkeypatch.setattr(gguf_export, "check_gguf", failing_check)
    with pytest.raises(ValueError, match="differs"):
        write_gguf(folder, tmp_path / "model.gguf")
    assert written[0] > 0 and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
