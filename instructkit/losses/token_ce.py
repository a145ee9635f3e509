"""Token-level cross-entropy for language modelling, without the full vocabulary logits.

SFT, the PPO-ptx term and ORPO's SFT term all need ``sum_t -log p(y_t | y_<t)`` over the
trained tokens. The naive way materialises logits of shape (B, T, V) (for a 49k vocabulary,
B=8, T=512: 800 MB in fp32, twice over with its gradient). Here only trained positions are
projected, a chunk at a time, and the gradient of each chunk is formed in the forward pass, so
peak memory holds one (chunk, V) block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of trained tokens.

    Args:
        logits: (B, T, V) scores for the token after each position.
        labels: (B, T) target ids aligned with the *inputs*; -100 marks untrained positions.
            Position t's logits predict labels[t + 1].

    Returns:
        (loss_sum, n_tokens): scalar sum of ``-log softmax(logits[b, t])[labels[b, t+1]]`` over
        trained targets, and their count. Callers divide by a token count of their choosing
        (the whole accumulated batch, for exact gradient accumulation).
    """
    targets = labels[:, 1:]
    scores = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(
        scores.reshape(-1, scores.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (targets != IGNORE_INDEX).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden[i] @ weight.T, targets[i]), gradients formed chunk by chunk in forward."""

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int
    ) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 or better for sums
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.size(0), chunk_size):
            h = hidden[start : start + chunk_size]
            t = targets[start : start + chunk_size]
            logits = (h @ weight.t()).to(acc)  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                # d(sum CE)/d(logits) = softmax - onehot, computed in place over the logits block.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(t.size(0), device=t.device), t] -= 1.0
                probs = probs.to(hidden.dtype)
                if need_h:
                    grad_h[start : start + chunk_size] = probs @ weight
                if need_w:
                    grad_w += (probs.t() @ h).to(acc)
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Summed cross-entropy of a linear projection, never holding more than a (chunk, V) block.

    Equivalent to (but much leaner than)::

        F.cross_entropy(hidden @ weight.T, targets, reduction="sum")

    Args:
        hidden: (N, H) final hidden states of the trained positions only.
        weight: (V, H) output projection (the LM head).
        targets: (N,) next-token ids, all trained (select them before calling).
        chunk_size: rows of ``hidden`` projected at a time.
    """
    if hidden.size(0) == 0:
        return (hidden.sum() + weight.sum()) * 0.0  # keeps both in the graph for DDP
    if not (hidden.requires_grad or weight.requires_grad) or not torch.is_grad_enabled():
        acc = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.size(0), chunk_size):
            logits = (hidden[start : start + chunk_size] @ weight.t()).to(acc)
            total += F.cross_entropy(logits, targets[start : start + chunk_size], reduction="sum")
        return total
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size)


class _LinearLogProbs(torch.autograd.Function):
    """log softmax(hidden[i] @ weight.T / temperature)[targets[i]] per row, chunk by chunk.

    Unlike the summed loss above, each row's gradient weight is only known in backward, so
    backward recomputes each (chunk, V) block instead of storing it: one extra matmul per
    chunk buys memory that never holds more than one block.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, targets, chunk_size: int, temperature: float):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(hidden.size(0), dtype=acc, device=hidden.device)
        lses = torch.empty_like(out)
        for start in range(0, hidden.size(0), chunk_size):
            logits = (hidden[start : start + chunk_size] @ weight.t()).to(acc) / temperature
            lse = torch.logsumexp(logits, dim=-1)
            lses[start : start + chunk_size] = lse
            out[start : start + chunk_size] = (
                logits.gather(1, targets[start : start + chunk_size, None]).squeeze(1) - lse
            )
        ctx.save_for_backward(hidden, weight, targets, lses)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")  # recompute under the forward's autocast state
    def backward(ctx, grad_out):
        hidden, weight, targets, lses = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = lses.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for start in range(0, hidden.size(0), ctx.chunk_size):
            end = start + ctx.chunk_size
            h, t, g = hidden[start:end], targets[start:end], grad_out[start:end].to(acc)
            logits = (h @ weight.t()).to(acc) / ctx.temperature
            # d logp / d logits = onehot - softmax; scaled by each row's incoming gradient / T.
            grad = logits.sub_(lses[start:end, None]).exp_().neg_()
            grad[torch.arange(t.size(0), device=t.device), t] += 1.0
            grad.mul_((g / ctx.temperature)[:, None])
            grad = grad.to(hidden.dtype)
            if need_h:
                grad_h[start:end] = grad @ weight
            if need_w:
                grad_w += (grad.t() @ h).to(acc)
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None, None


def linear_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024, temperature: float = 1.0
) -> torch.Tensor:
    """Per-row log-probability of ``targets`` under a linear head, without the full logits.

    Equivalent to (but leaner than)::

        torch.log_softmax(hidden @ weight.T / temperature, -1).gather(1, targets[:, None]).squeeze(1)

    Args:
        hidden: (N, H) final hidden states of the scored positions only.
        weight: (V, H) output projection.
        targets: (N,) ids whose log-probability is wanted.
        temperature: the sampling temperature the log-probs must match (PPO), 1 otherwise.

    Returns: (N,) log-probs in fp32 (or wider), differentiable w.r.t. hidden and weight.
    """
    if hidden.size(0) == 0:
        return (hidden.sum() + weight.sum()).reshape(1)[:0].float() * 0.0
    return _LinearLogProbs.apply(hidden, weight, targets, chunk_size, float(temperature))


def shifted_trained_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (B, T-1) mask of positions whose next token is trained, and those targets (N,)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return mask, targets[mask]
