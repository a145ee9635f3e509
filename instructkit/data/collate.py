"""Batching tokenized examples: padding, and packing several examples into one row.

Padding (:func:`pad_batch`) pads ``input_ids`` with the pad id, ``attention_mask`` with 0 and
``labels`` with -100, so padding is never trained whatever the pad id is (pad == eos included).

Packing (:func:`pack_examples`, :func:`collate_packed`) concatenates examples into rows of at
most ``max_length`` tokens. A packed row must compute exactly what its examples compute alone,
so at every example boundary:

* attention does not cross: a 4-D block-diagonal causal mask (:func:`packed_attention_mask`);
* positions restart at 0: ``position_ids`` per example, so RoPE sees each example from 0;
* the loss does not cross: the first label of each example is -100, because the model predicts
  ``labels[t]`` from the token at ``t - 1``, which belongs to the previous example.

How transformers (5.x) reads these: a 4-D ``attention_mask`` is used as is by eager and SDPA
attention (``masking_utils._preprocess_mask_arguments`` returns it untouched), so it must be
causal itself, additive (0 to attend, a large negative number not to), and in the dtype the
attention computes in. The last is not cosmetic: on CUDA (H100, torch 2.11, transformers 5.17)
SDPA with bf16 or fp16 weights and a float32 mask returns NaN logits without an error, while
eager attention and autocast (which casts the mask) are fine. Pass ``dtype=model.dtype``.
Alternatively :attr:`PackedAttention.POSITION_IDS` passes no mask at all; transformers then
finds the example boundaries from where ``position_ids`` restart (``find_packed_sequence_indices``)
and flash-attention uses them as variable-length sequences. That detection runs only when the
mask is None *and there is no KV cache*: a 2-D all-ones mask, or ``use_cache`` left at its
default True (the model then makes an empty cache), silently lets attention cross examples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from instructkit.data.templates import IGNORE_INDEX


def _get(example: Any, name: str) -> list[int]:
    return list(example[name] if isinstance(example, Mapping) else getattr(example, name))


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def pad_batch(
    examples: Sequence[Any],
    pad_id: int,
    side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad examples (anything with ``input_ids`` and ``labels``) to one (B, T) batch.

    ``side="left"`` puts padding before the tokens, as generation needs; training uses
    ``"right"``. Returns ``input_ids`` (B, T), ``attention_mask`` (B, T, 1 = token, 0 = pad)
    and ``labels`` (B, T, -100 on padding).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', not {side!r}")
    if not examples:
        raise ValueError("cannot pad an empty batch")
    ids = [_get(e, "input_ids") for e in examples]
    labels = [_get(e, "labels") for e in examples]
    length = _round_up(max(len(x) for x in ids), pad_to_multiple_of)
    out_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    out_labels = torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.long)
    for b, (x, y) in enumerate(zip(ids, labels)):
        if len(x) != len(y):
            raise ValueError(f"example {b}: {len(x)} input_ids but {len(y)} labels")
        cols = slice(0, len(x)) if side == "right" else slice(length - len(x), length)
        out_ids[b, cols] = torch.tensor(x, dtype=torch.long)
        out_labels[b, cols] = torch.tensor(y, dtype=torch.long)
        mask[b, cols] = 1
    return {"input_ids": out_ids, "attention_mask": mask, "labels": out_labels}


@dataclass
class Packed:
    """One packed row: several examples back to back.

    ``position_ids`` restart at 0 for each example; ``seq_lens`` are the examples' lengths in
    order, ``indices`` their places in the list given to :func:`pack_examples`, and
    ``segment_ids`` number each token's example from 1 (0 is left for padding).
    """

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def segment_ids(self) -> list[int]:
        return [s + 1 for s, n in enumerate(self.seq_lens) for _ in range(n)]

    def add(self, input_ids: Sequence[int], labels: Sequence[int], index: int = -1) -> None:
        self.input_ids += input_ids
        # The first token of an example is "predicted" from the last token of the one before.
        self.labels += [IGNORE_INDEX, *labels[1:]]
        self.position_ids += range(len(input_ids))
        self.seq_lens.append(len(input_ids))
        self.indices.append(index)


def pack_examples(examples: Sequence[Any], max_length: int) -> list[Packed]:
    """Pack examples into rows of at most ``max_length`` tokens, greedy first-fit.

    Each example, in order, goes into the first row with room for it, else a new row; the
    result depends only on the examples' order and lengths. Examples are never split: one
    longer than ``max_length`` is an error (truncate when encoding, with the same limit).
    """
    rows: list[Packed] = []
    for i, e in enumerate(examples):
        ids, labels = _get(e, "input_ids"), _get(e, "labels")
        if len(ids) != len(labels):
            raise ValueError(f"example {i}: {len(ids)} input_ids but {len(labels)} labels")
        if len(ids) > max_length:
            raise ValueError(f"example {i} has {len(ids)} tokens, more than max_length={max_length}")
        if not ids:
            continue
        row = next((r for r in rows if len(r) + len(ids) <= max_length), None)
        if row is None:
            row = Packed()
            rows.append(row)
        row.add(ids, labels, i)
    return rows


def packed_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive 4-D mask (B, 1, T, T) that is causal and block-diagonal over examples.

    ``segment_ids`` (B, T) numbers each token's example, 0 for padding. Query t may attend to
    key s iff ``s <= t`` and both belong to the same example; the mask is 0 there and
    ``finfo(dtype).min`` elsewhere (not -inf, which turns a fully masked row into NaN). Padding
    queries attend only to themselves, so their rows stay finite; no real token sees them.
    Naive equivalent::

        allowed[b, 0, t, s] = (s <= t) and seg[b, s] == seg[b, t] and (seg[b, t] > 0 or s == t)
    """
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device)
    causal = idx[None, :] <= idx[:, None]  # (T, T): key s <= query t
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    real = (segment_ids > 0)[:, :, None]  # (B, T, 1): the query is a real token
    eye = torch.eye(T, dtype=torch.bool, device=segment_ids.device)
    allowed = causal & same & (real | eye)  # (B, T, T)
    mask = torch.zeros((B, 1, T, T), dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class PackedAttention(str, Enum):
    """How a packed batch keeps attention inside each example."""

    BLOCK_MASK = "block-mask"
    """A 4-D additive mask (eager and SDPA attention)."""

    POSITION_IDS = "position-ids"
    """No mask: transformers splits rows where ``position_ids`` restart (flash-attention too)."""


def collate_packed(
    rows: Sequence[Packed],
    pad_id: int,
    pad_to_multiple_of: int | None = None,
    attention: PackedAttention | str = PackedAttention.BLOCK_MASK,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Batch packed rows for ``model(**batch)``.

    Returns ``input_ids``, ``labels`` and ``position_ids`` (B, T), right-padded, and either
    ``attention_mask``, the (B, 1, T, T) block mask in ``dtype`` (the model's dtype: a float32
    mask on a bf16 model gives NaN under CUDA SDPA, see the module docstring), or,
    with :attr:`PackedAttention.POSITION_IDS`, no mask and ``use_cache=False`` (without it the
    model builds a cache and skips the packed-sequence detection). Padding counts positions
    from 0 as one more segment, so it stays a sequence of its own in both modes.
    """
    attention = PackedAttention(attention)
    if not rows:
        raise ValueError("cannot collate an empty batch")
    length = _round_up(max(len(r) for r in rows), pad_to_multiple_of)
    B = len(rows)
    input_ids = torch.full((B, length), pad_id, dtype=torch.long)
    labels = torch.full((B, length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, length), dtype=torch.long)
    segments = torch.zeros((B, length), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r)
        input_ids[b, :n] = torch.tensor(r.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(r.labels, dtype=torch.long)
        positions[b, :n] = torch.tensor(r.position_ids, dtype=torch.long)
        positions[b, n:] = torch.arange(length - n)
        segments[b, :n] = torch.tensor(r.segment_ids, dtype=torch.long)
    batch: dict[str, Any] = {"input_ids": input_ids, "position_ids": positions, "labels": labels}
    if attention is PackedAttention.BLOCK_MASK:
        batch["attention_mask"] = packed_attention_mask(segments, dtype)
    else:
        batch["use_cache"] = False
    return batch


# ----------------------------------------------------------------------------------------------
# Collate functions of the stages: encoded examples (see instructkit.data.encoders) to tensors


def lm_collate(pad_id: int, packed: bool = False) -> Callable[[list[Any]], dict[str, Any]]:
    """LM examples (SFT, PPO-ptx, perplexity) as one right-padded batch, or packed rows."""
    if packed:
        return lambda batch: collate_packed(batch, pad_id=pad_id)
    return lambda batch: pad_batch(batch, pad_id=pad_id, side="right")


def ranking_collate(pad_id: int) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """All responses of the batch's rankings as one right-padded (N, T) batch, with each
    response's prompt index (``group``) and rank."""

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [ids for example in batch for ids in example["input_ids"]]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            attention_mask[i, : len(r)] = 1
        group = torch.tensor([g for g, example in enumerate(batch) for _ in example["input_ids"]])
        rank = torch.tensor([r for example in batch for r in example["ranks"]])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "group": group, "rank": rank}

    return collate


def preference_collate(pad_id: int) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Pairs: all chosen rows then all rejected rows, one right-padded (2B, T) batch, so both go
    through the model in one forward pass. Unpaired: (B, T) plus a desirable/undesirable label.
    Precomputed reference log-probs (``example["ref"]``) become ``ref_logps`` in the same order."""

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        paired = "chosen" in batch[0]
        rows = (
            ([e["chosen"] for e in batch] + [e["rejected"] for e in batch])
            if paired
            else [e["completion"] for e in batch]
        )
        out = pad_batch([{"input_ids": ids, "labels": labels} for ids, labels in rows], pad_id=pad_id)
        if "ref" in batch[0]:
            refs = [e["ref"] for e in batch]
            out["ref_logps"] = torch.tensor(
                [r[0] for r in refs] + ([r[1] for r in refs] if paired else []), dtype=torch.float64
            )
        if not paired:
            out["desirable"] = torch.tensor([bool(e["label"]) for e in batch])
        return out

    return collate
