"""Reward-model ranking loss: hand-computed pairs, ties, per-prompt weighting, centering."""

from __future__ import annotations

import math

import pytest
import torch

from instructkit.losses.reward import pairwise_loss, ranking_loss


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x); a pair with difference d costs softplus(-d)."""
    return math.log1p(math.exp(x))


def long(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_k2_is_the_pairwise_formula():
    """One prompt, better response scored 1, worse -0.5: d = 1.5, loss log(1 + e^-1.5)."""
    out = ranking_loss(f64(-0.5, 1.0), long(0, 0), long(1, 0))
    assert out.loss_sum.item() == pytest.approx(softplus(-1.5), rel=1e-12)
    assert (out.prompts.item(), out.pairs.item(), out.correct.item()) == (1, 1, 1)


def test_k4_six_pairs_by_hand():
    """Ranks 0..3 scored 2, 1, 1, -1. The C(4, 2) = 6 differences (better - worse):
    (0,1) 1, (0,2) 1, (0,3) 3, (1,2) 0, (1,3) 2, (2,3) 2.

    loss = [2 softplus(-1) + softplus(-3) + softplus(0) + 2 softplus(-2)] / 6; pair (1,2) has
    equal scores, so 5 of 6 are correct.
    """
    out = ranking_loss(f64(2.0, 1.0, 1.0, -1.0), long(5, 5, 5, 5), long(0, 1, 2, 3))
    expected = (2 * softplus(-1) + softplus(-3) + softplus(0) + 2 * softplus(-2)) / 6
    assert out.loss_sum.item() == pytest.approx(expected, rel=1e-12)
    assert (out.prompts.item(), out.pairs.item(), out.correct.item()) == (1, 6, 5)


def test_ties_are_dropped():
    """Prompt 0: both responses rank 0, a tie: no pair, not counted as a prompt.
    Prompt 1: ranks 0, 1, 1 scored 0, 1, 3: pairs (0,1) d = -1 and (0,2) d = -3 only; both
    wrong. loss_sum = [softplus(1) + softplus(3)] / 2.
    """
    scores = f64(4.0, -4.0, 0.0, 1.0, 3.0)
    out = ranking_loss(scores, long(0, 0, 1, 1, 1), long(0, 0, 0, 1, 1))
    assert out.loss_sum.item() == pytest.approx((softplus(1) + softplus(3)) / 2, rel=1e-12)
    assert (out.prompts.item(), out.pairs.item(), out.correct.item()) == (1, 2, 0)


def test_only_ties_contribute_nothing():
    scores = f64(1.0, 2.0).requires_grad_()
    out = ranking_loss(scores, long(3, 3), long(1, 1))
    assert out.loss_sum.item() == 0.0
    assert (out.prompts.item(), out.pairs.item(), out.correct.item()) == (0, 0, 0)
    out.loss_sum.backward()
    assert scores.grad.tolist() == [0.0, 0.0]


def test_non_contiguous_groups_match_contiguous():
    """Interleaving two prompts' responses, with arbitrary ids, changes nothing."""
    scores = f64(0.3, -1.0, 2.0, 0.5, 1.5)
    group = long(42, 7, 42, 7, 42)
    rank = long(2, 1, 0, 0, 1)
    order = torch.tensor([0, 2, 4, 1, 3])
    mixed = ranking_loss(scores, group, rank)
    tidy = ranking_loss(scores[order], long(0, 0, 0, 1, 1), rank[order])
    assert mixed.loss_sum.item() == pytest.approx(tidy.loss_sum.item(), rel=1e-12)
    assert (mixed.prompts, mixed.pairs, mixed.correct) == (tidy.prompts, tidy.pairs, tidy.correct)


def test_prompts_weigh_equally_whatever_k():
    """Prompt A is the K = 4 case above (6 pairs), prompt B one pair with d = 0 (loss ln 2).

    loss_sum = mean_A + ln 2, not (6 mean_A + ln 2) / 7 * 2: each prompt contributes its mean.
    """
    scores = f64(2.0, 1.0, 1.0, -1.0, 0.0, 0.0)
    out = ranking_loss(scores, long(0, 0, 0, 0, 1, 1), long(0, 1, 2, 3, 0, 1))
    mean_a = (2 * softplus(-1) + softplus(-3) + softplus(0) + 2 * softplus(-2)) / 6
    assert out.loss_sum.item() == pytest.approx(mean_a + math.log(2), rel=1e-12)
    assert (out.prompts.item(), out.pairs.item(), out.correct.item()) == (2, 7, 5)


