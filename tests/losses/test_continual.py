"""Continual-learning math (EWC, LwF, replay mixing, forgetting metrics) against values worked out
by hand."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from instructkit.errors import InputError
from instructkit.losses.continual import (
    average_accuracy,
    backward_transfer,
    diagonal_fisher,
    ewc_penalty,
    forgetting,
    forward_transfer,
    lwf_distillation,
    per_example_gradients,
    replay_schedule,
    replay_schedule_by_tokens,
)

# ----------------------------------------------------------------------------------------------
# EWC


def test_ewc_penalty_and_gradient_on_two_parameters():
    """theta = (1, 2), theta* = (0, 0), F = (0.5, 2), lambda = 2:
    penalty = (2 / 2) * (0.5 * 1^2 + 2 * 2^2) = 0.5 + 8 = 8.5;
    d/d theta_i = lambda * F_i * (theta_i - theta*_i) = (2 * 0.5 * 1, 2 * 2 * 2) = (1, 8).
    A weight missing from F ("head") is not penalised; theta* and F get no gradient."""
    params = {
        "a": torch.tensor(1.0, requires_grad=True),
        "b": torch.tensor(2.0, requires_grad=True),
        "head": torch.tensor(100.0, requires_grad=True),
    }
    anchor = {"a": torch.tensor(0.0, requires_grad=True), "b": torch.tensor(0.0), "head": torch.tensor(0.0)}
    fisher = {"a": torch.tensor(0.5, requires_grad=True), "b": torch.tensor(2.0)}
    penalty = ewc_penalty(params, anchor, fisher, lam=2.0)
    assert penalty.item() == pytest.approx(8.5)
    penalty.backward()
    assert params["a"].grad.item() == pytest.approx(1.0)
    assert params["b"].grad.item() == pytest.approx(8.0)
    assert params["head"].grad is None
    assert anchor["a"].grad is None and fisher["a"].grad is None


def test_ewc_penalty_is_zero_at_the_anchor_and_without_fisher():
    """theta = theta* gives (lambda / 2) * sum F * 0 = 0; an empty F penalises nothing."""
    theta = {"w": torch.tensor([[1.0, -2.0], [3.0, 0.5]])}
    fisher = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    assert ewc_penalty(theta, {"w": theta["w"].clone()}, fisher, lam=10.0).item() == 0.0
    assert ewc_penalty(theta, theta, {}, lam=10.0).item() == 0.0


def test_ewc_penalty_rejects_missing_names_and_shapes():
    w = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="'v'"):
        ewc_penalty(w, w, {"v": torch.ones(2)}, lam=1.0)
    with pytest.raises(ValueError, match="shapes"):
        ewc_penalty(w, {"w": torch.zeros(3)}, {"w": torch.ones(2)}, lam=1.0)


def test_diagonal_fisher_of_a_logistic_model_by_hand():
    """p(y = 1 | x) = sigmoid(w x + b) at w = b = 0, so sigmoid = 1/2 for every x.
    d log p / dw = (y - sigmoid) x and d log p / db = (y - sigmoid). Examples (x, y):

        (1, 1):  dw =  0.5,  db =  0.5
        (2, 0):  dw = -1.0,  db = -0.5
        (-1, 1): dw = -0.5,  db =  0.5

    F_w = (0.25 + 1 + 0.25) / 3 = 0.5 and F_b = (0.25 + 0.25 + 0.25) / 3 = 0.25. (Squaring the
    batch's mean gradient instead would give F_w = (-1/3)^2 = 1/9: the squares must be per example.)
    """
    w = torch.tensor(0.0, requires_grad=True)
    b = torch.tensor(0.0, requires_grad=True)
    x = torch.tensor([1.0, 2.0, -1.0])
    y = torch.tensor([1.0, 0.0, 1.0])
    nll = F.binary_cross_entropy_with_logits(w * x + b, y, reduction="none")  # (3,)
    grads = list(per_example_gradients(nll, {"w": w, "b": b}))
    assert [g["w"].item() for g in grads] == pytest.approx([-0.5, 1.0, 0.5])  # NLL: the sign flips
    fisher = diagonal_fisher(grads)
    assert fisher["w"].item() == pytest.approx(0.5)
    assert fisher["b"].item() == pytest.approx(0.25)


def test_per_example_gradients_zero_for_an_unused_weight():
    """nll_n = 2 * w for both examples: d/dw = 2, F_w = 4; ``unused`` is not in the graph: 0."""
    w = torch.tensor(1.0, requires_grad=True)
    unused = torch.zeros(3, requires_grad=True)
    nll = torch.stack([2 * w, 2 * w])
    fisher = diagonal_fisher(per_example_gradients(nll, {"w": w, "unused": unused}))
    assert fisher["w"].item() == pytest.approx(4.0)
    assert fisher["unused"].tolist() == [0.0, 0.0, 0.0]


def test_diagonal_fisher_rejects_no_examples_and_mixed_names():
    with pytest.raises(ValueError, match="at least one"):
        diagonal_fisher([])
    with pytest.raises(ValueError, match="example 1"):
        diagonal_fisher([{"w": torch.ones(1)}, {"v": torch.ones(1)}])


# ----------------------------------------------------------------------------------------------
# LwF


def test_lwf_equals_the_kl_by_hand_at_temperature_two():
    """Student logits (0, 0), teacher (2 ln 3, 0), T = 2. Divided by T: student (0, 0) -> p_s =
    (1/2, 1/2); teacher (ln 3, 0) -> p_t = (3/4, 1/4).

        KL(p_t || p_s) = 3/4 ln((3/4) / (1/2)) + 1/4 ln((1/4) / (1/2)) = 3/4 ln 3 - ln 2
        loss = T^2 * KL = 3 ln 3 - 4 ln 2

    Gradient w.r.t. the student's logits: T^2 * (1/T) * (p_s - p_t) = 2 * (-1/4, 1/4) = (-1/2, 1/2).
    The same distributions at T = 1 (teacher logits (ln 3, 0)) give KL without the factor 4.
    """
    student = torch.zeros(1, 1, 2, requires_grad=True)
    teacher = torch.tensor([[[2 * math.log(3), 0.0]]])
    loss, count = lwf_distillation(student, teacher, torch.ones(1, 1), temperature=2.0)
    assert loss.item() == pytest.approx(3 * math.log(3) - 4 * math.log(2))
    assert count.item() == 1
    loss.backward()
    assert student.grad.flatten().tolist() == pytest.approx([-0.5, 0.5])
    at_one, _ = lwf_distillation(student, teacher / 2, torch.ones(1, 1), temperature=1.0)
    assert at_one.item() == pytest.approx(0.75 * math.log(3) - math.log(2))


def test_lwf_ignores_masked_positions():
    """Position 0 is the case above (3 ln 3 - 4 ln 2); position 1 disagrees wildly but is masked:
    the sum is unchanged, the count is 1 and position 1 gets no gradient."""
    student = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]], requires_grad=True)
    teacher = torch.tensor([[[2 * math.log(3), 0.0], [-5.0, 5.0]]])
    loss, count = lwf_distillation(student, teacher, torch.tensor([[1, 0]]), temperature=2.0)
    assert loss.item() == pytest.approx(3 * math.log(3) - 4 * math.log(2))
    assert count.item() == 1
    loss.backward()
    assert student.grad[0, 1].tolist() == [0.0, 0.0]


def test_lwf_is_zero_when_the_student_is_the_teacher():
    """KL(p || p) = 0 at every position, whatever the temperature."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    loss, count = lwf_distillation(logits, logits.clone(), torch.ones(2, 3), temperature=2.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert count.item() == 6


def test_lwf_teacher_with_a_forbidden_token():
    """Teacher (0, -inf) -> p_t = (1, 0); student (0, 0) -> p_s = (1/2, 1/2); T = 1:
    KL = 1 * ln(1 / (1/2)) + 0 = ln 2 (the 0 * ln 0 term is 0, not NaN)."""
    loss, _ = lwf_distillation(
        torch.zeros(1, 1, 2), torch.tensor([[[0.0, -math.inf]]]), torch.ones(1, 1), temperature=1.0
    )
    assert loss.item() == pytest.approx(math.log(2))


def test_lwf_sums_add_over_micro_batches():
    """(loss_sum, count) of a batch is the sum of those of its halves: accumulation stays exact."""
    torch.manual_seed(1)
    s, t = torch.randn(4, 3, 6), torch.randn(4, 3, 6)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    whole, n = lwf_distillation(s, t, mask, temperature=2.0)
    first, n1 = lwf_distillation(s[:2], t[:2], mask[:2], temperature=2.0)
    second, n2 = lwf_distillation(s[2:], t[2:], mask[2:], temperature=2.0)
    assert whole.item() == pytest.approx((first + second).item())
    assert n.item() == n1.item() + n2.item() == 6


def test_lwf_rejects_bad_temperature_and_shapes():
    with pytest.raises(ValueError, match="temperature"):
        lwf_distillation(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.ones(1, 1), temperature=0.0)
    with pytest.raises(ValueError, match="shapes"):
        lwf_distillation(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.ones(1, 3), temperature=1.0)


# ----------------------------------------------------------------------------------------------
# Replay


def _split(epoch: list[int], n_new: int) -> tuple[list[int], list[int]]:
    return [i for i in epoch if i < n_new], [i - n_new for i in epoch if i >= n_new]


@pytest.mark.parametrize(
    ("n_new", "fraction", "k"),
    [
        (7, 0.3, 3),  # k* = 0.3 * 7 / 0.7 = 3 exactly: 3 of 10
        (5, 0.5, 5),  # k* = 5: 5 of 10
        (1, 0.9, 9),  # k* = 0.9 / 0.1 = 9: 9 of 10
        # k* = 0.2 * 10 / 0.8 = 2.5: k = 2 gives 2/12, off by 1/30; k = 3 gives 3/13, off by 2/65 < 1/30.
        (10, 0.2, 3),
        # k* = 0.25 / 0.75 = 1/3: k = 0 gives 0/1 and k = 1 gives 1/2, both off by 1/4; a tie, the smaller.
        (1, 0.25, 0),
        # k* = 0.4 / 0.9 = 4/9: 0 of 4 and 1 of 5 are both off by 1/10, a tie as written (in binary,
        # 0.1 is a hair above 1/10 and 1 of 5 would win; round(0.1 * 5) would then be a tie as well).
        (4, 0.1, 0),
        (4, 0.0, 0),  # no replay
    ],
)
def test_replay_mixing_fraction_is_exact_over_an_epoch(n_new, fraction, k):
    """Every new index once, k old ones (hand-derived in each case), and k = round(fraction * len)."""
    epoch = replay_schedule(n_new, 100, fraction, seed=0)
    new, old = _split(epoch, n_new)
    assert sorted(new) == list(range(n_new))
    assert len(old) == k == round(fraction * len(epoch))
    assert len(set(old)) == k  # a pool of 100 is not exhausted: no repeats


def test_replay_old_share_is_the_rounded_fraction_for_many_sizes():
    """The property behind the cases above: the old count is round(fraction * epoch length)."""
    for n_new in range(1, 40):
        for fraction in (0.05, 0.1, 0.2, 0.25, 1 / 3, 0.37, 0.5, 0.6, 0.7, 0.75, 0.9, 0.95):
            epoch = replay_schedule(n_new, 7, fraction, seed=n_new)
            _, old = _split(epoch, n_new)
            assert len(old) == round(fraction * len(epoch)), (n_new, fraction)


def test_replay_cycles_a_small_pool_evenly():
    """n_new = 9, fraction 1/2: k = 9 old examples from a pool of 2. 9 = 2 * 4 + 1 is four
    passes over the pool and one draw more: one old example appears 4 times, the other 5."""
    epoch = replay_schedule(9, 2, 0.5, seed=3)
    _, old = _split(epoch, 9)
    assert sorted(Counter(old).values()) == [4, 5]


def test_replay_is_deterministic_given_a_seed():
    a = replay_schedule(50, 50, 0.5, seed=7)
    assert a == replay_schedule(50, 50, 0.5, seed=7)
    assert a != replay_schedule(50, 50, 0.5, seed=8)
    assert sorted(a) != a  # shuffled, not new-then-old
    tokens = replay_schedule_by_tokens([3, 5, 2] * 10, [4, 1, 6] * 10, 0.3, seed=7)
    assert tokens == replay_schedule_by_tokens([3, 5, 2] * 10, [4, 1, 6] * 10, 0.3, seed=7)


def test_replay_by_tokens_by_hand():
    """New tokens N = 30, every old example 4 tokens, fraction 1/4: O* = (1/4) * 30 / (3/4) = 10.
    Two old examples give 8 tokens, share 8/38 (off by 0.0395); three give 12, share 12/42 = 2/7
    (off by 1/28 = 0.0357): three are kept. With N = 20, old of 5 tokens and fraction 1/5,
    O* = 5: one example hits it exactly (share 5/25)."""
    epoch = replay_schedule_by_tokens([30], [4] * 10, 0.25, seed=0)
    new, old = _split(epoch, 1)
    assert new == [0] and len(old) == 3
    epoch = replay_schedule_by_tokens([10, 10], [5] * 6, 0.2, seed=0)
    assert len(_split(epoch, 2)[1]) == 1


def test_replay_by_tokens_within_one_example_of_the_target():
    """N = 3+1+4+1+5+9+2+6 = 31 new tokens, fraction 0.4: O* = 0.4 * 31 / 0.6 = 62/3 = 20.67.
    The old tokens kept stop at the first prefix that reaches O* or the one before it, so they
    differ from O* by less than the longest old example (8 tokens), whatever the seed."""
    new_tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    old_tokens = [2, 7, 1, 8, 2, 8, 1, 8, 2, 8]
    target = 0.4 * 31 / 0.6
    for seed in range(20):
        epoch = replay_schedule_by_tokens(new_tokens, old_tokens, 0.4, seed=seed)
        new, old = _split(epoch, len(new_tokens))
        assert sorted(new) == list(range(len(new_tokens)))
        kept = sum(old_tokens[j] for j in old)
        assert abs(kept - target) < max(old_tokens), seed


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, math.nan])
def test_replay_fraction_outside_zero_one_is_an_input_error(fraction):
    for call in (
        lambda: replay_schedule(3, 3, fraction, seed=0),
        lambda: replay_schedule_by_tokens([1], [1], fraction, seed=0),
    ):
        with pytest.raises(InputError) as err:
            call()
        assert err.value.field == "replay.fraction"


