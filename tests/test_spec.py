"""The spec: every shipped YAML loads; bad ones fail with the field path and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.load import SpecError, load_spec
from schemas.sources import files_of
from schemas.spec import PipelineSpec, SFTStage

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "examples").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "data.jsonl").write_text('{"text": "hello"}\n')
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


GOOD = """
name: t
model: {init: {hidden_size: 64, layers: 2, heads: 2, max_seq_len: 128}}
stages:
  - {name: pretrain, kind: pretrain, data: data.jsonl, packing: {block_size: 64}}
  - {name: sft, kind: sft, data: [data.jsonl], train: {lr: 0.001}}
"""


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_spec_loads(path: Path) -> None:
    spec = load_spec(path)
    assert spec.stages and all(p.is_absolute() and p.exists() for s, _, _ in spec.data_contracts() for p in s.files)


def test_good_spec_resolves_paths_against_the_spec_folder(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD))
    assert files_of(spec.stages[0].data) == [tmp_path / "data.jsonl"]
    assert isinstance(spec.stages[1], SFTStage) and spec.stages[1].train.lr == 0.001
    assert spec.input_of(spec.stages[1]) is spec.stages[0]
    assert spec.input_of(spec.stages[0]) is None
    assert spec.tokenizer.train is not None and spec.tokenizer.train.vocab_size == 8192


@pytest.mark.parametrize(
    "change, expected",
    [
        (("lr: 0.001", "lr: -1"), "stages[1].train.lr: Input should be greater than 0"),
        (("lr: 0.001", "learning_rate: 0.1"), "stages[1].train.learning_rate: Extra inputs are not permitted"),
        (
            ("kind: sft", "kind: sfx"),
            "stages[1]: Input tag 'sfx' found using 'kind' does not match any of the expected tags: 'pretrain', 'sft'",
        ),
        (("heads: 2", "heads: 3"), "hidden_size 64 must be divisible by heads 3"),
        (("lr: 0.001}", "lr: 0.001}, max_len: 256"), "stages[1].max_len 256 exceeds model.init.max_seq_len 128"),
        (
            ("block_size: 64", "block_size: 4096"),
            "stages[0].packing.block_size 4096 exceeds model.init.max_seq_len 128",
        ),
        (("name: sft,", "name: pretrain,"), "stages[1].name 'pretrain' is used twice"),
        (("name: sft,", "name: sft, from: later,"), "stages[1].from names 'later', which is not an earlier stage"),
        (("name: t", "name: 't x'"), "name: String should match pattern"),
        (("data: [data.jsonl]", "data: [nothere.jsonl]"), "stages[1].data[0]: nothere.jsonl does not exist"),
        (("model: {init:", "model: {path: ./m, init:"), "give exactly one of model.init (a fresh model) or model.path"),
        (
            ("  - {name: pretrain, kind: pretrain, data: data.jsonl, packing: {block_size: 64}}\n", ""),
            "stages[0] (sft, kind sft) needs a trained model to start from: begin with a pretrain stage, or give "
            "model.path",
        ),
        (
            ("model: {init: {hidden_size: 64, layers: 2, heads: 2, max_seq_len: 128}}", "model: {path: .}"),
            "model.path needs tokenizer.path (usually the same folder)",
        ),
    ],
)
def test_bad_spec_names_the_field_and_the_rule(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, GOOD.replace(*change)))
    assert expected in str(err.value)
    assert str(tmp_path / "spec.yaml") in str(err.value)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    bad = GOOD.replace("lr: 0.001", "lr: -1, batch_size: 0")
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, bad))
    assert "2 problem(s)" in str(err.value)
    assert "stages[1].train.lr" in str(err.value) and "stages[1].train.batch_size" in str(err.value)


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(write(tmp_path, "name: [unclosed"))
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(write(tmp_path, "- a list"))
    with pytest.raises(SpecError, match="cannot read the spec"):
        load_spec(tmp_path / "missing.yaml")


def test_models_forbid_unknown_fields_everywhere() -> None:
    assert PipelineSpec.model_config["extra"] == "forbid"


def test_template_names_match_the_templates_the_stages_render() -> None:
    from typing import get_args

    from schemas.spec import TemplateName
    from stages.common.templates import TEMPLATE_NAMES

    assert get_args(TemplateName) == TEMPLATE_NAMES


def test_sft_stages_inherit_the_pipeline_template_unless_they_name_one(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD.replace("name: t\n", "name: t\ntemplate: llama2\n")))
    assert spec.stages[1].template == "llama2"
    own = load_spec(write(tmp_path, GOOD.replace("kind: sft,", "kind: sft, template: alpaca,")))
    assert own.stages[1].template == "alpaca"


def test_streaming_takes_glob_patterns_and_needs_max_steps(tmp_path: Path) -> None:
    streaming = GOOD.replace("data: data.jsonl, packing", "data: 'dat*.jsonl', streaming: true, packing")
    with pytest.raises(SpecError, match="a streaming stage needs train.max_steps"):
        load_spec(write(tmp_path, streaming))
    streaming = streaming.replace("packing: {block_size: 64}", "packing: {block_size: 64}, train: {max_steps: 5}")
    spec = load_spec(write(tmp_path, streaming))
    assert spec.streamed() == [spec.stages[0]]
    # the SFT stage's; the stream is checked apart
    assert [p for s, _, _ in spec.data_contracts() for p in s.files] == [tmp_path / "data.jsonl"]
    with pytest.raises(SpecError, match="nope-\\*.jsonl matches no file"):
        load_spec(write(tmp_path, streaming.replace("dat*.jsonl", "nope-*.jsonl")))


ALIGNED = (
    GOOD
    + """  - {name: dpo, kind: dpo, data: data.jsonl}
  - {name: pro, kind: pro, data: data.jsonl, curriculum: [2, 3, 4]}
  - {name: reward, kind: reward, from: sft, data: data.jsonl}
  - {name: eval, kind: eval}
