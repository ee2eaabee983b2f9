"""Sources: where a stage's rows come from, and what the user's columns are called.

A source is one of
- a file in any container `schemas/readers.py` reads (a glob pattern names several files, read in sorted order);
- a folder: a `datasets` `save_to_disk` folder (a DatasetDict's too, by `split`), or a dataset repository as
  the Hub has them (data files, and a README card whose `configs` name each config's files per split);
- `hf: owner/name`: a Hub dataset read from the local Hugging Face cache at `revision` (nothing is downloaded);
- `dataset: name`: an entry of a LLaMA-Factory `dataset_info.json` (its `file_name` or `hf_hub_url`,
  `formatting`, `columns` and `tags` read as LLaMA-Factory reads them).

In a spec a plain string is a path, or `hf:owner/name`. When the spec loads, each source is resolved into the
files it reads (`files`) and, for a Hub dataset, the commit it was read at (`revision`), so its digest follows
the content and the revision. `columns` renames the user's columns to the keys the shapes know
(schemas/formats.py), `tags` renames the speakers of sharegpt messages, as LLaMA-Factory's `tags` do.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveFloat, model_validator

from schemas.base import Strict
from schemas.formats import Shape

HF = "hf:"
# LLaMA-Factory's names of a message's keys and speakers, and the sharegpt names our shapes read them as
TAG_DEFAULTS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
SPEAKERS = {"user_tag": "human", "assistant_tag": "gpt", "observation_tag": "observation",
            "function_tag": "function_call", "system_tag": "system"}  # fmt: skip
# keys a shape reads when a row has them: a column mapped to one may be missing from a row, as the key may
OPTIONAL_KEYS = ("input", "history", "system", "tools", "answer", "images", "videos", "audios")
MESSAGE_KEYS = ("conversations", "messages", "chosen", "rejected", "chosen_messages", "rejected_messages", "prompt")


class Unmapped(Shape):
    """A row without a column the source's mapping names."""


