"""Rewards of completions: the answer checks the eval stage counts task accuracy with, and GRPO's reward functions.

Every reward function takes a batch, `(prompts, completions, answers, lengths)` (a prompt is its message list),
and returns one float per completion; `reward_functions` builds them from the spec: a user's own function
(`python`) is handed each prompt's last message, and a reward model (`reward_model`) scores the whole prompt and
reply. `checked_rewards` runs them all and refuses what cannot train: a function that raises, returns NaN, or
returns the wrong number of values; its message names the function and the prompt.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from schemas.errors import LifecycleError
from schemas.rewards import AnswerReward, LengthReward, ModelReward, PythonReward, RegexReward, Reward
from stages.common.checkpoint import load_model
from stages.common.reward_model import scores as reward_model_scores
from stages.common.templates import OWN_TEMPLATE
from stages.common.tools import imported

# not part of a longer word or number (so "31" is not read out of "310", "x31" or "3.31")
NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w]|\.\d)")


def normalise(text: str) -> str:
    """NFKC (full-width digits and the like become plain), runs of whitespace as one space, ends trimmed."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def _number(text: str) -> float | None:
    return float(text.replace(",", "")) if NUMBER.fullmatch(text) else None


def answer_matches(reply: str, reference: str) -> bool:
    """Whether `reply` contains the reference answer as a whole word or number.

    Both are normalised (`normalise`); the reference also loses trailing sentence punctuation.
    A numeric reference matches a number in the reply of equal value: "31" matches
    "7 plus 24 equals 31." and "31.0", not "310", "3.31", "31.5" or "-31". Any other reference
    matches where it appears with no letter, digit or underscore on either side: "eert" matches
    "The word tree reversed is eert." but not "eerth". Case is kept: some tasks are about case
    ("Write rain in capital letters": RAIN), and a case-folded match would credit a reply that
    merely repeats the question's word. A reply that mentions the answer anywhere is credited,
    even beside a wrong one: this measures whether the answer is produced, not whether it is final.
    """
    target = normalise(reference).rstrip(".!?;:")
    if not target:
        return False
    text = normalise(reply)
    value = _number(target)
    if value is not None:
        return any(_number(found) == value for found in NUMBER.findall(text))
    return re.search(rf"(?<!\w){re.escape(target)}(?!\w)", text) is not None


def task_accuracy(replies: list[str], references: list[str]) -> float:
    return sum(map(answer_matches, replies, references)) / len(references) if references else math.nan


class RewardError(LifecycleError):
    """A reward function that failed, or returned what cannot be trained on; the message names it and the prompt."""


def _numeric_match(reply: str, reference: str, tolerance: float) -> bool:
    value = _number(normalise(reference).rstrip(".!?;:"))
    if value is None:
        return answer_matches(reply, reference)
    return any(
        abs(_number(found) - value) <= tolerance * max(1.0, abs(value)) for found in NUMBER.findall(normalise(reply))
    )


def _answer(spec: AnswerReward) -> Callable[..., list[float]]:
    def reward(prompts, completions, answers, lengths) -> list[float]:
        if spec.match == "exact":
            return [float(normalise(c) == normalise(a)) for c, a in zip(completions, answers)]
        if spec.match == "numeric":
            return [float(_numeric_match(c, a, spec.tolerance)) for c, a in zip(completions, answers)]
        return [float(answer_matches(c, a)) for c, a in zip(completions, answers)]

    return reward


def _regex(spec: RegexReward) -> Callable[..., list[float]]:
    pattern = re.compile(spec.pattern)
    return lambda prompts, completions, answers, lengths: [float(pattern.search(c) is not None) for c in completions]


def _length(spec: LengthReward) -> Callable[..., list[float]]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), in tokens."""
    free = spec.limit - spec.soft
    return lambda prompts, completions, answers, lengths: [
        0.0 if n <= free else max(-1.0, (free - n) / spec.soft) for n in lengths
    ]


def _python(spec: PythonReward) -> Callable[..., list[float]]:
    function = imported(spec.function, f"reward {spec.function}")
    return lambda prompts, completions, answers, lengths: function(
        [p[-1]["content"] for p in prompts], completions, answers
    )


def _reward_model(folder: Path) -> Callable[..., list[float]]:
    """The reward model in `folder` (a reward stage's checkpoint, its tokenizer and template stored with it), in eval
    mode."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_model(folder, tokenizer, AutoModelForSequenceClassification, num_labels=1)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval().requires_grad_(False)
    return lambda prompts, completions, answers, lengths: reward_model_scores(
        model, tokenizer, prompts, completions, OWN_TEMPLATE
    )


@dataclass(frozen=True)
class RewardFunction:
    name: str  # as the metrics name it: reward/<name>
    weight: float
    score: Callable[[list[str], list[str], list[str | None], list[int]], list[float]]


def reward_functions(specs: list[Reward], reward_models: dict[str, Path] | None = None) -> list[RewardFunction]:
    """The spec's rewards as functions; `reward_models`: the checkpoint folder of every reward stage a `reward_model`
    names.
    A reward model named more than once is loaded once."""
    loaded: dict[str, Callable[..., list[float]]] = {}

    def built(spec: Reward) -> Callable[..., list[float]]:
        if isinstance(spec, ModelReward):
            if spec.stage not in (reward_models or {}):
                raise RewardError(
                    f"reward reward_model: the checkpoint of reward stage {spec.stage!r} was not handed to this stage"
                )
            if spec.stage not in loaded:
                loaded[spec.stage] = _reward_model(reward_models[spec.stage])
            return loaded[spec.stage]
        return {"answer": _answer, "regex": _regex, "length": _length, "python": _python}[spec.kind](spec)

    names = [spec.function if isinstance(spec, PythonReward) else spec.kind for spec in specs]
    return [
        RewardFunction(name if names.count(name) == 1 else f"{name}{i}", spec.weight, built(spec))
        for i, (name, spec) in enumerate(zip(names, specs))
    ]


def checked_rewards(
    functions: list[RewardFunction],
    prompts: list[list[dict]],
    completions: list[str],
    answers: list[str | None],
    lengths: list[int],
) -> list[list[float]]:
    """Each function's rewards of the batch, [functions][completions]; a failure names the function and the prompt."""
    shown = [p[-1]["content"] for p in prompts]
    scored = []
    for function in functions:
        try:
            values = [float(v) for v in function.score(prompts, completions, answers, lengths)]
        except Exception as err:
            raise RewardError(
                f"reward {function.name} failed on the batch whose first prompt is {shown[0]!r}: "
                f"{type(err).__name__}: {err}"
            ) from err
        if len(values) != len(completions):
            raise RewardError(
                f"reward {function.name} returned {len(values)} values for {len(completions)} completions "
                f"(the batch whose first prompt is {shown[0]!r}): it must return one per completion"
            )
        if (bad := next((i for i, v in enumerate(values) if not math.isfinite(v)), None)) is not None:
            raise RewardError(
                f"reward {function.name} returned {values[bad]} for a completion of the prompt {shown[bad]!r}: "
                "rewards must be finite numbers"
            )
        scored.append(values)
    return scored


def weighted_total(functions: list[RewardFunction], scores: Tensor) -> Tensor:
    """Each completion's reward: the functions' scores [functions, completions] summed with their weights."""
    return (torch.tensor([function.weight for function in functions])[:, None] * scores).sum(0)