"""
)


@pytest.mark.parametrize(
    "change, expected",
    [
        (("kind: dpo,", "kind: dpo, reference: adapter-off,"), "stages[2]: reference adapter-off needs a lora block"),
        (
            ("kind: dpo,", "kind: dpo, loss: simpo, reference: frozen,"),
            "loss simpo is reference-free: leave reference unset",
        ),
        (("kind: dpo,", "kind: dpo, loss: orpo, logps: sum,"), "loss orpo is defined on length-averaged log-probs"),
        (
            ("kind: dpo,", "kind: dpo, loss: ipo, label_smoothing: 0.1,"),
            "label_smoothing is cDPO's, defined for loss sigmoid only",
        ),
        (("curriculum: [2, 3, 4]", "curriculum: [3, 2]"), "curriculum [3, 2] must grow strictly"),
        (
            ("curriculum: [2, 3, 4]", "curriculum: [1, 2]"),
            "stages[3].curriculum[0]: Input should be greater than or equal to 2",
        ),
        (
            ("kind: eval}", "kind: eval, from: reward}\n  - {name: after, kind: sft, data: data.jsonl}"),
            "stages[6] (after) would start from reward stage 'reward', which is a scorer",
        ),
        (("kind: eval}", "kind: eval, checkpoints: [reward]}"), "names 'reward', a reward model"),
        (("kind: eval}", "kind: eval, checkpoints: [later]}"), "names 'later', which is not an earlier training stage"),
        (
            ("kind: eval}", "kind: eval, reward_model: dpo}"),
            "stages[5] (eval) scores with the reward model of 'dpo', which is not an earlier reward stage",
        ),
        (
            ("kind: eval}", "kind: eval, rewards: [{kind: reward_model, stage: later}]}"),
            "the reward model of 'later', which is not",
        ),
        (
            ("kind: dpo,", "kind: dpo, input: adapter,"),
            "input adapter needs an input stage with lora, and sft has none",
        ),
        (
            ("name: pretrain, kind: pretrain,", "name: pretrain, kind: pretrain, lora: {r: 4},"),
            "adapters on freshly initialised weights",
        ),
        (("name: reward,", "name: prompt,"), "stages[4].name 'prompt' is used twice (or is reserved)"),
    ],
)
def test_alignment_rules_name_the_stage_and_the_rule(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, ALIGNED.replace(*change)))
    assert expected in str(err.value)


def test_eval_scores_every_earlier_language_model_on_their_heldout_data(tmp_path: Path) -> None:
    (tmp_path / "held.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    spec = load_spec(
        write(
            tmp_path,
            ALIGNED.replace(
                "name: dpo, kind: dpo, data: data.jsonl", "name: dpo, kind: dpo, data: data.jsonl, heldout: held.jsonl"
            ),
        )
    )
    evaluation = spec.stages[-1]
    assert evaluation.checkpoints == ["pretrain", "sft", "dpo", "pro"]  # not the reward model: it is a scorer
    assert (
        files_of(evaluation.preference) == [tmp_path / "held.jsonl"]
        and evaluation.text == []
        and evaluation.template == "chatml"
    )
    assert spec.input_of(spec.stages[4]).name == "sft" and spec.input_of(spec.stages[3]).name == "dpo"


OWN = """
name: t
model: {path: ./m}
tokenizer: {path: ./m}
template: tokenizer
stages:
  - {name: sft, kind: sft, data: data.jsonl, max_len: 512}
  - {name: eval, kind: eval, checkpoints: [sft], max_len: 1024}
"""


def test_own_checkpoint_problems_are_found_from_its_config_files_before_anything_runs(tmp_path: Path) -> None:
    import json

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForSequenceClassification"], "max_position_embeddings": 256})
    )
    (tmp_path / "m" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, OWN))
    lines = str(caught.value).splitlines()
    assert lines[0].endswith("spec.yaml: 4 problem(s) with the model or tokenizer it names")
    assert (
        "holds a LlamaForSequenceClassification, a scorer with a classification head, not a language model" in lines[1]
    )
    assert (
        lines[2].strip()
        == f"stages[0].max_len 512 exceeds the 256 positions of the model in {tmp_path / 'm'} (config.json): "
        "lower it to 256 at most"
    )
    assert lines[3].strip().startswith("stages[1].max_len 1024 exceeds the 256 positions")
    assert "the one in" in lines[4] and "has none (no chat_template in tokenizer_config.json" in lines[4]

    # GPT-2's config names its positions n_positions; a template in the tokenizer's config counts
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_positions": 1024}))
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert load_spec(write(tmp_path, OWN)).model.path == tmp_path / "m"


def test_own_template_of_a_trained_tokenizer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="a tokenizer trained by the pipeline has none"):
        load_spec(write(tmp_path, GOOD + "template: tokenizer\n"))
