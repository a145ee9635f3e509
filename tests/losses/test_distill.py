"""Distillation losses against hand computations on a 3-token vocabulary.

Teacher p = (1/2, 1/4, 1/4), student q = (1/8, 1/8, 3/4), given as log-probabilities (logits
equal to log-probabilities up to a constant give the same softmax). The expected values are
written out from the definitions below, not taken from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from instructkit.errors import InputError
from instructkit.losses.distill import (
    chunked_divergence,
    distillation_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    token_divergence,
)

P = [1 / 2, 1 / 4, 1 / 4]
Q = [1 / 8, 1 / 8, 3 / 4]
LN2, LN3 = math.log(2), math.log(3)
# KL(p||q) = 1/2 ln(4) + 1/4 ln(2) + 1/4 ln(1/3)
KL_PQ = 1.25 * LN2 - 0.25 * LN3
# KL(q||p) = 1/8 ln(1/4) + 1/8 ln(1/2) + 3/4 ln(3)
KL_QP = 0.75 * LN3 - 0.375 * LN2
# beta = 1/2: m = (5/16, 3/16, 1/2)
KL_PM = 0.5 * math.log(8 / 5) + 0.25 * math.log(4 / 3) + 0.25 * math.log(1 / 2)
KL_QM = 0.125 * math.log(2 / 5) + 0.125 * math.log(2 / 3) + 0.75 * math.log(3 / 2)
JSD_HALF = 0.5 * KL_PM + 0.5 * KL_QM


def logits(probs, shift=0.0):
    return torch.tensor([math.log(x) + shift for x in probs], dtype=torch.float64)


def test_forward_and_reverse_kl_by_hand():
    student, teacher = logits(Q, 1.7), logits(P, -0.3)  # shifts do not change a softmax
    assert forward_kl(student[None], teacher[None])[0].item() == pytest.approx(KL_PQ, abs=1e-12)
    assert reverse_kl(student[None], teacher[None])[0].item() == pytest.approx(KL_QP, abs=1e-12)
    assert abs(KL_PQ - KL_QP) > 0.02  # the example tells the two directions apart


def test_jsd_at_one_half_by_hand():
    total, count = generalized_jsd(logits(Q)[None], logits(P)[None], beta=0.5)
    assert total.item() == pytest.approx(JSD_HALF, abs=1e-12)
    assert count.item() == 1


def test_jsd_limits_are_forward_and_reverse_kl():
    student, teacher = logits(Q), logits(P)
    small = 1e-6
    near_zero = token_divergence(student, teacher, beta=small).item() / small
    near_one = token_divergence(student, teacher, beta=1 - small).item() / small
    assert near_zero == pytest.approx(KL_PQ, rel=1e-4)
    assert near_one == pytest.approx(KL_QP, rel=1e-4)
    # beta = 0 and 1 are defined as those limits (GKD's convention).
    assert token_divergence(student, teacher, beta=0.0).item() == pytest.approx(KL_PQ, abs=1e-12)
    assert token_divergence(student, teacher, beta=1.0).item() == pytest.approx(KL_QP, abs=1e-12)


def test_temperature_flattens_both_distributions():
    # softmax(log p / 2) is sqrt(p) renormalised: compute the KL of those by hand.
    def at_t2(probs):
        roots = [math.sqrt(x) for x in probs]
        return [r / sum(roots) for r in roots]

    p2, q2 = at_t2(P), at_t2(Q)
    expected = sum(a * math.log(a / b) for a, b in zip(p2, q2))
    got = forward_kl(logits(Q)[None], logits(P)[None], temperature=2.0)[0].item()
    assert got == pytest.approx(expected, abs=1e-12)
    assert got < KL_PQ  # a higher temperature brings the two closer here


def test_mask_keeps_only_chosen_positions():
    student = torch.stack([logits(Q), logits(P), logits(Q)])[None]  # (1, 3, V)
    teacher = torch.stack([logits(P), logits(Q), logits(P)])[None]
    mask = torch.tensor([[True, False, True]])
    total, count = forward_kl(student, teacher, mask)
    assert count.item() == 2
    assert total.item() == pytest.approx(2 * KL_PQ, abs=1e-12)
    assert forward_kl(student, teacher)[0].item() == pytest.approx(2 * KL_PQ + KL_QP, abs=1e-12)


def test_zero_probability_teacher_tokens_add_nothing():
    teacher = torch.tensor([[0.0, 0.0, -math.inf]], dtype=torch.float64)  # p = (1/2, 1/2, 0)
    student = logits(Q)[None]
    expected = 0.5 * math.log(0.5 / 0.125) * 2
    assert forward_kl(student, teacher)[0].item() == pytest.approx(expected, abs=1e-12)


def test_gradient_reaches_the_student_only():
    student = logits(Q).clone().requires_grad_(True)
    teacher = logits(P).clone().requires_grad_(True)
    token_divergence(student, teacher, beta=0.5).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    # forward KL's gradient in the student's logits is q - p (at temperature 1).
    s = logits(Q).clone().requires_grad_(True)
    token_divergence(s, logits(P), beta=0.0).backward()
    torch.testing.assert_close(s.grad, torch.tensor(Q, dtype=torch.float64) - torch.tensor(P, dtype=torch.float64))


def test_chunked_divergence_equals_full_logits():
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(11, 4, generator=g, dtype=torch.float64)
    for beta in (0.0, 0.3, 1.0):
        full = token_divergence(hs @ ws.t(), ht @ wt.t(), beta=beta, temperature=1.5).sum()
        gh, gw = torch.autograd.grad(full, (hs, ws))
        chunked = chunked_divergence(hs, ws, ht, wt, beta=beta, temperature=1.5, chunk_size=3)
        ch, cw = torch.autograd.grad(chunked, (hs, ws))
        torch.testing.assert_close(chunked, full)
        torch.testing.assert_close(ch, gh)
        torch.testing.assert_close(cw, gw)


def test_mixing_with_the_sft_term():
    div = (torch.tensor(2.0), torch.tensor(4))
    sft = (torch.tensor(6.0), torch.tensor(4))
    total, count = distillation_loss(div, sft, alpha=0.25)
    assert total.item() == pytest.approx(0.25 * 2.0 + 0.75 * 6.0)
    assert count.item() == 4
    assert distillation_loss(div, None)[0].item() == 2.0
    with pytest.raises(ValueError, match="covers"):
        distillation_loss(div, (torch.tensor(1.0), torch.tensor(3)), alpha=0.5)


@pytest.mark.parametrize("kwargs", [{"beta": -0.1}, {"beta": 1.5}, {"temperature": 0.0}])
def test_bad_settings_are_input_errors(kwargs):
    with pytest.raises(InputError):
        token_divergence(logits(Q), logits(P), **kwargs)
