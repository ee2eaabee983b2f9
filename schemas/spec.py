"""The pipeline spec: one YAML file, loaded into this model tree and validated whole.

Every field has the default a user would pick. Variants are tagged unions on `kind`.
Paths in a spec are relative to the spec file, so a run never depends on the working
directory. `load_spec` raises `SpecError`, whose message names each bad field by its
path (`stages[1].train.lr`) and says what is allowed.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PositiveInt, ValidationError, model_validator

TOKENIZER_STAGE = "tokenizer"
# How conversations become text; "tokenizer" is the tokenizer's own chat template (stages/templates.py).
TemplateName = Literal["chatml", "llama2", "deepseek", "alpaca", "tokenizer"]


# A single path is accepted where a list of files is expected.
Files = Annotated[list[Path], BeforeValidator(lambda value: [value] if isinstance(value, str) else value)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class LlamaInit(Strict):
    """A Llama-architecture model built from this config with fresh weights."""

    arch: Literal["llama"] = "llama"
    hidden_size: PositiveInt = 256
    layers: PositiveInt = 4
    heads: PositiveInt = 4
    kv_heads: PositiveInt | None = Field(None, description="grouped-query attention; default: heads")
    intermediate_size: PositiveInt | None = Field(None, description="default: 8/3 · hidden_size rounded up to 64")
    max_seq_len: PositiveInt = 512
    rope_theta: float = Field(10000.0, gt=0)
    tie_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> LlamaInit:
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by heads {self.heads}")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be divisible by kv_heads {self.kv_heads}")
        return self


class ModelSpec(Strict):
    """Where the first training stage's model comes from: a fresh `init` or a local HF `path`."""

    init: LlamaInit | None = None
    path: Path | None = Field(None, description="a local Hugging Face model folder (never downloaded)")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.init is None) == (self.path is None):
            raise ValueError("give exactly one of model.init (a fresh model) or model.path (a local checkpoint)")
        return self


class TokenizerTrain(Strict):
    """A byte-level BPE trained on the text of the spec's data files."""

    vocab_size: int = Field(8192, ge=300, description="at least the 256 byte symbols plus the special tokens")
    min_frequency: PositiveInt = 2
    data: Files = Field(default_factory=list, description="text files to train on; default: every stage's data")


class TokenizerSpec(Strict):
    train: TokenizerTrain | None = None
    path: Path | None = Field(None, description="a local Hugging Face tokenizer folder")

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerSpec:
        if (self.train is None) == (self.path is None):
            raise ValueError("give exactly one of tokenizer.train or tokenizer.path")
        return self


class TrainSpec(Strict):
    """Optimisation settings shared by every training stage."""

    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine schedule floor, as a fraction of lr")
    warmup: float = Field(0.05, ge=0, description="warmup steps; below 1, a fraction of all steps")
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    batch_size: PositiveInt = 16
    grad_accum: PositiveInt = 1
    epochs: float = Field(1.0, gt=0)
    max_steps: PositiveInt | None = Field(None, description="overrides epochs when set")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 where the device multiplies bf16 natively")
    save_steps: PositiveInt = Field(100, description="in-stage checkpoint interval; a re-run resumes from the last one")
    logging_steps: PositiveInt = 10
    seed: int = 0


def expand(patterns: list[Path]) -> list[Path]:
    """Paths and glob patterns (`**` included) as the files they name: a path as itself, a pattern's matches sorted."""
    files: dict[Path, None] = {}
    for pattern in patterns:
        matches = [Path(pattern)] if Path(pattern).is_file() else sorted(Path(m) for m in glob.glob(str(pattern), recursive=True))
        files |= dict.fromkeys(m for m in matches if m.is_file())
    return list(files)


class StageBase(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="unique; names the MLflow run and the work folder")
    from_: str | None = Field(None, alias="from", description="the stage whose output is this stage's input; default: the previous one")
    on_invalid: Literal["fail", "skip"] = Field(
        "fail", description="fail: a bad row stops the run before any model loads; skip: bad rows are dropped, logged and counted")
    train: TrainSpec = TrainSpec()


