"""Token ids to pre-training examples and batches: BERT's masking rule and next-sentence pairs,
XLNet's factorisation orders, and packing text into fixed-length blocks for causal LM.

Everything random is drawn here from a seeded ``torch.Generator``, once, when examples are made
(static masking, as BERT's original data pipeline with one duplicate). The collators are then
deterministic, so an example's loss count is known before its batch is built (the engine's
exact accumulation needs it) and a resumed run sees the same batches as an uninterrupted one.

Choices, each as its paper or reference code makes it:

* MLM (Devlin et al. 2019, section 3.1; ``create_pretraining_data.py``): a sequence with ``n``
  maskable tokens (not special, not padding) gets ``k = max(1, round(0.15 n))`` chosen tokens;
  with whole-word masking the candidates are words, taken in a random order, and a word that
  would take the count past ``k`` is skipped (so a word is never split, and the count may end
  just under ``k``). Each chosen token becomes [MASK] with probability 0.8, a token drawn
  uniformly from the whole vocabulary with 0.1, and stays itself with 0.1.
* NSP: pairs of consecutive segments of one document; with probability 0.5 the second segment
  is replaced by a uniformly drawn segment of another document (label 1, as transformers'
  ``next_sentence_label``). ``[CLS] A [SEP] B [SEP]``, ``token_type_ids`` 0 for [CLS] A [SEP]
  and 1 for B [SEP]; too long pairs lose tokens from the end of the longer segment.
* PLM (Yang et al. 2019, section 2.3, partial prediction): a uniformly random order of the
  maskable positions; the last ``max(1, round(n / K))`` of the order are predicted (K = 6 by
  default, as XLNet's ``plm_probability = 1/6``). Context tokens (specials, padding and the
  unpredicted) may be seen by every position and see no predicted one; a predicted position
  sees the context and the predicted positions earlier in the order. Input tokens are not
  replaced (XLNet's query stream never sees its own token, so no [MASK] is needed).
* CLM: documents concatenated with eos after each, cut into blocks of ``block_size`` tokens;
  the tail shorter than a block is dropped. Positions run on across documents and attention
  crosses them (GPT-2's and transformers' ``run_clm`` grouping): the eos marks the boundary,
  every token trains, and no 4-D mask is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from instructkit.errors import InputError

IGNORE_INDEX = -100

# ----------------------------------------------------------------------------------------------
# Masked LM


def maskable_positions(
    input_ids: torch.Tensor, special_ids: Sequence[int], attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(..., T) bool: positions MLM/PLM may choose, i.e. neither a special token nor padding."""
    keep = ~torch.isin(input_ids, torch.as_tensor(list(special_ids), dtype=input_ids.dtype))
    if attention_mask is not None:
        keep &= attention_mask.bool()
    return keep


def word_ids_from_wordpiece(tokens: Sequence[str], special_tokens: Sequence[str] = ()) -> list[int | None]:
    """Word index of each WordPiece token: a ``##`` token continues the previous word; special
    tokens belong to no word (None), like a fast tokenizer's ``word_ids()``."""
    specials, out, word = set(special_tokens), [], -1
    for tok in tokens:
        if tok in specials:
            out.append(None)
            continue
        if not (tok.startswith("##") and word >= 0):
            word += 1
        out.append(word)
    return out


def _units(maskable: torch.Tensor, word_ids: Sequence[int | None] | None) -> list[list[int]]:
    """Candidate units: single maskable positions, or runs of adjacent maskable positions with
    one word id (a pair encoding restarts word ids in its second segment; runs keep them apart)."""
    positions = maskable.nonzero().flatten().tolist()
    if word_ids is None:
        return [[p] for p in positions]
    units: list[list[int]] = []
    for p in positions:
        if word_ids[p] is None:
            raise InputError(f"maskable position {p} has no word id (is it a special token?)", field="word_ids")
        if units and units[-1][-1] == p - 1 and word_ids[p - 1] == word_ids[p]:
            units[-1].append(p)
        else:
            units.append([p])
    return units


