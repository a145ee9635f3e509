"""RL math of PPO(-ptx), GRPO and RLOO against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from instructkit.losses.rl import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    grpo_advantages,
    kl_k1,
    kl_k3,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    rloo_advantages,
)


def test_masked_mean_and_whiten():
    """Entries 1, 2, 3 count, 100 does not: mean 2, unbiased variance ((1 + 0 + 1) / 2) = 1."""
    x = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    m = torch.tensor([[1, 1], [1, 0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([1.5, 3.0])
    assert masked_var(x, m).item() == pytest.approx(1.0)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(2 / 3)
    w = masked_whiten(x, m)
    assert w.flatten().tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    kept = masked_whiten(x, m, shift_mean=False)  # scale only: mean stays 2
    assert kept.flatten().tolist() == pytest.approx([1.0, 2.0, 3.0, 0.0], abs=1e-6)
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0  # empty mask: 0, not NaN


def test_kl_estimators_by_hand():
    """pi(y) = 1/2, pi_ref(y) = 1/4: k1 = log 2; r = 1/2, k3 = (1/2 - 1) - log(1/2) = log 2 - 1/2.
    Where pi_ref is larger (pi = 1/4, pi_ref = 1/2): k1 = -log 2 < 0, k3 = 1 - log 2 > 0."""
    lp = torch.log(torch.tensor([0.5, 0.25]))
    ref = torch.log(torch.tensor([0.25, 0.5]))
    assert kl_k1(lp, ref).tolist() == pytest.approx([math.log(2), -math.log(2)])
    assert kl_k3(lp, ref).tolist() == pytest.approx([math.log(2) - 0.5, 1 - math.log(2)])
    assert set(KL_ESTIMATORS) == {"k1", "k3"}


def test_kl_estimators_are_unbiased_in_expectation():
    """Sampling y ~ pi, both estimators average to the exact KL(pi || pi_ref)."""
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6), 0)
    q = torch.softmax(torch.randn(6), 0)
    exact = (p * (p.log() - q.log())).sum().item()
    y = torch.multinomial(p, 400_000, replacement=True)
    for name in ("k1", "k3"):
        est = KL_ESTIMATORS[name](p.log()[y], q.log()[y]).mean().item()
        assert est == pytest.approx(exact, abs=0.01), name


def test_kl_penalized_rewards_put_the_score_on_the_last_real_token():
    """Row 0 has 3 real tokens, row 1 has 1. beta = 0.5, kl = 1 everywhere:
    row 0 -> [-0.5, -0.5, -0.5 + 2], row 1 -> [-0.5 + 3, 0, 0]."""
    kl = torch.ones(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    r = kl_penalized_rewards(torch.tensor([2.0, 3.0]), kl, mask, 0.5)
    assert r.tolist() == [[-0.5, -0.5, 1.5], [2.5, 0.0, 0.0]]


def test_gae_matches_the_hand_unrolled_recursion():
    """gamma = 0.9, lambda = 0.8; row 0 has 3 real tokens, row 1 has 2 (its third is padding).

    Row 0: r = (0.1, -0.2, 1.0), V = (0.5, 0.4, 0.3), V_3 = 0.
      d2 = 1.0 + 0 - 0.3 = 0.7                   A2 = 0.7
      d1 = -0.2 + 0.9 * 0.3 - 0.4 = -0.33        A1 = -0.33 + 0.72 * 0.7 = 0.174
      d0 = 0.1 + 0.9 * 0.4 - 0.5 = -0.04         A0 = -0.04 + 0.72 * 0.174 = 0.08528
    Row 1: r = (0.0, 2.0), V = (1.0, 0.5), the padded value 7.0 and reward 9.0 must not leak.
      d1 = 2.0 - 0.5 = 1.5                       A1 = 1.5
      d0 = 0.0 + 0.9 * 0.5 - 1.0 = -0.55         A0 = -0.55 + 0.72 * 1.5 = 0.53
    """
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [1.0, 0.5, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert adv.tolist()[0] == pytest.approx([0.08528, 0.174, 0.7], abs=1e-6)
    assert adv.tolist()[1] == pytest.approx([0.53, 1.5, 0.0], abs=1e-6)
    assert ret.tolist()[0] == pytest.approx([0.58528, 0.574, 1.0], abs=1e-6)
    assert ret.tolist()[1] == pytest.approx([1.53, 2.0, 0.0], abs=1e-6)


def test_gae_with_lambda_one_is_the_discounted_return_minus_value():
    torch.manual_seed(0)
    r, v = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.ones(3, 5)
    adv, _ = gae(r, v, mask, gamma=0.7, lam=1.0)
    discounted = torch.stack([sum(0.7 ** (k - t) * r[:, k] for k in range(t, 5)) for t in range(5)], 1)
    assert torch.allclose(adv, discounted - v, atol=1e-6)


def test_clipped_policy_loss_by_hand():
    """eps = 0.2. Token 0: A = 1, ratio 1.5 -> max(-1.5, -1.2) = -1.2 (clipped).
    Token 1: A = -1, ratio 0.5 -> max(0.5, 0.8) = 0.8 (clipped).
    Token 2: A = 2, ratio 1.1 -> max(-2.2, -2.2) = -2.2 (inside the range, not clipped).
    Token 3: masked out. Mean over 3 tokens = (-1.2 + 0.8 - 2.2) / 3 = -0.8667; clip fraction 2/3.
    """
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 9.0]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clip_frac = clipped_policy_loss(new, old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-2.6 / 3, abs=1e-6)
    assert clip_frac.item() == pytest.approx(2 / 3)
    loss.backward()
    # Only the unclipped token moves the policy: d/dlogp (-A * ratio) = -2 * 1.1.
    assert new.grad[0].tolist() == pytest.approx([0.0, 0.0, -2.2 / 3, 0.0], abs=1e-6)
    loss2, _ = clipped_policy_loss(new, old, adv, mask, clip_range=0.2, normalizer=6)
    assert loss2.item() == pytest.approx(-2.6 / 6, abs=1e-6)


def test_clipped_value_loss_by_hand():
    """eps = 0.5. Token 0: V_old 0, V 2, G 2: clipped V = 0.5, errors 0 and 2.25 -> 2.25 (clipped).
    Token 1: V_old 0, V 0.2, G 1: errors 0.64 and 0.64 -> 0.64. Loss = 0.5 * (2.25 + 0.64) / 2."""
    loss, clip_frac = clipped_value_loss(
        torch.tensor([[2.0, 0.2]]), torch.zeros(1, 2), torch.tensor([[2.0, 1.0]]), torch.ones(1, 2), clip_range=0.5
    )
    assert loss.item() == pytest.approx(0.5 * 2.89 / 2, abs=1e-6)
    assert clip_frac.item() == pytest.approx(0.5)


def test_adaptive_kl_controller_follows_ziegler():
    """target 6, horizon 10000, batch 256. KL 9: error clip(0.5) = 0.2, beta *= 1 + 0.2 * 0.0256.
    KL 3: error -0.5 -> -0.2, beta *= 1 - 0.00512. KL 6.6: error 0.1, beta *= 1.00256."""
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    c.update(9.0, 256)
    assert c.value == pytest.approx(0.1 * 1.00512)
    c.update(3.0, 256)
    assert c.value == pytest.approx(0.1 * 1.00512 * 0.99488)
    before = c.value
    c.update(6.6, 256)
    assert c.value == pytest.approx(before * 1.00256)
    restored = AdaptiveKLController(0.5, 6.0, 10_000)
    restored.load_state_dict(c.state_dict())
    assert restored.value == c.value
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 256)
    assert fixed.value == 0.1


def test_grpo_advantages_by_hand():
    """Group (1, 0, 0, 1): mean 0.5, unbiased std sqrt(1/3); advantages +-0.5 * sqrt(3) = +-0.866.
    Group (2, 2, 2, 2): no spread, advantages 0."""
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    h = 0.5 * math.sqrt(3)
    assert adv.tolist() == pytest.approx([h, -h, -h, h, 0, 0, 0, 0], abs=1e-3)


def test_rloo_advantages_by_hand():
    """Group (1, 0, 0, 1): sample 0's baseline is (0 + 0 + 1) / 3, so 1 - 1/3 = 2/3; sample 1's is
    (1 + 0 + 1) / 3, so 0 - 2/3. Group (3, 1): 3 - 1 = 2 and 1 - 3 = -2."""
    assert rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4).tolist() == pytest.approx(
        [2 / 3, -2 / 3, -2 / 3, 2 / 3]
    )
    assert rloo_advantages(torch.tensor([3.0, 1.0]), 2).tolist() == [2.0, -2.0]
    with pytest.raises(ValueError):
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), 2)


def test_registry_says_which_estimators_need_a_value_model():
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "rloo"}
    assert ADVANTAGE_ESTIMATORS["gae"].needs_value_model and not ADVANTAGE_ESTIMATORS["gae"].group_relative
    for name in ("grpo", "rloo"):
        assert not ADVANTAGE_ESTIMATORS[name].needs_value_model and ADVANTAGE_ESTIMATORS[name].group_relative


def test_group_estimators_share_one_advantage_over_each_response():
    """Token rewards sum to the sequence reward (2 and 0 here); RLOO with k = 2 gives +2 and -2 on
    every real token of the respective response and 0 on padding."""
    rewards = torch.tensor([[0.5, 1.5, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv, returns = ADVANTAGE_ESTIMATORS["rloo"].estimate(rewards, None, mask, gamma=1.0, lam=1.0, group_size=2)
    assert returns is None
    assert adv.tolist() == [[2.0, 2.0, 0.0], [-2.0, -2.0, -2.0]]


def test_entropy_from_logits():
    """Uniform over 4: log 4; one-hot-ish: about 0."""
    ent = entropy_from_logits(torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]))
    assert ent.tolist() == pytest.approx([math.log(4), 0.0], abs=1e-6)


def test_explained_variance_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    target = torch.tensor([[2.0, 2.0, 4.0, 100.0]])  # the masked 100 must not count
    predicted = torch.tensor([[1.0, 2.0, 3.0, -50.0]])
    # Var[target] = 8/9, Var[target - predicted] = Var[1, 0, 1] = 2/9 (population variances)
    assert explained_variance(predicted, target, mask) == pytest.approx(1 - (2 / 9) / (8 / 9))
    assert explained_variance(target, target, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(target, 8 / 3), target, mask) == pytest.approx(0.0, abs=1e-6)
    assert explained_variance(-target, target, mask) < 0
    assert math.isnan(explained_variance(predicted, torch.ones_like(target), mask))


def test_running_moments_merge_batches_into_the_moments_of_all_scores():
    m = RunningMoments()
    m.update(torch.tensor([1.0, 2.0, 3.0]))
    m.update(torch.tensor([4.0, 5.0]))
    assert m.mean == pytest.approx(3.0) and m.std == pytest.approx(math.sqrt(2.0))  # of 1..5
    x = torch.tensor([3.0, 3.0 + math.sqrt(2.0)])
    assert torch.allclose(m.normalize(x), torch.tensor([0.0, 1.0]))
    again = RunningMoments()
    again.load_state_dict(m.state_dict())
    again.update(torch.tensor([6.0]))
    assert again.mean == pytest.approx(3.5) and again.std == pytest.approx(math.sqrt(35 / 12))  # of 1..6
    same = RunningMoments()
    same.update(torch.tensor([2.0, 2.0]))
    assert same.normalize(torch.tensor([2.0, 3.0])).tolist() == [0.0, 1.0]  # no spread: the shift alone