class Packing(Strict):
    block_size: PositiveInt = 512


class PretrainStage(StageBase):
    """Causal LM on raw text: documents joined with EOS and cut into blocks."""

    kind: Literal["pretrain"]
    data_format: ClassVar[str] = "text"
    data: Files = Field(min_length=1, description="jsonl files of {\"text\"}; glob patterns too")
    heldout: Files = Field(default_factory=list, description="held-out text for eval loss")
    packing: Packing = Packing()
    streaming: bool = Field(False, description="read data as a stream at flat memory (corpora larger than memory); needs train.max_steps")
    shuffle_buffer: PositiveInt = Field(1024, description="blocks held for shuffling a stream")

    @model_validator(mode="after")
    def _stream_has_an_end(self) -> PretrainStage:
        if self.streaming and self.train.max_steps is None:
            raise ValueError("a streaming stage needs train.max_steps: a stream has no length to count epochs in")
        return self


class SFTStage(StageBase):
    """Supervised fine-tuning on conversations; loss on every assistant turn only."""

    kind: Literal["sft"]
    data_format: ClassVar[str] = "conversations"
    data: Files = Field(min_length=1, description="jsonl files of {\"conversations\": [{role, content}]}")
    heldout: Files = Field(default_factory=list, description="held-out conversations: eval loss and exact match")
    max_len: PositiveInt = Field(512, description="tokens per example, and per packed row")
    packing: bool = Field(True, description="best-fit whole conversations into rows of max_len; attention never crosses one")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="what happens to a conversation longer than max_len (counted)")
    eval_samples: int = Field(64, ge=0, description="held-out conversations answered greedily for exact match")
    template: TemplateName | None = Field(None, description="default: the pipeline's template")


Stage = Annotated[PretrainStage | SFTStage, Field(discriminator="kind")]


class PipelineSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="names the MLflow experiment")
    model: ModelSpec
    tokenizer: TokenizerSpec = TokenizerSpec(train=TokenizerTrain())
    template: TemplateName = "chatml"
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="after")
    def _stages_link(self) -> PipelineSpec:
        seen: set[str] = {TOKENIZER_STAGE}
        for i, stage in enumerate(self.stages):
            if stage.name in seen:
                raise ValueError(f"stages[{i}].name {stage.name!r} is used twice (or is reserved); stage names must be unique")
            if stage.from_ is not None and stage.from_ not in seen - {TOKENIZER_STAGE}:
                raise ValueError(f"stages[{i}].from names {stage.from_!r}, which is not an earlier stage")
            seen.add(stage.name)
        first = self.stages[0]
        if self.model.init is not None and not isinstance(first, PretrainStage):
            raise ValueError(f"stages[0] ({first.name}, kind {first.kind}) needs a trained model to start from: "
                             "begin with a pretrain stage, or give model.path")
        if self.model.path is not None and self.tokenizer.path is None:
            raise ValueError("model.path needs tokenizer.path (usually the same folder): a newly trained tokenizer "
                             "would not match the model's embeddings")
        if self.model.init is not None:
            for i, stage in enumerate(self.stages):
                if isinstance(stage, PretrainStage) and stage.packing.block_size > self.model.init.max_seq_len:
                    raise ValueError(f"stages[{i}].packing.block_size {stage.packing.block_size} exceeds model.init.max_seq_len "
                                     f"{self.model.init.max_seq_len}")
        return self

    def upstream_of(self, stage: Stage) -> Stage | None:
        """The stage whose checkpoint feeds `stage`: `from` if given, else the previous one."""
        index = self.stages.index(stage)
        if stage.from_ is not None:
            return next(s for s in self.stages if s.name == stage.from_)
        return self.stages[index - 1] if index else None

    def tokenizer_corpus(self) -> list[tuple[Path, str, str]]:
        """The files a trained tokenizer learns from: (path, format, on_invalid); the given text files, else every stage's data."""
        if self.tokenizer.train is not None and self.tokenizer.train.data:
            return [(path, "text", "fail") for path in self.tokenizer.train.data]
        return [(path, stage.data_format, stage.on_invalid) for stage in self.stages for path in stage.data]

    def data_contracts(self) -> list[tuple[Path, str, str]]:
        """Every data file read whole, once: (path, the format it must have, what to do with a bad row).

        Streamed corpora are left out: they are checked line by line at flat memory instead (`streamed`)."""
        streamed = self.streamed()
        files = [(path, stage.data_format, stage.on_invalid) for stage in self.stages
                 for path in stage.heldout + ([] if stage in streamed else stage.data)]
        if self.tokenizer.train is not None and self.tokenizer.train.data:
            files += self.tokenizer_corpus()
        return list(dict.fromkeys(files))

    def streamed(self) -> list[PretrainStage]:
        return [stage for stage in self.stages if isinstance(stage, PretrainStage) and stage.streaming]


