"""The eval stage: every checkpoint of the lineage scored side by side on the same held-out data.

Nothing trains. The data is read and encoded once (the first `limit` rows of each file), then
each checkpoint is loaded in turn (float32, eval mode, no gradients), measured, and freed
before the next loads. A metric is measured only where its data exists; every row has the
same columns, nan where a checkpoint was not measured.

The metrics (columns):
    perplexity           text: the documents tokenized, EOS after each, the stream cut into blocks of
                         max_len (the last, shorter block included, so a short file still counts);
                         exp(−Σ log p / N) over every predicted token of every block (token-weighted).
    response_loss        conversations through the template: −Σ log p / N over the assistant tokens
                         (each reply and its end-of-turn marker), N counted over all conversations.
    exact_match          conversations: share whose last assistant turn the greedy reply to the turns
                         before it reproduces exactly (`generation.exact_match`).
    tool_calls           conversations with tool calls: at each assistant turn that called tools, the greedy
                         reply to the conversation before it (offered its tools) is read for <tool_call>
                         blocks; the share of those turns whose calls equal the reference's: the same names,
                         arguments equal as parsed JSON, in any order (`tools.calls_match`).
    task_accuracy        prompts with a reference answer: share of greedy replies that contain the
                         answer, by `answer_matches`.
    reward               prompts: the mean over greedy replies of the spec's rewards, summed with their
                         weights (by default the last scored grpo stage's: its verifiable reward).
                         With an `answer` reward, only prompts with a reference answer are scored.
    reward_model         prompts: the mean score the lineage's reward model gives the greedy replies.
    preference_accuracy  preference pairs: share where the chosen reply scores higher than the rejected,
    preference_margin    and the mean score difference chosen − rejected. A reply's score is its
                         length-normalised log-prob (mean over its tokens): reference-free, so every
                         checkpoint is scored alone and replies of different lengths compare fairly.
    reward_margin        preference pairs: the mean DPO implicit-reward margin (β = 1),
                             (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)),
                         log-probs summed over the reply, with the first scored checkpoint as π_ref
                         for every row: one common reference, so the rows compare with each other.
                         nan on the reference's own row (it would be 0 by definition).
    kendall_tau, top1    ranked lists: mean Kendall tau-b between the checkpoint's scores (as above)
                         and the reference scores, and the share of lists whose best-scored candidate
                         is one the reference ranks first (`stages.common.metrics.ranking`).

    <task>/<metric>      benchmarks: each lm-evaluation-harness task's (and group's) metrics, run on the loaded
                         checkpoint (`stages.common.benchmarks`); the seconds each took are a table of their own.

Pairs and lists in which max_len leaves some candidate no reply token are left out: such a reply has no score.

Samples: every checkpoint answers the same prompts greedily (spec.samples, else the first four
held-out prompts, else the first four held-out conversations up to their last reply).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from datasets import Dataset
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from transformers import AutoTokenizer

from schemas.data import read_files
from schemas.formats import Format
from schemas.rewards import AnswerReward, ModelReward
from schemas.sources import Source
from schemas.spec import EvalStage
from stages.common.benchmarks import Bench, Scores
from stages.common.candidates import encode, rows, scored
from stages.common.checkpoint import load_model
from stages.common.contract import columns_of
from stages.common.generation import answer, exact_match
from stages.common.losses import sequence_logps
from stages.common.metrics import mean_scores, perplexity, preference, ranking
from stages.common.packing import concat_chunk, tokenize_documents
from stages.common.progress import duration, say
from stages.common.reward_functions import checked_rewards, reward_functions, task_accuracy, weighted_total
from stages.common.templates import IGNORE, conversations, encode_conversation
from stages.common.tools import Chat, calling_turns, chats, tool_call_accuracy

SAMPLES = 4  # held-out prompts answered side by side when the spec names none
BATCH = 8  # sequences per forward when scoring: bounds the float32 logits ([batch, max_len, vocab]) in memory

# the columns each kind of held-out data gives, in table order
METRICS: dict[Format, tuple[str, ...]] = {
    "text": ("perplexity",),
    "conversations": ("response_loss", "exact_match", "tool_calls"),
    "prompts": ("task_accuracy", "reward", "reward_model"),
    "preference": ("preference_accuracy", "preference_margin", "reward_margin"),
    "ranked": ("kendall_tau", "top1"),
}


@dataclass(frozen=True)
class Report:
    # one row per checkpoint: {"checkpoint": name, "<metric>": value, ...}; nan where not measured
    metrics: list[dict[str, str | float]]
    samples: list[dict[str, str]]  # one row per sample prompt: {"prompt": text, "<checkpoint name>": reply, ...}
    plot: Path  # a PNG: one panel per metric, a bar per checkpoint in lineage order
    # one row per checkpoint: {"checkpoint": name, "<task>": seconds its benchmark took}; empty without benchmarks
    seconds: list[dict[str, str | float]]

    def metrics_table(self) -> dict[str, list]:
        """The metrics as columns, the shape `MlflowClient.log_table` takes."""
        return columns_of(self.metrics)

    def samples_table(self) -> dict[str, list]:
        return columns_of(self.samples)


# ---------------------------------------------------------------- reward margins and rewards


def implicit_reward_margin(policy: Tensor, reference: Tensor, beta: float = 1.0) -> float:
    """Mean DPO implicit-reward margin of pairs: β·[(π_w − ref_w) − (π_l − ref_l)].

    policy, reference: [pairs, 2] summed reply log-probs, chosen in column 0, rejected in column 1."""
    ratio = policy - reference
    return (beta * (ratio[:, 0] - ratio[:, 1])).mean().item()


# ---------------------------------------------------------------- the data, read and encoded once


@dataclass(frozen=True)
class HeldOut:
    """The eval data as every checkpoint is scored on it."""

    text_blocks: list[list[int]]
    chats: list[Chat]
    encoded_chats: list[tuple[list[int], list[int]]]
    tool_turns: list[tuple[Chat, list[dict]]]  # (the conversation before a turn that called tools, its calls)
    tasks: list[tuple[list[dict], str | None]]  # (prompt messages, reference answer or None)
    pairs: Dataset | None  # preference pairs as candidates, chosen first
    pair_tokens: Tensor | None  # [pairs, 2]: reply tokens of each candidate, to length-normalise the summed log-probs
    ranked: Dataset | None
    samples: list[tuple[str, Chat]]  # (the prompt as shown, the conversation answered)

    def columns(self, spec: EvalStage) -> list[str]:
        """The metrics this data measures, in table order."""
        present = {
            "text": self.text_blocks,
            "conversations": self.chats,
            "prompts": self.tasks,
            "preference": self.pairs is not None,
            "ranked": self.ranked is not None,
        }
        asked = {
            "task_accuracy": any(reference is not None for _, reference in self.tasks),
            "reward": bool(spec.rewards),
            "reward_model": spec.reward_model is not None,
            "tool_calls": bool(self.tool_turns),
        }
        return [column for fmt, names in METRICS.items() if present[fmt] for column in names if asked.get(column, True)]


def _read(sources: list[Source], fmt: Format, limit: int, on_invalid: str) -> pl.DataFrame | None:
    """The first `limit` valid rows of each source, sources in order; None without sources."""
    if not sources:
        return None
    return pl.concat([read_files([source], fmt, on_invalid).frame.head(limit) for source in sources])


def text_blocks(texts: list[str], tokenizer, max_len: int) -> list[list[int]]:
    """The documents with EOS after each, as one stream cut into max_len blocks; the shorter tail is a block too."""
    documents = tokenize_documents(texts, tokenizer)
    blocks = concat_chunk(documents, tokenizer.eos_token_id, max_len)
    full = blocks.input_ids.tolist()
    if not blocks.dropped_tokens:
        return full
    stream_tail = [t for ids in documents for t in (*ids, tokenizer.eos_token_id)][-blocks.dropped_tokens :]
    return [*full, stream_tail]


def _reply_tokens(labels: list[int]) -> int:
    """Tokens a candidate's score averages over: its labelled tokens after the first position, as `sequence_logps`
    counts."""
    return sum(label != IGNORE for label in labels[1:])


def _scorable(dataset: Dataset) -> Dataset | None:
    """The encoded rows, None when there are none: `candidates.encode` leaves out a row whose cut to max_len leaves
    some candidate no reply token (it would have no score)."""
    return dataset if len(dataset) else None


def _samples(spec: EvalStage, tasks: list[list[dict]], held: list[Chat]) -> list[tuple[str, Chat]]:
    if spec.samples:
        return [(text, Chat([{"role": "user", "content": text}])) for text in spec.samples]
    asked = [Chat(messages) for messages in tasks[:SAMPLES]] or [Chat(c.messages[:-1], c.tools) for c in held[:SAMPLES]]
    # shown by its last question: a conversation before its answer may end with a tool's result
    return [(next(m["content"] for m in reversed(c.messages) if m["role"] == "user"), c) for c in asked]


def held_out(spec: EvalStage, tokenizer) -> HeldOut:
    """Every held-out file of the spec read (first `limit` rows of each) and encoded for scoring."""
    read = {fmt: _read(sources, fmt, spec.limit, spec.on_invalid) for fmt, (sources, _) in spec.files().items()}
    texts = read["text"]["text"].to_list() if read["text"] is not None else []
    held = chats(read["conversations"]) if read["conversations"] is not None else []
    prompts = read["prompts"]
    asked = conversations(prompts, "prompt_") if prompts is not None else []
    references = prompts["answer"].to_list() if prompts is not None else []
    pairs = ranked = pair_tokens = None
    if read["preference"] is not None:
        pairs = _scorable(encode(rows(read["preference"]), tokenizer, spec.max_len, spec.template)[0])
    if pairs is not None:
        pair_tokens = torch.tensor(
            [[_reply_tokens(labels) for labels in row] for row in pairs["labels"]], dtype=torch.float32
        )
    if read["ranked"] is not None:
        ranked = _scorable(encode(rows(read["ranked"]), tokenizer, spec.max_len, spec.template)[0])
    return HeldOut(
        text_blocks=text_blocks(texts, tokenizer, spec.max_len) if texts else [],
        chats=held,
        encoded_chats=[encode_conversation(c.messages, tokenizer, spec.max_len, spec.template, c.tools) for c in held],
        tool_turns=calling_turns(held),
        tasks=list(zip(asked, references)),
        pairs=pairs,
        pair_tokens=pair_tokens,
        ranked=ranked,
        samples=_samples(spec, asked, held),
    )


# ---------------------------------------------------------------- one checkpoint measured


@torch.no_grad()
def labelled_logp(model, sequences: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[float, float]:
    """Σ log p of every labelled token (after the first position) over all sequences, and how many tokens that is."""
    total = tokens = 0.0
    for start in range(0, len(sequences), BATCH):
        batch = sequences[start : start + BATCH]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in batch], device=model.device)
        attention_mask = torch.tensor(
            [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=model.device
        )
        labels = torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels in batch], device=model.device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        sums, counts = sequence_logps(logits, labels)
        total += sums.sum().item()
        tokens += counts.sum().item()
    return total, tokens


def _preference(model, data: HeldOut, pad_id: int) -> tuple[dict[str, float], Tensor]:
    """Accuracy and margin of the length-normalised scores, and the summed log-probs the implicit reward needs (one
    forward)."""
    summed = torch.tensor(scored(model, data.pairs, pad_id, length_normalised=False))
    normalised = mean_scores(summed, data.pair_tokens)
    found = preference(normalised[:, 0], normalised[:, 1])
    return {"preference_accuracy": found["accuracy"], "preference_margin": found["margin"]}, summed


def measure(model, tokenizer, data: HeldOut, spec: EvalStage) -> tuple[dict[str, float], Tensor | None, list[str]]:
    """This model's metrics on the data it has (reward_margin and the rewards aside), its summed log-probs of the
    preference pairs, and its greedy replies to the held-out prompts."""
    pad_id = tokenizer.pad_token_id
    found: dict[str, float] = {}
    if data.text_blocks:
        total, tokens = labelled_logp(model, [(ids, ids) for ids in data.text_blocks], pad_id)
        found["perplexity"] = perplexity(total, tokens)
    if data.chats:
        total, tokens = labelled_logp(model, data.encoded_chats, pad_id)
        found["response_loss"] = -total / tokens if tokens else math.nan
        found["exact_match"] = exact_match(model, tokenizer, data.chats, spec.template, spec.max_new_tokens)
    if data.tool_turns:
        before, calls = zip(*data.tool_turns)
        found["tool_calls"] = tool_call_accuracy(replies_to(model, tokenizer, before, spec), list(calls))
    replies = (
        answer(model, tokenizer, [messages for messages, _ in data.tasks], spec.template, spec.max_new_tokens)
        if data.tasks
        else []
    )
    if answered := [(reply, reference) for reply, (_, reference) in zip(replies, data.tasks) if reference is not None]:
        found["task_accuracy"] = task_accuracy(*map(list, zip(*answered)))
    pair_logps = None
    if data.pairs is not None:
        pair_found, pair_logps = _preference(model, data, pad_id)
        found |= pair_found
    if data.ranked is not None:
        found |= ranking(scored(model, data.ranked, pad_id), data.ranked["scores"])
    return found, pair_logps, replies


@dataclass(frozen=True)
class Scored:
    """What one checkpoint gave: its metrics, summed preference log-probs, greedy replies to the held-out prompts,
    replies to the samples, and its benchmark scores by task."""

    found: dict[str, float]
    pair_logps: Tensor | None
    replies: list[str]
    samples: list[str]
    benchmarks: dict[str, Scores]


def _scored_checkpoint(
    folder: Path, tokenizer, data: HeldOut, spec: EvalStage, bench: Bench | None, name: str, number: str
) -> Scored:
    """One checkpoint loaded, measured, benchmarked and asked the samples; its model is unreferenced when this
    returns."""
    model = load_model(folder, tokenizer).to("cuda" if torch.cuda.is_available() else "cpu").eval()
    found, pair_logps, replies = measure(model, tokenizer, data, spec)
    samples = replies_to(model, tokenizer, [chat for _, chat in data.samples], spec)
    benchmarks = bench.score(model, tokenizer, name, number) if bench is not None else {}
    return Scored(found, pair_logps, replies, samples, benchmarks)


def replies_to(model, tokenizer, asked: Sequence[Chat], spec: EvalStage) -> list[str]:
    """Greedy replies to conversations, each rendered with the tools it offers."""
    messages, tools = [c.messages for c in asked], [c.tools for c in asked]
    return answer(model, tokenizer, messages, spec.template, spec.max_new_tokens, tools=tools)


def rewarded(
    spec: EvalStage, data: HeldOut, tokenizer, replies: dict[str, list[str]], reward_models: dict[str, Path]
) -> dict[str, dict[str, float]]:
    """Per checkpoint, the mean reward of its greedy replies to the held-out prompts (spec.rewards, weighted) and the
    reward model's mean score of them; the reward model loads once, after every checkpoint has been freed."""
    found: dict[str, dict[str, float]] = {name: {} for name in replies}
    prompts, references = [messages for messages, _ in data.tasks], [reference for _, reference in data.tasks]
    # one call, so a reward model that is both one of the rewards and the reward_model column is loaded once
    scorer = [ModelReward(kind="reward_model", stage=spec.reward_model)] if spec.reward_model is not None else []
    functions = reward_functions([*spec.rewards, *scorer], reward_models)
    if scorer:
        *functions, scorer_function = functions
    if spec.rewards:
        needs_answer = any(isinstance(r, AnswerReward) for r in spec.rewards)
        rows = [i for i, reference in enumerate(references) if reference is not None or not needs_answer]
        for name, texts in replies.items():
            picked = [texts[i] for i in rows]
            lengths = [len(tokenizer(text, add_special_tokens=False).input_ids) for text in picked]
            scores = checked_rewards(
                functions, [prompts[i] for i in rows], picked, [references[i] for i in rows], lengths
            )
            found[name]["reward"] = weighted_total(functions, torch.tensor(scores)).mean().item() if rows else math.nan
    if scorer:
        for name, texts in replies.items():
            found[name]["reward_model"] = sum(scorer_function.score(prompts, texts, references, [])) / len(texts)
    return found


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the plot


