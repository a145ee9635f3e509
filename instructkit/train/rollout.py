"""Rollouts for PPO, GRPO and RLOO: sampling responses together with their log-probs, and the
full forward passes that recompute log-probs and values for the same tokens during training.

What this module owns is the agreement between the two. PPO's ratio ``pi_new / pi_old`` is 1
before the first update only if the training pass scores each token exactly as the sampling pass
did, so both sides:

* take log-probs of ``logits / temperature`` over the whole vocabulary (top-p truncation shapes
  which tokens are drawn, not the log-probs, as in TRL and OpenRLHF);
* see the same positions: prompts are left-padded and position ids count real tokens only
  (``cumsum(attention_mask) - 1``, what ``generate`` derives for left-padded rows);
* see the same context: a response's attention mask ends at its stop token, so the padding
  written after it never reaches a scored position.

Layout of a :class:`Rollout`: ``N`` sequences, prompts left-padded to width ``P``, responses
right-padded to width ``R``; per-token tensors are (N, R) and aligned with the response tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass
class Rollout:
    """One batch of sampled sequences in a single padded layout."""

    query_responses: torch.Tensor  # (N, P + R) prompt ids (left-padded) then response ids (right-padded)
    attention_mask: torch.Tensor  # (N, P + R) 1 on prompt tokens and on response tokens up to the stop token
    response_mask: torch.Tensor  # (N, R) 1 on response tokens up to and including the stop token
    logprobs: torch.Tensor  # (N, R) log pi_old(token) at the sampling temperature, 0 on padding
    entropy: torch.Tensor  # (N, R) entropy of the sampling distribution at each token, 0 on padding
    ended: torch.Tensor  # (N,) bool: the response ends with a stop token (not cut at max_new_tokens)
    prompt_width: int  # P

    def __len__(self) -> int:
        return self.query_responses.size(0)

    @property
    def width(self) -> int:
        """R, the response width."""
        return self.response_mask.size(1)

    @property
    def responses(self) -> torch.Tensor:
        return self.query_responses[:, self.prompt_width :]  # (N, R)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)  # (N,)

    def select(self, rows: torch.Tensor | Sequence[int]) -> Rollout:
        """The given rows, with the columns that are padding in all of them cut off (left of
        the prompts, right of the responses). Slice other per-token tensors as ``t[rows, :width]``."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.query_responses.device)
        mask = self.attention_mask[rows]
        used = (mask[:, : self.prompt_width].sum(0) > 0).nonzero()
        left = int(used[0]) if used.numel() else self.prompt_width
        width = max(int(self.response_mask[rows].sum(1).max()), 1)
        end = self.prompt_width + width
        return Rollout(
            self.query_responses[rows, left:end],
            mask[:, left:end],
            self.response_mask[rows, :width],
            self.logprobs[rows, :width],
            self.entropy[rows, :width],
            self.ended[rows],
            self.prompt_width - left,
        )

    def to(self, device) -> Rollout:
        return replace(
            self,
            **{
                k: getattr(self, k).to(device)
                for k in ("query_responses", "attention_mask", "response_mask", "logprobs", "entropy", "ended")
            },
        )


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, as ``generate`` assigns them to left-padded rows."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------------------------
# Sampling


@torch.no_grad()
def sample(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    stop_ids: Sequence[int],
    pad_id: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
) -> Rollout:
    """Sample one response per prompt (token ids, used as given) with the KV cache, keeping the
    log-prob and entropy of every sampled token from the sampling pass itself.

    Sampling draws from ``softmax(logits / temperature)`` restricted to the top-p nucleus; no
    other logits processor runs (the model's own generation config is not used, so no hidden
    top-k or repetition penalty). The random stream is forked and seeded by ``seed``, so a
    rollout depends only on the weights and the seed (what makes resume exact).
    """
    from transformers import GenerationConfig

    from instructkit.decoding import decode, unsupported_reason
    from instructkit.generation import generate_new, left_pad

    fast = unsupported_reason(model) is None
    device = next(model.parameters()).device
    config = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        repetition_penalty=1.0,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    stops = torch.tensor(list(stop_ids), device=device)
    rows: list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor, bool]] = []
    was_training = model.training
    model.eval()
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                chunk = [list(p) for p in prompts[start : start + batch_size]]
                input_ids, attention_mask = left_pad(chunk, pad_id, device)  # (B, P)
                if fast:  # instructkit.decoding: HF's tokens and logits for the same seed, faster
                    new, step_logits = decode(
                        model, input_ids, attention_mask, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                        pad_id=pad_id, temperature=temperature, top_p=top_p, return_logits=True,
                    )  # fmt: skip
                else:
                    out, width = generate_new(model, input_ids, attention_mask, generation_config=config)
                    new, step_logits = out.sequences[:, width:], out.logits  # (B, R'), R' x (B, V)
                logprobs = torch.empty(new.shape, dtype=torch.float32, device=device)
                entropy = torch.empty(new.shape, dtype=torch.float32, device=device)
                for t, logits in enumerate(step_logits):  # R' tensors of (B, V): one (B, V) block at a time
                    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
                    logprobs[:, t] = logp.gather(1, new[:, t : t + 1]).squeeze(1)
                    entropy[:, t] = -(logp.exp() * logp).sum(-1)
                is_stop = torch.isin(new, stops)
                for b, prompt in enumerate(chunk):
                    hits = is_stop[b].nonzero()
                    n = int(hits[0]) + 1 if hits.numel() else new.size(1)
                    rows.append((prompt, new[b, :n], logprobs[b, :n], entropy[b, :n], bool(hits.numel())))
    finally:
        model.train(was_training)
    return _collate(rows, pad_id, device)