class Source(Strict):
    """Rows from a file, a folder, a Hub dataset in the local cache, or a LLaMA-Factory dataset_info.json entry."""

    path: Path | None = Field(
        None, description="a data file or glob pattern (.jsonl, .json, .parquet, .csv, .tsv, .txt, .md, .arrow, "
        "each also .gz, .zst or .bz2), or a folder: save_to_disk, or a dataset repository with a README card",
    )  # fmt: skip
    hf: str | None = Field(
        None, pattern=r"^[\w.-]+/[\w.-]+$", description="a Hub dataset id, read from the local Hugging Face cache"
    )
    dataset: str | None = Field(None, description="a dataset's name in a LLaMA-Factory dataset_info.json (`info`)")
    info: Path | None = Field(
        None, description="the dataset_info.json `dataset` is named in; default: the pipeline's dataset_info"
    )
    config: str | None = Field(None, description="a dataset repository's config (its card's config_name)")
    split: str = Field("train", description="the split of a folder, repository or Hub dataset")
    revision: str | None = Field(
        None, description="a Hub dataset's branch, tag or commit; resolved to the commit read when the spec loads"
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="our key: your column, e.g. {prompt: question, chosen: good, conversations: dialog}; a mapped "
        "column missing from a row is an error naming it, unless it maps an optional key (input, history, system, "
        "tools, answer)",
    )
    tags: dict[str, str] = Field(
        default_factory=dict,
        description="how sharegpt messages name their keys and speakers, as LLaMA-Factory's tags: role_tag, "
        "content_tag, user_tag, assistant_tag, observation_tag, function_tag, system_tag",
    )
    documents: Literal["line", "paragraph"] = Field(
        "line", description="how a .txt or .md file becomes text documents: a line each, or blank-line separated"
    )
    weight: PositiveFloat | None = Field(
        None, description="its share when a stage mixes sources (see the stage's mix); default 1"
    )
    files: list[Path] = Field(
        default_factory=list, description="the files it reads: filled in when the spec loads, not written by hand"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, Path):
            value = {"path": value}
        elif isinstance(value, str):
            value = {"hf": value.removeprefix(HF)} if value.startswith(HF) else {"path": value}
        if isinstance(value, dict) and value.get("path") is not None and not value.get("files"):
            # a source made in code (not loaded from a spec) reads the file or the pattern's matches as they are;
            # a spec's sources are resolved against the spec's folder when it loads (`resolve`)
            value = {**value, "files": expand([Path(value["path"])])}
        return value

    @model_validator(mode="after")
    def _one_place(self) -> Source:
        given = [name for name in ("path", "hf", "dataset") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a source gives exactly one of path, hf or dataset, not {' and '.join(given) or 'none'}")
        unknown = set(self.tags) - set(TAG_DEFAULTS)
        if unknown:
            raise ValueError(f"tags {sorted(unknown)} are unknown; tags are {', '.join(TAG_DEFAULTS)}")
        return self

    def __hash__(self) -> int:  # frozen, but its dicts are not hashable: a source is its settings
        return hash(json.dumps(self.model_dump(mode="json", exclude={"files"}), sort_keys=True))

    @property
    def name(self) -> str:
        """The source as the user named it, for messages and metrics."""
        if self.hf is not None:
            return f"{HF}{self.hf}" + (f"/{self.config}" if self.config else "") + f" ({self.split})"
        if self.dataset is not None:
            return self.dataset
        return self.path.name if self.path is not None else "?"

    def mapped(self, row: dict) -> dict:
        """The row with its columns renamed to our keys and its sharegpt speakers to the names the shapes know."""
        if self.columns:
            missing = [
                theirs for ours, theirs in self.columns.items() if theirs not in row and ours not in OPTIONAL_KEYS
            ]
            if missing:
                have = ", ".join(sorted(map(str, row))) or "none"
                raise Unmapped(missing[0], f"is not a column of this row (columns maps it; the row has: {have})")
            renamed = {key: value for key, value in row.items() if key not in self.columns.values()}
            renamed |= {ours: row[theirs] for ours, theirs in self.columns.items() if theirs in row}
            row = renamed
        if self.tags:
            tags = TAG_DEFAULTS | self.tags  # once a row, not once a message
            speakers = {tags[tag]: ours for tag, ours in SPEAKERS.items()}
            role, content = tags["role_tag"], tags["content_tag"]
            row = {
                key: _speakers(value, role, content, speakers) if key in MESSAGE_KEYS else value
                for key, value in row.items()
            }
        return row


def _speakers(value: Any, role: str, content: str, speakers: dict[str, str]) -> Any:
    """sharegpt messages under their own key and speaker names, as the names our shapes read."""
    if isinstance(value, list):
        return [_speakers(item, role, content, speakers) for item in value]
    if not isinstance(value, dict) or role not in value:
        return value
    rest = {key: item for key, item in value.items() if key not in (role, content)}
    return {**rest, "from": speakers.get(value[role], value[role]), "value": value.get(content)}


def files_of(sources: list[Source]) -> list[Path]:
    """Every file the sources read, in order."""
    return [file for source in sources for file in source.files]


# ---- resolving: a source as the files it reads ----------------------------------------------------------------

# LLaMA-Factory's column roles, as the keys our shapes read, by its `formatting`
LLAMA_FACTORY_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
               "system": "system", "chosen": "chosen", "rejected": "rejected", "kto_tag": "label",
               "images": "images", "videos": "videos", "audios": "audios"},
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools", "chosen": "chosen",
                 "rejected": "rejected", "kto_tag": "label", "images": "images", "videos": "videos",
                 "audios": "audios"},
}  # fmt: skip


class Unresolved(Exception):
    """A source that names nothing readable, with the sentence that says why."""


def resolve(source: Source, base: Path, dataset_info: Path | None) -> Source:
    """The source with its files (and a Hub dataset's commit) filled in; raise Unresolved saying what is missing."""
    if source.dataset is not None:
        return resolve(_llama_factory(source, base, dataset_info), base, None)
    if source.hf is not None:
        folder = hub_snapshot(source.hf, source.revision, "dataset")
        return source.model_copy(update={"files": _folder_files(folder, source), "revision": folder.name})
    path = source.path if source.path.is_absolute() else (base / source.path).resolve()
    if path.is_dir():
        return source.model_copy(update={"path": path, "files": _folder_files(path, source)})
    files = expand([path])
    if not files:
        exists = glob.escape(str(source.path)) == str(source.path)
        raise Unresolved(f"{source.path} {'does not exist' if exists else 'matches no file'} (looked for {path})")
    return source.model_copy(update={"path": path, "files": files})


