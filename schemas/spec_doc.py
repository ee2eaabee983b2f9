"""The spec reference, rendered from the models themselves, so it cannot drift from what a spec file may say.

One section per model a spec reaches from `PipelineSpec`, one table row per field: its YAML name (aliases
respected), its type as a YAML user writes it, its default, and its `Field(description=...)`; the model's docstring
introduces the section. Descriptions live in the schema, nowhere else: a field that needs words gets them there.
`lifecycle spec-doc` prints the result, `lifecycle spec-doc docs/spec.md` writes this repository's copy, and a test
fails while that file differs from it.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from schemas.sources import Source
from schemas.spec import PipelineSpec, Sources

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "spec.md"
# the validator that lets a list-of-sources field take a single source too
SINGLE_SOURCE = get_args(Sources)[1]

INTRODUCTION = """\
# Spec reference

Every field a pipeline spec can have: its YAML name, its type, its default and what it does. This page is
generated from the pydantic models in `schemas/` by `lifecycle spec-doc`, which prints it wherever the tool is
installed; do not edit it by hand. To change it, change the model (a field's `Field(description=...)`, a model's
docstring) and run `lifecycle spec-doc docs/spec.md`: a test fails while this page differs from the models.

A spec is validated whole before any data is read: a field not listed here is an error, and every error names the
field's path (`stages[1].train.lr`). Paths are relative to the spec file; a field typed "source or list of sources"
takes one source or a list of them: a path (glob patterns such as `corpus/**/*.jsonl` included), `hf:owner/name`,
or a mapping (see Source and docs/data.md).
"""


@dataclass
class Section:
    """One model's part of the reference: where it sits in a spec and which fields name it."""

    model: type[BaseModel]
    title: str
    label: str  # how links to the section read
    path: str  # the YAML keys leading to it from the pipeline or from the item of a list it belongs to
    tag: str | None = None  # for an item of a tagged union: the field that selects it (`kind`)
    noun: str = ""  # what such an item is: stage, reward
    used_in: list[tuple[Section, str]] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        """The id GitHub gives the section's heading: lower case, punctuation dropped, spaces as hyphens."""
        return re.sub(r"[^\w\- ]", "", self.title.lower()).replace(" ", "-")


def _unwrap(annotation: Any) -> tuple[Any, list[Any], str | None]:
    """An annotation without its `Annotated` layers: the type, their constraints, a tagged union's discriminator."""
    metadata: list[Any] = []
    discriminator = None
    while get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        for item in extra:
            if isinstance(item, FieldInfo):
                metadata += item.metadata
                discriminator = discriminator or item.discriminator
            else:
                metadata.append(item)
    return annotation, metadata, discriminator


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


# models a field reaches: a plain model alone (no tag), or the members of a tagged union with the field that tags them
Reached = tuple[tuple[type[BaseModel], ...], str | None]


def _nested(annotation: Any, discriminator: str | None = None) -> Iterator[Reached]:
    """The models a field's annotation reaches: a plain model alone, a tagged union's members together with its tag."""
    annotation, _, inner = _unwrap(annotation)
    discriminator = discriminator or inner
    options = get_args(annotation)
    if get_origin(annotation) in (Union, UnionType):
        models = tuple(option for option in options if _is_model(option))
        if discriminator and len(models) == len(options):
            yield models, discriminator
            return
        for option in options:
            yield from _nested(option)
    elif get_origin(annotation) in (list, dict):
        for option in options:
            yield from _nested(option)
    elif _is_model(annotation):
        yield (annotation,), None


