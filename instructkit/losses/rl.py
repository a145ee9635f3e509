"""Reinforcement-learning math for PPO(-ptx), GRPO and RLOO: pure functions of log-probs, rewards,
values and masks. Torch only, no model, so every formula is tested by hand.

Shapes: ``N`` sequences per rollout batch, ``R`` response positions. A response mask (N, R) is 1
on a prefix of each row (the response up to and including its stop token) and 0 on the padding
after it. Per-token quantities are aligned with the response tokens: position t holds what
concerns response token t (its log-prob, the value of the state before it, its reward).

Where each piece comes from:

* KL estimators k1, k3: J. Schulman, "Approximating KL Divergence" (2020).
* KL-penalised rewards and the adaptive KL coefficient: Ziegler et al. 2019, "Fine-Tuning Language
  Models from Human Preferences", Eq. 2 and Sec. 2.2; Ouyang et al. 2022 (InstructGPT), Eq. 2.
* GAE: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation", Eq. 16.
* Clipped policy loss: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", Eq. 7;
  clipped value loss: the PPO2 baselines implementation (also in Ziegler et al.'s code).
* GRPO: Shao et al. 2024, "DeepSeekMath", Sec. 4.1.2 (outcome supervision).
* RLOO: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization", Eq. 5.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------------------------
# Masked statistics


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (all of them, or along ``dim``).

    An all-zero mask gives 0, not NaN: an empty mini-batch contributes nothing.
    """
    mask = mask.to(x.dtype)
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of ``x`` (Bessel-corrected by default, as TRL)."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries; with ``shift_mean=False`` the mean
    is added back (only the scale changes, as for reward whitening). Masked-out entries are
    returned as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var[target - predicted] / Var[target]`` over the masked entries (population variances):
    1 when the value model predicts the returns exactly, 0 when it does no better than their mean,
    negative when worse. NaN when the targets do not vary."""
    var_target = float(masked_var(target, mask, unbiased=False))
    if var_target == 0:
        return float("nan")
    return 1.0 - float(masked_var(target - predicted, mask, unbiased=False)) / var_target


# ----------------------------------------------------------------------------------------------
# KL between the policy and the reference, per token


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi(y) - log pi_ref(y) for y ~ pi: unbiased for KL(pi || pi_ref), high variance,
    negative on some tokens. Shapes (N, R) -> (N, R). (Schulman 2020.)"""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = pi_ref(y) / pi(y), y ~ pi: unbiased, never negative, lower
    variance than k1 when pi is close to pi_ref. Shapes (N, R) -> (N, R). (Schulman 2020.)"""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"k1": kl_k1, "k3": kl_k3}
"""Per-token KL estimators by name (``PPOConfig.kl_estimator``)."""


def kl_penalized_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards ``-kl_coef * kl_t``, plus the sequence's score at its last real token.

    This is the reward of InstructGPT Eq. 2 / Ziegler et al. Eq. 2,
    ``R(x, y) = r(x, y) - beta * log(pi(y|x) / pi_SFT(y|x))``, spread over tokens so that GAE can
    credit each one; summed over a row it is exactly ``score - beta * sum_t kl_t``.

    Args:
        scores: (N,) reward of each whole response.
        kl: (N, R) per-token KL estimate (see :data:`KL_ESTIMATORS`).
        mask: (N, R) response mask (a prefix of ones per row).
        kl_coef: beta.

    Returns:
        (N, R) rewards, 0 on padding.
    """
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (N,)
    rows = torch.arange(rewards.size(0), device=rewards.device)
    has_tokens = mask.sum(1) > 0
    rewards[rows[has_tokens], last[has_tokens]] += scores[has_tokens].to(rewards.dtype)
    return rewards


class RunningMoments:
    """Mean and (population) standard deviation of every score seen so far, merged batch by batch
    (Chan et al.'s parallel update), for reward normalisation: ``normalize`` maps scores to
    ``(x - mean) / std``. Its state is three numbers, checkpointed with the run."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        x = x.detach().double()
        batch_mean = float(x.mean())
        batch_m2 = float(((x - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std``; only the shift while every score seen has been the same."""
        return (x - self.mean) / self.std if self.std > 0 else x - self.mean

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_samples: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019, Sec. 2.2: steer the KL coefficient so the KL tracks a target.

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n / horizon)`` where ``n``
    is the number of samples in the batch just seen and ``KL`` their mean sequence KL.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int) -> None:
        super().__init__(kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon


# ----------------------------------------------------------------------------------------------
# Advantages


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, with
    ``V`` and ``A`` taken as 0 past the last real token (the episode ends with the response).

    Args:
        rewards: (N, R) per-token rewards (:func:`kl_penalized_rewards`).
        values: (N, R) value of the state before each response token.
        mask: (N, R) response mask, a prefix of ones per row.

    Returns:
        (advantages, returns), both (N, R) and 0 on padding; ``returns = advantages + values``
        is the value target.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        next_value = values[:, t + 1] if t + 1 < values.size(1) else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size} (>= 2)")
    return scores.view(-1, group_size)  # consecutive rows are one prompt's samples