def test_replay_needs_an_old_pool_only_when_it_replays():
    with pytest.raises(ValueError, match="no earlier examples"):
        replay_schedule(3, 0, 0.5, seed=0)
    assert sorted(replay_schedule(3, 0, 0.0, seed=0)) == [0, 1, 2]
    with pytest.raises(ValueError, match="at least one token"):
        replay_schedule_by_tokens([1], [0], 0.5, seed=0)


# ----------------------------------------------------------------------------------------------
# Metrics

# R[i][j]: metric on task j after training task i. Task 0 improves while task 1 is trained
# (0.8 -> 0.9), then both earlier tasks drop while task 2 is trained.
R = [
    [0.8, 0.1, 0.2],
    [0.9, 0.7, 0.3],
    [0.6, 0.5, 0.9],
]


def test_average_accuracy_is_the_mean_of_the_last_row():
    """(0.6 + 0.5 + 0.9) / 3 = 2/3."""
    assert average_accuracy(R) == pytest.approx(2 / 3)
    assert average_accuracy(torch.tensor(R)) == pytest.approx(2 / 3)
    assert average_accuracy([[0.4]]) == pytest.approx(0.4)


def test_backward_transfer_negative_and_positive():
    """R: BWT = ((0.6 - 0.8) + (0.5 - 0.7)) / 2 = -0.2, forgetting.
    Positive: [[0.5, 0, 0], [0.7, 0.6, 0], [0.8, 0.6, 0.9]] -> ((0.8 - 0.5) + (0.6 - 0.6)) / 2 = 0.15."""
    assert backward_transfer(R) == pytest.approx(-0.2)
    assert backward_transfer([[0.5, 0, 0], [0.7, 0.6, 0], [0.8, 0.6, 0.9]]) == pytest.approx(0.15)