def sections(root: type[BaseModel] = PipelineSpec) -> list[Section]:
    """Every model the root reaches, in reading order: the root and the models inside it, then each tagged union's
    members (each kind of stage, each kind of reward) followed by the models inside them that came up first there."""
    found: dict[type[BaseModel], Section] = {}
    waiting: list[tuple[Section, str, tuple[type[BaseModel], ...], str]] = []

    def add(section: Section) -> Section:
        if section.title in {known.title for known in found.values()}:
            section.title = f"{section.title} ({section.model.__name__})"
        found[section.model] = section
        return section

    def descend(section: Section) -> None:
        for name, info in section.model.model_fields.items():
            key = info.alias or name
            for models, tag in _nested(info.annotation, info.discriminator):
                if tag is not None:
                    waiting.append((section, key, models, tag))
                elif models[0] in found:
                    found[models[0]].used_in.append((section, key))
                else:
                    path = f"{section.path}.{key}" if section.path else key
                    child = add(Section(models[0], f"`{path}`", path, path, used_in=[(section, key)]))
                    descend(child)

    descend(add(Section(root, "The pipeline", "the pipeline", "")))
    while waiting:
        parent, key, members, tag = waiting.pop(0)
        noun = key.removesuffix("s")
        fresh = []
        for member in members:
            if member in found:
                found[member].used_in.append((parent, key))
                continue
            value = get_args(member.model_fields[tag].annotation)[0]
            title = f"{noun.capitalize()} `{value}`"
            fresh.append(add(Section(member, title, f"{value} {noun}", "", tag, noun, [(parent, key)])))
        for section in fresh:
            descend(section)
    return list(found.values())


def _cannot(where: str, what: str) -> TypeError:
    """A field the renderer does not know how to write down fails the render: nothing is left out silently."""
    return TypeError(f"{where}: the spec reference cannot describe {what}; extend schemas/spec_doc.py")


def _number(value: float) -> str:
    return _yaml(value) if isinstance(value, float) else str(value)


def _bounded(noun: str, metadata: list[Any], where: str) -> str:
    """`int >= 1`, `number in [0, 1)`: a number type with its bounds (an int above n is at least n + 1)."""
    low = high = None
    for item in metadata:
        if getattr(item, "ge", None) is not None:
            low = (item.ge, "[")
        elif getattr(item, "gt", None) is not None:
            low = (item.gt + 1, "[") if noun == "int" else (item.gt, "(")
        elif getattr(item, "le", None) is not None:
            high = (item.le, "]")
        elif getattr(item, "lt", None) is not None:
            high = (item.lt, ")")
        else:
            raise _cannot(where, f"the constraint {item!r}")
    if low and high:
        return f"{noun} in {low[1]}{_number(low[0])}, {_number(high[0])}{high[1]}"
    if low:
        return f"{noun} {'>=' if low[1] == '[' else '>'} {_number(low[0])}"
    if high:
        return f"{noun} {'<=' if high[1] == ']' else '<'} {_number(high[0])}"
    return noun


def _link(section: Section, text: str) -> str:
    return f"[{text}](#{section.anchor})"


def _type(annotation: Any, metadata: list[Any], found: dict[type[BaseModel], Section], where: str) -> str:
    """A field's type as a YAML user writes it: `int >= 1`, `one of: fail, skip`, `list of strings`, a link to the
    section of a nested model."""
    annotation, inner, discriminator = _unwrap(annotation)
    metadata = [*metadata, *inner]
    if SINGLE_SOURCE in metadata:
        metadata.remove(SINGLE_SOURCE)
        sized = [item for item in metadata if hasattr(item, "min_length")]
        at_least = f" (at least {sized[0].min_length})" if sized else ""
        return f"source or list of sources{at_least}: a path, `hf:owner/name`, or a {_link(found[Source], 'Source')}"
    origin, options = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType):
        options = tuple(option for option in options if option is not NoneType)
        if discriminator and all(_is_model(option) for option in options):
            tag = found[options[0]].tag
            links = ", ".join(_link(found[option], found[option].label.split()[0]) for option in options)
            return f"mapping whose `{tag}` is one of: {links}"
        return ", or ".join(_type(option, metadata, found, where) for option in options)
    if origin is Literal:
        values = [f"`{_yaml(value)}`" for value in options]
        return values[0] if len(values) == 1 else f"one of: {', '.join(values)}"
    if origin is list:
        sized = [item for item in metadata if hasattr(item, "min_length")]
        others = [item for item in metadata if not hasattr(item, "min_length")]
        at_least = f" (at least {sized[0].min_length})" if sized else ""
        noun, _, rest = _type(options[0], others, found, where).partition(" ")
        if noun.removesuffix(":") not in ("string", "path", "int", "number", "mapping"):
            raise _cannot(where, f"a list of {noun} {rest}")
        return f"list of {noun.removesuffix(':')}s{':' * noun.endswith(':')} {rest}".strip() + at_least
    if origin is dict:
        return "mapping"
    if _is_model(annotation):
        return f"mapping: {_link(found[annotation], f'`{found[annotation].label}`')}"
    if annotation is bool:
        return "true or false"
    if annotation is str:
        patterns = [item.pattern for item in metadata if getattr(item, "pattern", None)]
        return f"string matching `{patterns[0]}`" if patterns else "string"
    if annotation is Path:
        return "path"
    if annotation is Any:
        return "any value"
    if annotation in (int, float):
        return _bounded("int" if annotation is int else "number", metadata, where)
    raise _cannot(where, f"the type {annotation!r}")