def grpo_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024, Sec. 4.1.2): ``(r_i - mean(group)) / (std(group) + eps)``.

    ``std`` is the Bessel-corrected standard deviation of the group (as TRL). A group whose
    rewards are all equal gets advantage 0: it says nothing about which sample was better.

    Args:
        scores: (N,) sequence rewards, ``N = prompts * group_size``, each prompt's samples adjacent.

    Returns:
        (N,) advantages.
    """
    g = _groups(scores, group_size)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, Eq. 5): ``r_i - mean_{j != i} r_j``.

    The baseline of each sample is the mean reward of the other ``k - 1`` samples of its prompt,
    so it does not depend on the sample itself (the estimate stays unbiased). Equals
    ``k / (k - 1) * (r_i - mean(group))``.

    Args:
        scores: (N,) sequence rewards, each prompt's ``group_size`` samples adjacent.

    Returns:
        (N,) advantages.
    """
    g = _groups(scores, group_size)
    baseline = (g.sum(1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def _gae_estimator(rewards, values, mask, *, gamma, lam, group_size):
    return gae(rewards, values, mask, gamma, lam)


def _group_estimator(fn: Callable[[torch.Tensor, int], torch.Tensor]):
    def estimate(rewards, values, mask, *, gamma, lam, group_size):
        # The sequence reward (score minus the summed KL penalty, as in RLOO) gets one advantage,
        # shared by all its tokens. No value model: the group is the baseline.
        sequence = (rewards * mask).sum(1)
        advantages = fn(sequence, group_size)[:, None] * mask.to(rewards.dtype)
        return advantages, None

    return estimate


@dataclass(frozen=True)
class AdvantageEstimator:
    """One way to turn per-token rewards into per-token advantages.

    ``estimate(rewards (N, R), values (N, R) | None, mask (N, R), *, gamma, lam, group_size)``
    returns ``(advantages (N, R), returns (N, R) | None)``; returns are the value targets, None
    when there is no value model.
    """

    name: str
    estimate: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    needs_value_model: bool
    group_relative: bool  # samples group_size responses per prompt and compares within the group


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    e.name: e
    for e in (
        AdvantageEstimator("gae", _gae_estimator, needs_value_model=True, group_relative=False),
        AdvantageEstimator("grpo", _group_estimator(grpo_advantages), needs_value_model=False, group_relative=True),
        AdvantageEstimator("rloo", _group_estimator(rloo_advantages), needs_value_model=False, group_relative=True),
    )
}
"""Advantage estimators by name (``PPOConfig.advantage``)."""


# ----------------------------------------------------------------------------------------------
# Losses


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), as a loss to minimise.

    ``ratio = exp(logprobs - old_logprobs)``;
    ``loss_t = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))``, averaged over tokens.

    Args:
        logprobs: (N, R) log-probs under the policy being trained (with grad).
        old_logprobs: (N, R) log-probs at sampling time.
        advantages: (N, R).
        mask: (N, R) response mask.
        clip_range: eps.
        normalizer: divide the token sum by this (the token count of the whole mini-batch when it
            is split into micro-batches); default the mask's own count.

    Returns:
        (loss, clip_fraction): the scalar loss and the share of tokens where the clipped term won.
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    denom = mask.sum().clamp(min=1) if normalizer is None else normalizer
    loss = masked_sum(per_token, mask) / denom
    clip_frac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    return loss, clip_frac.detach()


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (PPO2 baselines): ``0.5 * max((V - G)^2, (V_clip - G)^2)`` per token,
    ``V_clip = V_old + clip(V - V_old, -eps, eps)``, averaged over tokens.

    Args:
        values: (N, R) current value predictions (with grad).
        old_values: (N, R) predictions at rollout time.
        returns: (N, R) targets (from :func:`gae`).
        mask: (N, R) response mask.
        clip_range: eps, in units of the value.
        normalizer: as in :func:`clipped_policy_loss`.

    Returns:
        (loss, clip_fraction): the scalar loss and the share of tokens where the clipped error won.
    """
    mask = mask.to(values.dtype)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    denom = mask.sum().clamp(min=1) if normalizer is None else normalizer
    loss = 0.5 * masked_sum(torch.maximum(err, err_clipped), mask) / denom
    clip_frac = masked_mean((err_clipped > err).to(values.dtype), mask)
    return loss, clip_frac.detach()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of each row of ``logits`` (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
