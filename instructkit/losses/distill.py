"""Knowledge-distillation losses over next-token distributions: forward KL, reverse KL and the
generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-policy distillation of
language models: learning from self-generated mistakes").

Every function here is pure: logits in, ``(loss_sum, count)`` out, the sum over the positions a
mask keeps, so the engine's exact token-weighted accumulation applies as for the SFT loss. Both
distributions are taken at the same temperature ``T``: ``softmax(logits / T)``. (Hinton et al.'s
``T^2`` factor, which keeps gradient sizes comparable across temperatures, is the caller's choice
and not applied here.)

With ``p`` the teacher's distribution and ``q`` the student's at one position:

- forward KL, ``KL(p || q) = sum_v p_v (log p_v - log q_v)``: mass-covering, the usual KD loss;
- reverse KL, ``KL(q || p)``: mode-seeking (MiniLLM, Gu et al. 2024);
- ``JSD_beta(p || q) = beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q``.
  For small ``beta`` it is ``beta KL(p || q) + O(beta^2)`` and near 1 it is
  ``(1 - beta) KL(q || p) + O((1 - beta)^2)``: GKD (and TRL's ``generalized_jsd_loss``) therefore
  define ``beta = 0`` as forward KL and ``beta = 1`` as reverse KL, and so does :func:`generalized_jsd`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from instructkit.errors import InputError


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise InputError(f"temperature must be positive, got {temperature}", field="temperature")
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """(..,) KL(p || q) over the last dimension, from log-probabilities; 0 log 0 = 0."""
    return torch.where(log_p.isneginf(), 0.0, log_p.exp() * (log_p - log_q)).sum(-1)


def _masked_sum(per_position: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if mask is None:
        return per_position.sum(), torch.tensor(per_position.numel(), device=per_position.device)
    mask = mask.to(torch.bool)
    return per_position[mask].sum(), mask.sum()


def token_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.0, temperature: float = 1.0
) -> torch.Tensor:
    """Per-position divergence between teacher and student, shape ``logits.shape[:-1]``.

    ``beta`` picks the member of the family: 0 forward KL (teacher || student), 1 reverse KL
    (student || teacher), in between the generalised JSD. Gradients flow into the student only.
    """
    if not 0.0 <= beta <= 1.0:
        raise InputError(f"beta must be in [0, 1], got {beta}", field="beta")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} != teacher's {tuple(teacher_logits.shape)}")
    log_q = _log_probs(student_logits, temperature)
    log_p = _log_probs(teacher_logits, temperature).detach()
    if beta == 0.0:
        return _kl(log_p, log_q)
    if beta == 1.0:
        return _kl(log_q, log_p)
    # log m = logsumexp(log p + log beta, log q + log(1 - beta)), computed stably.
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed ``KL(teacher || student)`` over the positions ``mask`` keeps, and their count."""
    return _masked_sum(token_divergence(student_logits, teacher_logits, beta=0.0, temperature=temperature), mask)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed ``KL(student || teacher)`` over the positions ``mask`` keeps, and their count."""
    return _masked_sum(token_divergence(student_logits, teacher_logits, beta=1.0, temperature=temperature), mask)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed ``JSD_beta(teacher || student)`` (GKD) over the positions ``mask`` keeps, and their count."""
    return _masked_sum(token_divergence(student_logits, teacher_logits, beta=beta, temperature=temperature), mask)


def chunked_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    beta: float = 0.0,
    temperature: float = 1.0,
    chunk_size: int = 512,
) -> torch.Tensor:
    """Summed divergence over N positions from final hidden states and LM-head weights, without
    the (N, V) logits: ``chunk_size`` positions are projected at a time and each chunk is
    recomputed in backward (activation checkpointing), so memory holds one (chunk, V) block of
    each model. Equal to ``token_divergence(hs @ Ws.T, ht @ Wt.T).sum()``.

    Args:
        student_hidden: (N, H_s); student_weight: (V, H_s); teacher_hidden: (N, H_t);
        teacher_weight: (V, H_t). The teacher side takes no gradient.
    """
    from torch.utils.checkpoint import checkpoint

    def block(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return token_divergence(
            h @ student_weight.t(), t @ teacher_weight.t(), beta=beta, temperature=temperature
        ).sum()

    teacher_hidden = teacher_hidden.detach()
    total = student_hidden.new_zeros((), dtype=torch.promote_types(student_hidden.dtype, torch.float32))
    for start in range(0, student_hidden.size(0), chunk_size):
        h = student_hidden[start : start + chunk_size]
        t = teacher_hidden[start : start + chunk_size]
        total = total + (checkpoint(block, h, t, use_reentrant=False) if torch.is_grad_enabled() else block(h, t))
    return total


def distillation_loss(
    divergence: tuple[torch.Tensor, torch.Tensor],
    sft: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    alpha: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``alpha * divergence + (1 - alpha) * SFT cross-entropy``, both summed over the same
    trained tokens (the count is the divergence's). ``alpha`` 1 is pure distillation."""
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}", field="alpha")
    div_sum, count = divergence
    if sft is None or alpha == 1.0:
        return alpha * div_sum, count
    sft_sum, sft_count = sft
    if int(sft_count) != int(count):
        raise ValueError(f"the SFT term covers {int(sft_count)} tokens and the divergence {int(count)}")
    return alpha * div_sum + (1.0 - alpha) * sft_sum, count
