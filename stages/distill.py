"""The distill stage: a student learns a teacher's next-token distributions on the assistant turns of conversations.

Off-policy knowledge distillation (Hinton et al. 2015; the supervised setting of GKD, Agarwal et al. 2024): the data
is SFT's (prepared as SFT prepares it, packed or padded, the same tokens labelled), and where SFT's loss asks the
student for the one token written, this one asks for the teacher's whole distribution there, by the spec's
`divergence` (stages/common/losses.distillation_loss). The student is the input stage's model or a fresh `student`
of its own shape; the teacher, an earlier stage's model, a model folder or a models:/ URI, is frozen, and must share
the pipeline's tokenizer. Held out, the stage measures the divergence to the teacher and the exact match of greedy
answers, before and after, so the run shows how much of the teacher the student took.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from schemas.spec import DistillStage
from stages import sft
from stages.common import checkpoint
from stages.common.contract import ModelError, StageInputs, StageResult
from stages.common.losses import distillation_loss
from stages.common.recipe import adapt, fit, load, make_trainer, save
from stages.common.templates import IGNORE
from stages.common.training import ObjectiveTrainer

__all__ = ["examples", "prepare", "run"]  # the TrainingStage protocol (stages/__init__.py)

prepare = sft.prepare  # the same conversations, the same labelled tokens
examples = sft.examples


class DistillTrainer(ObjectiveTrainer):
    def __init__(self, *args, teacher, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        batch = {key: value for key, value in inputs.items() if key != "labels"}
        student = model(**batch).logits
        with torch.no_grad():
            teacher = self.teacher(**batch).logits
        # logits at t score the token at t + 1: the positions whose next token is one the stage learns
        learned = labels[:, 1:] != IGNORE
        spec = self.spec
        loss = distillation_loss(
            student[:, :-1], teacher[:, :-1], learned, spec.divergence, spec.beta, spec.temperature
        )
        with torch.no_grad():  # the written token's loss, as SFT would have it: how far the student is from the data
            nll = torch.nn.functional.cross_entropy(
                student[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE
            )
        self.record(nll=nll)
        return (loss, {"logits": student}) if return_outputs else loss


def teacher_of(spec: DistillStage, inputs: StageInputs, tokenizer):
    """The teacher, frozen: an earlier stage's model or a URI's (fetched by the flow), or a model folder; refused
    (naming both) when its tokenizer is not the pipeline's."""
    folder = inputs.stage_models.get(spec.teacher) or Path(spec.teacher)
    if not folder.is_dir():
        raise ModelError(f"teacher {spec.teacher}: {folder} is not a model folder")
    theirs = AutoTokenizer.from_pretrained(folder).get_vocab()
    if theirs != tokenizer.get_vocab():
        raise ModelError(
            f"teacher {spec.teacher} ({folder}) has a tokenizer of {len(theirs)} tokens that is not the pipeline's "
            f"({len(tokenizer)} tokens): a teacher's distributions are over its own tokens, so both must share one"
        )
    return checkpoint.load_model(folder, tokenizer).requires_grad_(False).eval()


def run(spec: DistillStage, inputs: StageInputs, workdir: Path) -> StageResult:
    tokenizer, model = load(spec, inputs)
    teacher = teacher_of(spec, inputs, tokenizer)
    model = adapt(spec, inputs, model)
    datasets = inputs.datasets
    asked = sft.held_out_chats(datasets, spec.eval_samples) if "heldout" in datasets else []
    trainer = make_trainer(
        spec,
        model,
        tokenizer,
        workdir,
        datasets,
        sft.collator(spec, tokenizer),
        inputs.callbacks,
        DistillTrainer,
        spec=spec,
        teacher=teacher,
    )

    # the divergence to the teacher on the held-out conversations, and exact match
    metrics, resumed_from = fit(trainer, sft.held_out_measure(trainer, spec, asked, "heldout_divergence"))
    counts = {"teacher_parameters": float(sum(p.numel() for p in teacher.parameters()))}
    counts["student_parameters"] = float(sum(p.numel() for p in model.parameters()))
    return save(spec, inputs, trainer, workdir, metrics, resumed_from, counts=counts)
