"""An exported model folder as one GGUF file, the format llama.cpp, Ollama and LM Studio load.

Written with gguf-py's own writer and tensor-name map, so the names and keys are the ones llama.cpp reads. Two
architectures are supported, the two the pipeline trains and adopts: LlamaForCausalLM and Qwen2ForCausalLM (llama.cpp's
`llama` and `qwen2`); every other one is refused, as is a tokenizer that is not a byte-level BPE llama.cpp can
reproduce, and a RoPE scaling or sliding window llama.cpp's architecture would not apply. Everything is read and
checked before a byte is written. No quantization: tensors keep the checkpoint's float type (F32, F16 or BF16; 1-D
tensors as F32, as llama.cpp's own converter writes them) or are all written as F32, so the file holds exactly the
checkpoint's values, and `check_gguf` compares them for equality.

The file is written beside its destination (`<name>.partial`), read back and compared with the folder, and only then
renamed into place: a GGUF file that exists is whole and matches its checkpoint.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import torch
from safetensors import safe_open

# the Hugging Face architectures written, as gguf-py names them
ARCHITECTURES = {"LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA, "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2}
SUPPORTED = " and ".join(ARCHITECTURES)

# The pre-tokenizer splits llama.cpp implements, by the name it knows each by (`tokenizer.ggml.pre`): a byte-level BPE
# splits text with a regex before merging, and llama.cpp does not read the regex from the file, so a split it does not
# know by name would tokenize differently there. GPT-2's is ByteLevel's own (use_regex), the others a Split before it.
GPT2_PRE = "gpt2"
SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}

# safetensors' float types, as GGUF's and as the numpy arrays the writer stores (BF16 as its raw bits: numpy has none)
FLOAT_TYPES = {
    "F32": gguf.GGMLQuantizationType.F32,
    "F16": gguf.GGMLQuantizationType.F16,
    "BF16": gguf.GGMLQuantizationType.BF16,
}
NUMPY_TYPES = {
    gguf.GGMLQuantizationType.F32: np.dtype(np.float32),
    gguf.GGMLQuantizationType.F16: np.dtype(np.float16),
    gguf.GGMLQuantizationType.BF16: np.dtype(np.uint16),
}
FILE_TYPES = {
    gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
    gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
    gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
}
# a buffer a checkpoint may carry that is computed from the config, not learned: llama.cpp computes it too
SKIPPED = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Vocab:
    """The tokenizer as llama.cpp's `gpt2` (byte-level BPE) tokenizer reads it."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special: dict[str, int]  # bos, eos, pad, eot: the ids the folder names
    add_bos: bool
    add_eos: bool
    chat_template: str | list[dict[str, str]] | None  # tokenizer_config.json may hold named templates


@dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor and what it becomes in the file."""

    source: str  # its name in the safetensors
    shard: Path
    name: str  # its GGUF name
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    rope_heads: int | None  # heads whose rows are interleaved for llama.cpp's rotation (Llama's q and k), else None


@dataclass(frozen=True)
class Checkpoint:
    """A model folder, read and checked: everything `write_gguf` writes, but the tensors' values."""

    folder: Path
    config: dict[str, Any]
    arch: gguf.MODEL_ARCH
    tensors: list[Tensor]
    vocab: Vocab


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _field(config: dict[str, Any], name: str, folder: Path) -> Any:
    if config.get(name) is None:
        raise ValueError(f"{folder}/config.json has no {name}, which the GGUF metadata needs")
    return config[name]