def mlm_mask(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
    probability: float = 0.15,
    word_ids: Sequence[int | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of one sequence (the rule is in the module docstring).

    Args:
        input_ids: (T,) token ids.
        maskable: (T,) bool, from :func:`maskable_positions`.
        word_ids: per position, the word it belongs to (a fast tokenizer's ``word_ids()`` or
            :func:`word_ids_from_wordpiece`): whole-word masking; None masks tokens one by one.

    Returns: (inputs, labels), both (T,): inputs with the chosen tokens replaced; labels the
    original id at chosen positions and -100 elsewhere.
    """
    if not 0.0 < probability < 1.0:
        raise InputError(f"mlm probability must be in (0, 1), got {probability}", field="mlm_probability")
    units = _units(maskable, word_ids)
    n = sum(len(u) for u in units)
    inputs, labels = input_ids.clone(), torch.full_like(input_ids, IGNORE_INDEX)
    if n == 0:
        return inputs, labels
    k = max(1, int(n * probability + 0.5))
    chosen: list[int] = []
    for u in torch.randperm(len(units), generator=generator).tolist():
        if len(chosen) + len(units[u]) <= k:
            chosen.extend(units[u])
            if len(chosen) == k:
                break
    at = torch.tensor(sorted(chosen), dtype=torch.long)
    labels[at] = input_ids[at]
    draw = torch.rand(len(at), generator=generator)
    random_ids = torch.randint(vocab_size, (len(at),), generator=generator, dtype=input_ids.dtype)
    inputs[at[draw < 0.8]] = mask_token_id
    swap = (draw >= 0.8) & (draw < 0.9)
    inputs[at[swap]] = random_ids[swap]
    return inputs, labels


# ----------------------------------------------------------------------------------------------
# Next-sentence prediction


@dataclass(frozen=True)
class SentencePair:
    a: list[int]
    b: list[int]
    is_random: int  # 1: b is a random segment of another document (next_sentence_label 1)
    a_from: tuple[int, int]  # (document, segment) of a
    b_from: tuple[int, int]  # (document, segment) of b


def nsp_pairs(
    documents: Sequence[Sequence[Sequence[int]]], generator: torch.Generator, random_probability: float = 0.5
) -> list[SentencePair]:
    """One pair per two consecutive segments of a document; with ``random_probability`` the
    second is replaced by a uniformly drawn segment of a uniformly drawn *other* document."""
    nonempty = [d for d, segs in enumerate(documents) if len(segs) > 0]
    if len(nonempty) < 2:
        raise InputError("next-sentence pairs need at least two documents with text", field="data.path")
    pairs = []
    for d, segs in enumerate(documents):
        for i in range(len(segs) - 1):
            if float(torch.rand((), generator=generator)) < random_probability:
                others = [o for o in nonempty if o != d]
                o = others[int(torch.randint(len(others), (), generator=generator))]
                j = int(torch.randint(len(documents[o]), (), generator=generator))
                pairs.append(SentencePair(list(segs[i]), list(documents[o][j]), 1, (d, i), (o, j)))
            else:
                pairs.append(SentencePair(list(segs[i]), list(segs[i + 1]), 0, (d, i), (d, i + 1)))
    return pairs


def bert_pair(a: Sequence[int], b: Sequence[int], *, cls_id: int, sep_id: int, max_length: int) -> dict[str, list[int]]:
    """``[CLS] A [SEP] B [SEP]`` with ``token_type_ids`` (0 up to the first [SEP], 1 after);
    the longer segment loses tokens from its end until the pair fits ``max_length``."""
    if max_length < 5:
        raise InputError(f"max_length {max_length} cannot hold [CLS] a [SEP] b [SEP]", field="max_length")
    a, b = list(a), list(b)
    while len(a) + len(b) + 3 > max_length:
        (a if len(a) >= len(b) else b).pop()
    ids = [cls_id, *a, sep_id, *b, sep_id]
    return {"input_ids": ids, "token_type_ids": [0] * (len(a) + 2) + [1] * (len(b) + 1)}


# ----------------------------------------------------------------------------------------------
# Permutation LM


def plm_order(
    maskable: torch.Tensor, generator: torch.Generator, predict_fraction: float = 1 / 6
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's factorisation order with partial prediction.

    Returns (rank, predicted), both (T,): ``predicted`` marks the last ``max(1, round(n *
    predict_fraction))`` maskable positions of a uniformly random order; ``rank`` is each
    predicted position's place among the predicted (0 first), and -1 for every context position
    (all context comes before every predicted position, and context positions see each other).
    """
    if not 0.0 < predict_fraction <= 1.0:
        raise InputError(f"predict fraction must be in (0, 1], got {predict_fraction}", field="plm_probability")
    positions = maskable.nonzero().flatten()
    rank = torch.full(maskable.shape, -1, dtype=torch.long)
    predicted = torch.zeros(maskable.shape, dtype=torch.bool)
    if len(positions) == 0:
        return rank, predicted
    order = positions[torch.randperm(len(positions), generator=generator)]
    k = max(1, int(len(positions) * predict_fraction + 0.5))
    targets = order[len(order) - k :]
    rank[targets] = torch.arange(k)
    predicted[targets] = True
    return rank, predicted


def perm_mask_from_order(rank: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """(..., T, T) float: ``[i, j] = 1`` (i may not attend to j) iff j is predicted and j is not
    earlier than i in the order (XLNetModel's ``perm_mask``; the diagonal of a predicted position
    is 1, and XLNet's content stream adds it back itself)."""
    return (predicted[..., None, :] & (rank[..., None, :] >= rank[..., :, None])).float()


def plm_collate(examples: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Examples with ``input_ids``, ``rank`` and ``predicted`` (lists, from :func:`plm_order`) to
    XLNetLMHeadModel's inputs: ``input_ids``/``attention_mask`` (B, T), ``perm_mask`` (B, T, T),
    ``target_mapping`` (B, P, T) with row p one-hot at the p-th predicted position (by position),
    ``labels`` (B, P); P is the batch's most predicted positions, shorter rows padded with zero
    rows of ``target_mapping`` and labels of -100. Padding is context that nobody attends
    (``attention_mask`` 0)."""
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    rank = torch.full((B, T), -1, dtype=torch.long)
    predicted = torch.zeros((B, T), dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[b, :n] = torch.tensor(e["input_ids"])
        mask[b, :n] = 1
        rank[b, :n] = torch.tensor(e["rank"])
        predicted[b, :n] = torch.tensor(e["predicted"], dtype=torch.bool)
    P = max(1, int(predicted.sum(1).max()))
    target_mapping = torch.zeros((B, P, T))
    labels = torch.full((B, P), IGNORE_INDEX, dtype=torch.long)
    for b in range(B):
        where = predicted[b].nonzero().flatten()
        target_mapping[b, torch.arange(len(where)), where] = 1.0
        labels[b, : len(where)] = ids[b, where]
    perm_mask = perm_mask_from_order(rank, predicted)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "perm_mask": perm_mask,
        "target_mapping": target_mapping,
        "labels": labels,
    }


# ----------------------------------------------------------------------------------------------
# Causal LM: packing into blocks


def pack_blocks(documents: Sequence[Sequence[int]], block_size: int, eos_id: int) -> tuple[list[list[int]], int]:
    """Documents, each followed by eos, concatenated and cut into ``block_size`` blocks.

    Returns (blocks, dropped): the full blocks and the number of tokens in the dropped tail.
    """
    if block_size < 2:
        raise InputError(f"block size must be at least 2, got {block_size}", field="max_length")
    stream = [t for doc in documents for t in (*doc, eos_id)]
    n = len(stream) // block_size
    return [stream[i * block_size : (i + 1) * block_size] for i in range(n)], len(stream) - n * block_size


# ----------------------------------------------------------------------------------------------
# Padding for the encoder objectives


def pad_encoder_batch(examples: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (pad id), ``labels`` (-100, when present) and ``token_type_ids``
    (0, when present) to (B, T), with ``attention_mask``; ``next_sentence_label`` stacks to (B,)."""
    T = max(len(e["input_ids"]) for e in examples)
    out: dict[str, torch.Tensor] = {}
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "token_type_ids": 0}
    for key, value in fill.items():
        if key in examples[0]:
            out[key] = torch.tensor([list(e[key]) + [value] * (T - len(e[key])) for e in examples], dtype=torch.long)
    out["attention_mask"] = torch.tensor(
        [[1] * len(e["input_ids"]) + [0] * (T - len(e["input_ids"])) for e in examples]
    )
    if "next_sentence_label" in examples[0]:
        out["next_sentence_label"] = torch.tensor([e["next_sentence_label"] for e in examples], dtype=torch.long)
    return out
