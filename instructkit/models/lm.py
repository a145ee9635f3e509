"""A causal LM seen as (backbone -> hidden states) + (LM head), and the SFT loss module over it.

Splitting the model lets losses project only the positions they train, chunk by chunk
(:func:`instructkit.losses.token_ce.linear_cross_entropy`), instead of computing the (B, T, V)
logits that ``model(...).logits`` would. The split works for plain and peft-wrapped models of
every architecture whose output layer is a plain linear head; models that post-process their
logits (soft-capping, scaling) fall back to the full forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from instructkit.losses.token_ce import linear_cross_entropy, shifted_trained_positions, token_cross_entropy


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


class CausalLMLoss(nn.Module):
    """Wraps a causal LM so that ``forward`` returns (summed token loss, trained-token count).

    Accelerate/DDP wrap *this* module, so gradient synchronisation sees the whole computation.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # input_ids, labels: (B, T); attention_mask: (B, T) or (B, 1, T, T) for packed rows.
        if attention_mask is not None and attention_mask.dim() == 4:
            # An additive mask must match the compute dtype: a float32 mask against bf16/fp16
            # attention on CUDA SDPA gives NaN logits without an error.
            dtype = next(self.model.parameters()).dtype
            if torch.is_autocast_enabled("cuda"):
                dtype = torch.get_autocast_dtype("cuda")
            attention_mask = attention_mask.to(dtype)
        parts = split_model(self.model)
        if parts is None:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids, use_cache=False).logits
            return token_cross_entropy(logits, labels)
        decoder, head = parts
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state  # (B, T, H)
        mask, targets = shifted_trained_positions(labels)  # (B, T-1), (N,)
        loss = linear_cross_entropy(hidden[:, :-1][mask], head.weight, targets, self.chunk_size)
        return loss, mask.sum()


def sequence_log_probs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor, *, chunk_size: int = 1024,
                       temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's trained tokens, and how many there are.

    For preference losses (DPO, IPO, SimPO, ORPO, KTO), which score whole responses. Only the
    trained (response) positions are projected onto the vocabulary, a chunk at a time.

    Args:
        input_ids, attention_mask, labels: (B, T), right- or left-padded; labels -100 where
            untrained. Position t predicts labels[t + 1].

    Returns:
        (logps, counts): (B,) sums of ``log p(labels[t+1] | ..t)`` over trained targets, and
        (B,) numbers of trained targets.
    """
    from instructkit.losses.token_ce import linear_log_probs

    mask, targets = shifted_trained_positions(labels)  # (B, T-1), (N,)
    rows = torch.arange(labels.size(0), device=labels.device)[:, None].expand_as(mask)[mask]  # (N,)
    parts = split_model(model)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        scores = logits[:, :-1][mask].float() / temperature  # (N, V)
        token_logps = torch.log_softmax(scores, -1).gather(1, targets[:, None]).squeeze(1)
    else:
        decoder, head = parts
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        token_logps = linear_log_probs(hidden[:, :-1][mask], head.weight, targets, chunk_size, temperature)
    sums = torch.zeros(labels.size(0), dtype=token_logps.dtype, device=labels.device)
    sums = sums.index_add(0, rows, token_logps)
    return sums, mask.sum(-1)
