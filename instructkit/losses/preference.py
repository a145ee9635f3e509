"""Offline preference losses (the DPO family) over sequence log-probs, and their registry.

Each loss is a pure function of per-sequence log-probs (B,) and returns unreduced per-pair
losses plus detached implicit rewards for logging. ``PREFERENCE_LOSSES`` says what each loss
needs (a reference model, length-normalised inputs, pairs); ``preference_loss`` applies that
and is what recipes call. Formulas follow TRL 1.16 (``DPOTrainer``, ``experimental.cpo``,
``experimental.orpo``, ``KTOTrainer``) so that parity tests against it can pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_LN_HALF = -math.log(2.0)


@dataclass
class PreferenceOutput:
    """Unreduced losses and detached implicit rewards.

    For paired losses all three are (B,). For KTO ``losses`` is (n_desirable + n_undesirable,)
    laid out [desirable..., undesirable...], ``chosen_rewards`` is (n_desirable,) and
    ``rejected_rewards`` is (n_undesirable,).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _float(x: torch.Tensor) -> torch.Tensor:
    """Upcast to fp32 or better: half-precision log-prob differences lose the signal."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _log_ratio_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """(pi_c - ref_c, pi_r - ref_r, their difference), each (B,) in fp32 or better."""
    chosen = _float(chosen_logps) - _float(ref_chosen_logps)
    rejected = _float(rejected_logps) - _float(ref_rejected_logps)
    return chosen, rejected, chosen - rejected


def dpo_sigmoid_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    """DPO (Rafailov et al. 2023, Eq. 7), conservative when ``label_smoothing`` > 0.

    With h = (pi_c - ref_c) - (pi_r - ref_r) and eps = label_smoothing::

        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    eps is the probability that a preference label is flipped (cDPO, Mitchell 2023, "A note on
    DPO with noisy preferences"). At eps = 0 this is TRL 1.16's ``loss_type="sigmoid"``; TRL 1.16
    applies label smoothing only in its "robust"/"exo_pair" losses, and in CPO's sigmoid loss with
    exactly this form.

    Args:
        chosen_logps, rejected_logps: (B,) summed response log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the frozen reference.
        beta: inverse temperature (strength of the implicit KL penalty).
        label_smoothing: eps in [0, 0.5].

    Returns:
        losses (B,); rewards beta * (pi - ref), (B,) each.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing}")
    chosen, rejected, h = _log_ratio_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    return PreferenceOutput(losses, beta * chosen.detach(), beta * rejected.detach())


def ipo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceOutput:
    """IPO (Azar et al. 2023, Eq. 17): ``(h - 1 / (2 beta))^2``, h the DPO log-ratio margin.

    beta plays the paper's tau. The squared loss regresses h onto 1/(2 beta) instead of pushing
    it to infinity. The registry marks IPO length-normalised, as TRL 1.16 does (confirmed there
    with the IPO authors): through ``preference_loss`` all four inputs are per-token means
    (B,), and so are the logged rewards beta * (pi - ref) (TRL logs them on sums).
    """
    chosen, rejected, h = _log_ratio_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return PreferenceOutput(losses, beta * chosen.detach(), beta * rejected.detach())


