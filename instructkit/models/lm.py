"""A causal LM seen as (backbone -> hidden states) + (LM head), and the SFT loss module over it.

Splitting the model lets losses project only the positions they train, chunk by chunk
(:func:`instructkit.losses.token_ce.linear_cross_entropy`), instead of computing the (B, T, V)
logits that ``model(...).logits`` would. The split works for plain and peft-wrapped models of
every architecture whose output layer is a plain linear head; models that post-process their
logits (soft-capping, scaling) fall back to the full forward pass.

Calling the backbone directly bypasses peft's wrapper forward, which is where prompt-learning
methods live, so this module also owns putting their virtual tokens in
(:func:`virtual_token_inputs`): every path that calls a backbone (log-probs here, reward and value
scores in ``reward_model`` and ``train.rollout``, generation) goes through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from instructkit.errors import InputError
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
    them (soft-capping, scaling). A peft prompt-learning model sees its virtual tokens
    (:func:`virtual_token_inputs`); ``positions`` index the real tokens only.
    """
    # A prompt-learning model's base sees the virtual tokens; peft's forward would put them in again.
    whole = base_causal_lm(model) if prompt_learning(model) else model
    inputs, prepended = virtual_token_inputs(model, **inputs)
    parts = split_model(model)
    if parts is None:
        logits = whole(**inputs, use_cache=False).logits[:, prepended:]  # (B, T, V)
        return PositionOutputs(None, None, logits[positions])
    decoder, head = parts
    hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, prepended:]  # (B, T, H)
    return PositionOutputs(hidden[positions], head.weight, None)


def backbone_hidden(model: nn.Module, **inputs: Any) -> tuple[nn.Module, torch.Tensor]:
    """(the transformers model inside any peft wrapper, its backbone's (B, T, H) last hidden
    states at the real positions of ``inputs``), for heads read off the backbone (reward and
    value models); virtual tokens put in as :func:`outputs_at` does."""
    base = base_causal_lm(model)
    backbone = getattr(base, base.base_model_prefix)
    inputs, prepended = virtual_token_inputs(model, **inputs)
    return base, backbone(**inputs, use_cache=False).last_hidden_state[:, prepended:]


# ----------------------------------------------------------------------------------------------
# peft prompt learning: the virtual tokens, put in where peft's wrapper forward puts them

EMBEDDING_PROMPTS = ("PROMPT_TUNING", "P_TUNING")  # virtual tokens prepended to the input embeddings
KV_PREFIXES = ("PREFIX_TUNING", "CARTRIDGE")  # a key/value prefix in every attention layer's cache


def prompt_learning(model: nn.Module) -> str | None:
    """``"embeddings"`` for an active peft prompt-tuning or p-tuning adapter, ``"prefix"`` for
    prefix tuning, None for every other model and inside peft's ``disable_adapter()`` (which swaps
    the wrapper's forward for the base model's and says so only in ``_adapters_disabled``)."""
    config = getattr(model, "active_peft_config", None)
    if not getattr(config, "is_prompt_learning", False) or getattr(model, "_adapters_disabled", False):
        return None
    if config.peft_type in EMBEDDING_PROMPTS:
        return "embeddings"
    if config.peft_type in KV_PREFIXES:
        return "prefix"
    raise InputError(
        f"{config.peft_type} adapters (task ids, their own loss) are not read by instructkit's loss and "
        f"generation paths; {', '.join(t.lower() for t in EMBEDDING_PROMPTS + KV_PREFIXES[:1])} are",
        field="peft.method",
    )


def virtual_token_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **rest: Any,
) -> tuple[dict[str, Any], int]:
    """Inputs for the base model (or its backbone) that put ``model``'s virtual tokens in as
    peft's own forward does, and how many positions the output then has before the real ones.

    * Prompt and p-tuning: ``model.get_prompt(B)`` (n, H) rows before the embeddings of
      ``input_ids``, the mask extended with n ones on the left; n positions to drop.
    * Prefix tuning: ``model.get_prompt(B)`` as ``past_key_values``, the mask extended with n
      ones; positions shifted by n (what peft does); nothing to drop.

    Position ids: without them the model counts from 0 over everything, virtual tokens included,
    exactly as peft. Given (left-padded rollouts, packed rows), the virtual tokens take 0..n-1 and
    each real token ``n + position_ids``; for prefix tuning that is peft's own offset, for prompt
    tuning peft would drop them (with a warning) and count the padding as positions, so a
    left-padded row would not compute what the row alone does. A 4-D (packed) mask is extended
    so that every real token sees the virtual tokens: each packed example then computes what it
    would alone, as with the plain model. (B, T) inputs; the 4-D mask is (B, 1, T, T).
    """
    kind = prompt_learning(model)
    if kind is None:
        out = dict(rest, input_ids=input_ids, attention_mask=attention_mask)
        return (out if position_ids is None else dict(out, position_ids=position_ids)), 0
    n = model.active_peft_config.num_virtual_tokens
    b, t = input_ids.shape
    if attention_mask is None and position_ids is not None and bool((position_ids.diff(dim=-1) != 1).any()):
        raise InputError(
            "packed rows without a mask (position ids restarting at each example) would let the virtual "
            "tokens reach only the first example of a row; pack with the block mask (data.packing)",
            field="data.packing",
        )
    if kind == "prefix":
        if model.training:
            check_prefix_tuning(model)
        prefix = model.get_prompt(b, max_cache_len=t + n)
        if not hasattr(prefix, "get_seq_length"):  # not a transformers Cache: the model would not read it
            raise InputError(_NO_CACHE, field="peft.method")
        out = dict(rest, input_ids=input_ids, past_key_values=prefix)
        out["attention_mask"] = _mask_with_virtual_tokens(attention_mask, n, as_queries=False)
        if position_ids is not None:
            out["position_ids"] = position_ids + n
        return out, 0
    embeds = model.word_embeddings(input_ids)  # (B, T, H)
    prompts = model.get_prompt(batch_size=b).to(embeds.dtype)  # (B, n, H)
    out = dict(rest, inputs_embeds=torch.cat((prompts, embeds), dim=1))
    out["attention_mask"] = _mask_with_virtual_tokens(attention_mask, n, as_queries=True)
    if position_ids is not None:
        first = torch.arange(n, device=position_ids.device, dtype=position_ids.dtype).expand(b, n)
        out["position_ids"] = torch.cat((first, position_ids + n), dim=1)
    return out, n