def plot(metrics: list[dict[str, str | float]], columns: list[str], path: Path) -> Path:
    """One panel per metric, a bar per checkpoint in lineage order; a checkpoint not measured has no bar.

    A bare Figure on the Agg canvas: no display is needed and pyplot's global figure registry is never touched."""
    names = [str(row["checkpoint"]) for row in metrics]
    across = max(1, min(4, len(columns)))
    down = max(1, math.ceil(len(columns) / across))
    figure = Figure(figsize=(3.2 * across, 2.8 * down), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(down, across, squeeze=False).ravel()
    for ax, column in zip(axes, columns):
        values = [float(row[column]) for row in metrics]
        bars = ax.bar(
            range(len(names)),
            [v if math.isfinite(v) else 0.0 for v in values],
            color=[f"C{i % 10}" for i in range(len(names))],
        )
        ax.bar_label(bars, labels=[f"{v:.3g}" if math.isfinite(v) else "n/a" for v in values], fontsize=7)
        ax.set_title(column, fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes[len(columns) :]:
        ax.set_axis_off()
    if not columns:
        axes[0].text(0.5, 0.5, "no held-out data to score", ha="center", va="center")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------- the stage


def run(
    spec: EvalStage,
    checkpoints: dict[str, Path],
    tokenizer: Path,
    workdir: Path,
    reward_models: dict[str, Path] | None = None,
    bench: Bench | None = None,
) -> Report:
    """Score each checkpoint (in the given lineage order) on the spec's held-out data, and on its benchmarks with
    `bench`; the report and its plot in workdir. `reward_models`: the checkpoint of every reward stage the spec's
    reward model and rewards name."""
    if not checkpoints:
        raise ValueError(f"eval stage {spec.name!r} has no checkpoints to score")
    tok = AutoTokenizer.from_pretrained(tokenizer)
    data = held_out(spec, tok)
    columns = data.columns(spec)
    metrics: list[dict[str, str | float]] = []
    seconds: list[dict[str, str | float]] = []
    replies: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    reference: Tensor | None = None  # the first checkpoint's summed pair log-probs: π_ref of every reward margin
    for i, (name, folder) in enumerate(checkpoints.items(), 1):
        started = time.monotonic()
        gave = _scored_checkpoint(folder, tok, data, spec, bench, name, f"{i}/{len(checkpoints)}")
        _release_memory()
        say(f"{spec.name}  {name} scored ({i}/{len(checkpoints)}) in {duration(time.monotonic() - started)}")
        found, replies[name], samples[name] = gave.found, gave.replies, gave.samples
        if gave.pair_logps is not None:
            margin = math.nan if reference is None else implicit_reward_margin(gave.pair_logps, reference)
            found["reward_margin"] = margin
            reference = gave.pair_logps if reference is None else reference
        for task in gave.benchmarks.values():
            found |= task.columns
            columns += [column for column in task.columns if column not in columns]
        metrics.append({"checkpoint": name} | found)
        seconds.append({"checkpoint": name} | {task: s.seconds for task, s in gave.benchmarks.items()})
    if data.tasks and (spec.rewards or spec.reward_model):
        for row, found in zip(metrics, rewarded(spec, data, tok, replies, reward_models or {}).values()):
            row |= found
    metrics = [
        {"checkpoint": row["checkpoint"]} | {column: row.get(column, math.nan) for column in columns} for row in metrics
    ]
    shown = [
        {"prompt": prompt} | {name: samples[name][i] for name in checkpoints}
        for i, (prompt, _) in enumerate(data.samples)
    ]
    return Report(metrics=metrics, samples=shown, plot=plot(metrics, columns, workdir / "metrics.png"), seconds=seconds)