def hinge_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceOutput:
    """SLiC hinge (Zhao et al. 2023, SLiC-HF, Eq. 1 rank-calibration term): ``relu(1 - beta * h)``.

    As in TRL, the margin is applied to the DPO log-ratio margin h (not raw log-probs) and
    scaled so the paper's delta is 1/beta. Zero loss, and zero gradient, once h >= 1/beta.
    Shapes (B,); rewards beta * (pi - ref).
    """
    chosen, rejected, h = _log_ratio_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1.0 - beta * h)
    return PreferenceOutput(losses, beta * chosen.detach(), beta * rejected.detach())


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    """SimPO (Meng et al. 2024, Eq. 6): reference-free, on per-token mean log-probs.

    With a_c, a_r the mean log-probs (B,), gamma = simpo_gamma and m = beta * (a_c - a_r) - gamma::

        loss = -(1 - eps) * log sigmoid(m) - eps * log sigmoid(-m)

    gamma is the paper's target reward margin, subtracted after scaling by beta; TRL's CPO
    writes the same thing as beta * (a_c - a_r - gamma / beta). eps = label_smoothing as in
    TRL's CPO (0 gives the paper's loss). The paper's beta is 2 to 2.5, hence the default here.
    Rewards: beta * a, (B,) each.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing}")
    chosen, rejected = _float(chosen_logps), _float(rejected_logps)
    m = beta * (chosen - rejected) - simpo_gamma
    losses = -(1.0 - label_smoothing) * F.logsigmoid(m)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-m)
    return PreferenceOutput(losses, beta * chosen.detach(), beta * rejected.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x < 0, accurate at both ends (Maechler 2012, "Accurately
    computing log(1 - exp(-|a|))"): log(-expm1(x)) near 0, log1p(-exp(x)) below -ln 2."""
    return torch.where(x > _LN_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    chosen_nll: torch.Tensor | None = None,
    beta: float = 0.1,
    orpo_lambda: float = 1.0,
) -> PreferenceOutput:
    """ORPO (Hong et al. 2024, Eq. 6-7): SFT NLL plus a log odds-ratio penalty, reference-free.

    With a the per-token mean log-prob (so P = exp(a) is the length-normalised likelihood), the
    log odds are ``log(P / (1 - P)) = a - log1mexp(a)`` and::

        L_OR = -log sigmoid(logodds_c - logodds_r)          (Eq. 7)
        loss = chosen_nll + orpo_lambda * L_OR              (Eq. 6)

    ``orpo_lambda`` is the role TRL 1.16's ORPO gives its ``beta``. Rewards are beta * a, as TRL
    logs them (pass beta = orpo_lambda to reproduce TRL's numbers).

    Args:
        chosen_logps, rejected_logps: (B,) per-token mean log-probs, all < 0.
        chosen_nll: (B,) per-example mean NLL of chosen, or a scalar broadcast to every pair
            (TRL uses one token-mean over the whole batch). Default: -chosen_logps.
    """
    chosen, rejected = _float(chosen_logps), _float(rejected_logps)
    log_odds = (chosen - log1mexp(chosen)) - (rejected - log1mexp(rejected))
    if chosen_nll is None:
        chosen_nll = -chosen
    losses = _float(chosen_nll) - orpo_lambda * F.logsigmoid(log_odds)
    return PreferenceOutput(losses, beta * chosen.detach(), beta * rejected.detach())


def kto_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    kl_ref: torch.Tensor | float | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceOutput:
    """KTO (Ethayarajh et al. 2024; the loss TRL 1.16 cites as Eq. 7 of arXiv 2402.01306).

    Unpaired: ``chosen_*`` hold the desirable examples (n_d,), ``rejected_*`` the undesirable
    ones (n_u,); either may be empty. With r = pi - ref (summed log-probs) and reference point
    z0 = max(kl_ref, 0), detached::

        desirable:   desirable_weight   * (1 - sigmoid(beta * (r - z0)))
        undesirable: undesirable_weight * (1 - sigmoid(beta * (z0 - r)))

    kl_ref is the batch estimate of KL(pi || ref) from mismatched (prompt, completion) pairs;
    None means 0. Returns losses (n_d + n_u,) = [desirable..., undesirable...] and rewards
    beta * r, (n_d,) and (n_u,).
    """
    chosen = _float(chosen_logps) - _float(ref_chosen_logps)
    rejected = _float(rejected_logps) - _float(ref_rejected_logps)
    z0 = (
        torch.zeros((), dtype=chosen.dtype, device=chosen.device)
        if kl_ref is None
        else (torch.as_tensor(kl_ref, dtype=chosen.dtype, device=chosen.device).detach().clamp(min=0))
    )
    losses = torch.cat(
        [
            desirable_weight * (1.0 - torch.sigmoid(beta * (chosen - z0))),
            undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - rejected))),
        ]
    )
    return PreferenceOutput(losses, beta * chosen.detach(), beta * rejected.detach())