def _collate(rows, pad_id: int, device) -> Rollout:
    width_p = max(len(r[0]) for r in rows)
    width_r = max(max(len(r[1]) for r in rows), 1)
    n = len(rows)
    qr = torch.full((n, width_p + width_r), pad_id, dtype=torch.long, device=device)
    am = torch.zeros((n, width_p + width_r), dtype=torch.long, device=device)
    rm = torch.zeros((n, width_r), dtype=torch.float32, device=device)
    lp = torch.zeros((n, width_r), dtype=torch.float32, device=device)
    ent = torch.zeros((n, width_r), dtype=torch.float32, device=device)
    for i, (prompt, response, logprobs, entropy, _ended) in enumerate(rows):
        p, r = len(prompt), len(response)
        qr[i, width_p - p : width_p] = torch.tensor(prompt, dtype=torch.long, device=device)
        qr[i, width_p : width_p + r] = response
        am[i, width_p - p : width_p + r] = 1
        rm[i, :r], lp[i, :r], ent[i, :r] = 1.0, logprobs, entropy
    ended = torch.tensor([r[4] for r in rows], dtype=torch.bool, device=device)
    return Rollout(qr, am, rm, lp, ent, ended, width_p)


# ----------------------------------------------------------------------------------------------
# Recomputing for training


def response_logprobs(model: nn.Module, batch: Rollout, temperature: float, chunk_size: int = 1024) -> torch.Tensor:
    """(N, R) log-probs of the response tokens under ``model`` at ``temperature``, 0 on padding.

    One full forward pass over prompt + response; only response positions are projected onto
    the vocabulary, a chunk at a time (:func:`instructkit.models.lm.outputs_at`). Differentiable.
    """
    from instructkit.models.lm import outputs_at

    p = batch.prompt_width
    mask = batch.response_mask.bool()  # (N, R)
    positions = torch.zeros_like(batch.attention_mask, dtype=torch.bool)  # (N, P + R)
    positions[:, p - 1 : -1] = mask  # position t - 1 predicts response token t
    out = outputs_at(
        model,
        positions,
        input_ids=batch.query_responses,
        attention_mask=batch.attention_mask,
        position_ids=position_ids(batch.attention_mask),
    )
    token_logps = out.log_probs(batch.responses[mask], chunk_size, temperature)  # (M,)
    scattered = torch.zeros(mask.shape, dtype=token_logps.dtype, device=token_logps.device)
    return scattered.masked_scatter(mask, token_logps)


def response_values(value_model: nn.Module, batch: Rollout) -> torch.Tensor:
    """(N, R) value of the state before each response token, from a one-label sequence
    classifier (a reward model's architecture) read at every position; 0 on padding."""
    from instructkit.models.lm import backbone_hidden

    base, hidden = backbone_hidden(
        value_model,
        input_ids=batch.query_responses,
        attention_mask=batch.attention_mask,
        position_ids=position_ids(batch.attention_mask),
    )  # (N, P + R, H)
    values = base.score(hidden[:, batch.prompt_width - 1 : -1]).squeeze(-1).float()  # (N, R)
    return values * batch.response_mask


@torch.no_grad()
def in_chunks(fn, batch: Rollout, size: int) -> torch.Tensor:
    """``fn`` (a per-token function of a Rollout) over ``batch`` in row chunks, without grad."""
    parts = []
    for start in range(0, len(batch), size):
        rows = torch.arange(start, min(start + size, len(batch)))
        part = fn(batch.select(rows))
        parts.append(torch.nn.functional.pad(part, (0, batch.width - part.size(1))))
    return torch.cat(parts)


@contextlib.contextmanager
def adapter_disabled(model: nn.Module):
    """The peft model with its adapter switched off (the reference of a LoRA policy)."""
    with model.disable_adapter():
        yield model
