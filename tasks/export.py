"""A stage's model as a folder people take elsewhere: no MLflow store, no pipeline, only Hugging Face files.

The folder holds the weights in safetensors (a LoRA stage's adapters merged onto their base), the tokenizer with
its chat template, a generation config that stops where a reply ends, and a model card (README.md) that names the
lineage: each stage from the first to this one, its run, fingerprint and data digests, its own measures, and the
scores the eval stages gave this model. It is written beside its destination and moved into place whole, so a
folder that exists is complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run

from stages.common.contract import ModelError
from tasks.lineage import TAG, input_run_of
from tasks.registry import model_of

# each stage's own measures the card shows, where its run has them
MEASURES = (
    "train_loss",
    "heldout_loss",
    "exact_match",
    "heldout_preference_accuracy",
    "heldout_kendall_tau",
    "heldout_reward_accuracy",
)


def lineage_of(mlflow: MlflowClient, run: Run) -> list[Run]:
    """The runs from the first stage to `run`, following each run's input run."""
    runs = [run]
    while input_run := input_run_of(runs[-1]):
        runs.append(mlflow.get_run(input_run))
    return runs[::-1]


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def model_card(mlflow: MlflowClient, run: Run, pipeline: str) -> str:
    """The README.md of an exported model: how to load it, its lineage, and its scores."""
    tags = run.data.tags
    stage = tags[f"{TAG}stage"]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [llm-lifecycle]",
        "---",
        f"# {pipeline} / {stage}",
        "",
        f"Made by llm-lifecycle: the pipeline `{pipeline}`, stage `{stage}` (MLflow run `{run.info.run_id}`). "
        "The weights are in safetensors (a LoRA stage's adapters merged), the tokenizer holds the chat template the "
        "model was trained with, and the generation config stops where a reply ends:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder>")',
        "```",
        "",
        "## Lineage, first stage first",
        "",
        "| stage | kind | run | fingerprint | data (name: sha256) |",
        "|---|---|---|---|---|",
    ]
    chain = lineage_of(mlflow, run)
    for step in chain:
        step_tags = step.data.tags
        data = "; ".join(
            f"{given.dataset.name}: {given.dataset.digest}"
            for given in step.inputs.dataset_inputs
            if any(tag.key == "mlflow.data.context" and tag.value == "train" for tag in given.tags)
        )
        lines.append(
            f"| {step_tags[f'{TAG}stage']} | {step_tags.get(f'{TAG}kind', '')} | `{step.info.run_id}` | "
            f"`{step_tags.get(f'{TAG}fingerprint', '')[:16]}` | {data or '-'} |"
        )
    if base := tags.get(f"{TAG}base_model") or chain[0].data.tags.get(f"{TAG}base_model"):
        first = chain[0].data.tags
        named = first.get(f"{TAG}base_model_id")
        origin = f"{named} at {first[f'{TAG}base_model_revision']}" if named else base
        lines += ["", f"The first stage started from {origin} (sha256 {first.get(f'{TAG}base_model_digest', '')})."]
    measured = [name for name in MEASURES if any(name in step.data.metrics for step in chain)]
    if measured:
        lines += [
            "",
            "## Each stage's own measures (its held-out data)",
            "",
            "| stage | " + " | ".join(measured) + " |",
            "|---|" + "---|" * len(measured),
        ]
        for step in chain:
            cells = [_cell(step.data.metrics.get(name)) for name in measured]
            lines.append(f"| {step.data.tags[f'{TAG}stage']} | " + " | ".join(cells) + " |")
    if (model_id := model_of(run)) is not None and (scores := mlflow.get_logged_model(model_id).metrics):
        lines += ["", "## Scores the eval stages gave this model", "", "| metric | value |", "|---|---|"]
        lines += [f"| {metric.key} | {metric.value:.4g} |" for metric in sorted(scores, key=lambda m: m.key)]
    return "\n".join(lines) + "\n"


def save_chat_model(checkpoint: Path, folder: Path) -> None:
    """A checkpoint as one plain Hugging Face folder: an adapter merged onto its base, safetensors, the generation
    config stopping where a reply ends, the tokenizer with its chat and response templates."""
    from stages.common.generation import ChatModel

    loaded = ChatModel.load(checkpoint, device="cpu")
    loaded.model.save_pretrained(folder, safe_serialization=True)
    loaded.tokenizer.save_pretrained(folder)


def export(mlflow: MlflowClient, run: Run, checkpoint: Path, out: Path, pipeline: str) -> Path:
    """Write the model of `run` (its checkpoint folder `checkpoint`) into `out`, which must not exist yet."""
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} exists and is not empty: export writes a new folder")
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_chat_model(checkpoint, partial)
    (partial / "README.md").write_text(model_card(mlflow, run, pipeline), encoding="utf-8")
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return out
