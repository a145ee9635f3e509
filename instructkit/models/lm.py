"""A causal LM seen as (backbone -> hidden states) + (LM head), and the SFT loss module over it.

Splitting the model lets losses project only the positions they train, chunk by chunk
(:func:`instructkit.losses.token_ce.linear_cross_entropy`), instead of computing the (B, T, V)
logits that ``model(...).logits`` would. The split works for plain and peft-wrapped models of
every architecture whose output layer is a plain linear head; models that post-process their
logits (soft-capping, scaling) fall back to the full forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from instructkit.losses.token_ce import linear_cross_entropy, linear_log_probs, shifted_trained_positions


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder backbone, LM head) when logits are exactly ``head(backbone(x))``, else None."""
    lm = base_causal_lm(model)
    config = getattr(lm, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, attr, None) not in (None, 1.0):
            return None
    get_decoder = getattr(lm, "get_decoder", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if not callable(get_decoder) or not isinstance(head, nn.Linear) or head.bias is not None:
        return None
    decoder = get_decoder()
    return (decoder, head) if decoder is not None and decoder is not lm else None


@dataclass
class PositionOutputs:
    """What a causal LM computes at chosen positions: final hidden states and the LM head's weight
    (projected later, a chunk at a time), or, for models whose head cannot be split off, the
    logits there. Position t scores the token at t + 1."""

    hidden: torch.Tensor | None  # (N, H)
    weight: torch.Tensor | None  # (V, H)
    logits: torch.Tensor | None  # (N, V)

    def log_probs(self, targets: torch.Tensor, chunk_size: int = 1024, temperature: float = 1.0) -> torch.Tensor:
        """(N,) ``log softmax(logits / temperature)[target]``, differentiable, fp32 or wider."""
        if self.logits is None:
            return linear_log_probs(self.hidden, self.weight, targets, chunk_size, temperature)
        scores = self.logits.to(torch.promote_types(self.logits.dtype, torch.float32)) / temperature
        return torch.log_softmax(scores, -1).gather(1, targets[:, None]).squeeze(1)

    def cross_entropy(self, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
        """Summed cross-entropy of ``targets`` (the LM loss), with a lean chunked gradient."""
        if self.logits is None:
            return linear_cross_entropy(self.hidden, self.weight, targets, chunk_size)
        scores = self.logits.to(torch.promote_types(self.logits.dtype, torch.float32))
        return F.cross_entropy(scores, targets, reduction="sum")


def outputs_at(model: nn.Module, positions: torch.Tensor, **inputs: Any) -> PositionOutputs:
    """Run ``model`` on ``inputs`` (input_ids, attention_mask, position_ids, ...) and keep only the
    positions where the (B, T) boolean ``positions`` is true, in row-major order.

    The one place that decides between projecting only those positions (the backbone's hidden
    states and the head's weight) and the full ``(B, T, V)`` logits of models that post-process
    them (soft-capping, scaling).
    """
    parts = split_model(model)
    if parts is None:
        logits = model(**inputs, use_cache=False).logits  # (B, T, V)
        return PositionOutputs(None, None, logits[positions])
    decoder, head = parts
    hidden = decoder(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    return PositionOutputs(hidden[positions], head.weight, None)


def next_token_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) mask of the positions whose next token is trained, and those targets (N,)."""
    mask, targets = shifted_trained_positions(labels)  # (B, T-1), (N,)
    return F.pad(mask, (0, 1), value=False), targets


class CausalLMLoss(nn.Module):
    """Wraps a causal LM so that ``forward`` returns (summed token loss, trained-token count).

    Accelerate/DDP wrap *this* module, so gradient synchronisation sees the whole computation.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # input_ids, labels: (B, T); attention_mask: (B, T) or (B, 1, T, T) for packed rows.
        if attention_mask is not None and attention_mask.dim() == 4:
            # An additive mask must match the compute dtype: a float32 mask against bf16/fp16
            # attention on CUDA SDPA gives NaN logits without an error.
            dtype = next(self.model.parameters()).dtype
            if torch.is_autocast_enabled("cuda"):
                dtype = torch.get_autocast_dtype("cuda")
            attention_mask = attention_mask.to(dtype)
        positions, targets = next_token_positions(labels)
        out = outputs_at(
            self.model, positions, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        )
        return out.cross_entropy(targets, self.chunk_size), positions.sum()


def sequence_log_probs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's trained tokens, and how many there are.

    For preference losses (DPO, IPO, SimPO, ORPO, KTO) and the `preference` eval suite, which
    score whole responses. Only the trained (response) positions are projected onto the
    vocabulary, a chunk at a time.

    Args:
        input_ids, attention_mask, labels: (B, T), right- or left-padded; labels -100 where
            untrained. Position t predicts labels[t + 1].

    Returns:
        (logps, counts): (B,) sums of ``log p(labels[t+1] | ..t)`` over trained targets, and
        (B,) numbers of trained targets.
    """
    positions, targets = next_token_positions(labels)  # (B, T), (N,)
    rows = torch.arange(labels.size(0), device=labels.device)[:, None].expand_as(positions)[positions]  # (N,)
    out = outputs_at(model, positions, input_ids=input_ids, attention_mask=attention_mask)
    token_logps = out.log_probs(targets, chunk_size, temperature)
    sums = torch.zeros(labels.size(0), dtype=token_logps.dtype, device=labels.device)
    return sums.index_add(0, rows, token_logps), positions.sum(-1)
