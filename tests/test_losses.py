"""Losses against values worked out by hand: each expected number is spelled out with `math`."""

from __future__ import annotations

import math

import pytest
import torch

from stages.common.losses import (
    bradley_terry_loss,
    distillation_loss,
    dpo_loss,
    gae,
    group_advantages,
    grpo_loss,
    kto_loss,
    kto_reference_point,
    masked_whiten,
    orpo_loss,
    ppo_loss,
    ppo_rewards,
    pro_loss,
    pro_sft_weight,
    sequence_logps,
    simpo_loss,
    tuna_loss,
)
from stages.common.templates import IGNORE


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:
    """−log σ(−x) = log(1 + eˣ), written out so expectations don't lean on torch."""
    return math.log(1 + math.exp(x))


def test_sequence_logps_sums_shifted_labelled_tokens():
    # Position t's logits predict labels[t+1]; labels[0] and IGNOREd targets never count.
    logits = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [3.0, 0.0]]])
    labels = torch.tensor([[1, 1, 0]])
    total, count = sequence_logps(logits, labels)
    # logits[0] = (0, 0) predicts token 1: e^0 / (e^0 + e^0) = 1/2
    # logits[1] = (1, 2) predicts token 0: e^1 / (e^1 + e^2)
    expected = math.log(1 / 2) + (1 - math.log(math.e + math.e**2))
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert count.tolist() == [2.0]

    total, count = sequence_logps(logits, torch.tensor([[5, IGNORE, 0]]))
    assert total.item() == pytest.approx(1 - math.log(math.e + math.e**2), rel=1e-6)
    assert count.tolist() == [1.0]


def test_sequence_logps_fully_ignored_row_is_zero_and_batch_rows_independent():
    logits = torch.tensor([[[0.0, 0.0], [1.0, 2.0]], [[math.log(3), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[IGNORE, IGNORE], [IGNORE, 0]])
    total, count = sequence_logps(logits, labels)
    # Row 2: logits (log 3, 0) predict token 0 with probability 3 / (3 + 1).
    assert total.tolist() == pytest.approx([0.0, math.log(3 / 4)], rel=1e-6)
    assert count.tolist() == [0.0, 1.0]


def test_sequence_logps_upcasts_bf16_to_float32():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]], dtype=torch.bfloat16, requires_grad=True)
    total, count = sequence_logps(logits, torch.tensor([[0, 0]]))
    assert total.dtype == torch.float32 and count.dtype == torch.float32
    # 2 and 0 are exact in bf16, so the answer is log(e² / (e² + 1)) to float32 precision.
    assert total.item() == pytest.approx(2 - math.log(math.e**2 + 1), rel=1e-6)
    total.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


# πc = −1, πr = −2, ref_c = ref_r = −1.5, β = 0.1:
# h = (−1 − (−1.5)) − (−2 − (−1.5)) = 0.5 − (−0.5) = 1, so β·h = 0.1.
DPO_INPUTS = (t(-1.0), t(-2.0), t(-1.5), t(-1.5))
BETA = 0.1


def test_dpo_sigmoid_by_hand():
    losses, chosen, rejected = dpo_loss(*DPO_INPUTS, beta=BETA)
    # −log σ(0.1) = log(1 + e^−0.1)
    assert losses.item() == pytest.approx(softplus(-0.1), rel=1e-12)
    assert chosen.item() == pytest.approx(0.1 * 0.5)
    assert rejected.item() == pytest.approx(0.1 * -0.5)


def test_dpo_label_smoothing_by_hand():
    losses, _, _ = dpo_loss(*DPO_INPUTS, beta=BETA, label_smoothing=0.2)
    # −0.8·log σ(0.1) − 0.2·log σ(−0.1) = 0.8·log(1 + e^−0.1) + 0.2·log(1 + e^0.1)
    assert losses.item() == pytest.approx(0.8 * softplus(-0.1) + 0.2 * softplus(0.1), rel=1e-12)


def test_dpo_ipo_and_hinge_by_hand():
    ipo, _, _ = dpo_loss(*DPO_INPUTS, beta=BETA, variant="ipo")
    # (h − 1/(2β))² = (1 − 1/0.2)² = (1 − 5)² = 16
    assert ipo.item() == pytest.approx((1 - 5) ** 2)
    hinge, _, _ = dpo_loss(*DPO_INPUTS, beta=BETA, variant="hinge")
    # max(0, 1 − β·h) = 1 − 0.1
    assert hinge.item() == pytest.approx(0.9)
    # Past the margin the hinge is flat: h = 20 gives 1 − 0.1·20 < 0.
    flat, _, _ = dpo_loss(t(10.0), t(-10.0), t(0.0), t(0.0), beta=BETA, variant="hinge")
    assert flat.item() == 0.0


