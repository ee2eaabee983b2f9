"""A spec's mistakes as a user makes them, in examples/quick.yaml: each message says what to write instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.load import SpecError, load_spec
from schemas.spec import STAGE_KINDS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
QUICK = (EXAMPLES / "quick.yaml").read_text(encoding="utf-8")


def spec(tmp_path: Path, old: str, new: str) -> Path:
    """quick.yaml with its first `old` made `new`, beside the example's data (its paths are relative to the spec)."""
    assert old in QUICK, f"quick.yaml no longer has {old!r}"
    for folder in ("data", "benchmarks"):
        if not (tmp_path / folder).exists():
            (tmp_path / folder).symlink_to(EXAMPLES / folder, target_is_directory=True)
    path = tmp_path / "spec.yaml"
    path.write_text(QUICK.replace(old, new, 1), encoding="utf-8")
    return path


def problem(path: Path) -> str:
    with pytest.raises(SpecError) as err:
        load_spec(path)
    return str(err.value)


def test_the_unchanged_example_loads_from_its_copy(tmp_path: Path) -> None:
    assert [stage.kind for stage in load_spec(spec(tmp_path, "", "")).stages][:2] == ["pretrain", "sft"]


def test_a_misspelt_field_suggests_the_nearest_one(tmp_path: Path) -> None:
    path = spec(tmp_path, "eval_samples: 16\n    train: {max_steps: 40", "eval_samples: 16\n    train: {max_step: 40")
    message = problem(path)
    assert message.startswith(f"{path}: 1 problem(s) in the spec")
    assert "stages[1].train.max_step: Extra inputs are not permitted (got 40); did you mean max_steps?" in message


@pytest.mark.parametrize(
    "old, new, where, nearest",
    [
        ("alpha: 16, merge: true}", "alpah: 16, merge: true}", "stages[2].lora.alpah", "alpha"),
        ("packing: {block_size: 128}", "packing: {blocksize: 128}", "stages[0].packing.blocksize", "block_size"),
        ("hidden_size: 64", "hiden_size: 64", "model.init.hiden_size", "hidden_size"),
        ("lora: {r: 8, alpha: 16, merge: true}", "loar: {r: 8, alpha: 16, merge: true}", "stages[2].loar", "lora"),
        ("from: sft\n", "frm: sft\n", "stages[6].frm", "from"),  # the alias, as the spec spells it
        # a reward's kind picks its fields, and stays out of the path as a stage's does
        ("{kind: answer}", "{kind: answer, wieght: 2}", "stages[8].rewards[0].wieght", "weight"),
        ("limit: 12}", "limt: 12}", "stages[9].benchmarks.limt", "limit"),
    ],
)
def test_every_level_suggests_its_own_fields(tmp_path: Path, old: str, new: str, where: str, nearest: str) -> None:
    message = problem(spec(tmp_path, old, new))
    assert f"{where}: Extra inputs are not permitted" in message
    assert f"did you mean {nearest}?" in message


def test_an_unknown_top_level_key_suggests_or_lists_the_fields(tmp_path: Path) -> None:
    assert "templete: Extra inputs are not permitted (got 'chatml'); did you mean template?" in problem(
        spec(tmp_path, "template: chatml", "templete: chatml")
    )
    far = problem(spec(tmp_path, "template: chatml", "colour: blue"))
    assert "colour: Extra inputs are not permitted (got 'blue'); the fields here: name, model, tokenizer," in far


def test_a_field_of_another_kind_lists_the_fields_of_the_stage_s_kind(tmp_path: Path) -> None:
    message = problem(spec(tmp_path, "    max_len: 256\n    eval_samples: 16", "    max_len: 256\n    beta: 0.1"))
    line = next(line for line in message.splitlines() if "stages[1].beta" in line)
    assert "the fields of kind sft: name, from, on_invalid, data," in line and "eval_samples" in line
    assert "beta," not in line  # a dpo stage's field, not an sft stage's


def test_a_misspelt_kind_lists_the_kinds_and_suggests_one(tmp_path: Path) -> None:
    message = problem(spec(tmp_path, "kind: dpo", "kind: dpp"))
    line = next(line for line in message.splitlines() if line.startswith("  stages[3]:"))
    assert all(repr(kind) in line for kind in STAGE_KINDS)
    assert line.endswith("; did you mean dpo?")
    missing = problem(spec(tmp_path, "    kind: dpo\n", ""))
    assert (
        f"stages[3]: Unable to extract tag using discriminator 'kind'; give kind, one of {', '.join(STAGE_KINDS)}"
        in (missing)
    )


def test_a_from_naming_no_stage_lists_the_stages_before_it(tmp_path: Path) -> None:
    message = problem(spec(tmp_path, "from: sft-lora\n", "from: sft-lra\n"))
    assert (
        "  stages[7].from names 'sft-lra', which is not an earlier stage; did you mean sft-lora? "
        "(the stages before it: pretrain, sft, sft-lora, dpo, pro, tuna, reward)"
    ) in message
    later = problem(spec(tmp_path, "from: sft-lora\n", "from: grpo\n"))
    assert "grpo comes after it: move it before, or name an earlier stage (the stages before it: pretrain," in later


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    # an unclosed bracket is found on the next line: both lines are shown
    path = spec(tmp_path, "curriculum: [2, 3]", "curriculum: [2, 3")
    opened = next(i for i, line in enumerate(QUICK.splitlines(), 1) if "curriculum:" in line)
    message = problem(path)
    assert message.startswith(f"{path}:{opened + 1}:10: not valid YAML: expected ',' or ']', but got ':'")
    assert f"(while parsing a flow sequence that starts at line {opened}, column 17)" in message
    assert f"\n  {opened} |     curriculum: [2, 3\n" in message and "<unicode string>" not in message
    path = spec(tmp_path, "template: chatml", "template: chatml: llama2")
    line = next(i for i, text in enumerate(QUICK.splitlines(), 1) if text == "template: chatml")
    message = problem(path)
    assert message.startswith(f"{path}:{line}:17: not valid YAML: mapping values are not allowed here")
    assert message.endswith(f"  {line} | template: chatml: llama2\n  {' ' * len(str(line))} |                 ^")