@dataclass(frozen=True)
class LossSpec:
    """What a preference loss needs; ``preference_loss`` acts on it, recipes may read it."""

    fn: Callable[..., PreferenceOutput]
    needs_reference: bool
    """Takes ``ref_chosen_logps``/``ref_rejected_logps`` (a frozen reference model's)."""
    length_normalized: bool
    """Takes per-token mean log-probs; ``preference_loss`` divides the sums by token counts."""
    paired: bool = True
    """False for KTO: chosen/rejected are independent desirable/undesirable examples."""
    options: tuple[str, ...] = ()
    """Keywords of ``preference_loss`` that ``fn`` also takes and is given (beta always is)."""


PREFERENCE_LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(dpo_sigmoid_loss, needs_reference=True, length_normalized=False, options=("label_smoothing",)),
    "ipo": LossSpec(ipo_loss, needs_reference=True, length_normalized=True),
    "hinge": LossSpec(hinge_loss, needs_reference=True, length_normalized=False),
    "simpo": LossSpec(
        simpo_loss, needs_reference=False, length_normalized=True, options=("simpo_gamma", "label_smoothing")
    ),
    "orpo": LossSpec(orpo_loss, needs_reference=False, length_normalized=True, options=("chosen_nll", "orpo_lambda")),
    "kto": LossSpec(
        kto_loss,
        needs_reference=True,
        length_normalized=False,
        paired=False,
        options=("kl_ref", "desirable_weight", "undesirable_weight"),
    ),
}


def _per_token(logps: torch.Tensor, tokens: torch.Tensor | None, which: str) -> torch.Tensor:
    if tokens is None:
        raise ValueError(f"{which}_tokens is required by length-normalised losses")
    return _float(logps) / torch.as_tensor(tokens, device=logps.device).clamp(min=1)


def preference_loss(
    name: str,
    *,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor | None,
    rejected_tokens: torch.Tensor | None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    chosen_nll: torch.Tensor | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    orpo_lambda: float = 1.0,
    kl_ref: torch.Tensor | float | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceOutput:
    """Look up ``name`` in ``PREFERENCE_LOSSES`` and apply it to summed log-probs.

    Args:
        chosen_logps, rejected_logps, ref_*: (B,) SUMS of response-token log-probs (for KTO:
            desirable and undesirable examples, (n_d,) and (n_u,)).
        chosen_tokens, rejected_tokens: (B,) response token counts (clamped to >= 1); only
            length-normalised losses read them, dividing every log-prob sum, reference
            included, by its count.
        chosen_nll: ORPO's SFT term, (B,) or scalar; default -chosen_logps / chosen_tokens.
        The remaining keywords go to the losses named in each spec's ``options``; a loss
        ignores the ones it does not use.

    Raises:
        ValueError: unknown ``name`` (lists the valid ones), or a reference-based loss called
            without reference log-probs.
    """
    spec = PREFERENCE_LOSSES.get(name)
    if spec is None:
        raise ValueError(f"unknown preference loss {name!r}; valid: {sorted(PREFERENCE_LOSSES)}")
    given = {
        "chosen_nll": chosen_nll,
        "label_smoothing": label_smoothing,
        "simpo_gamma": simpo_gamma,
        "orpo_lambda": orpo_lambda,
        "kl_ref": kl_ref,
        "desirable_weight": desirable_weight,
        "undesirable_weight": undesirable_weight,
    }
    tensors = [chosen_logps, rejected_logps]
    if spec.needs_reference:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(
                f"preference loss {name!r} needs ref_chosen_logps and "
                "ref_rejected_logps (log-probs under the reference model)"
            )
        tensors += [ref_chosen_logps, ref_rejected_logps]
    if spec.length_normalized:  # tensors alternate chosen, rejected
        counts = [chosen_tokens, rejected_tokens] * (len(tensors) // 2)
        names = ["chosen", "rejected"] * (len(tensors) // 2)
        tensors = [_per_token(t, n, w) for t, n, w in zip(tensors, counts, names)]
    return spec.fn(*tensors, beta=beta, **{k: given[k] for k in spec.options})
