"""What a model's config can be, read without loading a model: a fresh model's transformers config from
`model.init`, and what a user's checkpoint or tokenizer folder cannot do that a spec asks of it.

Both read configs only (JSON files, or transformers' config classes), so a spec is checked before
any weights load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from schemas.spec import ModelInit, PipelineSpec

# ModelInit's fields as transformers configs name them
CONFIG_NAMES = {
    "hidden_size": "hidden_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "max_seq_len": "max_position_embeddings",
    "tie_embeddings": "tie_word_embeddings",
}


def init_config(init: ModelInit, **fixed) -> PretrainedConfig:
    """The transformers config of a fresh model: the architecture's defaults, the fields it has from `init`, then
    `init.config` and `fixed` (vocabulary size and special token ids). Fields it lacks fail when set explicitly."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if init.arch not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"arch {init.arch!r} is not a transformers architecture with a causal LM head "
            f"(some that are: llama, qwen2, mistral, gemma, phi3, gpt2)"
        )
    defaults = AutoConfig.for_model(init.arch)
    known = set(defaults.to_dict()) | set(defaults.attribute_map)
    derived = {
        "kv_heads": init.kv_heads or init.heads,
        "intermediate_size": init.intermediate_size or -(-init.hidden_size * 8 // 3 // 64) * 64,
    }
    values = {}
    for field, name in CONFIG_NAMES.items():
        if name in known:
            values[name] = derived.get(field, getattr(init, field))
        elif field in init.model_fields_set:
            raise ValueError(
                f"{field}: a {init.arch} config has no {name}; give that architecture's own field in config"
            )
    if "rope_parameters" in known:
        values["rope_parameters"] = {"rope_type": "default", "rope_theta": init.rope_theta}
    if unknown := sorted(set(init.config) - known):
        raise ValueError(
            f"config: {unknown} are not fields of a {init.arch} config (transformers {type(defaults).__name__})"
        )
    return AutoConfig.for_model(init.arch, **(values | init.config | fixed))


# where configs keep the longest sequence the model has positions for, by architecture
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
SCORER_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def own_model_problems(spec: PipelineSpec) -> list[str]:
    """What a user's checkpoint or tokenizer folder cannot do that the spec asks of it, read from their config files
    alone."""
    problems: list[str] = []
    if (path := spec.model.path) is not None:
        config = _json(path / "config.json")
        if not config:
            problems.append(f"model.path: {path} is not a Hugging Face model folder (no readable config.json in it)")
        scorers = [name for name in config.get("architectures") or [] if name.endswith(SCORER_HEADS)]
        if scorers:
            problems.append(
                f"model.path: {path} holds a {scorers[0]}, a scorer with a classification head, not a language "
                "model: give a causal LM checkpoint (…ForCausalLM), e.g. the one the scorer was trained from"
            )
        text = config.get("text_config") or config
        positions = next((text[field] for field in POSITION_FIELDS if isinstance(text.get(field), int)), None)
        for i, stage in enumerate(spec.stages):
            field, length = (
                ("packing.block_size", stage.packing.block_size)
                if stage.kind == "pretrain"
                else ("max_len", getattr(stage, "max_len", 0))
            )
            explicit = stage.kind != "eval" or "max_len" in stage.model_fields_set
            if positions is not None and explicit and length > positions:
                problems.append(
                    f"stages[{i}].{field} {length} exceeds the {positions} positions of the model in {path} "
                    f"(config.json): lower it to {positions} at most"
                )
    templates = {spec.template} | {getattr(stage, "template", None) for stage in spec.stages}
    if "tokenizer" in templates:
        folder = spec.tokenizer.path
        if folder is None:
            problems.append(
                "template: tokenizer means the tokenizer's own chat template, and a tokenizer trained by the "
                "pipeline has none: choose one of chatml, llama2, deepseek, alpaca"
            )
        elif not (
            _json(folder / "tokenizer_config.json").get("chat_template")
            or (folder / "chat_template.jinja").exists()
            or (folder / "chat_template.json").exists()
        ):
            problems.append(
                f"template: tokenizer means the tokenizer's own chat template, and the one in {folder} has none "
                "(no chat_template in tokenizer_config.json, no chat_template.jinja): choose one of chatml, "
                "llama2, deepseek, alpaca, and the pipeline adds the tokens it needs"
            )
    return problems
