"""Losses against values worked out by hand: each expected number is spelled out with `math`."""

from __future__ import annotations

import math

import pytest
import torch

from stages.losses import (
    bradley_terry_loss,
    dpo_loss,
    orpo_loss,
    pro_loss,
    pro_sft_weight,
    sequence_logps,
    simpo_loss,
    tuna_loss,
)
from stages.templates import IGNORE


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
    expected = math.log(1 / 2) + (1 - math.log(math.e + math.e ** 2))
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert count.tolist() == [2.0]

    total, count = sequence_logps(logits, torch.tensor([[5, IGNORE, 0]]))
    assert total.item() == pytest.approx(1 - math.log(math.e + math.e ** 2), rel=1e-6)
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
    assert total.item() == pytest.approx(2 - math.log(math.e ** 2 + 1), rel=1e-6)
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
