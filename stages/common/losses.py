"""Training objectives as pure tensor functions, each beside the equation it implements.

Every function takes per-sequence log-probabilities (from `sequence_logps`) or rewards and
returns per-example losses, so the caller chooses the reduction and the stage's `Trainer`
subclass stays a few lines; where the objective itself fixes a reduction over the batch
(Tuna's pair means, ORPO's token-mean NLL, GRPO's aggregations over per-token log-probs) the
function returns the scalar. Nothing here knows about models, tokenizers or adapters.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from stages.common.templates import IGNORE

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


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    beta: float,
    variant: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
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


def orpo_loss(
    chosen_logps: Tensor, chosen_counts: Tensor, rejected_logps: Tensor, rejected_counts: Tensor, lam: float
) -> tuple[Tensor, Tensor, Tensor]:
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
    log_odds_ratio = (chosen_means - _log1mexp(chosen_means)) - (rejected_means - _log1mexp(rejected_means))
    nll = -chosen_logps.sum() / chosen_counts.sum().clamp(min=1)
    loss = nll - lam * F.logsigmoid(log_odds_ratio).mean()
    return loss, nll.detach(), log_odds_ratio.detach()


def simpo_loss(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor, beta: float, gamma: float) -> Tensor:
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
            worse_temps = rewards[:, k : k + 1] - rewards[:, k + 1 :]
            best_temp = worse_temps.max(dim=1).values
        else:
            worse_temps = torch.ones_like(scores[:, k + 1 :])
            best_temp = torch.ones_like(scores[:, k])
        positive = scores[:, k] * best_temp
        # log(ε + Σ exp(·)) as a logsumexp with log ε as one more term: exact and overflow-free.
        terms = torch.cat([log_eps, positive.unsqueeze(1), scores[:, k + 1 :] * worse_temps], dim=1)
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


def group_advantages(
    rewards: Tensor,
    scale: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
    baseline: Literal["grpo", "rloo"] = "grpo",
) -> Tensor:
    """GRPO's outcome advantages (Shao et al. 2024, §4.1.2), one per completion.

        Â_{i} = (r_i − mean_g(r)) / (std + ε)

    or, with baseline="rloo", REINFORCE Leave-One-Out's (Kool et al. 2019; Ahmadian et al. 2024, eq. 4): each
    completion's baseline is the mean reward of the *other* G − 1 completions of its prompt,

        Â_{i} = r_i − 1/(G − 1) Σ_{j≠i} r_j  =  G/(G − 1) · (r_i − mean_g(r))

    an unbiased baseline (it does not depend on the completion it judges), then scaled as `scale` says (RLOO's paper
    scales nothing: scale="none").

    rewards [prompts, group]: the group of completions sampled for each prompt. The mean is
    always the prompt's own group's; the std is the group's (scale="group", as DeepSeekMath),
    the whole batch's (scale="batch": one scale for every prompt, so a nearly solved prompt's
    small reward differences are not blown up to unit size), or there is none (scale="none",
    as Dr. GRPO, Liu et al. 2025, who show the division biases updates toward prompts that are
    too easy or too hard). Every std is the unbiased one (Bessel's n − 1), as `torch.std` gives
    and TRL's GRPOTrainer and verl use, so advantages here match theirs number for number;
    for a fixed group size the choice only rescales all advantages by √(G/(G − 1)).

    A group whose rewards are all equal carries no signal: its advantages are exactly zero
    (not a rounding residue divided by ε, and never NaN, whatever ε).
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"unknown advantage scale {scale!r}; expected 'group', 'batch' or 'none'")
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(
            f"rewards must be [prompts, group] with at least two completions per group "
            f"(a lone completion has nothing to be relative to), got shape {tuple(rewards.shape)}"
        )
    if baseline not in ("grpo", "rloo"):
        raise ValueError(f"unknown advantage baseline {baseline!r}; expected 'grpo' or 'rloo'")
    group = rewards.shape[1]
    if baseline == "rloo":
        centered = rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (group - 1)
    else:
        centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (rewards.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (rewards.std() + eps)
    flat = rewards.amax(dim=1, keepdim=True) == rewards.amin(dim=1, keepdim=True)
    # where, not multiply: with ε = 0 a flat group's 0/0 is NaN, and NaN · 0 is NaN.
    return torch.where(flat, torch.zeros_like(centered), centered)


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon_low: float,
    epsilon_high: float,
    beta: float = 0.0,
    ref_logps: Tensor | None = None,
    aggregation: Literal["grpo", "dr_grpo", "dapo"] = "grpo",
    max_tokens: int | None = None,
    ratio_level: Literal["token", "sequence"] = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Group Relative Policy Optimisation (Shao et al. 2024, DeepSeekMath, eq. 3), a scalar.

        ρ_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) / π_θold(o_{i,t} | q, o_{i,<t})
        ℓ_{i,t} = min(ρ_{i,t} Â_i, clip(ρ_{i,t}, 1 − ε_low, 1 + ε_high) Â_i) − β · D_{i,t}
        D_{i,t} = π_ref/π_θ − log(π_ref/π_θ) − 1     (Schulman's k3 estimator of KL[π_θ ‖ π_ref])

    and L = −ℓ aggregated over the N = prompts × group completions o_i, |o_i| their lengths:

        grpo     (DeepSeekMath eq. 3):   L = −1/N Σ_i 1/|o_i| Σ_t ℓ_{i,t}
        dapo     (Yu et al. 2025, §3.3): L = −1/Σ_i|o_i| Σ_i Σ_t ℓ_{i,t}
        dr_grpo  (Liu et al. 2025):      L = −1/(N · max_tokens) Σ_i Σ_t ℓ_{i,t}

    The per-sequence mean of grpo gives a short completion's tokens more weight than a long
    one's, so wrong long answers are penalised less per token (Dr. GRPO's length bias); dapo
    weighs every token of the call the same; dr_grpo divides by a constant, max_tokens being
    the generation limit. dapo's denominator is this call's token count: under gradient
    accumulation the caller rescales to the whole batch's count if it wants DAPO exactly.
    ε_high > ε_low is DAPO's clip-higher; ε_low = ε_high is the symmetric PPO clip.

    ratio_level="sequence" is GSPO (Zheng et al. 2025, eq. 5–7): one importance ratio per completion, the geometric
    mean of its tokens' ratios,

        s_i = (π_θ(o_i | q) / π_θold(o_i | q))^(1/|o_i|) = exp(1/|o_i| Σ_t log ρ_{i,t})

    clipped and multiplied by Â_i as above, and shared by the completion's tokens (with "grpo" aggregation the
    loss is exactly GSPO's −1/N Σ_i min(s_i Â_i, clip(s_i) Â_i); the gradient reaches every token through s_i).
    A sequence ratio moves much less than a token's, so GSPO clips far tighter (the paper: ε_low 3e-4, ε_high 4e-4).

    logps, old_logps, ref_logps [N, T] are per-token log-probs of the completion tokens; mask
    [N, T] is 1 on completion tokens, and what lies under mask = 0 (even NaN) never reaches the
    loss or its gradient. advantages [N] (from `group_advantages`, flattened prompt-major) are
    shared by a completion's tokens. old_logps and ref_logps are constants and are detached
    here, so on the first update of a batch (μ = 1) `old_logps=logps` gives ρ = 1 and the plain
    policy gradient. With beta = 0 the reference model is not needed and ref_logps may be None.

    Returns (the loss, metrics detached for logging):
        clip_fraction  share of completion tokens whose surrogate is clipped, i.e. the min picks
                       the clipped term and the token's gradient is zero: ρ > 1 + ε_high with
                       Â > 0, or ρ < 1 − ε_low with Â < 0 (TRL's clip_ratio/region_mean).
                       A ratio outside the range on the other side of Â is not counted: there
                       the unclipped term is the min and the gradient flows.
        kl             mean of D_{i,t} over all completion tokens; only when ref_logps is given.
    """
    if aggregation not in ("grpo", "dr_grpo", "dapo"):
        raise ValueError(f"unknown GRPO aggregation {aggregation!r}; expected 'grpo', 'dr_grpo' or 'dapo'")
    if ratio_level not in ("token", "sequence"):
        raise ValueError(f"unknown importance ratio level {ratio_level!r}; expected 'token' or 'sequence'")
    if beta and ref_logps is None:
        raise ValueError(f"beta = {beta} weighs a KL penalty to the reference model, but no ref_logps were given")
    if aggregation == "dr_grpo" and (max_tokens is None or max_tokens < 1):
        raise ValueError(
            "the dr_grpo aggregation divides by a constant: pass max_tokens, "
            f"the maximum completion length (got {max_tokens!r})"
        )
    if (
        old_logps.shape != logps.shape
        or mask.shape != logps.shape
        or (ref_logps is not None and ref_logps.shape != logps.shape)
    ):
        raise ValueError(
            f"logps, old_logps, mask and ref_logps must share one [N, T] shape; got logps "
            f"{tuple(logps.shape)}, old_logps {tuple(old_logps.shape)}, mask {tuple(mask.shape)}"
            + (f", ref_logps {tuple(ref_logps.shape)}" if ref_logps is not None else "")
        )
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages must be [N] = {tuple(logps.shape[:1])}, got {tuple(advantages.shape)}")

    mask = mask.bool()
    zeros = torch.zeros_like(logps)
    # Padding is zeroed before exp, not after: exp(NaN) · 0 would still be NaN in the backward.
    log_ratio = torch.where(mask, logps - old_logps.detach(), zeros)
    if ratio_level == "sequence":  # the completion's mean log-ratio, on each of its tokens
        log_ratio = (log_ratio.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)).expand_as(logps)
        log_ratio = torch.where(mask, log_ratio, zeros)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().unsqueeze(1).to(ratio.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    per_token = torch.minimum(unclipped, clipped)

    metrics: dict[str, Tensor] = {}
    tokens = mask.sum().clamp(min=1)
    if ref_logps is not None:
        ref_gap = torch.where(mask, ref_logps.detach() - logps, zeros)
        kl = torch.exp(ref_gap) - ref_gap - 1
        if beta:
            per_token = per_token - beta * kl
        metrics["kl"] = (kl * mask).sum().detach() / tokens

    per_token = per_token * mask
    if aggregation == "grpo":
        loss = -(per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    elif aggregation == "dapo":
        loss = -per_token.sum() / tokens
    else:
        loss = -per_token.sum() / (logps.shape[0] * max_tokens)

    is_clipped = ((ratio > 1 + epsilon_high) & (adv > 0)) | ((ratio < 1 - epsilon_low) & (adv < 0))
    metrics["clip_fraction"] = (is_clipped & mask).sum().detach().to(logps.dtype) / tokens
    return loss, metrics


def kto_reference_point(mismatched_policy_logps: Tensor, mismatched_reference_logps: Tensor) -> Tensor:
    """KTO's reference point z₀ (Ethayarajh et al. 2024, §4), a detached scalar.

        z₀ = max(0, 1/m Σ_j log π_θ(y'_j | x_j) / π_ref(y'_j | x_j))

    an estimate of KL(π_θ ‖ π_ref) from m mismatched pairs: each prompt x_j of the batch with
    another example's completion y'_j, so the estimate is not biased toward this batch's own
    labelled completions. The clamp keeps a noisy negative estimate (a KL is never negative)
    from turning into a bonus. No gradient flows through z₀, as in the paper: it is a baseline
    the policy cannot move to lower its loss.
    """
    logratio = mismatched_policy_logps.detach() - mismatched_reference_logps.detach()
    return logratio.mean().clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    kl_reference_point: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Kahneman-Tversky Optimisation (Ethayarajh et al. 2024, §4), per example.

        r_θ(x, y) = log π_θ(y|x) / π_ref(y|x)
        v(x, y)   = λ_D · σ(β · (r_θ(x, y) − z₀))   if y is desirable
                    λ_U · σ(β · (z₀ − r_θ(x, y)))   if y is undesirable
        L         = λ_y − v(x, y)

    so each loss lies in [0, λ_y]. policy_logps, reference_logps [B] are summed log-probs of
    each completion (from `sequence_logps`); desirable [B] is bool; z₀ comes from
    `kto_reference_point` and is detached here too, so no gradient reaches it. The paper
    advises choosing λ_D, λ_U so that λ_D·n_D / (λ_U·n_U) lies in [1, 4/3] for n_D desirable
    and n_U undesirable examples. The batch mean of these losses is the paper's L_KTO.

    Returns (per-example losses, rewards β · r_θ detached for logging, as `dpo_loss` does).
    """
    logratio = policy_logps - reference_logps
    z0 = kl_reference_point.detach()
    gain = desirable_weight * torch.sigmoid(beta * (logratio - z0))
    loss_averse = undesirable_weight * torch.sigmoid(beta * (z0 - logratio))
    weight = torch.where(desirable, logratio.new_tensor(desirable_weight), logratio.new_tensor(undesirable_weight))
    losses = weight - torch.where(desirable, gain, loss_averse)
    return losses, beta * logratio.detach()


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Token-level distillation (Hinton et al. 2015; GKD, Agarwal et al. 2024, §3), a scalar: the mean over the
    tokens under `mask` of a divergence between the teacher's next-token distribution P and the student's Q, both
    softened by `temperature` (logits / τ):

        forward_kl  KL(P ‖ Q) = Σ_v P(v) (log P(v) − log Q(v))        mode-covering: the student spreads over P
        reverse_kl  KL(Q ‖ P) = Σ_v Q(v) (log Q(v) − log P(v))        mode-seeking: the student keeps P's peaks
        jsd         β KL(P ‖ M) + (1 − β) KL(Q ‖ M),  M = β P + (1 − β) Q   (GKD's generalised JSD, bounded by
                    log 2 at β = ½; toward forward KL's gradient as β → 0, reverse's as β → 1, both up to scale)

    student_logits, teacher_logits [B, T, V] (the teacher's detached here; a larger teacher vocabulary is cut to the
    student's, the tokens past it being padding of the embedding), mask [B, T] 1 where the next token is one the
    stage learns (an assistant reply's). Positions under mask = 0 never reach the loss or its gradient.
    """
    if divergence not in ("forward_kl", "reverse_kl", "jsd"):
        raise ValueError(f"unknown divergence {divergence!r}; expected 'forward_kl', 'reverse_kl' or 'jsd'")
    if divergence == "jsd" and not 0 < beta < 1:
        raise ValueError(f"the JSD's beta weighs the teacher in the mixture and lies strictly in (0, 1), got {beta}")
    vocab = student_logits.shape[-1]
    if teacher_logits.shape[-1] < vocab or teacher_logits.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} do not cover the student's {tuple(student_logits.shape)}"
        )
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits[..., :vocab].detach().float() / temperature, dim=-1)
    if divergence == "forward_kl":
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif divergence == "reverse_kl":
        per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
        kl_p = (log_p.exp() * (log_p - log_m)).sum(-1)
        kl_q = (log_q.exp() * (log_q - log_m)).sum(-1)
        per_token = beta * kl_p + (1 - beta) * kl_q
    mask = mask.bool()
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean) / √(var + ε) over the entries under `mask`, the variance unbiased (n − 1), as PPO implementations
    whiten advantages (TRL's `masked_whiten`, OpenRLHF's); entries outside the mask are left out of both figures."""
    mask = mask.bool()
    count = mask.sum()
    if count < 2:
        raise ValueError(f"whitening needs at least two entries under the mask, got {int(count)}")
    mean = values[mask].mean()
    variance = ((values - mean)[mask] ** 2).sum() / (count - 1)
    return (values - mean) * torch.rsqrt(variance + eps)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each completion's tokens, and the returns.

        δ_t = r_t + γ V_{t+1} − V_t          (V past the completion's last token is 0: the episode ends there)
        Â_t = Σ_{l≥0} (γλ)^l δ_{t+l}  = δ_t + γλ Â_{t+1}
        R_t = Â_t + V_t                       (the value head's target)

    rewards, values, mask [N, T], a completion's tokens first and its padding after (mask 0); rewards and values
    under mask = 0 are taken as 0, so nothing past a completion reaches its advantages. Returns (Â, R), 0 under the
    mask's zeros; whitening the advantages is the caller's (`masked_whiten`)."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        following = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """PPO-RLHF's per-token rewards (Ouyang et al. 2022; Ziegler et al. 2019): a KL penalty on every completion token
    and the completion's score on its last one,

        r_t = −β (log π_old(o_t) − log π_ref(o_t))  +  1[t = last] · score

    scores [N]; logps (the sampling policy's), ref_logps, mask [N, T], a completion's tokens first."""
    mask = mask.bool()
    rewards = torch.where(mask, -kl_coef * (logps - ref_logps).detach(), torch.zeros_like(logps))
    last = mask.sum(dim=1).clamp(min=1) - 1
    return rewards.scatter_add(1, last.unsqueeze(1), scores.detach().to(rewards.dtype).unsqueeze(1))


def ppo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float = 0.2,
    value_clip: float = 0.2,
    value_weight: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped objective (Schulman et al. 2017, eq. 7 and 9) for the policy and its value head, a scalar:

        ρ_t      = π_θ(o_t) / π_old(o_t)
        L_policy = mean_t max(−Â_t ρ_t, −Â_t clip(ρ_t, 1 − ε, 1 + ε))
        L_value  = ½ mean_t max((V_t − R_t)², (clip(V_t, V_old,t ± ε_v) − R_t)²)
        L        = L_policy + c_v · L_value

    each mean over every completion token of the batch (mask), as TRL's and OpenRLHF's PPO take it. Â (whitened),
    R, V_old and π_old come from the rollout and are detached here. Returns (the loss, metrics detached for logging:
    policy_loss, value_loss, clip_fraction (share of tokens whose policy term is clipped), value_clip_fraction)."""
    mask = mask.bool()
    tokens = mask.sum().clamp(min=1)
    zeros = torch.zeros_like(logps)
    ratio = torch.exp(torch.where(mask, logps - old_logps.detach(), zeros))
    advantages = advantages.detach()
    policy_terms = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip, 1 + clip))
    policy = torch.where(mask, policy_terms, zeros).sum() / tokens
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = torch.clamp(values, old_values - value_clip, old_values + value_clip)
    value_terms = torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    value = 0.5 * torch.where(mask, value_terms, torch.zeros_like(values)).sum() / tokens
    metrics = {
        "policy_loss": policy.detach(),
        "value_loss": value.detach(),
        "clip_fraction": ((-advantages * torch.clamp(ratio, 1 - clip, 1 + clip) > -advantages * ratio) & mask).sum()
        / tokens,
        "value_clip_fraction": (((clipped_values - returns) ** 2 > (values - returns) ** 2) & mask).sum() / tokens,
    }
    return policy + value_weight * value, {k: v.detach() for k, v in metrics.items()}
