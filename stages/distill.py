"""The distill stage: a student learns a teacher's next-token distributions on the assistant turns of conversations.

Off-policy knowledge distillation (Hinton et al. 2015; the supervised setting of GKD, Agarwal et al. 2024): the data
is SFT's (prepared as SFT prepares it, packed or padded, the same tokens labelled), and where SFT's loss asks the
student for the one token written, this one asks for the teacher's whole distribution there, by the spec's
`divergence` (stages/common/losses.distillation_loss). The student is the input stage's model or a fresh `student`
of its own shape; the teacher, an earlier stage's model, a model folder or a models:/ URI, is frozen, and must share
the pipeline's tokenizer. Held out, the stage measures the divergence to the teacher and the exact match of greedy
answers, before and after, so the run shows how much of the teacher the student took.

On-policy (GKD, Agarwal et al. 2024, §3.2): with `on_policy` λ > 0, each step is, with probability λ (drawn from the
stage's seed and the step, so a resumed stage draws the same), one on the student's own replies: the step's share of
the data's prompts (each conversation up to its last reply, `prepare` keeps them) are answered by the student at
`temperature`, and the loss is the divergence on the tokens it wrote. The student learns where it goes, not only
where the data goes: the mismatch between training on the data's replies and generating its own is what GKD closes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from torch import Tensor
from transformers import AutoTokenizer

from schemas.data import read_files
from schemas.spec import DistillStage
from stages import sft
from stages.common import checkpoint
from stages.common.contract import ModelError, Prepared, StageInputs, StageResult
from stages.common.generation import Sampling, generate, stop_ids
from stages.common.losses import distillation_loss
from stages.common.recipe import adapt, fit, load, make_trainer, save
from stages.common.templates import IGNORE, encode_prompt, end_of_turn_id
from stages.common.tools import chats
from stages.common.training import ObjectiveTrainer

__all__ = ["examples", "prepare", "run"]  # the TrainingStage protocol (stages/__init__.py)

examples = sft.examples
PROMPTS = "prompts"  # the split of the data's prompts, for on-policy steps


def prepare(spec: DistillStage, tokenizer) -> Prepared:
    """SFT's conversations and labelled tokens; with on_policy, each training conversation's prompt too (up to its
    last assistant reply, the tools offered and the assistant header), for the student to answer."""
    prepared = sft.prepare(spec, tokenizer)
    if not spec.on_policy:
        return prepared
    read = read_files(spec.data, "conversations", spec.on_invalid, spec.mix)
    prompts = []
    for chat in chats(read.frame):
        last = max(i for i, m in enumerate(chat.messages) if m["role"] == "assistant")
        ids = encode_prompt(chat.messages[:last], tokenizer, spec.template, chat.tools)
        if len(ids) + spec.max_new_tokens <= spec.max_len:
            prompts.append(ids)
    datasets = DatasetDict({**prepared.datasets, PROMPTS: Dataset.from_dict({"prompt_ids": prompts})})
    counts = prepared.counts | {"prompts": float(len(prompts))}
    return Prepared(datasets, prepared.rejected, counts)


class DistillTrainer(ObjectiveTrainer):
    def __init__(self, *args, teacher, prompts: Dataset | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device)
        self.prompts = prompts
        self.drawn_step, self.drawn = -1, 0  # the step of the last on-policy draw, and its micro-batches so far

    def on_policy_step(self) -> bool:
        """Whether this optimizer step learns on the student's own replies: a draw of probability on_policy, seeded
        by the stage's seed and the step."""
        if not self.spec.on_policy:
            return False
        if self.prompts is None:
            raise ValueError(
                f"stage {self.spec.name}: on_policy needs the data's prompts, and its prepared data has none (prepared "
                "before on_policy was set?): remove the stage's prepared data to prepare it again"
            )
        draw = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.global_step)
        return float(torch.rand(1, generator=draw)) < self.spec.on_policy

    @torch.no_grad()
    def own_replies(self, model, rows: int) -> dict[str, Tensor]:
        """`rows` of the data's prompts (the step's, in a seeded order) answered by the student at the stage's
        temperature: the batch as the loss reads it, labels on the tokens the student wrote."""
        spec, tokenizer = self.spec, self.processing_class
        # each micro-batch of a step its own prompts: drawn by the step and the micro-batch's place in it
        step = self.state.global_step
        self.drawn = self.drawn + 1 if self.drawn_step == step else 0
        self.drawn_step = step
        order = torch.Generator().manual_seed(self.args.seed + 1_000_003 * step + self.drawn)
        picked = torch.randperm(len(self.prompts), generator=order)[:rows].tolist()
        prompts = [self.prompts[i]["prompt_ids"] for i in picked]
        student = self.accelerator.unwrap_model(model)
        stops = stop_ids(tokenizer, end_of_turn_id(tokenizer, spec.template))
        sampling = Sampling(spec.temperature, 1.0, spec.max_new_tokens)
        replies = generate(student, prompts, stops, tokenizer.pad_token_id, sampling, batch_size=rows)
        student.train()
        width = max(len(p) + len(r) for p, r in zip(prompts, replies))
        pad = tokenizer.pad_token_id
        input_ids = [p + r + [pad] * (width - len(p) - len(r)) for p, r in zip(prompts, replies)]
        labels = [[IGNORE] * len(p) + r + [IGNORE] * (width - len(p) - len(r)) for p, r in zip(prompts, replies)]
        mask = [[1] * (len(p) + len(r)) + [0] * (width - len(p) - len(r)) for p, r in zip(prompts, replies)]
        self.record(own_reply_length=sum(map(len, replies)) / rows)
        device = self.args.device
        return {
            "input_ids": torch.tensor(input_ids, device=device),
            "attention_mask": torch.tensor(mask, device=device),
            "labels": torch.tensor(labels, device=device),
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        on_policy = model.training and self.on_policy_step()
        if on_policy:  # right-padded rows: positions from the mask's cumulative sum are plain 0, 1, 2, ...
            inputs = self.own_replies(model, len(inputs["input_ids"]))
        self.record(on_policy=float(on_policy))
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
        prompts=datasets.get(PROMPTS),
    )

    # the divergence to the teacher on the held-out conversations, and exact match
    metrics, resumed_from = fit(trainer, sft.held_out_measure(trainer, spec, asked, "heldout_divergence"))
    counts = {"teacher_parameters": float(sum(p.numel() for p in teacher.parameters()))}
    counts["student_parameters"] = float(sum(p.numel() for p in model.parameters()))
    return save(spec, inputs, trainer, workdir, metrics, resumed_from, counts=counts)