def _mask_with_virtual_tokens(mask: torch.Tensor | None, n: int, *, as_queries: bool) -> torch.Tensor | None:
    """``mask`` with n virtual tokens before the real ones: as keys every real token attends to,
    and, for prompt tuning (``as_queries``), also as n causal queries of their own.
    (B, T) -> (B, n + T); (B, 1, Tq, Tk) -> (B, 1, n + Tq, n + Tk) or (B, 1, Tq, n + Tk)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return torch.cat((mask.new_ones(mask.size(0), n), mask), dim=1)
    attend, block = (True, False) if mask.dtype == torch.bool else (0.0, torch.finfo(mask.dtype).min)
    b, heads, tq, _ = mask.shape
    keys = torch.cat((mask.new_full((b, heads, tq, n), attend), mask), dim=-1)  # (B, 1, Tq, n + Tk)
    if not as_queries:
        return keys
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    own = mask.new_full((n, n), block).masked_fill(causal, attend)  # (n, n)
    virtual = torch.cat((own, mask.new_full((n, mask.size(-1)), block)), dim=-1)  # (n, n + Tk): not the future
    return torch.cat((virtual.expand(b, heads, n, -1), keys), dim=2)


_NO_CACHE = "prefix tuning puts its virtual tokens in the model's key/value cache, which this model has none of"
_CACHE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")  # plain key/value layers peft can prefill


def prefix_cache_problem(model: nn.Module) -> str | None:
    """Why prefix tuning cannot train or generate on ``model`` (a transformers causal LM or
    sequence classifier), or None when it can.

    peft 0.21.2 hands every decoder-only model one ``DynamicCache`` of (B, kv heads, n, head dim)
    key and value tensors per layer, built from the config (hidden size / heads, or ``head_dim``),
    and refuses nothing up front: a model whose cache is not that fails in its first forward
    (hybrid attention/SSM models want conv and recurrent states in some layers; multi-head latent
    attention rebuilds keys and values of other widths) or never reads it (no ``past_key_values``).
    """
    import inspect

    from transformers import DynamicCache

    name = type(model).__name__
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, model.base_model_prefix, model)
    if "past_key_values" not in inspect.signature(backbone.forward).parameters:
        return f"{_NO_CACHE} ({name} takes no past_key_values); use prompt_tuning, p_tuning or lora"
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "kv_lora_rank", None):
        return (
            f"prefix tuning gives every layer keys and values of one head width, and {name}'s multi-head "
            "latent attention rebuilds them from a compressed cache with other widths; use prompt_tuning, "
            "p_tuning or lora"
        )
    try:
        layers = sorted({type(layer).__name__ for layer in DynamicCache(config=config).layers})
    except Exception as err:  # a config transformers' own cache cannot be built for
        return f"{_NO_CACHE} ({name}: {err})"
    others = [layer for layer in layers if layer not in _CACHE_LAYERS]
    if others:
        return (
            f"prefix tuning prefills every layer's key/value cache, and {name}'s cache has layers of another "
            f"kind ({', '.join(others)}: linear-attention, convolution or state-space layers); use "
            "prompt_tuning, p_tuning or lora"
        )
    return None


def check_prefix_tuning(model: nn.Module) -> None:
    """InputError when prefix tuning cannot work on ``model`` (before peft wraps it, or after):
    its cache cannot take a prefix (:func:`prefix_cache_problem`), or gradient checkpointing is on,
    which replays each layer with ``past_key_values=None`` (transformers' GradientCheckpointingLayer;
    peft 0.21.2 refuses it too, with a ValueError, when it wraps the model)."""
    base = base_causal_lm(model)
    if problem := prefix_cache_problem(base):
        raise InputError(problem, field="peft.method")
    if any(getattr(m, "gradient_checkpointing", False) for m in base.modules()):
        raise InputError(
            "prefix tuning's key/value prefix lives in the cache, and gradient checkpointing runs every layer "
            "without one; set train.gradient_checkpointing=false or use prompt_tuning or p_tuning",
            field="train.gradient_checkpointing",
        )


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