def test_margin_is_subtracted_from_every_difference():
    """d = 1 with margin 0.5 costs softplus(-0.5)."""
    out = ranking_loss(f64(1.0, 0.0), long(0, 0), long(0, 1), margin=0.5)
    assert out.loss_sum.item() == pytest.approx(softplus(-0.5), rel=1e-12)


def test_center_coefficient_by_hand():
    """Penalty c * (r_w + r_l)^2 per pair, averaged with the pair losses.

    K = 2, c = 0.1, r_w = 1, r_l = -3: softplus(-4) + 0.1 * (-2)^2.
    K = 3 scores 1, 0, -2 ranked in that order: pair sums 1, -1, -2, squares 1, 1, 4, mean 2;
    differences 1, 3, 2. loss = [softplus(-1) + softplus(-3) + softplus(-2)] / 3 + 0.1 * 2.
    """
    k2 = ranking_loss(f64(1.0, -3.0), long(0, 0), long(0, 1), center_coefficient=0.1)
    assert k2.loss_sum.item() == pytest.approx(softplus(-4) + 0.4, rel=1e-12)
    k3 = ranking_loss(f64(1.0, 0.0, -2.0), long(0, 0, 0), long(0, 1, 2), center_coefficient=0.1)
    expected = (softplus(-1) + softplus(-3) + softplus(-2)) / 3 + 0.1 * 2
    assert k3.loss_sum.item() == pytest.approx(expected, rel=1e-12)


def test_pairwise_matches_ranking_and_trl_formula():
    """pairwise_loss is ranking_loss with one prompt per pair, and loss_sum / prompts is TRL's
    RewardTrainer loss: mean(-log sigmoid(c - r - m)) + coef * mean((c + r)^2)."""
    torch.manual_seed(0)
    chosen, rejected = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    pair = pairwise_loss(chosen, rejected, margin=0.2, center_coefficient=0.01)
    ranked = ranking_loss(
        torch.cat([chosen, rejected]),
        torch.arange(5).repeat(2),
        long(*[0] * 5, *[1] * 5),
        margin=0.2,
        center_coefficient=0.01,
    )
    assert pair.loss_sum.item() == pytest.approx(ranked.loss_sum.item(), rel=1e-12)
    for field in ("prompts", "pairs", "correct"):
        assert getattr(pair, field) == getattr(ranked, field)
    trl = -torch.nn.functional.logsigmoid(chosen - rejected - 0.2).mean() + 0.01 * ((chosen + rejected) ** 2).mean()
    assert (pair.loss_sum / pair.prompts).item() == pytest.approx(trl.item(), rel=1e-12)


def test_pairwise_per_pair_margin():
    """Margins 0 and 2 on differences 1 and 1: softplus(-1) + softplus(1)."""
    out = pairwise_loss(f64(1.0, 1.0), f64(0.0, 0.0), margin=f64(0.0, 2.0))
    assert out.loss_sum.item() == pytest.approx(softplus(-1) + softplus(1), rel=1e-12)
    assert out.correct.item() == 2


def test_gradient_by_hand_and_finite():
    """For one pair, d softplus(-(r_w - r_l)) / d r_w = -sigmoid(-d): with d = 0, -1/2 and +1/2.
    Extreme scores and masked pairs with huge differences still give finite gradients."""
    scores = f64(0.0, 0.0).requires_grad_()
    ranking_loss(scores, long(0, 0), long(0, 1)).loss_sum.backward()
    assert scores.grad.tolist() == pytest.approx([-0.5, 0.5])
    big = f64(1e4, -1e4, 3e3, -3e3, 0.0).requires_grad_()
    out = ranking_loss(big, long(0, 0, 1, 1, 1), long(1, 0, 0, 0, 1), center_coefficient=0.01)
    out.loss_sum.backward()
    assert torch.isfinite(out.loss_sum) and torch.isfinite(big.grad).all()


def test_empty_batch_and_half_precision():
    empty = ranking_loss(torch.zeros(0), long(), long())
    assert empty.loss_sum.item() == 0.0 and empty.prompts.item() == 0 and empty.pairs.item() == 0
    half = ranking_loss(torch.tensor([1.0, -0.5], dtype=torch.bfloat16), long(0, 0), long(0, 1))
    assert half.loss_sum.dtype == torch.float32
    assert half.loss_sum.item() == pytest.approx(softplus(-1.5), rel=1e-6)
