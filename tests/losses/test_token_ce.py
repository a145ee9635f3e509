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
            F.cross_entropy(h @ w.t(), t, reduction="sum").item(), rel=1e-5)
    empty = linear_cross_entropy(torch.zeros(0, 4, requires_grad=True), w.requires_grad_(), t[:0])
    assert empty.item() == 0.0
    empty.backward()  # keeps the graph connected (DDP needs every parameter used)