def _plain(value: Any) -> Any:
    """A default as the YAML that gives it: models as the fields they set, paths as strings."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _yaml(value: Any) -> str:
    """A value in YAML's flow style, as a user would type it into a spec."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float):
        text = repr(value)
        # YAML 1.1 (PyYAML) reads 1e-06 as a string: a float needs its dot
        return text.replace("e", ".0e") if "e" in text and "." not in text else text
    if isinstance(value, list):
        return f"[{', '.join(_yaml(item) for item in value)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_yaml(item)}" for key, item in value.items()) + "}"
    if isinstance(value, str) and (not value or re.search(r"[,\[\]{}#&*!|>'\"%@`]|: ", value)):
        return json.dumps(value)
    if isinstance(value, str) and yaml.safe_load(value) != value:
        return json.dumps(value)
    return str(value)


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "not set"
    plain = _plain(value)
    if plain == {} and isinstance(value, BaseModel):
        return "each field's default"
    return f"`{_yaml(plain)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _used_in(section: Section) -> str:
    """Where the model appears: `The train field of the pretrain stage, the sft stage, ...`."""
    by_key: dict[str, list[Section]] = {}
    for parent, key in section.used_in:
        if parent not in by_key.setdefault(key, []):
            by_key[key].append(parent)
    start = "An item of the" if section.tag else "The"
    return (
        "; ".join(
            f"{start} `{key}` field of {', '.join(_link(parent, parent.label) for parent in parents)}"
            for key, parents in by_key.items()
        )
        + "."
    )


def _table(section: Section, found: dict[type[BaseModel], Section]) -> list[str]:
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    fields = sorted(section.model.model_fields.items(), key=lambda item: item[0] != section.tag)
    for name, info in fields:
        key = info.alias or name
        where = f"{section.model.__name__}.{name}"
        description = info.description or (f"selects this kind of {section.noun}" if name == section.tag else "")
        cells = [f"`{key}`", _type(info.annotation, list(info.metadata), found, where), _default(info), description]
        rows.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return rows


def render(root: type[BaseModel] = PipelineSpec) -> str:
    """The Markdown reference of every field a spec rooted at `root` can have."""
    found = {section.model: section for section in sections(root)}
    lines = [INTRODUCTION, "Contents:", ""]
    lines += [f"- {_link(section, section.title)}" for section in found.values()]
    for section in found.values():
        lines += ["", f"## {section.title}", ""]
        if section.model.__doc__:
            lines += [inspect.cleandoc(section.model.__doc__), ""]
        if data_format := getattr(section.model, "data_format", None):
            lines += [
                f"Its `data` and `heldout` files are jsonl in the `{data_format}` format "
                "([data formats](../README.md#data)).",
                "",
            ]
        if section.used_in:
            lines += [_used_in(section), ""]
        lines += _table(section, found)
    return "\n".join(lines) + "\n"
