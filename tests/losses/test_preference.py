"""Preference losses: hand-computed values, limiting behaviour, the registry, and TRL's helpers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from instructkit.losses.preference import (
    PREFERENCE_LOSSES,
    dpo_sigmoid_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    log1mexp,
    orpo_loss,
    preference_loss,
    simpo_loss,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- hand-computed values -------------------------------------------------------------------


def test_dpo_by_hand():
    """beta = 0.5; pi_c - ref_c = -3 - (-5) = 2, pi_r - ref_r = -4 - (-4) = 0, so h = 2.

    loss = -log sigmoid(0.5 * 2) = log(1 + e^-1) = 0.31326...; rewards 0.5 * 2 = 1 and 0.
    """
    out = dpo_sigmoid_loss(t(-3.0), t(-4.0), t(-5.0), t(-4.0), beta=0.5)
    assert out.losses.item() == pytest.approx(softplus(-1.0), rel=1e-12)
    assert out.losses.item() == pytest.approx(0.31326, abs=1e-5)
    assert out.chosen_rewards.item() == pytest.approx(1.0)
    assert out.rejected_rewards.item() == pytest.approx(0.0)


def test_conservative_dpo_by_hand():
    """Same pair, eps = 0.25: with probability 0.25 the label is flipped, so

    loss = 0.75 * log(1 + e^-1) + 0.25 * log(1 + e^1)   (-log sigmoid(-1) = log(1 + e)).
    """
    out = preference_loss(
        "sigmoid",
        chosen_logps=t(-3.0),
        rejected_logps=t(-4.0),
        chosen_tokens=t(3),
        rejected_tokens=t(3),
        ref_chosen_logps=t(-5.0),
        ref_rejected_logps=t(-4.0),
        beta=0.5,
        label_smoothing=0.25,
    )
    expected = 0.75 * softplus(-1.0) + 0.25 * softplus(1.0)
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)


def test_ipo_by_hand_on_per_token_log_ratios():
    """beta = 0.25, so the target margin is 1 / (2 * 0.25) = 2.

    Pair 1: chosen (-6 - -12) / 3 tokens = 2 per token, rejected (-4 - -4) / 2 = 0: h = 2, loss 0.
    Pair 2: chosen (-3 - -3) / 3 = 0, rejected (-2 - -4) / 2 = 1: h = -1, loss (-1 - 2)^2 = 9.
    On sums instead, pair 1 would have h = 6 and loss 16: IPO is length-normalised, as in TRL.
    """
    out = preference_loss(
        "ipo",
        chosen_logps=t(-6.0, -3.0),
        rejected_logps=t(-4.0, -2.0),
        chosen_tokens=t(3, 3),
        rejected_tokens=t(2, 2),
        ref_chosen_logps=t(-12.0, -3.0),
        ref_rejected_logps=t(-4.0, -4.0),
        beta=0.25,
    )
    assert out.losses.tolist() == pytest.approx([0.0, 9.0], abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, 0.0])  # 0.25 * per-token ratio
    assert PREFERENCE_LOSSES["ipo"].length_normalized


def test_hinge_by_hand():
    """beta = 0.5, margin 1/beta = 2. h = -2, 1, 2, 3 gives relu(1 - 0.5 h) = 2, 0.5, 0, 0."""
    h = t(-2.0, 1.0, 2.0, 3.0)
    out = hinge_loss(
        h,
        torch.zeros(4, dtype=torch.float64),
        torch.zeros(4, dtype=torch.float64),
        torch.zeros(4, dtype=torch.float64),
        beta=0.5,
    )
    assert out.losses.tolist() == pytest.approx([2.0, 0.5, 0.0, 0.0])


def test_simpo_by_hand_with_gamma():
    """beta = 2, gamma = 0.5. Chosen -2 over 4 tokens: a_c = -0.5; rejected -3 over 2: a_r = -1.5.

    m = 2 * (-0.5 - -1.5) - 0.5 = 1.5; loss = log(1 + e^-1.5). Rewards 2 * a: -1 and -3.
    gamma = 0 would give log(1 + e^-2): the margin gamma makes the loss larger.
    """
    out = preference_loss(
        "simpo",
        chosen_logps=t(-2.0),
        rejected_logps=t(-3.0),
        chosen_tokens=torch.tensor([4]),
        rejected_tokens=torch.tensor([2]),
        beta=2.0,
        simpo_gamma=0.5,
    )
    assert out.losses.item() == pytest.approx(softplus(-1.5), rel=1e-12)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-1.0, -3.0))
    no_gamma = simpo_loss(t(-0.5), t(-1.5), beta=2.0, simpo_gamma=0.0)
    assert no_gamma.losses.item() == pytest.approx(softplus(-2.0), rel=1e-12)


def test_orpo_odds_by_hand():
    """Chosen: -2 ln 2 over 2 tokens, a_c = -ln 2, P = 1/2, odds 1, log odds 0.
    Rejected: -3 ln 4 over 3 tokens, a_r = -ln 4, P = 1/4, odds 1/3, log odds -ln 3.

    Log odds ratio ln 3; L_OR = -log sigmoid(ln 3) = -log(3/4) = ln(4/3). The default SFT term
    is -a_c = ln 2, so with lambda = 0.5: loss = ln 2 + 0.5 ln(4/3). Rewards beta * a.
    """
    out = preference_loss(
        "orpo",
        chosen_logps=t(-2 * math.log(2)),
        rejected_logps=t(-3 * math.log(4)),
        chosen_tokens=t(2),
        rejected_tokens=t(3),
        beta=0.1,
        orpo_lambda=0.5,
    )
    assert out.losses.item() == pytest.approx(math.log(2) + 0.5 * math.log(4 / 3), rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(-0.1 * math.log(2))
    # An explicit NLL replaces the default; a scalar one is shared by every pair.
    two = orpo_loss(
        t(-math.log(2), -math.log(2)),
        t(-math.log(4), -math.log(4)),
        chosen_nll=torch.tensor(5.0, dtype=torch.float64),
        orpo_lambda=0.5,
    )
    assert two.losses.tolist() == pytest.approx([5 + 0.5 * math.log(4 / 3)] * 2, rel=1e-12)


def test_kto_by_hand_with_reference_point():
    """beta = 0.5, z0 = 1, weights 2 (desirable) and 3 (undesirable).

    Desirable r = -1 - (-4) = 3: 2 * (1 - sigmoid(0.5 * (3 - 1))) = 2 * (1 - sigmoid(1)).
    Undesirable r = -5 - (-4) = -1: 3 * (1 - sigmoid(0.5 * (1 - -1))) = 3 * (1 - sigmoid(1)).
    A negative KL estimate is clamped to z0 = 0: the desirable loss becomes
    2 * (1 - sigmoid(1.5)).
    """
    kwargs = dict(beta=0.5, desirable_weight=2.0, undesirable_weight=3.0)
    out = kto_loss(t(-1.0), t(-5.0), t(-4.0), t(-4.0), kl_ref=torch.tensor(1.0), **kwargs)
    assert out.losses.tolist() == pytest.approx([2 * (1 - sigmoid(1)), 3 * (1 - sigmoid(1))])
    assert out.chosen_rewards.tolist() == pytest.approx([1.5])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5])
    clamped = kto_loss(t(-1.0), t(-5.0), t(-4.0), t(-4.0), kl_ref=-3.0, **kwargs)
    assert clamped.losses[0].item() == pytest.approx(2 * (1 - sigmoid(1.5)))


def test_kto_unpaired_through_registry():
    """Three desirable, no undesirable examples; no kl_ref means z0 = 0. r = 0 gives 1 - 1/2."""
    empty = torch.zeros(0, dtype=torch.float64)
    out = preference_loss(
        "kto",
        chosen_logps=t(-2.0, -2.0, -2.0),
        rejected_logps=empty,
        chosen_tokens=None,
        rejected_tokens=None,
        ref_chosen_logps=t(-2.0, -2.0, -2.0),
        ref_rejected_logps=empty,
    )
    assert out.losses.tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert out.rejected_rewards.shape == (0,)
    assert not PREFERENCE_LOSSES["kto"].paired


def test_kl_ref_carries_no_gradient():
    kl = torch.tensor(0.5, requires_grad=True)
    chosen = t(-1.0).requires_grad_()
    kto_loss(chosen, t(-2.0), t(-1.5), t(-1.5), kl_ref=kl).losses.sum().backward()
    assert kl.grad is None and chosen.grad is not None


# --- limits and shape of each loss ----------------------------------------------------------


@pytest.mark.parametrize("name", ["sigmoid", "hinge", "simpo", "orpo"])
def test_preferring_chosen_lowers_loss(name):
    """d loss / d chosen <= 0 and d loss / d rejected >= 0 (strictly away from the hinge)."""
    chosen = t(-9.0, -7.0, -6.0).requires_grad_()  # h = -1, 1, 2: inside the hinge
    rejected = t(-8.0, -8.0, -8.0).requires_grad_()
    ref = t(-7.0, -7.0, -7.0)
    out = preference_loss(
        name,
        chosen_logps=chosen,
        rejected_logps=rejected,
        chosen_tokens=t(4, 4, 4),
        rejected_tokens=t(4, 4, 4),
        ref_chosen_logps=ref,
        ref_rejected_logps=ref,
        beta=0.3,
    )
    out.losses.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    assert (out.losses[:-1] >= out.losses[1:]).all()  # higher chosen log-prob, lower loss


def test_dpo_small_beta_limit():
    """-log sigmoid(beta h) = log 2 - beta h / 2 + beta^2 h^2 / 8 + O(beta^4), and its gradient
    in h is -beta * sigmoid(-beta h) -> -beta / 2. With beta = 1e-6 and h = 2, 15 the quadratic
    term is below 3e-11: the loss is log 2 minus the linear term, the scaled gradient -1/2.
    """
    beta = 1e-6
    chosen = t(-3.0, 10.0).requires_grad_()  # h = 2 and 15
    out = dpo_sigmoid_loss(chosen, t(-4.0, -4.0), t(-5.0, -5.0), t(-4.0, -4.0), beta=beta)
    out.losses.sum().backward()
    expected = [math.log(2) - beta * h / 2 for h in (2.0, 15.0)]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-10)
    assert (chosen.grad / beta).tolist() == pytest.approx([-0.5, -0.5], rel=1e-5)


def test_ipo_minimised_at_target_margin():
    """(h - 1/(2 beta))^2 with beta = 0.1: minimum 0 at h = 5, zero gradient, larger either side."""
    h = t(4.0, 5.0, 6.0).requires_grad_()
    zero = torch.zeros(3, dtype=torch.float64)
    out = ipo_loss(h, zero, zero, zero, beta=0.1)
    out.losses.sum().backward()
    assert out.losses.tolist() == pytest.approx([1.0, 0.0, 1.0])
    assert h.grad.tolist() == pytest.approx([-2.0, 0.0, 2.0])


def test_hinge_has_no_gradient_beyond_margin():
    h = t(10.5, 20.0).requires_grad_()  # beta = 0.1: margin 1/beta = 10
    zero = torch.zeros(2, dtype=torch.float64)
    out = hinge_loss(h, zero, zero, zero, beta=0.1)
    out.losses.sum().backward()
    assert out.losses.tolist() == [0.0, 0.0] and h.grad.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("name", ["ipo", "simpo", "orpo"])
def test_length_normalisation_divides_by_token_counts(name):
    """Doubling the token counts equals halving every log-prob sum; unnormalised losses ignore
    the counts altogether."""
    base = dict(
        chosen_logps=t(-6.0, -9.0),
        rejected_logps=t(-8.0, -7.0),
        ref_chosen_logps=t(-7.0, -8.0),
        ref_rejected_logps=t(-7.5, -7.0),
        beta=0.2,
    )
    halved = {k: v / 2 if torch.is_tensor(v) else v for k, v in base.items()}
    doubled = preference_loss(name, chosen_tokens=t(6, 8), rejected_tokens=t(4, 10), **base)
    same = preference_loss(name, chosen_tokens=t(3, 4), rejected_tokens=t(2, 5), **halved)
    assert torch.allclose(doubled.losses, same.losses, atol=1e-12)
    spec = PREFERENCE_LOSSES[name]
    per_token = [base["chosen_logps"] / t(6, 8), base["rejected_logps"] / t(4, 10)]
    if spec.needs_reference:
        per_token += [base["ref_chosen_logps"] / t(6, 8), base["ref_rejected_logps"] / t(4, 10)]
    direct = spec.fn(*per_token, beta=0.2)
    assert torch.allclose(doubled.losses, direct.losses, atol=1e-12)


def test_sum_losses_ignore_token_counts():
    kwargs = dict(chosen_logps=t(-6.0), rejected_logps=t(-8.0), ref_chosen_logps=t(-7.0), ref_rejected_logps=t(-7.0))
    a = preference_loss("sigmoid", chosen_tokens=t(1), rejected_tokens=t(1), **kwargs)
    b = preference_loss("sigmoid", chosen_tokens=None, rejected_tokens=t(50), **kwargs)
    assert a.losses.item() == b.losses.item()


def test_log1mexp_is_accurate_at_both_ends():
    """log(1 - e^x): for x = -1e-10, 1 - e^x = 1e-10 (to 1e-20); for x = -50, log(1 - e^-50)
    = -e^-50 to first order. The naive log1p(-exp(x)) loses the first, log(-expm1) the second."""
    out = log1mexp(t(-1e-10, -50.0, -math.log(2)))
    assert out[0].item() == pytest.approx(math.log(1e-10), rel=1e-9)
    assert out[1].item() == pytest.approx(-math.exp(-50.0), rel=1e-9)
    assert out[2].item() == pytest.approx(-math.log(2), rel=1e-12)


def test_half_precision_inputs_are_upcast():
    out = dpo_sigmoid_loss(*(torch.tensor([v], dtype=torch.bfloat16) for v in (-3, -4, -5, -4)), beta=0.5)
    assert out.losses.dtype == torch.float32
    assert out.losses.item() == pytest.approx(softplus(-1.0), rel=1e-6)


# --- registry -------------------------------------------------------------------------------


def test_registry_flags():
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "ipo", "hinge", "simpo", "orpo", "kto"}
    needs_ref = {k for k, s in PREFERENCE_LOSSES.items() if s.needs_reference}
    assert needs_ref == {"sigmoid", "ipo", "hinge", "kto"}
    normalised = {k for k, s in PREFERENCE_LOSSES.items() if s.length_normalized}
    assert normalised == {"ipo", "simpo", "orpo"}


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "kto"])
def test_reference_required(name):
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        preference_loss(
            name,
            chosen_logps=t(-1.0),
            rejected_logps=t(-2.0),
            chosen_tokens=t(1),
            rejected_tokens=t(1),
            ref_chosen_logps=t(-1.0),
        )


def test_reference_free_losses_ignore_a_missing_reference():
    for name in ("simpo", "orpo"):
        preference_loss(name, chosen_logps=t(-1.0), rejected_logps=t(-2.0), chosen_tokens=t(1), rejected_tokens=t(1))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        preference_loss("dpo", chosen_logps=t(-1.0), rejected_logps=t(-2.0), chosen_tokens=t(1), rejected_tokens=t(1))
    for name in PREFERENCE_LOSSES:
        assert repr(name) in str(err.value)


def test_label_smoothing_out_of_range():
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_sigmoid_loss(t(-1.0), t(-1.0), t(-1.0), t(-1.0), label_smoothing=0.7)


def test_rewards_are_detached():
    chosen = t(-1.0).requires_grad_()
    out = dpo_sigmoid_loss(chosen, t(-2.0), t(-1.5), t(-1.5))
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


# --- TRL's own loss helpers, called on tensors (no model) ------------------------------------


@pytest.fixture(scope="module")
def trl_helpers():
    pytest.importorskip("trl")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRLExperimentalWarning on import
        from trl.experimental.cpo.cpo_trainer import CPOTrainer
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    return CPOTrainer, ORPOTrainer


@pytest.mark.parametrize(
    "loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0), ("simpo", 0.0), ("simpo", 0.1)]
)
def test_matches_trl_cpo_loss_forms(trl_helpers, loss_type, eps):
    """TRL's CPO applies the sigmoid/hinge/IPO/SimPO forms to a log-prob difference; feeding it
    the DPO log-ratios (reference at 0) checks our forms, label smoothing included."""
    cpo, _ = trl_helpers
    torch.manual_seed(0)
    chosen, rejected = -torch.rand(16) * 3, -torch.rand(16) * 3
    beta, gamma = 0.7, 0.4
    fake = SimpleNamespace(
        alpha=0.0,
        accelerator=SimpleNamespace(device="cpu"),
        beta=beta,
        loss_type=loss_type,
        label_smoothing=eps,
        simpo_gamma=gamma,
    )
    want, want_c, want_r = cpo.cpo_loss(fake, chosen, rejected)
    zero = torch.zeros(16)
    if loss_type == "sigmoid":
        got = dpo_sigmoid_loss(chosen, rejected, zero, zero, beta=beta, label_smoothing=eps)
    elif loss_type == "hinge":
        got = hinge_loss(chosen, rejected, zero, zero, beta=beta)
    elif loss_type == "ipo":
        got = ipo_loss(chosen, rejected, zero, zero, beta=beta)
    else:
        got = simpo_loss(chosen, rejected, beta=beta, simpo_gamma=gamma, label_smoothing=eps)
    assert torch.allclose(got.losses, want, atol=1e-6)
    assert torch.allclose(got.chosen_rewards, want_c)
    assert torch.allclose(got.rejected_rewards, want_r)


def test_matches_trl_orpo_odds_ratio(trl_helpers):
    """TRL: loss = nll - mean(beta * log sigmoid(log odds)); ours with orpo_lambda = TRL's beta
    and a scalar nll has the same mean."""
    _, orpo = trl_helpers
    torch.manual_seed(1)
    chosen, rejected = -torch.rand(16) * 2 - 1e-3, -torch.rand(16) * 2 - 1e-3
    nll = torch.tensor(1.3)
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    ratio_losses, want_c, want_r, _, _ = orpo.odds_ratio_loss(fake, chosen, rejected)
    got = orpo_loss(chosen, rejected, chosen_nll=nll, beta=0.25, orpo_lambda=0.25)
    assert got.losses.mean().item() == pytest.approx((nll - ratio_losses.mean()).item(), rel=1e-6)
    assert torch.allclose(got.chosen_rewards, want_c)
    assert torch.allclose(got.rejected_rewards, want_r)