def _architecture(folder: Path, config: dict[str, Any]) -> gguf.MODEL_ARCH:
    """The GGUF architecture of the folder's model; anything llama.cpp would run differently is refused here."""
    names = config.get("architectures") or [config.get("model_type", "an unnamed architecture")]
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise ValueError(
            f"{folder}: the model is a {', '.join(map(str, names))} (config.json), and GGUF export supports "
            f"{SUPPORTED} only (llama.cpp's llama and qwen2); convert the exported Hugging Face folder with "
            "llama.cpp's convert_hf_to_gguf.py instead"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(
            f"{folder}: the {names[0]} uses RoPE scaling {kind!r}, and GGUF export writes plain RoPE only "
            "(its file would run with different positions)"
        )
    if config.get("use_sliding_window"):
        raise ValueError(f"{folder}: the {names[0]} uses sliding-window attention, which llama.cpp's qwen2 ignores")
    return ARCHITECTURES[names[0]]


def _steps(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A tokenizer.json pre-tokenizer as its list of steps."""
    if pre is None:
        return []
    return (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]


def _pre_tokenizer(steps: list[dict[str, Any]]) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer's split, or None where it is not one llama.cpp knows."""
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel":
        return GPT2_PRE if steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space") else None
    if len(steps) != 2:
        return None
    split, byte_level = steps
    if (
        split.get("type") != "Split"
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or byte_level.get("type") != "ByteLevel"
        or byte_level.get("use_regex", True)
        or byte_level.get("add_prefix_space")
    ):
        return None
    regex = (split.get("pattern") or {}).get("Regex")
    return next((name for name, known in SPLITS.items() if regex == known), None)


def _token_id(value: Any, ids: dict[str, int]) -> int | None:
    """A special token of tokenizer_config.json (its text, or the older {"content": ...}) as an id."""
    content = value.get("content") if isinstance(value, dict) else value
    return ids.get(content) if isinstance(content, str) else None


def read_vocab(folder: Path, vocab_size: int) -> Vocab:
    """The folder's tokenizer as llama.cpp's byte-level BPE reads it, padded to the model's embedding rows as
    llama.cpp's converter pads (rows no token uses: `[PAD<id>]`, unused)."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.exists():
        raise ValueError(f"{folder}: no tokenizer.json; GGUF export needs a byte-level BPE tokenizer in that format")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    steps = _steps(spec.get("pre_tokenizer"))
    byte_level = any(step.get("type") == "ByteLevel" for step in steps)
    if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
        raise ValueError(
            f"{folder}: the tokenizer is not a byte-level BPE (its model is {model.get('type')}"
            f"{' with byte fallback' if model.get('byte_fallback') else ''}, its pre-tokenizer "
            f"{', '.join(str(step.get('type')) for step in steps) or 'none'}), and GGUF export writes byte-level BPE "
            "tokenizers only (llama.cpp's gpt2 tokenizer), as GPT-2, Llama 3, Qwen2 and the pipeline's own are"
        )
    if (pre := _pre_tokenizer(steps)) is None:
        raise ValueError(
            f"{folder}: the tokenizer is a byte-level BPE whose pre-tokenizer split is not one llama.cpp knows by name "
            f"(it knows {GPT2_PRE}'s and the Split regexes of {', '.join(SPLITS)}); llama.cpp would split "
            "text differently from the model's own tokenizer"
        )
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, index in [*model["vocab"].items(), *((t["content"], t["id"]) for t in spec.get("added_tokens", []))]:
        if index >= vocab_size:
            raise ValueError(
                f"{folder}: the tokenizer's token {text!r} has id {index}, past the model's {vocab_size} embedding rows"
            )
        tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    ids = {text: index for index, text in enumerate(tokens) if text is not None}

    config = _json(folder / "config.json")
    tokenizer_config = _json(folder / "tokenizer_config.json")
    special = {}
    for kind in ("bos", "eos", "pad"):
        index = _token_id(tokenizer_config.get(f"{kind}_token"), ids)
        index = index if index is not None else config.get(f"{kind}_token_id")
        if isinstance(index, int):
            special[kind] = index
    # the export's generation config stops at the end of a turn as well as at EOS: llama.cpp's end-of-turn token
    stops = _json(folder / "generation_config.json").get("eos_token_id")
    stops = stops if isinstance(stops, list) else [stops]
    turn_end = next((i for i in stops if isinstance(i, int) and i != special.get("eos")), None)
    if turn_end is not None:
        special["eot"] = turn_end

    # whether encoding adds BOS / EOS is the tokenizer's post-processor's business: ask it, unless the config says
    runtime = Tokenizer.from_file(str(path))
    plain, full = runtime.encode("a", add_special_tokens=False).ids, runtime.encode("a").ids
    added_bos = len(full) > len(plain) and full[0] == special.get("bos")
    added_eos = len(full) > len(plain) and full[-1] == special.get("eos")
    chat_template = tokenizer_config.get("chat_template")
    if chat_template is None and (folder / "chat_template.jinja").exists():
        chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return Vocab(
        pre=pre,
        tokens=[text if text is not None else f"[PAD{index}]" for index, text in enumerate(tokens)],
        types=[int(kind) for kind in types],
        merges=[merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])],
        special=special,
        add_bos=bool(tokenizer_config.get("add_bos_token", added_bos)),
        add_eos=bool(tokenizer_config.get("add_eos_token", added_eos)),
        chat_template=chat_template,
    )


def _shards(folder: Path) -> dict[str, Path]:
    """Each safetensors tensor's file: the one model.safetensors, or the shards its index names."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {name: folder / file for name, file in _json(index)["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise ValueError(f"{folder}: no model.safetensors or model.safetensors.index.json to convert")
    with safe_open(single, framework="pt") as weights:
        return dict.fromkeys(weights.keys(), single)


def read_checkpoint(folder: Path, dtype: Literal["checkpoint", "f32"] = "checkpoint") -> Checkpoint:
    """Everything about the folder GGUF export needs, checked: it raises before anything is written."""
    config = _json(folder / "config.json")
    if not config:
        raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json)")
    arch = _architecture(folder, config)
    layers, heads = _field(config, "num_hidden_layers", folder), _field(config, "num_attention_heads", folder)
    kv_heads = config.get("num_key_value_heads") or heads
    names = gguf.get_tensor_name_map(arch, layers)
    shards = _shards(folder)
    # tied: the output layer is the token embedding, which llama.cpp reuses where the file has no output tensor
    tied = config.get("tie_word_embeddings", "lm_head.weight" not in shards)
    tensors = []
    with ExitStack() as stack:
        opened = {shard: stack.enter_context(safe_open(shard, framework="pt")) for shard in set(shards.values())}
        for source, shard in shards.items():
            if source.endswith(SKIPPED) or (tied and source == "lm_head.weight"):
                continue
            name = names.get_name(source, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ValueError(f"{folder}: tensor {source} has no {arch.name.lower()} GGUF name in gguf's tensor map")
            view = opened[shard].get_slice(source)
            if view.get_dtype() not in FLOAT_TYPES:
                raise ValueError(
                    f"{folder}: tensor {source} is {view.get_dtype()}; GGUF export writes F32, F16 and BF16 checkpoints"
                )
            shape = tuple(view.get_shape())
            keep = dtype == "checkpoint" and len(shape) > 1
            rope_heads = None
            if arch == gguf.MODEL_ARCH.LLAMA and source.endswith(("q_proj.weight", "q_proj.bias")):
                rope_heads = heads
            elif arch == gguf.MODEL_ARCH.LLAMA and source.endswith(("k_proj.weight", "k_proj.bias")):
                rope_heads = kv_heads
            qtype = FLOAT_TYPES[view.get_dtype()] if keep else gguf.GGMLQuantizationType.F32
            tensors.append(Tensor(source, shard, name, shape, qtype, rope_heads))
    vocab = read_vocab(folder, _field(config, "vocab_size", folder))
    return Checkpoint(folder, config, arch, tensors, vocab)


def interleave_rope(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Llama's q or k rows as llama.cpp's `llama` rotates them. Hugging Face's Llama rotates each head's first half of
    dimensions against its second half (rotate_half); llama.cpp rotates neighbouring pairs, so within each head the
    rows (a0 … a(n-1), b0 … b(n-1)) become (a0, b0, a1, b1, …). Qwen2 is run with the halves' rotation (NEOX) and
    needs none."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, 2, half, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def deinterleave_rope(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `interleave_rope`: a file's rows back in Hugging Face's order."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _as_array(values: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """A tensor as the numpy array the writer stores (`NUMPY_TYPES`)."""
    if qtype == gguf.GGMLQuantizationType.BF16:
        return values.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return values.to(torch.float16 if qtype == gguf.GGMLQuantizationType.F16 else torch.float32).contiguous().numpy()


def _metadata(writer: gguf.GGUFWriter, checkpoint: Checkpoint) -> None:
    config, folder, vocab = checkpoint.config, checkpoint.folder, checkpoint.vocab
    heads = _field(config, "num_attention_heads", folder)
    head_dim = config.get("head_dim") or _field(config, "hidden_size", folder) // heads
    rope = config.get("rope_parameters") or {}
    writer.add_name(folder.name)
    matrices = [tensor.qtype for tensor in checkpoint.tensors if len(tensor.shape) > 1]
    writer.add_file_type(FILE_TYPES[max(set(matrices), key=matrices.count)])
    writer.add_context_length(_field(config, "max_position_embeddings", folder))
    writer.add_embedding_length(_field(config, "hidden_size", folder))
    writer.add_block_count(_field(config, "num_hidden_layers", folder))
    writer.add_feed_forward_length(_field(config, "intermediate_size", folder))
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(_field(config, "rms_norm_eps", folder)))
    writer.add_vocab_size(len(vocab.tokens))

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "pad": writer.add_pad_token_id,
        "eot": writer.add_eot_token_id,
    }
    for kind, index in vocab.special.items():
        adders[kind](index)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def write_gguf(folder: Path, out: Path, *, dtype: Literal["checkpoint", "f32"] = "checkpoint") -> Path:
    """Write the model folder `folder` as the GGUF file `out` (replacing one there) and return `out`. `dtype`:
    "checkpoint" keeps each tensor's float type (1-D tensors as F32), "f32" writes them all as F32."""
    checkpoint = read_checkpoint(folder, dtype)
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[checkpoint.arch])
    try:
        _metadata(writer, checkpoint)
        for tensor in checkpoint.tensors:
            stored = NUMPY_TYPES[tensor.qtype]
            nbytes = int(np.prod(tensor.shape)) * stored.itemsize
            writer.add_tensor_info(tensor.name, tensor.shape, stored, nbytes, raw_dtype=tensor.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # one tensor in memory at a time, in the order their infos were added
        with ExitStack() as stack:
            shards = {t.shard: stack.enter_context(safe_open(t.shard, framework="pt")) for t in checkpoint.tensors}
            for tensor in checkpoint.tensors:
                values = shards[tensor.shard].get_tensor(tensor.source)
                if tensor.rope_heads is not None:
                    values = interleave_rope(values, tensor.rope_heads)
                writer.write_tensor_data(_as_array(values, tensor.qtype))
        writer.close()
        check_gguf(partial, folder)
        partial.replace(out)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return out


def _values(tensor: Any) -> np.ndarray:
    """A GGUF tensor's values as float32, in numpy's (row-major) shape."""
    shape = tuple(reversed(tensor.shape.tolist()))
    if tensor.tensor_type == gguf.GGMLQuantizationType.BF16:
        bits = np.ascontiguousarray(tensor.data).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.array(tensor.data, dtype=np.float32).reshape(shape)


def check_gguf(path: Path, folder: Path) -> None:
    """Read `path` back and compare it with the model folder it was written from: every tensor there with its shape
    and values (Llama's q and k after undoing their interleaving), the block count, vocabulary size and token list
    the folder's own tokenizer gives. Raises ValueError naming the first mismatch."""
    from transformers import AutoTokenizer

    checkpoint = read_checkpoint(folder)
    config, arch = checkpoint.config, checkpoint.arch
    reader = gguf.GGUFReader(path)

    def field(key: str) -> Any:
        found = reader.get_field(key)
        if found is None:
            raise ValueError(f"{path}: no {key} in the metadata")
        return found.contents()

    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    if (written := field(gguf.Keys.General.ARCHITECTURE)) != arch_name:
        raise ValueError(f"{path}: architecture {written}, and {folder} holds a {arch_name} model")
    expected = {
        gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch_name): config["num_hidden_layers"],
        gguf.Keys.LLM.VOCAB_SIZE.format(arch=arch_name): config["vocab_size"],
    }
    for key, value in expected.items():
        if (written := field(key)) != value:
            raise ValueError(f"{path}: {key} is {written}, and {folder}/config.json says {value}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens = field(gguf.Keys.Tokenizer.LIST)
    if len(tokens) != config["vocab_size"]:
        raise ValueError(f"{path}: {len(tokens)} tokens, and the model has {config['vocab_size']} embedding rows")
    for index, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if tokens[index] != token:
            raise ValueError(f"{path}: token {index} is {tokens[index]!r}, and {folder}'s tokenizer has {token!r}")

    in_file = {tensor.name: tensor for tensor in reader.tensors}
    if extra := sorted(set(in_file) - {tensor.name for tensor in checkpoint.tensors}):
        raise ValueError(f"{path}: tensor {extra[0]} is not in {folder}")
    with ExitStack() as stack:
        shards = {t.shard: stack.enter_context(safe_open(t.shard, framework="pt")) for t in checkpoint.tensors}
        for tensor in checkpoint.tensors:
            if tensor.name not in in_file:
                raise ValueError(f"{path}: no tensor {tensor.name} ({folder}'s {tensor.source})")
            values = _values(in_file[tensor.name])
            if values.shape != tensor.shape:
                raise ValueError(f"{path}: {tensor.name} has shape {values.shape}, {tensor.source} {tensor.shape}")
            if tensor.rope_heads is not None:
                values = deinterleave_rope(torch.from_numpy(values), tensor.rope_heads).numpy()
            source = shards[tensor.shard].get_tensor(tensor.source).to(torch.float32).numpy()
            if not np.array_equal(values, source, equal_nan=True):
                raise ValueError(f"{path}: {tensor.name} differs from {folder}'s {tensor.source}")
