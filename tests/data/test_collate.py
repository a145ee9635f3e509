"""Padding and packing: hand-checked tensors, and a tiny Llama whose packed logits must equal
the logits of each example run alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from instructkit.data.collate import (
    Packed,
    PackedAttention,
    collate_packed,
    pack_examples,
    packed_attention_mask,
    pad_batch,
)

X = -100  # IGNORE_INDEX, short for the tables below


# --- padding -------------------------------------------------------------------------------


def _examples():
    # pad_id 3 is also a real, trained token (the pad == eos case): labels must not care.
    return [
        {"input_ids": [5, 6, 3], "labels": [X, 6, 3]},
        {"input_ids": [7], "labels": [7]},
    ]


def test_pad_right():
    b = pad_batch(_examples(), pad_id=3)
    assert b["input_ids"].tolist() == [[5, 6, 3], [7, 3, 3]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[X, 6, 3], [7, X, X]]
    assert all(t.dtype == torch.long for t in b.values())


def test_pad_left_to_a_multiple():
    b = pad_batch(_examples(), pad_id=3, side="left", pad_to_multiple_of=4)
    assert b["input_ids"].tolist() == [[3, 5, 6, 3], [3, 3, 3, 7]]
    assert b["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert b["labels"].tolist() == [[X, X, 6, 3], [X, X, X, 7]]


def test_pad_rejects_bad_input():
    with pytest.raises(ValueError, match="side"):
        pad_batch(_examples(), pad_id=0, side="middle")
    with pytest.raises(ValueError, match="labels"):
        pad_batch([{"input_ids": [1, 2], "labels": [1]}], pad_id=0)


# --- packing -------------------------------------------------------------------------------


def _seq(n: int, start: int) -> dict:
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": ids}


def test_first_fit_packing_by_hand():
    """Lengths 7, 5, 9, 3 into rows of 16: 7 opens row 0; 5 fits (12); 9 does not (21), opens
    row 1; 3 fits in row 0 (15), the first row with room."""
    examples = [_seq(7, 1), _seq(5, 10), _seq(9, 20), _seq(3, 40)]
    rows = pack_examples(examples, max_length=16)
    assert [r.seq_lens for r in rows] == [[7, 5, 3], [9]]
    assert [r.indices for r in rows] == [[0, 1, 3], [2]]
    r = rows[0]
    assert r.input_ids == list(range(1, 8)) + list(range(10, 15)) + [40, 41, 42]
    assert r.position_ids == list(range(7)) + list(range(5)) + list(range(3))
    assert r.segment_ids == [1] * 7 + [2] * 5 + [3] * 3
    # The first token of each example is never a target: it would be predicted from the
    # previous example's last token.
    assert r.labels == [X, *range(2, 8), X, *range(11, 15), X, 41, 42]
    assert pack_examples(examples, max_length=16) == rows  # deterministic
    with pytest.raises(ValueError, match="more than max_length"):
        pack_examples([_seq(17, 0)], max_length=16)


def test_packed_attention_mask_by_hand():
    """Segments [1, 1, 2, 0]: token 1 sees 0 and 1; token 2 (a new example) sees only itself;
    the padding token 3 sees only itself."""
    mask = packed_attention_mask(torch.tensor([[1, 1, 2, 0]]))
    allowed = [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 1],
    ]
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == torch.float32
    assert (mask[0, 0] == 0).int().tolist() == allowed
    assert (mask[0, 0][mask[0, 0] != 0] == torch.finfo(torch.float32).min).all()
    assert packed_attention_mask(torch.tensor([[1, 0]]), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_collate_packed_pads_rows():
    rows = pack_examples([_seq(3, 1), _seq(2, 5), _seq(4, 9)], max_length=5)
    b = collate_packed(rows, pad_id=0, pad_to_multiple_of=8)
    assert b["input_ids"].tolist() == [[1, 2, 3, 5, 6, 0, 0, 0], [9, 10, 11, 12, 0, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert b["labels"].tolist() == [[X, 2, 3, X, 6, X, X, X], [X, 10, 11, 12, X, X, X, X]]
    assert b["attention_mask"].shape == (2, 1, 8, 8)
    c = collate_packed(rows, pad_id=0, attention="position-ids")
    assert "attention_mask" not in c and c["use_cache"] is False


# --- packing on a model --------------------------------------------------------------------

VOCAB = 61


def tiny_llama(attn: str):
    from transformers import LlamaForCausalLM

    from tests.tiny import tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config(VOCAB, max_position_embeddings=128, tie_word_embeddings=False)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def _random_examples(lengths):
    g = torch.Generator().manual_seed(1)
    return [
        {
            "input_ids": torch.randint(0, VOCAB, (n,), generator=g).tolist(),
            "labels": torch.randint(0, VOCAB, (n,), generator=g).tolist(),
        }
        for n in lengths
    ]


def _segments(logits: torch.Tensor, rows: list[Packed]):
    """(example index, its logits in the packed batch) for every example."""
    for b, row in enumerate(rows):
        offset = 0
        for i, n in zip(row.indices, row.seq_lens):
            yield i, logits[b, offset : offset + n]
            offset += n


@pytest.fixture(scope="module")
def packed_case():
    examples = _random_examples([7, 5, 9, 3, 6])
    rows = pack_examples(examples, max_length=16)
    assert [r.seq_lens for r in rows] == [[7, 5, 3], [9, 6]]
    return examples, rows


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", list(PackedAttention))
def test_packed_logits_equal_each_example_alone(packed_case, attn, mode):
    examples, rows = packed_case
    model = tiny_llama(attn)
    batch = collate_packed(rows, pad_id=0, pad_to_multiple_of=8, attention=mode)
    with torch.no_grad():
        packed = model(**batch).logits
        alone = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples]
    assert torch.isfinite(packed).all()  # padding rows too
    for i, seg in _segments(packed, rows):
        torch.testing.assert_close(seg, alone[i], atol=1e-5, rtol=0)


def test_without_the_block_mask_attention_leaks(packed_case):
    """The control that shows the check above can fail: with a plain 2-D mask (and the same
    restarted positions) every example after the first in a row sees the ones before it.

    (Restarted positions are checked by value above rather than here: RoPE scores depend only
    on relative positions, so inside a block mask a shifted start changes Llama's logits by
    rounding only. They matter to absolute-position models and to the position-ids mode, where
    they are how transformers finds the boundaries.)"""
    examples, rows = packed_case
    model = tiny_llama("sdpa")
    batch = collate_packed(rows, pad_id=0)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples]
        leak = model(
            input_ids=batch["input_ids"],
            attention_mask=torch.ones_like(batch["input_ids"]),
            position_ids=batch["position_ids"],
        ).logits
    first = {row.indices[0] for row in rows}
    for i, seg in _segments(leak, rows):
        diff = (seg - alone[i]).abs().max().item()
        assert diff < 1e-5 if i in first else diff > 1e-3, (i, diff)


def test_packed_loss_sums_each_examples_loss(packed_case):
    """Token-summed cross-entropy of the packed batch equals the sum over examples run alone:
    no target crosses an example boundary and padding is not trained."""
    examples, rows = packed_case
    model = tiny_llama("eager")
    batch = collate_packed(rows, pad_id=0, pad_to_multiple_of=8)

    def summed_ce(logits, labels):
        # (B, T-1, V) logits against (B, T-1) next-token labels, summed over targets
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum", ignore_index=X)

    with torch.no_grad():
        packed = summed_ce(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])
        alone = sum(
            summed_ce(model(input_ids=torch.tensor([e["input_ids"]])).logits, torch.tensor([e["labels"]]))
            for e in examples
        )
        n_targets = (batch["labels"][:, 1:] != X).sum().item()
    assert n_targets == sum(len(e["labels"]) - 1 for e in examples)
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-5)