class SpecError(ValueError):
    """A spec that cannot run, with one line per problem."""


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("pretrain", "sft") and out.endswith("]"):
            continue  # the tagged-union branch adds no information to the path
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _folder(path: Path, base: Path, where: str, missing: list[str]) -> Path:
    resolved = path if path.is_absolute() else (base / path).resolve()
    if not resolved.is_dir():
        missing.append(f"{where}: {path} is not a folder (looked for {resolved})")
    return resolved


def _resolve(spec: PipelineSpec, base: Path) -> PipelineSpec:
    """Every data path made absolute against the spec's folder and expanded into the files it names; each SFT stage given its template."""

    def fix(path: Path, where: str) -> list[Path]:
        resolved = path if path.is_absolute() else (base / path).resolve()
        files = expand([resolved])
        if not files:
            missing.append(f"{where}: {path} does not exist (looked for {resolved})" if glob.escape(str(path)) == str(path)
                           else f"{where}: {path} matches no file (looked for {resolved})")
        return files

    missing: list[str] = []
    stages = [
        stage.model_copy(update={
            "data": [f for p in stage.data for f in fix(p, f"stages[{i}].data")],
            "heldout": [f for p in stage.heldout for f in fix(p, f"stages[{i}].heldout")],
        } | ({"template": stage.template or spec.template} if isinstance(stage, SFTStage) else {}))
        for i, stage in enumerate(spec.stages)
    ]
    model = spec.model
    if model.path is not None:
        model = model.model_copy(update={"path": _folder(model.path, base, "model.path", missing)})
    tokenizer = spec.tokenizer
    if tokenizer.path is not None:
        tokenizer = tokenizer.model_copy(update={"path": _folder(tokenizer.path, base, "tokenizer.path", missing)})
    elif tokenizer.train is not None and tokenizer.train.data:
        train = tokenizer.train.model_copy(update={"data": [f for p in tokenizer.train.data for f in fix(p, "tokenizer.train.data")]})
        tokenizer = tokenizer.model_copy(update={"train": train})
    if missing:
        raise SpecError("\n".join(missing))
    return spec.model_copy(update={"stages": stages, "model": model, "tokenizer": tokenizer})


def load_spec(path: Path) -> PipelineSpec:
    """Read, validate and resolve a spec file; raise SpecError with every problem found."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SpecError(f"{path}: cannot read the spec ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a mapping with name, model and stages")
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as err:
        lines = [f"{path}: {len(err.errors())} problem(s) in the spec"]
        for e in err.errors():
            lines.append(f"  {_location(e['loc'])}: {e['msg'].removeprefix('Value error, ')}" + (f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""))
        raise SpecError("\n".join(lines)) from None
    try:
        return _resolve(spec, path.resolve().parent)
    except SpecError as err:
        raise SpecError(f"{path}: missing files\n  " + str(err).replace("\n", "\n  ")) from None
