"""How a model is measured on held-out data: pure functions of scores, shared by every stage and the eval stage.

A candidate's score is its length-normalised log-prob (mean over the reply's tokens), so
replies of different lengths compare fairly and no reference model is needed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def preference(chosen: Tensor, rejected: Tensor) -> dict[str, float]:
    """Share of pairs whose chosen reply scores higher, and the mean score margin chosen − rejected."""
    return {"accuracy": (chosen > rejected).float().mean().item(), "margin": (chosen - rejected).mean().item()}


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b between two orderings of the same items (ties in either count as neither agreeing nor not).

        τ_b = (C − D) / sqrt((C + D + T_x) · (C + D + T_y))

    C, D: concordant and discordant pairs; T_x, T_y: pairs tied in y only, in x only. nan when one side is all ties."""
    concordant = discordant = tied_x_only = tied_y_only = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tied_x_only += 1
            elif dy == 0:
                tied_y_only += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + tied_y_only) * (concordant + discordant + tied_x_only))
    return (concordant - discordant) / denominator if denominator else float("nan")


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
