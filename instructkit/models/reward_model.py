"""Reward models: a scalar head on a causal-LM backbone, read at the last real token.

A reward model is saved as a plain ``AutoModelForSequenceClassification`` folder (one label)
whose pad token differs from its end-of-turn token, so transformers itself reads the score at
the same place we do (the last non-pad token, which is the end-of-turn marker). The shift that
makes reference responses score 0 is stored in ``config.json`` as ``instructkit_reward_bias``
and applied by :func:`score`; plain transformers gives the unshifted score (same ordering).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

BIAS_KEY = "instructkit_reward_bias"


def distinct_pad_token(tokenizer, model: nn.Module | None = None) -> None:
    """Give the tokenizer a pad token that is not its eos/end-of-turn token (adding one if needed)."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    for candidate in (tokenizer.unk_token, "<|endoftext|>", "<pad>", "<|pad|>", "[PAD]"):
        if candidate and candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    if model is not None:
        model.resize_token_embeddings(len(tokenizer))


def reward_model_from_causal_lm(causal_lm: nn.Module, tokenizer) -> nn.Module:
    """A one-label sequence classifier sharing the causal LM's backbone weights; fresh head."""
    from transformers import AutoModelForSequenceClassification

    from instructkit.models.bottleneck import copy_adapters

    config = causal_lm.config
    config.num_labels = 1
    distinct_pad_token(tokenizer, causal_lm)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, dtype=causal_lm.dtype)
    copy_adapters(causal_lm, model)  # an SFT stage's bottleneck adapters come along (and keep training)
    prefix = model.base_model_prefix
    getattr(model, prefix).load_state_dict(getattr(causal_lm, prefix).state_dict())
    head = model.score if hasattr(model, "score") else None
    if head is not None:  # small init keeps initial rewards near 0 (InstructGPT/TRL practice)
        nn.init.normal_(head.weight, std=1.0 / (config.hidden_size + 1) ** 0.5)
    return model


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores (N,) of right-padded sequences (N, T), read at each one's last real token.

    A peft prompt-learning model sees its virtual tokens (``models.lm.virtual_token_inputs``).
    Read at the last real token, not where peft's own forward reads prompt-tuning rows: given
    embeddings, transformers cannot see the padding and scores the last column, padding or not.
    """
    from instructkit.models.lm import backbone_hidden

    base, hidden = backbone_hidden(model, input_ids=input_ids, attention_mask=attention_mask)  # (N, T, H)
    last = attention_mask.long().sum(-1) - 1  # (N,)
    picked = hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # (N, H)
    return base.score(picked).squeeze(-1).float()


PROMPT_ADAPTER = "prompt_adapter"  # a prompt-learning reward model's virtual tokens, beside its classifier


def load_reward_model(spec: str | os.PathLike, device: str | None = None):
    """(model, tokenizer, bias) from a reward-model folder or run folder."""
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification

    from instructkit.models.loading import default_device, load_tokenizer, resolve

    resolved = resolve(spec)
    path = Path(resolved.base)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    if resolved.bottleneck:  # bottleneck adapters saved beside the whole weights (models.bottleneck)
        from instructkit.models import bottleneck

        bottleneck.load(model, Path(resolved.bottleneck))
    if (path / PROMPT_ADAPTER / "adapter_config.json").is_file():  # virtual tokens saved beside (train.reward)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path / PROMPT_ADAPTER)
    model.to(device or default_device()).eval()
    tokenizer = load_tokenizer(path)
    return model, tokenizer, float(getattr(model.config, BIAS_KEY, 0.0) or 0.0)


def score(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[Any]],
    responses: Sequence[Sequence[Any]],
    *,
    bias: float = 0.0,
    batch_size: int = 16,
    template: str | None = None,
) -> list[float]:
    """Reward of each (prompt messages, response messages) pair, shifted by ``bias``."""
    from instructkit.data.collate import pad_batch
    from instructkit.data.templates import encode_prompt_response
    from instructkit.models.passes import no_grad_batches

    encoded = [
        encode_prompt_response(tokenizer, prompt, response, template=template)
        for prompt, response in zip(prompts, responses)
    ]
    out: list[float] = []
    collate = lambda chunk: pad_batch(chunk, pad_id=tokenizer.pad_token_id)
    for _, batch in no_grad_batches(model, encoded, collate, batch_size):
        out += [float(s) + bias for s in sequence_scores(model, batch["input_ids"], batch["attention_mask"])]
    return out
