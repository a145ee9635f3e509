"""Token cross-entropy: hand-computed values and the chunked projection against the naive one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from instructkit.losses.token_ce import IGNORE_INDEX, linear_cross_entropy, token_cross_entropy


def test_token_cross_entropy_by_hand():
    """Two positions predict labels[1] and labels[2]; labels[0] is never a target.

    Position 0 has logits (0, 0): p(target 1) = 1/2, loss ln 2. Position 1 has logits (ln 3, 0):
    p(target 0) = 3/4, loss ln(4/3). Position 2 predicts nothing. Sum = ln 2 + ln(4/3) = ln(8/3).
    """
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    loss, n = token_cross_entropy(logits, labels)
    assert n.item() == 2
    assert loss.item() == pytest.approx(math.log(8 / 3), abs=1e-6)


def test_untrained_targets_are_skipped():
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[3, IGNORE_INDEX, IGNORE_INDEX, 2]])
    loss, n = token_cross_entropy(logits, labels)
    expected = -torch.log_softmax(logits[0, 2], -1)[2]
    assert n.item() == 1 and loss.item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("train_weight", [True, False])
def test_linear_cross_entropy_matches_naive_values_and_gradients(chunk, train_weight):
    torch.manual_seed(0)
    h = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(31, 8, dtype=torch.float64, requires_grad=train_weight)
    t = torch.randint(0, 31, (23,))
    loss = linear_cross_entropy(h, w, t, chunk_size=chunk)
    (loss * 0.37).backward()
    h2 = h.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_(train_weight)
    ref = F.cross_entropy(h2 @ w2.t(), t, reduction="sum")
    (ref * 0.37).backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(h.grad, h2.grad, atol=1e-12)
    if train_weight:
        assert torch.allclose(w.grad, w2.grad, atol=1e-12)
    else:
        assert w.grad is None


def test_linear_cross_entropy_without_grad_and_empty():
    h, w, t = torch.randn(5, 4), torch.randn(9, 4), torch.randint(0, 9, (5,))
    with torch.no_grad():
        assert linear_cross_entropy(h, w, t, 2).item() == pytest.approx(
            F.cross_entropy(h @ w.t(), t, reduction="sum").item(), rel=1e-5
        )
    empty = linear_cross_entropy(torch.zeros(0, 4, requires_grad=True), w.requires_grad_(), t[:0])
    assert empty.item() == 0.0
    empty.backward()  # keeps the graph connected (DDP needs every parameter used)


def test_linear_log_probs_matches_naive_log_softmax_and_its_gradient():
    """Per-row log-probs (and gradients for arbitrary per-row weights) equal the full-logits
    reference, at temperature 1 and at a sampling temperature, with chunks that split rows."""
    import torch

    from instructkit.losses.token_ce import linear_log_probs

    torch.manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (7,))
    upstream = torch.randn(7, dtype=torch.float64)
    for temperature in (1.0, 0.7):
        ours = linear_log_probs(hidden, weight, targets, chunk_size=3, temperature=temperature)
        ours_grads = torch.autograd.grad((ours * upstream).sum(), (hidden, weight))
        naive = torch.log_softmax(hidden @ weight.T / temperature, -1).gather(1, targets[:, None]).squeeze(1)
        naive_grads = torch.autograd.grad((naive * upstream).sum(), (hidden, weight))
        torch.testing.assert_close(ours, naive)
        for a, b in zip(ours_grads, naive_grads):
            torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda h, w: linear_log_probs(h, w, targets, 2, 0.9), (hidden, weight))
