"""How a model is measured on held-out data: pure functions of scores, shared by every stage and the eval stage.

A candidate's score is its length-normalised log-prob (mean over the reply's tokens), so
replies of different lengths compare fairly and no reference model is needed.
"""

from __future__ import annotations

import math

import torch
from scipy.stats import kendalltau
from torch import Tensor


def preference(chosen: Tensor, rejected: Tensor) -> dict[str, float]:
    """Share of pairs whose chosen reply scores higher, and the mean score margin chosen − rejected."""
    return {"accuracy": (chosen > rejected).float().mean().item(), "margin": (chosen - rejected).mean().item()}


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b between two orderings of the same items (scipy's: ties in either side count as neither agreeing
    nor not); nan when one side is all ties."""
    return float(kendalltau(x, y, variant="b").statistic)


def ranking(model_scores: list[list[float]], reference_scores: list[list[float]]) -> dict[str, float]:
    """Agreement of the model's ranking of each list with the reference scores: mean Kendall tau-b, and top-1 match.

    Top-1 counts a list when the model's best candidate is one the reference scores highest (ties allowed)."""
    taus = [t for m, r in zip(model_scores, reference_scores) if not math.isnan(t := kendall_tau(m, r))]
    top1 = [r[max(range(len(m)), key=m.__getitem__)] == max(r) for m, r in zip(model_scores, reference_scores)]
    return {"kendall_tau": sum(taus) / len(taus) if taus else float("nan"), "top1": sum(top1) / len(top1)}


def perplexity(total_logp: float, tokens: float) -> float:
    """exp of the mean negative log-likelihood per token."""
    return math.exp(-total_logp / tokens)


def mean_scores(sums: Tensor, counts: Tensor) -> Tensor:
    """Length-normalised scores; a candidate cut to no reply tokens scores −inf, never a NaN."""
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, -math.inf))