def test_forgetting_takes_the_best_earlier_row_not_the_diagonal():
    """R: task 0 was best after task 1 (0.9, not its diagonal 0.8): f_0 = 0.9 - 0.6 = 0.3;
    task 1: max(0.1, 0.7) - 0.5 = 0.2; F = (0.3 + 0.2) / 2 = 0.25. BWT says -0.2 because it
    measures from the diagonal."""
    per_task, mean = forgetting(R)
    assert per_task == pytest.approx([0.3, 0.2])
    assert mean == pytest.approx(0.25)


def test_forgetting_counts_rows_before_the_task_was_trained():
    """R[0][1] = 0.9 (zero-shot, before task 1) beats R[1][1] = 0.7: f_1 = 0.9 - 0.5 = 0.4.
    f_0 = max(0.8, 0.8) - 0.8 = 0; F = 0.2. A task that improved gives negative forgetting:
    [[0.5, 0], [0.7, 0.6]] -> f_0 = 0.5 - 0.7 = -0.2."""
    per_task, mean = forgetting([[0.8, 0.9, 0.0], [0.8, 0.7, 0.0], [0.8, 0.5, 0.9]])
    assert per_task == pytest.approx([0.0, 0.4])
    assert mean == pytest.approx(0.2)
    assert forgetting([[0.5, 0.0], [0.7, 0.6]])[0] == pytest.approx([-0.2])


def test_forward_transfer_against_a_baseline():
    """b = (0, 0.2, 0.1): ((R[0][1] - b_1) + (R[1][2] - b_2)) / 2 = ((0.1 - 0.2) + (0.3 - 0.1)) / 2 = 0.05."""
    assert forward_transfer(R, [0.0, 0.2, 0.1]) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="baseline"):
        forward_transfer(R, [0.0, 0.2])


def test_metrics_reject_non_square_and_single_task_matrices():
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[0.1, 0.2], [0.3]])
    for metric in (backward_transfer, forgetting, lambda r: forward_transfer(r, [0.0])):
        with pytest.raises(ValueError, match="at least 2"):
            metric([[0.5]])