def test_dpo_rejects_smoothing_outside_sigmoid_and_unknown_variant():
    with pytest.raises(ValueError, match="sigmoid"):
        dpo_loss(*DPO_INPUTS, beta=BETA, variant="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="unknown DPO variant"):
        dpo_loss(*DPO_INPUTS, beta=BETA, variant="kto")  # type: ignore[arg-type]


def test_dpo_policy_equal_to_reference_is_log_two_with_zero_rewards():
    policy = t(-3.0, -0.5)
    losses, chosen, rejected = dpo_loss(policy, t(-7.0, -2.0), policy.clone(), t(-7.0, -2.0), beta=0.5)
    # h = 0: −log σ(0) = −log(1/2)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2)
    assert chosen.tolist() == rejected.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("variant", ["sigmoid", "ipo", "hinge"])
def test_dpo_gradient_raises_chosen_and_lowers_rejected(variant):
    chosen = t(-1.0).requires_grad_()
    rejected = t(-2.0).requires_grad_()
    losses, chosen_reward, _ = dpo_loss(chosen, rejected, t(-1.5), t(-1.5), beta=BETA, variant=variant)
    losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()
    assert not chosen_reward.requires_grad


def test_orpo_by_hand():
    # Chosen: 2 tokens summing to 2·log 0.5, so p_c = exp(mean) = 0.5: odds 1, log odds 0.
    # Rejected: 3 tokens summing to 3·log 0.2, so p_r = 0.2: odds 0.2/0.8 = 1/4, log odds −log 4.
    # Log odds ratio = 0 − (−log 4) = log 4; σ(log 4) = 4/(4 + 1) = 0.8.
    # NLL = −(2·log 0.5) / 2 = log 2.
    loss, nll, ratio = orpo_loss(t(2 * math.log(0.5)), t(2.0), t(3 * math.log(0.2)), t(3.0), lam=0.1)
    assert ratio.item() == pytest.approx(math.log(4), rel=1e-12)
    assert nll.item() == pytest.approx(math.log(2), rel=1e-12)
    assert loss.item() == pytest.approx(math.log(2) + 0.1 * -math.log(0.8), rel=1e-12)


def test_orpo_nll_is_the_token_mean_over_the_batchs_chosen_replies():
    # Row 1: a 1-token chosen reply with log π = −3 (mean −3); row 2: a 3-token one with log π = −3 (mean −1).
    # Token-mean NLL: (3 + 3) / (1 + 3) = 6/4 = 1.5. (A mean of per-row means would be (3 + 1)/2 = 2.)
    # Rejected replies with the same means (−6 over 2 tokens = −3; −1 over 1 token = −1) make each
    # log odds ratio 0, so each odds term is −log σ(0) = log 2, and their batch mean is log 2.
    chosen, rejected = t(-3.0, -3.0).requires_grad_(), t(-6.0, -1.0)
    loss, nll, ratio = orpo_loss(chosen, t(1.0, 3.0), rejected, t(2.0, 1.0), lam=0.5)
    assert ratio.tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    assert nll.item() == pytest.approx(1.5, rel=1e-12) and nll.item() != pytest.approx(2.0)
    assert loss.item() == pytest.approx(1.5 + 0.5 * math.log(2), rel=1e-12)

    # Every chosen token weighs the same: with λ = 0, ∂L/∂log π(y_w,b) = −1 / Σ|y_w| = −1/4 for both rows
    # (per-row means would give −1/(2·1) = −0.5 and −1/(2·3) = −1/6).
    loss, _, _ = orpo_loss(chosen, t(1.0, 3.0), rejected, t(2.0, 1.0), lam=0.0)
    loss.backward()
    assert chosen.grad.tolist() == pytest.approx([-0.25, -0.25], rel=1e-12)


def test_orpo_log_odds_stay_finite_near_certainty():
    # In float32 exp(−1e-9) rounds to 1, so log1p(−exp(x)) would be −inf; log odds ≈ −log(1e-9).
    one = torch.tensor([1.0])
    _, _, ratio = orpo_loss(torch.tensor([-1e-9]), one, torch.tensor([math.log(0.5)]), one, lam=1.0)
    assert ratio.item() == pytest.approx(-math.log(1e-9), rel=1e-4)


def test_simpo_by_hand():
    # β·(mean_c − mean_r) − γ = 2·(−1 − (−1.5)) − 0.5 = 0.5; −log σ(0.5) = log(1 + e^−0.5)
    losses = simpo_loss(t(-1.0), t(-1.5), beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(softplus(-0.5), rel=1e-12)


def test_pro_three_candidates_with_reward_weighting_by_hand():
    scores, rewards = t(-1.0, -2.0, -1.5)[None], t(3.0, 1.0, 0.0)[None]
    # k = 1: T_12 = 3 − 1 = 2, T_13 = 3 − 0 = 3, T_1 = max = 3.
    #   −log( e^{−1·3} / (ε + e^{−1·3} + e^{−2·2} + e^{−1.5·3}) )
    first = math.log(1e-10 + math.exp(-3) + math.exp(-4) + math.exp(-4.5)) + 3
    # k = 2: T_23 = 1 − 0 = 1 = T_2.  −log( e^{−2} / (ε + e^{−2} + e^{−1.5}) )
    second = math.log(1e-10 + math.exp(-2) + math.exp(-1.5)) + 2
    assert pro_loss(scores, rewards).item() == pytest.approx(first + second, rel=1e-12)


def test_pro_two_candidates_is_pairwise_logistic():
    s1, s2 = -0.7, -1.9
    scores = t(s1, s2)[None]
    pairwise = softplus(s2 - s1)  # −log σ(s1 − s2); ε = 1e-10 moves it by < 1e-9
    unweighted = pro_loss(scores, t(0.3, 0.9)[None], reward_weighting=False)
    assert unweighted.item() == pytest.approx(pairwise, abs=1e-8)
    # Rewards 1 and 0 make T = 1 − 0 = 1, the same as no weighting.
    assert pro_loss(scores, t(1.0, 0.0)[None]).item() == pytest.approx(pairwise, abs=1e-8)


def test_pro_is_per_example_and_sft_weight_follows_released_code():
    scores = t(-1.0, -2.0, -0.5, -0.25).reshape(2, 2)
    losses = pro_loss(scores, torch.ones_like(scores), reward_weighting=False)
    assert losses.tolist() == pytest.approx([softplus(-1.0), softplus(0.25)], abs=1e-8)
    # sft_weight · (n − 1)²: 0.05 · 3² for four candidates.
    assert pro_sft_weight(0.05, 4) == pytest.approx(0.05 * 9)
    assert pro_sft_weight(0.05, 2) == pytest.approx(0.05)


def test_tuna_three_candidates_by_hand():
    scores = t(-1.0, -1.2, -0.9)[None]
    # i = 1, margin 0.1: max(0, −1.2 + 1.0 + 0.1) = 0 and max(0, −0.9 + 1.2 + 0.1) = 0.4; mean 0.2
    # i = 2, margin 0.2: max(0, −0.9 + 1.0 + 0.2) = 0.3; mean 0.3
    assert tuna_loss(scores, margin=0.1).item() == pytest.approx((0 + 0.4) / 2 + 0.3, rel=1e-12)


def test_tuna_two_candidates_without_margin_is_hinge_on_difference():
    scores = t(-1.0, -1.5, -2.0, -0.5).reshape(2, 2)
    # Row 1 is ranked right (no loss); row 2 wrong by 1.5. The mean runs over the batch.
    assert tuna_loss(scores, margin=0.0).item() == pytest.approx((0 + 1.5) / 2)


def test_bradley_terry_by_hand():
    # −log σ(0.3 − (−0.2)) = log(1 + e^−0.5); a tie costs log 2.
    losses = bradley_terry_loss(t(0.3, 1.0), t(-0.2, 1.0))
    assert losses.tolist() == pytest.approx([softplus(-0.5), math.log(2)], rel=1e-12)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def ratio_rows(*rows: list[float], old: float = -1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps, old_logps) whose per-token ratios π/π_old are the given numbers."""
    logps = torch.tensor([[old + math.log(r) for r in row] for row in rows], dtype=torch.float64)
    return logps, torch.full_like(logps, old)


def lengths_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths], dtype=torch.float64)


def test_group_advantages_each_scale_by_hand():
    rewards = t(0.0, 0.0, 3.0, 1.0, 2.0, 3.0).reshape(2, 3)
    # Group means 1 and 2: centred rewards (−1, −1, 2) and (−1, 0, 1).
    # Unbiased group stds: √((1 + 1 + 4)/2) = √3 and √((1 + 0 + 1)/2) = 1.
    group = group_advantages(rewards, "group", eps=0.0)
    s3 = math.sqrt(3)
    assert group.flatten().tolist() == pytest.approx([-1 / s3, -1 / s3, 2 / s3, -1, 0, 1], rel=1e-12)
    # Batch std: the six rewards' mean is 9/6 = 1.5; squared deviations 2.25·4 + 0.25·2 = 9.5;
    # unbiased variance 9.5/5 = 1.9. The centring stays per group.
    batch = group_advantages(rewards, "batch", eps=0.0)
    s19 = math.sqrt(1.9)
    assert batch.flatten().tolist() == pytest.approx([-1 / s19, -1 / s19, 2 / s19, -1 / s19, 0, 1 / s19], rel=1e-12)
    # Dr. GRPO: centred only.
    none = group_advantages(rewards, "none")
    assert none.flatten().tolist() == pytest.approx([-1, -1, 2, -1, 0, 1], rel=1e-12)
    # The default ε = 1e-4 sits beside the std: the second group's (−1, 0, 1) / (1 + 1e-4).
    default = group_advantages(rewards, "group")
    assert default[1].tolist() == pytest.approx([-1 / 1.0001, 0, 1 / 1.0001], rel=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_group_advantages_flat_group_is_exactly_zero(scale, eps):
    # In float64 the mean of (0.1, 0.1, 0.1) is 0.1 + 1.4e-17: without the rule a flat group would
    # get a residue / ε ≈ 1e-13, or 0/0 = NaN with ε = 0.
    rewards = t(0.1, 0.1, 0.1, 0.0, 1.0, 0.5).reshape(2, 3)
    advantages = group_advantages(rewards, scale, eps=eps)
    assert advantages[0].tolist() == [0.0, 0.0, 0.0]
    assert torch.isfinite(advantages).all()
    assert advantages[1].tolist() != [0.0, 0.0, 0.0]
    # The same when the whole batch is flat (batch std 0).
    assert group_advantages(t(1.0, 1.0, 1.0, 1.0).reshape(2, 2), scale, eps=eps).tolist() == [[0.0, 0.0]] * 2


def test_rloo_advantages_leave_each_completion_out_of_its_own_baseline():
    rewards = t(0.0, 0.0, 3.0, 1.0, 2.0, 3.0).reshape(2, 3)
    # Each baseline is the mean of the other two: 0 → (0 + 3)/2, 0 → (0 + 3)/2, 3 → (0 + 0)/2;
    # 1 → (2 + 3)/2, 2 → (1 + 3)/2, 3 → (1 + 2)/2. That is G/(G − 1) = 3/2 times GRPO's centred rewards.
    rloo = group_advantages(rewards, "none", baseline="rloo")
    assert rloo.flatten().tolist() == pytest.approx([-1.5, -1.5, 3.0, -1.5, 0.0, 1.5], rel=1e-12)
    assert rloo.flatten().tolist() == pytest.approx((1.5 * group_advantages(rewards, "none")).flatten().tolist())
    # A flat group is still exactly zero; a scale divides as it does for GRPO.
    assert group_advantages(t(2.0, 2.0, 0.0, 1.0).reshape(2, 2), "group", baseline="rloo")[0].tolist() == [0.0, 0.0]
    group = group_advantages(rewards, "group", eps=0.0, baseline="rloo")
    assert group[1].tolist() == pytest.approx([-1.5, 0.0, 1.5], rel=1e-12)  # the second group's std is 1


def test_an_rloo_stage_scales_nothing_unless_its_scale_is_given():
    from schemas.spec import GRPOStage

    stage = {"name": "rl", "kind": "grpo", "data": "prompts.jsonl"}
    assert GRPOStage.model_validate(stage).scale == "group"
    assert GRPOStage.model_validate(stage | {"advantage": "rloo"}).scale == "none"
    assert GRPOStage.model_validate(stage | {"advantage": "rloo", "scale": "batch"}).scale == "batch"


def test_group_advantages_rejects_unknown_scale_and_lone_completions():
    with pytest.raises(ValueError, match="unknown advantage scale"):
        group_advantages(t(1.0, 0.0).reshape(1, 2), "rank")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least two completions"):
        group_advantages(t(1.0, 0.0).reshape(2, 1), "group")


# Two prompts × a group of two, rewards (1, 0) and (0, 2), scale "none":
# group means 0.5 and 1, so Â = (0.5, −0.5, −1, 1). ε_low = ε_high = 0.2: ratios clip to [0.8, 1.2].
# Per-token ratios (· is padding, ratio 10 there, which would show if it leaked):
#   o_1 (Â =  0.5): 1.1, 1.5, 0.9      ℓ = 0.55, min(0.75, 1.2·0.5 = 0.6) = 0.6 [clipped], 0.45   Σ =  1.6
#   o_2 (Â = −0.5): 0.5                ℓ = min(−0.25, 0.8·−0.5 = −0.4) = −0.4 [clipped]            Σ = −0.4
#   o_3 (Â = −1):   1.5, 1.0           ℓ = min(−1.5, −1.2) = −1.5 [unclipped is the min], −1       Σ = −2.5
#   o_4 (Â =  1):   1.0, 0.5           ℓ = 1, min(0.5, 0.8) = 0.5 [unclipped is the min]           Σ =  1.5
# 8 completion tokens, 2 of them clipped.
GRPO_REWARDS = t(1.0, 0.0, 0.0, 2.0).reshape(2, 2)
GRPO_RATIOS = ([1.1, 1.5, 0.9, 10], [0.5, 10, 10, 10], [1.5, 1.0, 10, 10], [1.0, 0.5, 10, 10])
GRPO_LENGTHS = [3, 1, 2, 2]


@pytest.mark.parametrize(
    "aggregation, expected",
    [
        # Mean over the 4 completions of each one's token mean: −(1.6/3 − 0.4/1 − 2.5/2 + 1.5/2) / 4
        ("grpo", -(1.6 / 3 - 0.4 / 1 - 2.5 / 2 + 1.5 / 2) / 4),
        # Token mean over the batch: −(1.6 − 0.4 − 2.5 + 1.5) / 8 = −0.2/8
        ("dapo", -0.2 / 8),
        # Over N · max_tokens = 4 · 4, whatever the lengths: −0.2/16
        ("dr_grpo", -0.2 / 16),
    ],
)
def test_grpo_aggregations_by_hand(aggregation, expected):
    advantages = group_advantages(GRPO_REWARDS, "none").flatten()
    assert advantages.tolist() == [0.5, -0.5, -1.0, 1.0]
    logps, old = ratio_rows(*GRPO_RATIOS)
    loss, metrics = grpo_loss(
        logps,
        old,
        advantages,
        lengths_mask(GRPO_LENGTHS, 4),
        epsilon_low=0.2,
        epsilon_high=0.2,
        aggregation=aggregation,
        max_tokens=4,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 8)
    assert "kl" not in metrics  # no reference model, nothing to measure


def test_gspo_clips_one_ratio_per_completion_by_hand():
    # GSPO: s_i is the geometric mean of o_i's token ratios, clipped to [0.8, 1.2] and shared by its tokens.
    #   o_1 (Â =  0.5): s = (1.1 · 1.5 · 0.9)^(1/3) = 1.485^(1/3) ≈ 1.1409    ℓ = 0.5 · s  (inside the clip)
    #   o_2 (Â = −0.5): s = 0.5                  ℓ = min(−0.25, 0.8 · −0.5) = −0.4 [clipped]
    #   o_3 (Â = −1):   s = √1.5 ≈ 1.2247        ℓ = min(−1.2247, −1.2) = −√1.5 [unclipped is the min]
    #   o_4 (Â =  1):   s = √0.5 ≈ 0.7071        ℓ = min(0.7071, 0.8) = √0.5 [unclipped is the min]
    # grpo aggregation: each completion's tokens share ℓ, so L = −(Σ_i ℓ_i) / 4; only o_2's one token is clipped.
    advantages = group_advantages(GRPO_REWARDS, "none").flatten()
    logps, old = ratio_rows(*GRPO_RATIOS)
    logps.requires_grad_()
    mask = lengths_mask(GRPO_LENGTHS, 4)
    loss, metrics = grpo_loss(logps, old, advantages, mask, 0.2, 0.2, ratio_level="sequence")
    s1 = 1.485 ** (1 / 3)
    assert loss.item() == pytest.approx(-(0.5 * s1 - 0.4 - math.sqrt(1.5) + math.sqrt(0.5)) / 4, rel=1e-12)
    assert metrics["clip_fraction"].item() == pytest.approx(1 / 8)
    # ∂L/∂log π_{i,t} = −Â_i · s_i / (N · |o_i|) on every token of an unclipped completion (through s_i), 0 on a
    # clipped one and on padding: one value per completion, where token ratios would give each token its own.
    loss.backward()
    expected = [[-0.5 * s1 / 12] * 3 + [0.0], [0.0] * 4, [math.sqrt(1.5) / 8] * 2 + [0.0] * 2]
    expected.append([-math.sqrt(0.5) / 8] * 2 + [0.0] * 2)
    assert logps.grad.tolist() == [pytest.approx(row, rel=1e-12, abs=1e-15) for row in expected]


def test_grpo_first_pass_has_unit_ratio_and_the_plain_policy_gradient():
    # μ = 1: the sampling policy is the current one, so the caller may pass logps as old_logps.
    # ρ = 1 everywhere, nothing is clipped, and ℓ_{i,t} = Â_i: with Â = (1, −2), lengths (2, 1),
    # L = −(2·1/2 + 1·(−2)/1) / 2 = 0.5, and ∂L/∂log π_{i,t} = −Â_i / (N·|o_i|):
    # −1/(2·2) = −0.25 on o_1's two tokens, 2/(2·1) = 1 on o_2's one, 0 on padding.
    # Were old_logps not detached, ρ = exp(logps − logps) would carry no gradient at all.
    logps = t(-0.7, -1.3, -0.2, -2.0).reshape(2, 2).requires_grad_()
    loss, metrics = grpo_loss(logps, logps, t(1.0, -2.0), lengths_mask([2, 1], 2), epsilon_low=0.2, epsilon_high=0.2)
    assert loss.item() == pytest.approx(0.5, rel=1e-12)
    assert metrics["clip_fraction"].item() == 0.0
    loss.backward()
    assert logps.grad.flatten().tolist() == pytest.approx([-0.25, -0.25, 1.0, 0.0], rel=1e-12)


def test_grpo_zero_variance_group_gives_zero_advantage_and_finite_loss():
    # Prompt 1's group all scored 1: Â = 0, so its completions add nothing, not NaN.
    advantages = group_advantages(t(1.0, 1.0, 0.0, 1.0).reshape(2, 2), "group").flatten()
    assert advantages[:2].tolist() == [0.0, 0.0]
    logps = t(-0.5, -1.5, -0.25, -3.0).reshape(4, 1).requires_grad_()
    old = logps.detach() + 0.1
    loss, _ = grpo_loss(logps, old, advantages, torch.ones(4, 1), epsilon_low=0.2, epsilon_high=0.2)
    assert torch.isfinite(loss)
    loss.backward()
    assert logps.grad[:2].flatten().tolist() == [0.0, 0.0]
    assert (logps.grad[2:] != 0).all()


def test_grpo_clipped_tokens_get_no_gradient():
    # ε = 0.2, grpo aggregation over N = 2 completions of 2 tokens: ∂L/∂log π = −ρ·Â / (2·2) where the
    # unclipped term is the min, 0 where the clipped constant is.
    #   o_1, Â = +1: ρ = 1.5 > 1.2 → clipped, 0;    ρ = 1.1 → −1.1/4 = −0.275
    #   o_2, Â = −1: ρ = 1.5 → −1.5 < −1.2, so the unclipped term is the min: +1.5/4 = 0.375
    #                ρ = 0.5 < 0.8 → clipped, 0
    logps, old = ratio_rows([1.5, 1.1], [1.5, 0.5])
    logps.requires_grad_()
    loss, metrics = grpo_loss(logps, old, t(1.0, -1.0), torch.ones(2, 2), epsilon_low=0.2, epsilon_high=0.2)
    loss.backward()
    assert logps.grad.flatten().tolist() == pytest.approx([0.0, -0.275, 0.375, 0.0], rel=1e-12)
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 4)


def test_grpo_clip_higher_widens_only_the_upper_bound():
    # ρ = 1.25, Â = 1: clipped at 1 + 0.2 (ℓ = 1.2), not at DAPO's 1 + 0.28 (ℓ = 1.25).
    logps, old = ratio_rows([1.25])
    symmetric, clipped = grpo_loss(logps, old, t(1.0), torch.ones(1, 1), epsilon_low=0.2, epsilon_high=0.2)
    higher, free = grpo_loss(logps, old, t(1.0), torch.ones(1, 1), epsilon_low=0.2, epsilon_high=0.28)
    assert symmetric.item() == pytest.approx(-1.2, rel=1e-12) and clipped["clip_fraction"].item() == 1.0
    assert higher.item() == pytest.approx(-1.25, rel=1e-12) and free["clip_fraction"].item() == 0.0


def test_grpo_kl_penalty_by_hand():
    # Â = 0 and ρ = 1, so ℓ = −β·D only. log π_ref − log π = log 2 on both tokens:
    # D = e^{log 2} − log 2 − 1 = 1 − log 2, and L = −(1/2)·Σ_t(−β·D) = β·(1 − log 2).
    # ∂L/∂log π = (β/2)·(1 − e^{log 2}) = −β/2: the penalty pulls π up toward the likelier reference.
    logps = t(-2.0, -1.0).reshape(1, 2).requires_grad_()
    ref = logps.detach() + math.log(2)
    loss, metrics = grpo_loss(
        logps, logps, t(0.0), torch.ones(1, 2), epsilon_low=0.2, epsilon_high=0.2, beta=0.1, ref_logps=ref
    )
    assert loss.item() == pytest.approx(0.1 * (1 - math.log(2)), rel=1e-12)
    assert metrics["kl"].item() == pytest.approx(1 - math.log(2), rel=1e-12)
    loss.backward()
    assert logps.grad.flatten().tolist() == pytest.approx([-0.05, -0.05], rel=1e-12)


def test_grpo_kl_is_zero_when_the_reference_is_the_policy():
    logps, old = ratio_rows(*GRPO_RATIOS)
    advantages = group_advantages(GRPO_REWARDS, "none").flatten()
    mask = lengths_mask(GRPO_LENGTHS, 4)
    penalised, metrics = grpo_loss(
        logps, old, advantages, mask, epsilon_low=0.2, epsilon_high=0.2, beta=0.5, ref_logps=logps.clone()
    )
    plain, _ = grpo_loss(logps, old, advantages, mask, epsilon_low=0.2, epsilon_high=0.2)
    assert metrics["kl"].item() == 0.0
    assert penalised.item() == pytest.approx(plain.item(), rel=1e-12)


def test_grpo_padding_never_leaks_nan_into_loss_or_gradient():
    nan = float("nan")
    logps = t(-1.0, nan, -0.5, -0.25).reshape(2, 2).requires_grad_()
    old = t(-1.0, nan, -0.5, nan).reshape(2, 2)
    ref = t(-1.5, nan, -0.5, nan).reshape(2, 2)
    mask = lengths_mask([1, 1], 2)
    loss, metrics = grpo_loss(
        logps, old, t(1.0, -1.0), mask, epsilon_low=0.2, epsilon_high=0.2, beta=0.1, ref_logps=ref, aggregation="dapo"
    )
    assert torch.isfinite(loss) and torch.isfinite(metrics["kl"])
    loss.backward()
    assert torch.isfinite(logps.grad).all()
    assert logps.grad[:, 1].tolist() == [0.0, 0.0]


def test_grpo_rejects_bad_arguments():
    logps, old = ratio_rows([1.0, 1.0])
    mask, advantages = torch.ones(1, 2), t(1.0)
    common = dict(epsilon_low=0.2, epsilon_high=0.2)
    with pytest.raises(ValueError, match="unknown GRPO aggregation"):
        grpo_loss(logps, old, advantages, mask, aggregation="seq_sum", **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no ref_logps"):
        grpo_loss(logps, old, advantages, mask, beta=0.04, **common)
    with pytest.raises(ValueError, match="pass max_tokens"):
        grpo_loss(logps, old, advantages, mask, aggregation="dr_grpo", **common)
    with pytest.raises(ValueError, match=r"advantages must be \[N\]"):
        grpo_loss(logps, old, t(1.0, 2.0), mask, **common)
    with pytest.raises(ValueError, match="share one"):
        grpo_loss(logps, old, advantages, torch.ones(1, 3), **common)


# β = 0.5, z₀ = 0.2.
#   desirable:   log π = −1, log π_ref = −1.4: log ratio 0.4,  v = σ(0.5·(0.4 − 0.2)) = σ(0.1)
#   undesirable: log π = −2, log π_ref = −1.6: log ratio −0.4, v = σ(0.5·(0.2 + 0.4)) = σ(0.3)
KTO_INPUTS = (t(-1.0, -2.0), t(-1.4, -1.6), torch.tensor([True, False]), t(0.2))


def test_kto_desirable_and_undesirable_by_hand():
    losses, rewards = kto_loss(*KTO_INPUTS, beta=0.5)
    # L = λ_y − v with λ = 1; rewards β·(log π − log π_ref) = 0.5·±0.4.
    assert losses.tolist() == pytest.approx([1 - sigmoid(0.1), 1 - sigmoid(0.3)], rel=1e-12)
    assert rewards.tolist() == pytest.approx([0.2, -0.2], rel=1e-12)
    assert not rewards.requires_grad


def test_kto_weights_scale_each_side():
    losses, _ = kto_loss(*KTO_INPUTS, beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)
    # λ_D·(1 − σ(0.1)) and λ_U·(1 − σ(0.3))
    assert losses.tolist() == pytest.approx([2 * (1 - sigmoid(0.1)), 0.5 * (1 - sigmoid(0.3))], rel=1e-12)
    # Losses lie in [0, λ_y]: a desirable completion far above z₀ costs ≈ 0, an undesirable one ≈ λ_U.
    extreme, _ = kto_loss(
        t(50.0, 50.0),
        t(0.0, 0.0),
        torch.tensor([True, False]),
        t(0.0),
        beta=1.0,
        desirable_weight=2.0,
        undesirable_weight=0.5,
    )
    assert extreme.tolist() == pytest.approx([0.0, 0.5], abs=1e-12)


def test_kto_gradient_raises_desirable_lowers_undesirable_and_skips_z0():
    policy = t(-1.0, -2.0).requires_grad_()
    z0 = t(0.2).requires_grad_()
    losses, _ = kto_loss(policy, t(-1.4, -1.6), torch.tensor([True, False]), z0, beta=0.5)
    losses.sum().backward()
    # ∂/∂log π of 1 − σ(β(r − z₀)) is −β·σ'(0.1) and of 1 − σ(β(z₀ − r)) is +β·σ'(0.3), σ' = σ(1 − σ).
    assert policy.grad.tolist() == pytest.approx(
        [-0.5 * sigmoid(0.1) * (1 - sigmoid(0.1)), 0.5 * sigmoid(0.3) * (1 - sigmoid(0.3))], rel=1e-12
    )
    assert z0.grad is None


def test_kto_reference_point_is_a_clamped_detached_mean():
    reference = t(-1.5, -1.5)
    # Log ratios 0.5 and −0.3: mean 0.1.
    policy = t(-1.0, -1.8).requires_grad_()
    z0 = kto_reference_point(policy, reference)
    assert z0.shape == () and z0.item() == pytest.approx(0.1, rel=1e-12)
    assert not z0.requires_grad
    # Log ratios −0.5 and −0.3: mean −0.4, clamped to 0 (a KL is never negative).
    assert kto_reference_point(t(-2.0, -1.8), reference).item() == 0.0


# One labelled position: the teacher's logits (0, 0) give P = (1/2, 1/2), the student's (ln 3, 0) give Q = (3/4, 1/4).
# A second position is masked out; its logits are far from each other and must not count.
DISTILL_TEACHER = torch.tensor([[[0.0, 0.0], [40.0, -40.0]]], dtype=torch.float64)
DISTILL_STUDENT = torch.tensor([[[math.log(3), 0.0], [-40.0, 40.0]]], dtype=torch.float64)
DISTILL_MASK = torch.tensor([[1, 0]])


@pytest.mark.parametrize(
    "divergence, expected",
    [
        # KL(P ‖ Q) = ½ ln(½ / ¾) + ½ ln(½ / ¼) = ½ ln(4/3)
        ("forward_kl", 0.5 * math.log(4 / 3)),
        # KL(Q ‖ P) = ¾ ln(¾ / ½) + ¼ ln(¼ / ½) = ¾ ln(3/2) − ¼ ln 2
        ("reverse_kl", 0.75 * math.log(1.5) - 0.25 * math.log(2)),
        # β = ½: M = (5/8, 3/8); ½ [½ ln(½ / ⅝) + ½ ln(½ / ⅜)] + ½ [¾ ln(¾ / ⅝) + ¼ ln(¼ / ⅜)]
        (
            "jsd",
            0.5 * (0.5 * math.log(0.8) + 0.5 * math.log(4 / 3)) + 0.5 * (0.75 * math.log(1.2) + 0.25 * math.log(2 / 3)),
        ),
    ],
)
def test_distillation_divergences_by_hand(divergence, expected):
    loss = distillation_loss(DISTILL_STUDENT, DISTILL_TEACHER, DISTILL_MASK, divergence)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_forward_kl_pulls_the_student_toward_the_teacher_by_q_minus_p():
    # ∂KL(P ‖ Q)/∂z_Q = Q − P per labelled token, divided by their count (1 here): (¾ − ½, ¼ − ½); nothing reaches the
    # masked position, and the teacher gets no gradient.
    student = DISTILL_STUDENT.clone().requires_grad_()
    teacher = DISTILL_TEACHER.clone().requires_grad_()
    distillation_loss(student, teacher, DISTILL_MASK, "forward_kl").backward()
    assert student.grad[0, 0].tolist() == pytest.approx([0.25, -0.25], rel=1e-6)
    assert student.grad[0, 1].tolist() == [0.0, 0.0] and teacher.grad is None


def test_distillation_softens_both_sides_and_cuts_a_wider_teacher_vocabulary():
    # τ = 2: the teacher's (0, ln 4, 9) is cut to the student's two tokens, then P ∝ (1, 4^½) = (1/3, 2/3); the
    # student's (0, 0) gives Q = (½, ½). KL(P ‖ Q) = ⅓ ln(⅔) + ⅔ ln(4/3).
    teacher = torch.tensor([[[0.0, math.log(4), 9.0]]], dtype=torch.float64)
    student = torch.zeros(1, 1, 2, dtype=torch.float64)
    loss = distillation_loss(student, teacher, torch.ones(1, 1), "forward_kl", temperature=2.0)
    assert loss.item() == pytest.approx(math.log(2 / 3) / 3 + 2 / 3 * math.log(4 / 3), rel=1e-6)
    with pytest.raises(ValueError, match="do not cover the student's"):
        distillation_loss(torch.zeros(1, 1, 3), torch.zeros(1, 1, 2), torch.ones(1, 1))
    with pytest.raises(ValueError, match=r"strictly in \(0, 1\)"):
        distillation_loss(student, teacher, torch.ones(1, 1), "jsd", beta=1.0)


def test_gae_by_hand_stops_at_each_completions_end():
    # γ = 1, λ = ½. Row 1, three tokens: δ = (0 + 0.4 − 0.5, 0 + 0.2 − 0.4, 1 + 0 − 0.2) = (−0.1, −0.2, 0.8);
    # Â_2 = 0.8, Â_1 = −0.2 + ½·0.8 = 0.2, Â_0 = −0.1 + ½·0.2 = 0; R = Â + V = (0.5, 0.6, 1.0).
    # Row 2, two tokens and padding (its reward 99 and value 7 must not count): δ_1 = −1 + 0 − 0.5 = −1.5,
    # δ_0 = 0.3 + 0.5 − 1 = −0.2; Â = (−0.2 + ½·−1.5, −1.5) = (−0.95, −1.5); R = (0.05, −1.0).
    rewards = t(0.0, 0.0, 1.0, 0.3, -1.0, 99.0).reshape(2, 3)
    values = t(0.5, 0.4, 0.2, 1.0, 0.5, 7.0).reshape(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert advantages.tolist() == [pytest.approx([0.0, 0.2, 0.8], abs=1e-12), pytest.approx([-0.95, -1.5, 0.0])]
    assert returns.tolist() == [pytest.approx([0.5, 0.6, 1.0]), pytest.approx([0.05, -1.0, 0.0])]


def test_ppo_rewards_put_the_score_on_each_completions_last_token_beside_the_kl_penalty():
    # β = 0.1; log π − log π_ref = (0.5, −1, 2 | 1, ·): r = (−0.05, 0.1, −0.2 + 3 | −0.1 + (−1), 0).
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -9.0, -9.0]], dtype=torch.float64)
    ref = logps.new_tensor([[-1.5, -1.0, -2.5], [-2.0, 0.0, 0.0]])
    rewards = ppo_rewards(t(3.0, -1.0), logps, ref, torch.tensor([[1, 1, 1], [1, 0, 0]]), kl_coef=0.1)
    assert rewards.tolist() == [pytest.approx([-0.05, 0.1, 2.8]), pytest.approx([-1.1, 0.0, 0.0])]


def _trl_ppo(rewards, values, mask, logps, old_logps, new_values, gamma, lam, clip, value_clip, value_weight):
    """TRL's PPOTrainer arithmetic (trl/trainer/ppo_trainer.py, v0.x and 1.x), transcribed as it is written there:
    its GAE loop over the padded width, its masked_whiten (unbiased variance, shift_mean) and its loss."""
    values = values * mask
    rewards = rewards * mask
    lastgaelam, reversed_advantages = 0, []
    width = rewards.shape[1]
    for step in reversed(range(width)):
        nextvalues = values[:, step + 1] if step < width - 1 else 0.0
        delta = rewards[:, step] + gamma * nextvalues - values[:, step]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_advantages.append(lastgaelam)
    advantages = torch.stack(reversed_advantages[::-1], axis=1)
    returns = advantages + values

    def masked_mean(x, m):
        return (x * m).sum() / m.sum()

    mean = masked_mean(advantages, mask)
    variance = masked_mean((advantages - mean) ** 2, mask) * (mask.sum() / (mask.sum() - 1))
    advantages = torch.masked_fill((advantages - mean) * torch.rsqrt(variance + 1e-8), ~mask.bool(), 0)
    clipped = torch.clamp(new_values, values - value_clip, values + value_clip)
    vf_loss = 0.5 * masked_mean(torch.max((new_values - returns) ** 2, (clipped - returns) ** 2), mask)
    ratio = torch.exp(logps - old_logps)
    pg_loss = masked_mean(torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)), mask)
    return advantages, returns, pg_loss + value_weight * vf_loss


def test_ppo_matches_trls_arithmetic_on_fixed_tensors():
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 3, 1, 4]
    mask = lengths_mask(lengths, 5)
    rewards, values, logps, old_logps = (torch.randn(4, 5, generator=generator, dtype=torch.float64) for _ in "1234")
    new_values = values + 0.3 * torch.randn(4, 5, generator=generator, dtype=torch.float64)
    settings = dict(gamma=0.99, lam=0.95, clip=0.2, value_clip=0.2, value_weight=0.1)
    expected_advantages, expected_returns, expected_loss = _trl_ppo(
        rewards, values, mask, logps, old_logps, new_values, **settings
    )
    advantages, returns = gae(rewards, values, mask, settings["gamma"], settings["lam"])
    advantages = masked_whiten(advantages, mask) * mask
    loss, metrics = ppo_loss(logps, old_logps, advantages, new_values, values * mask, returns, mask, 0.2, 0.2, 0.1)
    assert torch.allclose(advantages, expected_advantages, atol=1e-6)
    assert torch.allclose(returns, expected_returns, atol=1e-6)
    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-6)
    assert 0 < metrics["clip_fraction"] < 1 and 0 < metrics["value_clip_fraction"] < 1
