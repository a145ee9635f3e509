"""Reward-model ranking loss over K ranked responses per prompt (InstructGPT), and its K=2 case.

Returns sums and counts rather than means, so a recipe can divide by the number of prompts in
the whole accumulated batch and gradient accumulation stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RankingOutput:
    """Sums and counts over a batch of prompts; all scalars."""

    loss_sum: torch.Tensor
    """Sum over prompts of each prompt's mean pairwise loss (float)."""
    prompts: torch.Tensor
    """Prompts with at least one untied pair (long)."""
    pairs: torch.Tensor
    """Untied comparisons (long)."""
    correct: torch.Tensor
    """Comparisons whose better response scored strictly higher (long); accuracy = correct/pairs."""


def _pair_loss(better: torch.Tensor, worse: torch.Tensor, margin, center_coefficient: float):
    """TRL RewardTrainer's per-pair loss: -log sigmoid(r_w - r_l - m) + c * (r_w + r_l)^2."""
    diff = better - worse
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coefficient:
        loss = loss + center_coefficient * (better + worse) ** 2
    return loss


def ranking_loss(
    scores: torch.Tensor,
    group: torch.Tensor,
    rank: torch.Tensor,
    *,
    margin: float | None = None,
    center_coefficient: float = 0.0,
) -> RankingOutput:
    """InstructGPT reward-model loss (Ouyang et al. 2022, Sec. 3.5, Eq. 1), ties dropped.

    For a prompt x with responses ranked by labellers, every untied pair (y_w better than y_l)
    contributes ``-log sigmoid(r(x, y_w) - r(x, y_l) - margin)``; the prompt's loss is the mean
    over its untied pairs (Eq. 1's 1 / C(K, 2), counting only untied pairs), so a prompt weighs
    the same whatever its K, as the paper's one-batch-element-per-prompt training does.

    ``center_coefficient`` c adds ``c * (r_w + r_l)^2`` to each pair before averaging: the
    centering penalty of Eisenstein et al. 2023 as TRL 1.16 ``RewardTrainer`` applies it
    (``center_rewards_coefficient`` on the mean over pairs of (r_chosen + r_rejected)^2), so for
    K = 2 each prompt's loss is exactly TRL's per-pair loss.

    Args:
        scores: (N,) one reward per (prompt, response).
        group: (N,) long prompt id of each response; ids are arbitrary and a prompt's
            responses need not be contiguous.
        rank: (N,) long, 0 = best; equal ranks within a prompt are a tie.
        margin: constant subtracted from every difference (None: 0).
        center_coefficient: c above.

    Builds (N, N) pair matrices: fine for reward batches (N in the hundreds).
    """
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    # pair[i, j]: i and j answer the same prompt and i is ranked strictly better.
    pair = (group[:, None] == group[None, :]) & (rank[:, None] < rank[None, :])  # (N, N)
    loss = _pair_loss(scores[:, None], scores[None, :], margin, center_coefficient)  # (N, N)
    _, prompt = torch.unique(group, return_inverse=True)  # (N,) dense prompt index
    per_prompt = torch.zeros(int(prompt.max()) + 1 if prompt.numel() else 0, dtype=torch.long, device=scores.device)
    per_prompt.index_add_(0, prompt, pair.sum(dim=1))  # untied pairs of each prompt
    # Weight each pair by 1/(its prompt's pair count); tied-only prompts never get a weight.
    weight = 1.0 / per_prompt.clamp(min=1)[prompt].to(scores.dtype)  # (N,) by winner's prompt
    loss_sum = (torch.where(pair, loss, torch.zeros_like(loss)) * weight[:, None]).sum()
    return RankingOutput(
        loss_sum=loss_sum,
        prompts=(per_prompt > 0).sum(),
        pairs=pair.sum(),
        correct=(pair & (scores[:, None] > scores[None, :])).sum(),
    )


def pairwise_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_coefficient: float = 0.0,
) -> RankingOutput:
    """``ranking_loss`` for one (chosen, rejected) pair per prompt.

    Args:
        chosen_scores, rejected_scores: (B,) rewards of pair b's better and worse response.
        margin: constant, or (B,) per-pair margins as in TRL's ``"margin"`` column.

    ``loss_sum / prompts`` is TRL 1.16 ``RewardTrainer``'s loss on the same batch.
    """
    dtype = torch.promote_types(chosen_scores.dtype, torch.float32)
    chosen, rejected = chosen_scores.to(dtype), rejected_scores.to(dtype)
    loss = _pair_loss(chosen, rejected, margin, center_coefficient)
    n = torch.tensor(chosen.numel(), device=chosen.device)
    return RankingOutput(loss_sum=loss.sum(), prompts=n, pairs=n.clone(), correct=(chosen > rejected).sum())
