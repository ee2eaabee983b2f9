"""Training objectives as pure tensor functions, each beside the equation it implements.

Every function takes per-sequence log-probabilities (from `sequence_logps`) or rewards and
returns per-example losses, so the caller chooses the reduction and the stage's `Trainer`
subclass stays a few lines; where the objective itself fixes a reduction over the batch
(Tuna's pair means, ORPO's token-mean NLL) the function returns the scalar. Nothing here
knows about models, tokenizers or adapters.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from stages.templates import IGNORE

PRO_EPS = 1e-10  # the constant PRO's released code adds inside its log-sum


def sequence_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of log p(labels[t+1] | logits[t]) over the labelled tokens, and their count.

        log π(y|x) = Σ_t 1[y_t ≠ IGNORE] · (z_{t-1}[y_t] − logsumexp(z_{t-1}))

    logits [B, T, V], labels [B, T] unshifted (as for an HF causal LM). Returns ([B], [B])
    in float32; divide the first by the second for a length-normalised score.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE
    safe_targets = targets.masked_fill(~mask, 0)
    rows = []
    # One sequence at a time, so the float32 copy of bf16 logits is [T, V], not [B, T, V].
    for row_logits, row_targets in zip(logits[:, :-1], safe_targets):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    token_logps = torch.stack(rows)
    # where, not multiply: a masked position must not leak NaN or inf from its logits.
    token_logps = torch.where(mask, token_logps, torch.zeros_like(token_logps))
    return token_logps.sum(-1), mask.sum(-1).float()


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
             reference_rejected: Tensor, beta: float,
             variant: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference losses on h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)).

        sigmoid  (Rafailov et al. 2023, eq. 7; cDPO, Mitchell 2023, for ε > 0):
                 L = −(1 − ε) · log σ(β·h) − ε · log σ(−β·h)
        ipo      (Azar et al. 2023):                L = (h − 1/(2β))²
        hinge    (SLiC, Zhao et al. 2023):          L = max(0, 1 − β·h)

    log π here is whatever the caller passes: the DPO stage gives summed log-probs to sigmoid
    and hinge and length-averaged ones (log π(y) / |y|) to ipo by default, as TRL does for IPO:
    with sums, h and so the squared loss grow with the reply's length, and the fixed target
    1/(2β) means something different for a 5-token and a 50-token reply.

    Returns (per-example losses, chosen rewards, rejected rewards), the rewards being the
    implicit β·(log π − log π_ref), detached: they are for logging, not for gradients.
    """
    if label_smoothing and variant != "sigmoid":
        raise ValueError(f"label_smoothing is defined for the sigmoid DPO loss only, not for {variant!r}")
    chosen_logratio = policy_chosen - reference_chosen
    rejected_logratio = policy_rejected - reference_rejected
    h = chosen_logratio - rejected_logratio
    if variant == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif variant == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif variant == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO variant {variant!r}; expected 'sigmoid', 'ipo' or 'hinge'")
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, accurate at both ends (Mächler 2012)."""
    # Near 0, 1 − eˣ cancels in log1p(−eˣ); expm1 keeps the digits. Far below, the reverse.
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_logps: Tensor, chosen_counts: Tensor, rejected_logps: Tensor, rejected_counts: Tensor,
              lam: float) -> tuple[Tensor, Tensor, Tensor]:
    """Odds-ratio preference optimisation (Hong et al. 2024, eqs. 6-7), a scalar over the batch.

        odds(y) = p / (1 − p),  p = exp(log π(y) / |y|)   (the length-averaged log-prob)
        L_OR    = mean_b −log σ(log odds(y_w,b) − log odds(y_l,b))
        L_SFT   = −Σ_b log π(y_w,b) / Σ_b |y_w,b|
        L       = L_SFT + λ · L_OR

    chosen_logps, rejected_logps [B] are summed log-probs (from `sequence_logps`), the counts
    [B] their reply lengths. L_SFT is the token-mean NLL of all chosen reply tokens in the batch,
    as an HF causal-LM loss on the chosen replies is and as TRL's ORPOTrainer computes it: each
    token weighs the same, so a long reply counts by its length, unlike in a mean of per-reply
    means. log odds(y) = log p − log(1 − p) is computed from log p, never from p.
    Returns (the loss, L_SFT and the per-example log odds ratios, both detached for logging).
    """
    chosen_means = chosen_logps / chosen_counts.clamp(min=1)
    rejected_means = rejected_logps / rejected_counts.clamp(min=1)
    log_odds_ratio = ((chosen_means - _log1mexp(chosen_means)) - (rejected_means - _log1mexp(rejected_means)))
    nll = -chosen_logps.sum() / chosen_counts.sum().clamp(min=1)
    loss = nll - lam * F.logsigmoid(log_odds_ratio).mean()
    return loss, nll.detach(), log_odds_ratio.detach()


def simpo_loss(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor, beta: float,
               gamma: float) -> Tensor:
    """SimPO (Meng et al. 2024, eq. 6), with γ the absolute target reward margin.

        L = −log σ(β/|y_w| · log π(y_w) − β/|y_l| · log π(y_l) − γ)
    """
    return -F.logsigmoid(beta * (chosen_mean_logps - rejected_mean_logps) - gamma)


def pro_loss(scores: Tensor, rewards: Tensor, reward_weighting: bool = True) -> Tensor:
    """Preference Ranking Optimisation (Song et al. 2023), per example, summed over k.

        L = Σ_{k=1}^{n-1} −log( exp(s_k·T_k) / (ε + exp(s_k·T_k) + Σ_{j>k} exp(s_j·T_kj)) )
        T_kj = r_k − r_j,   T_k = max_{j>k} T_kj,   ε = 1e-10

    scores [B, n] are length-normalised log-probs of the candidates, best first; rewards
    [B, n] their rewards, sorted the same way. With reward_weighting=False every T is 1 (the
    paper's ablation without temperature). This matches `ProcessManager.compute_loss` in
    AlibabaResearch/DAMO-ConvAI PRO/train/utils/process_manager.py, including its ε inside
    the log; the code averages each k's term over the batch before summing over k, which
    equals the batch mean of these per-example sums.

    The SFT term is the caller's: pro_sft_weight(sft_weight, n) × the batch mean of the top
    candidate's summed (not length-normalised) NLL.
    """
    batch, n = scores.shape
    log_eps = scores.new_full((batch, 1), math.log(PRO_EPS))
    losses = scores.new_zeros(batch)
    for k in range(n - 1):
        if reward_weighting:
            worse_temps = rewards[:, k:k + 1] - rewards[:, k + 1:]
            best_temp = worse_temps.max(dim=1).values
        else:
            worse_temps = torch.ones_like(scores[:, k + 1:])
            best_temp = torch.ones_like(scores[:, k])
        positive = scores[:, k] * best_temp
        # log(ε + Σ exp(·)) as a logsumexp with log ε as one more term: exact and overflow-free.
        terms = torch.cat([log_eps, positive.unsqueeze(1), scores[:, k + 1:] * worse_temps], dim=1)
        losses = losses + torch.logsumexp(terms, dim=1) - positive
    return losses


def pro_sft_weight(sft_weight: float, n: int) -> float:
    """The factor PRO's released code puts on its SFT term: sft_weight · (n − 1)².

    The code's total is Σ_k rank_loss_k + sft_weight · (n − 1)² · mean_batch(−Σ_t log p(y_1,t)),
    the NLL being the top candidate's token log-probs summed, not averaged over its length
    (DAMO-ConvAI PRO/train/utils/process_manager.py; sft_index is 0 in its data scripts).
    The (n − 1)² keeps the SFT term in step with the n − 1 ranking terms as n grows.
    """
    return sft_weight * (n - 1) ** 2


def tuna_loss(scores: Tensor, margin: float) -> Tensor:
    """Tuna's ranking loss (Li et al. 2023; BRIO's candidate ranking loss), a scalar.

        L = Σ_{i=1}^{n-1} mean_{b, j} max(0, s_{b,j+i} − s_{b,j} + i·m)

    scores [B, n] are length-normalised log-probs, best first; the margin m grows with the
    rank distance i; each mean runs over all B·(n − i) pairs, as torch's MarginRankingLoss
    does in `TunaTrainer.compute_loss` (microsoft/LMOps tuna/src/custom.py). That code has
    no gold-reference term (BRIO's gold_margin/gold_weight) and its `no_discriminate` and
    `lenpen` arguments are unused. Its MLE term, mle_weight × the token-mean NLL over all
    candidates, is the caller's.
    """
    n = scores.shape[1]
    loss = scores.new_zeros(())
    for i in range(1, n):
        loss = loss + torch.relu(scores[:, i:] - scores[:, :-i] + margin * i).mean()
    return loss


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """Pairwise reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1), per example.

        L = −log σ(r(x, y_w) − r(x, y_l))
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards)
