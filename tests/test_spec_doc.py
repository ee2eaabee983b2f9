"""The spec reference: docs/spec.md is what the models render today, and what it says of a field is what the model
accepts (its YAML name, its type, its default read back as YAML)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import Field, TypeAdapter

from flows.cli import parser
from schemas.base import Strict
from schemas.rewards import Reward
from schemas.spec import STAGE_KINDS, Stage, TemplateName
from schemas.spec_doc import REFERENCE, render, sections

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def text() -> str:
    return render()


@pytest.fixture(scope="module")
def tables(text: str) -> dict[str, dict[str, list[str]]]:
    """Each section's table, read back from the Markdown: heading -> YAML name -> [type, default, description]."""
    found: dict[str, dict[str, list[str]]] = {}
    for block in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        title, _, body = block.partition("\n")
        rows = {}
        for line in body.splitlines():
            if line.startswith("| `"):
                cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
                rows[cells[0].strip("`")] = cells[1:]
        found[title] = rows
    return found


def slug(title: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def test_committed_reference_is_current(text: str) -> None:
    committed = REFERENCE.read_text(encoding="utf-8") if REFERENCE.exists() else ""
    if committed != text:
        diff = difflib.unified_diff(
            committed.splitlines(keepends=True), text.splitlines(keepends=True), "docs/spec.md", "rendered"
        )
        pytest.fail(
            "docs/spec.md is stale (the spec's models changed): run `lifecycle spec-doc` and commit it\n"
            + "".join(list(diff)[:40])
        )


@pytest.mark.parametrize("union, noun", [(Stage, "Stage"), (Reward, "Reward")], ids=["stages", "rewards"])
def test_every_kind_has_a_section_listing_exactly_its_fields(union, noun, tables) -> None:
    members = get_args(get_args(union)[0])
    for model in members:
        kind = get_args(model.model_fields["kind"].annotation)[0]
        rows = tables[f"{noun} `{kind}`"]
        assert list(rows)[0] == "kind" and rows["kind"][:2] == [f"`{kind}`", "required"]
        assert set(rows) == {info.alias or name for name, info in model.model_fields.items()}
    assert len([title for title in tables if title.startswith(f"{noun} `")]) == len(members)


def test_every_stage_kind_is_documented(tables) -> None:
    documented = {title.removeprefix("Stage `").removesuffix("`") for title in tables if title.startswith("Stage `")}
    assert documented == set(STAGE_KINDS)


def test_fields_are_spelled_as_yaml_spells_them(tables) -> None:
    for kind in STAGE_KINDS:
        assert "from" in tables[f"Stage `{kind}`"] and "from_" not in tables[f"Stage `{kind}`"]


def test_types_read_as_a_yaml_user_writes_them(tables) -> None:
    pipeline, pretrain, train = tables["The pipeline"], tables["Stage `pretrain`"], tables["`train`"]
    assert pipeline["template"][0] == "one of: " + ", ".join(f"`{name}`" for name in get_args(TemplateName))
    assert pretrain["on_invalid"][0] == "one of: `fail`, `skip`"
    assert tables["`model.init`"]["hidden_size"][0] == "int >= 1"  # PositiveInt: above 0
    assert tables["`tokenizer.train`"]["vocab_size"][0] == "int >= 300"
    assert train["min_lr_ratio"][0] == "number in [0, 1]"
    assert tables["`lora`"]["dropout"][0] == "number in [0, 1)"
    assert tables["Stage `grpo`"]["top_p"][0] == "number in (0, 1]"
    assert tables["Stage `pro`"]["curriculum"][0] == "list of ints >= 2"
    source = "a path, `hf:owner/name`, or a [Source](#tokenizertraindata)"
    assert pretrain["data"][0] == f"source or list of sources (at least 1): {source}"
    assert pretrain["heldout"][0] == f"source or list of sources: {source}"
    assert tables["`lora`"]["targets"][0] == "list of strings, or `all-linear`"
    assert pretrain["lora"][0] == "mapping: [`lora`](#lora)"
    assert tables["`launch`"]["deepspeed"][0] == "mapping: [`launch.deepspeed`](#launchdeepspeed), or path"
    assert pipeline["stages"][0].startswith("list of mappings whose `kind` is one of: [pretrain](#stage-pretrain)")


def test_required_fields_and_defaults(tables) -> None:
    assert tables["The pipeline"]["name"][1] == "required"
    assert tables["The pipeline"]["model"][1] == "required"
    assert tables["Stage `pretrain`"]["data"][1] == "required"
    assert tables["Reward `length`"]["limit"][1] == "required"
    assert tables["Stage `grpo`"]["rewards"][1] == "`[{kind: answer}]`"  # a default_factory, shown as its value
    assert tables["Stage `pretrain`"]["train"][1] == "each field's default"
    assert tables["`model.init`"]["kv_heads"][1] == "not set"


def test_every_default_shown_reads_back_as_the_models_default(tables) -> None:
    """A default copied from the reference into a spec gives the model's default: the YAML is right, floats
    included (PyYAML reads 1e-06 as a string)."""
    checked = 0
    for section in sections():
        for name, info in section.model.model_fields.items():
            shown = tables[section.title][info.alias or name][1]
            if shown == "required":
                assert info.is_required()
                continue
            default = info.get_default(call_default_factory=True)
            if shown == "not set":
                assert default is None
                continue
            value = {} if shown == "each field's default" else yaml.safe_load(shown.strip("`"))
            read = TypeAdapter(info.rebuild_annotation()).validate_python(value, strict=True)
            assert read == default, (section.title, name, shown)
            checked += 1
    assert checked > 100


def test_every_description_reaches_its_row(tables) -> None:
    for section in sections():
        for name, info in section.model.model_fields.items():
            if info.description:
                assert tables[section.title][info.alias or name][2] == info.description


def test_links_point_at_sections_and_the_readme_links_the_reference(text: str) -> None:
    anchors = {slug(line.removeprefix("#").lstrip("#")) for line in text.splitlines() if line.startswith("#")}
    targets = re.findall(r"\]\(#([^)]+)\)", text)
    assert targets and set(targets) <= anchors
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    readme_anchors = {slug(line.lstrip("#")) for line in readme.splitlines() if line.startswith("#")}
    assert set(re.findall(r"\]\(\.\./README\.md#([^)]+)\)", text)) <= readme_anchors
    assert "](docs/spec.md)" in readme


def test_a_constraint_the_renderer_cannot_write_fails_the_render() -> None:
    class Odd(Strict):
        """A model with a constraint the reference has no words for."""

        count: int = Field(4, multiple_of=2)

    with pytest.raises(TypeError, match="Odd.count"):
        render(Odd)


def spec_doc(*words: str) -> int:
    args = parser().parse_args(["spec-doc", *words])
    return args.func(args)


def test_spec_doc_writes_the_file_and_check_fails_when_it_is_stale(tmp_path: Path, capsys) -> None:
    assert spec_doc() == 0 and capsys.readouterr().out == render()  # printed, wherever the tool is installed
    assert spec_doc("--check") == 2 and "needs the file" in capsys.readouterr().err
    path = tmp_path / "docs" / "spec.md"
    assert spec_doc("--check", str(path)) == 1 and not path.exists()
    assert f"{path} does not exist" in capsys.readouterr().err
    assert spec_doc(str(path)) == 0 and path.read_text(encoding="utf-8") == render()
    assert spec_doc("--check", str(path)) == 0
    stale = path.read_text(encoding="utf-8") + "A line written by hand.\n"
    path.write_text(stale, encoding="utf-8")
    capsys.readouterr()
    assert spec_doc("--check", str(path)) == 1
    err = capsys.readouterr().err
    assert f"{path} is stale" in err and f"run `lifecycle spec-doc {path}`" in err
    assert path.read_text(encoding="utf-8") == stale  # --check writes nothing
