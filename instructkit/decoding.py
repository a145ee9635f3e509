"""The decode loop of plain causal LMs: prefill once, then one token a step over a key/value
cache allocated up front, for :func:`instructkit.generation.generate` (eval, PPO rollouts, the
CLI) and the server's engine.

Why not ``model.generate``: at batch 1 on a CPU, HF's loop spends a large share of each step
outside the model (preparing inputs and masks, logits processors and stopping-criteria objects,
growing the cache by ``torch.cat`` of every layer's keys and values). Here a step is the model's
forward on one token per row, ``argmax`` (or the same seeded sampling HF does) and a
comparison with the stop ids.

What it guarantees, and how:

* **Greedy tokens equal HF ``generate`` in fp32.** The model sees exactly the inputs HF gives
  it: positions ``cumsum(mask) - 1`` (0 on padding), the 2-D mask grown by a column per step (or
  none when no row is padded, as HF drops an all-ones mask), the LM head on the last position
  only (``logits_to_keep=1``). The eager cache (:class:`PreallocatedLayer`) writes into tensors
  sized for the whole answer and hands attention the filled part, so attention sees the same
  shapes as with HF's concatenating ``DynamicLayer``; only the copying is gone.
* **Sampling equals HF ``generate`` for the same seed.** The same warpers (HF's own
  ``TemperatureLogitsWarper`` and ``TopPLogitsWarper``), one ``torch.multinomial`` over the
  whole batch per step, finished rows fed the pad token: the random stream is consumed as HF
  consumes it.
* **Compiled step (``compile=True``).** The one-token step goes through ``torch.compile`` over
  HF's ``StaticCache`` with a 4-D boolean mask built here, so every step has the same shapes and
  compiles once per (model, batch size, cache length). Attention then reads the whole cache
  with the unfilled slots masked, which can change the last bits of a logit; greedy identity
  with HF is tested for the eager path, measured for the compiled one
  (``benchmarks/decode.py``). Off by default: see docs/decoding.md for the measurement.
* **What it does not take.** Encoder-decoders, peft prompt and p-tuning (virtual tokens),
  sliding-window or hybrid caches, models without ``logits_to_keep``, and generation configs
  that would add logits processors HF applies and this loop does not (``repetition_penalty``,
  ``no_repeat_ngram_size``, forced or suppressed tokens, ...): :func:`unsupported_reason` names
  the reason and the caller falls back to ``model.generate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

# Generation-config fields that make HF add a logits processor this loop does not apply, with
# the values that add none. Not listed: what every caller passes to HF explicitly
# (repetition_penalty=1.0, top_k=0, temperature, top_p), so a model's own value never applied.
_NO_PROCESSOR = {
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "sequence_bias": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "exponential_decay_length_penalty": (None,),
    "remove_invalid_values": (None, False),
    "renormalize_logits": (None, False),
    "watermarking_config": (None,),
    "guidance_scale": (None, 1.0),
    "num_beams": (None, 1),
    "min_p": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "top_h": (None,),
}


def unsupported_reason(model: Any) -> str | None:
    """Why :func:`decode` cannot stand in for ``model.generate`` on ``model``; None when it can."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False) and not getattr(model, "_adapters_disabled", False):
        return "peft prompt learning"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "_supports_logits_to_keep") or not base._supports_logits_to_keep():
        return "the model's forward has no logits_to_keep"
    from transformers import DynamicCache

    try:
        layers = DynamicCache(config=base.config).layers
    except Exception as exc:  # a config the cache cannot read: let HF handle it
        return f"cache layout unknown ({type(exc).__name__})"
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return "sliding-window or hybrid cache"
    generation_config = getattr(base, "generation_config", None)
    for field, neutral in _NO_PROCESSOR.items():
        value = getattr(generation_config, field, None)
        if value not in neutral:
            return f"generation_config.{field} = {value!r} adds a logits processor"
    return None


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in tensors sized for the whole generation, (B, H, max_len, D);
    ``update`` writes the new columns in place and returns the filled part (a view), what HF's
    ``DynamicLayer`` returns after its ``torch.cat``. Built lazily from the first keys, as
    HF's layers are."""

    is_croppable = False

    def __init__(self, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, k_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_buffer = key_states.new_empty((batch, heads, self.max_len, k_dim))  # (B, H, max_len, D)
        self.value_buffer = value_states.new_empty((batch, heads, self.max_len, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.max_len:
            raise RuntimeError(f"the preallocated cache holds {self.max_len} positions, asked for {end}")
        self.key_buffer[:, :, self.length : end].copy_(key_states)
        self.value_buffer[:, :, self.length : end].copy_(value_states)
        self.length = end
        self.keys = self.key_buffer[:, :, :end]
        self.values = self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


def preallocated_cache(model: Any, max_len: int):
    """An HF ``Cache`` of :class:`PreallocatedLayer`, one per decoder layer of ``model``."""
    config = model.config.get_text_config(decoder=True)
    return Cache(layers=[PreallocatedLayer(max_len) for _ in range(config.num_hidden_layers)])


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _sampler(temperature: float, top_p: float):
    """HF's own warpers for these settings, in HF's order (temperature, then top-p), so the
    scores sampled from are HF's bit for bit; None when greedy."""
    if temperature <= 0:
        return None
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return warpers


CACHE_BUCKET = 128
"""The compiled path's static cache length is the prompt width plus ``max_new_tokens``, rounded
up to a multiple of this, so batches of different prompt lengths share one compiled step."""


class _CompiledStep:
    """The one-token step over a ``StaticCache``, compiled once per model. Shapes are fixed by
    (batch size, cache length), so each new pair compiles once; its cache is kept and reset
    between calls, so the compiled step always sees the same tensors."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.forward = torch.compile(model.forward, dynamic=False, fullgraph=False)
        self.caches: dict[tuple[int, int], Any] = {}

    def cache(self, batch: int, max_len: int) -> Any:
        from transformers import StaticCache

        key = (batch, max_len)
        cache = self.caches.get(key)
        if cache is None:
            cache = self.caches[key] = StaticCache(config=_base(self.model).config, max_cache_len=max_len)
            cache.instructkit_len = max_len
        else:
            cache.reset()
        return cache

    def __call__(self, ids, positions, mask, cache):
        out = self.forward(
            input_ids=ids, position_ids=positions, attention_mask=mask, past_key_values=cache, use_cache=True,
            logits_to_keep=1,
        )  # fmt: skip
        return out.logits[:, -1]


_COMPILED: dict[int, _CompiledStep] = {}


def compiled_step(model: Any) -> _CompiledStep:
    """The compiled step of ``model`` (kept for the model's lifetime in this process)."""
    key = id(model)
    step = _COMPILED.get(key)
    if step is None or step.model is not model:
        step = _COMPILED[key] = _CompiledStep(model)
    return step


@torch.inference_mode()
def decode(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    min_new_tokens: int = 0,
    stop_strings: Sequence[str] = (),
    tokenizer: Any = None,
    compile: bool = False,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """The new tokens for left-padded prompts ``input_ids`` (B, T) with ``attention_mask`` (B, T)
    (0 on padding): (B, n), n <= ``max_new_tokens``. A row ends at its first token in
    ``stop_ids`` (kept) or once its text holds one of ``stop_strings``; later columns of an ended
    row are ``pad_id``, and the loop ends when every row has. ``min_new_tokens`` forbids the stop
    ids before that many tokens, as HF's ``MinNewTokensLengthLogitsProcessor`` does (the
    benchmark uses it so every row decodes the same count). Sampling draws from the global
    generator: the caller seeds it (``generation.generate`` forks and seeds it).
    ``return_logits`` also returns each step's raw logits, (B, V) float32 before any warper, as
    HF's ``output_logits`` does (the PPO rollout's log-probs and entropies read them)."""
    batch, width = input_ids.shape
    device = input_ids.device
    warpers = _sampler(temperature, top_p)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    max_len = width + max_new_tokens
    mask = attention_mask.to(torch.long)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, T), as HF derives them
    padded = bool((mask == 0).any())

    if compile:
        step_fn, cache = _static_step(model, batch, max_len, mask, device)
    else:
        cache = preallocated_cache(_base(model), max_len)
        step_fn = None
    out = model(
        input_ids=input_ids, attention_mask=step_mask(cache, mask, padded, width) if compile else (mask if padded else None),
        position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1,
    )  # fmt: skip
    logits = out.logits[:, -1]
    del out
    last_pos = positions[:, -1:]  # (B, 1)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    columns: list[torch.Tensor] = []
    raw: list[torch.Tensor] = []
    texts_done = [False] * batch
    for t in range(max_new_tokens):
        scores = logits.to(dtype=torch.float32)
        if return_logits:
            raw.append(scores)
        if t < min_new_tokens:
            scores = scores.clone()
            scores[:, stops] = -float("inf")
        if warpers is None:
            token = scores.argmax(dim=-1)  # (B,)
        else:
            for warp in warpers:
                scores = warp(None, scores)
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        token = torch.where(unfinished, token, pad_id)
        columns.append(token)
        unfinished &= ~torch.isin(token, stops)
        if stop_strings:
            _stop_on_strings(tokenizer, columns, stop_strings, unfinished, texts_done)
        if t + 1 == max_new_tokens or not bool(unfinished.any()):
            break
        last_pos = last_pos + 1
        ids = token[:, None]
        if compile:
            logits = step_fn(ids, last_pos, step_mask(cache, mask, True, width + t + 1), cache)
        else:
            if padded:
                mask = torch.cat((mask, mask.new_ones(batch, 1)), dim=1)
            out = model(
                input_ids=ids, attention_mask=mask if padded else None, position_ids=last_pos, past_key_values=cache,
                use_cache=True, logits_to_keep=1,
            )  # fmt: skip
            logits = out.logits[:, -1]
            del out
    tokens = torch.stack(columns, dim=1)  # (B, n)
    return (tokens, raw) if return_logits else tokens


def _stop_on_strings(tokenizer, columns, stop_strings, unfinished, texts_done) -> None:
    """Mark rows whose text now holds a stop string as finished. Text after a stop string is cut
    by ``generation.decode_response`` anyway, so ending a row here (never before its first stop
    string) leaves the returned text as HF's ``StopStringCriteria`` would."""
    rows = [b for b in range(len(texts_done)) if bool(unfinished[b])]
    if not rows:
        return
    new = torch.stack(columns, dim=1)
    for b in rows:
        text = tokenizer.decode(new[b].tolist(), skip_special_tokens=True)
        if any(s in text for s in stop_strings):
            unfinished[b] = False
            texts_done[b] = True


# ----------------------------------------------------------------------------------------------
# The compiled path: HF's StaticCache and a 4-D mask


def _static_step(model: Any, batch: int, max_len: int, mask: torch.Tensor, device: Any):
    step = compiled_step(model)
    cache = step.cache(batch, -(-max_len // CACHE_BUCKET) * CACHE_BUCKET)
    # Which cache slots hold a real token: the prompt's non-padding columns now, each new
    # column as it is written. (B, cache length)
    cache.instructkit_valid = torch.zeros((batch, cache.instructkit_len), dtype=torch.bool, device=device)
    cache.instructkit_valid[:, : mask.shape[1]] = mask.bool()
    return step, cache


def step_mask(cache: Any, mask: torch.Tensor, padded: bool, length: int) -> torch.Tensor:
    """The 4-D boolean mask (B, 1, q, max_len) for the static cache: a query at slot p sees the
    valid slots up to p. ``length`` is the number of slots filled once this step has run."""
    valid = cache.instructkit_valid
    width = mask.shape[1]
    if length > width:  # a decode step: slot length-1 becomes valid
        valid[:, length - 1] = True
        return valid[:, None, None, :].clone()
    slots = torch.arange(valid.shape[1], device=valid.device)
    causal = slots[None, :] <= torch.arange(width, device=valid.device)[:, None]  # (T, max_len)
    return (valid[:, None, None, :] & causal[None, None]).clone()


# ----------------------------------------------------------------------------------------------
# Reduced-precision weights


PRECISIONS = ("fp32", "bf16", "int8")
"""Weight precisions a model can be decoded in: as loaded (fp32 on CPU), a bf16 copy, or a copy
with torchao's int8 weight-only linear layers (activations stay in the model's dtype)."""


def reduced_precision(model: Any, precision: str) -> Any:
    """``model`` itself for ``fp32``; otherwise a copy with its weights in ``precision``. A peft
    model is merged into its base first (the copy decodes what the adapter would)."""
    import copy

    if precision not in PRECISIONS:
        from instructkit.errors import InputError

        raise InputError(f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})", field="precision")
    if precision == "fp32":
        return model
    low = copy.deepcopy(model)
    if hasattr(low, "merge_and_unload"):
        low = low.merge_and_unload()
    if precision == "bf16":
        return low.to(torch.bfloat16)
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(low, Int8WeightOnlyConfig())
    return low