def expand(patterns: list[Path]) -> list[Path]:
    """Paths and glob patterns (`**` included) as the files they name: a path as itself, a pattern's matches sorted."""
    files: dict[Path, None] = {}
    for pattern in patterns:
        matches = (
            [Path(pattern)]
            if Path(pattern).is_file()
            else sorted(Path(m) for m in glob.glob(str(pattern), recursive=True))
        )
        files |= dict.fromkeys(m for m in matches if m.is_file())
    return list(files)


def _folder_files(folder: Path, source: Source) -> list[Path]:
    """The data files of a save_to_disk folder (a DatasetDict's split), or of a dataset repository's config and
    split as its README card (or the Hub's default file layout) names them."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        if source.split not in splits:
            raise Unresolved(f"{folder} has no split {source.split!r}; it has {', '.join(splits) or 'none'}")
        folder = folder / source.split
    if (folder / "state.json").is_file():
        state = json.loads((folder / "state.json").read_text())
        return [folder / entry["filename"] for entry in state.get("_data_files", [])]
    import datasets  # the library's own reading of a card's configs and of the default layout (seconds to load)

    try:
        builder = datasets.load_dataset_builder(str(folder), source.config)
    except (ValueError, FileNotFoundError) as err:
        raise Unresolved(f"{folder}: {str(err).splitlines()[0]}") from None
    found = builder.config.data_files or {}
    if source.split not in found:
        raise Unresolved(
            f"{folder} (config {builder.config.name}) has no split {source.split!r}; "
            f"it has {', '.join(found) or 'none'}"
        )
    return [Path(file) for file in found[source.split]]


def hub_snapshot(repo_id: str, revision: str | None, repo_type: Literal["dataset", "model"]) -> Path:
    """The cached snapshot folder of a Hub repository at a revision (its name is the commit); never a download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError

    revision = revision or "main"
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        flag = " --repo-type dataset" if repo_type == "dataset" else ""
        also = " (or datasets.load_dataset once)" if repo_type == "dataset" else ""
        raise Unresolved(
            f"the Hub {repo_type} {repo_id} at revision {revision} is not in the local Hugging Face cache "
            f"({HF_HUB_CACHE}), and nothing is downloaded while a pipeline runs: on a machine with a network, "
            f"fetch it with `hf download {repo_id}{flag} --revision {revision}`{also}, then run again"
        ) from None


def _llama_factory(source: Source, base: Path, dataset_info: Path | None) -> Source:
    """A dataset_info.json entry as the source LLaMA-Factory would read: its file or Hub id, columns and tags."""
    info = source.info or dataset_info
    if info is None:
        raise Unresolved(
            f"dataset {source.dataset!r} needs a dataset_info.json: give the source's info, or the spec's dataset_info"
        )
    info = info if info.is_absolute() else (base / info).resolve()
    try:
        entries = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise Unresolved(f"{info} cannot be read as JSON: {err}") from None
    entry = entries.get(source.dataset) if isinstance(entries, dict) else None
    if not isinstance(entry, dict):
        raise Unresolved(f"{info} has no dataset {source.dataset!r}; it has {', '.join(entries) or 'none'}")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in LLAMA_FACTORY_COLUMNS:
        raise Unresolved(f"{info}: {source.dataset}.formatting {formatting!r} is not alpaca or sharegpt")
    roles = entry.get("columns", {})  # its defaults are the keys our shapes read anyway
    unknown = set(roles) - set(LLAMA_FACTORY_COLUMNS[formatting])
    if unknown:
        raise Unresolved(f"{info}: {source.dataset}.columns {sorted(unknown)} are not {formatting} columns")
    # the user's own renames win over the entry's
    columns = {LLAMA_FACTORY_COLUMNS[formatting][role]: theirs for role, theirs in roles.items() if theirs}
    columns |= source.columns
    place: dict[str, Any] = {}
    if "file_name" in entry:
        place["path"] = info.parent / entry["file_name"]
    elif "hf_hub_url" in entry:
        place["hf"] = entry["hf_hub_url"]
    else:
        raise Unresolved(f"{info}: {source.dataset} has neither file_name nor hf_hub_url (other hubs are not read)")
    return Source(
        **place,
        config=source.config or entry.get("subset"),
        split=entry.get("split", source.split),
        revision=source.revision or entry.get("revision"),
        columns=columns,
        tags=entry.get("tags", {}) | source.tags if formatting == "sharegpt" else source.tags,
        documents=source.documents,
        weight=source.weight,
    )
