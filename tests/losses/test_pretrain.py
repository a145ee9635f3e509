"""Pre-training losses: hand-computed values on 3-token vocabularies, and parity with the
``labels=`` loss of tiny BertForPreTraining, XLNetLMHeadModel and LlamaForCausalLM."""

from __future__ import annotations

import math
import typing

import pytest
import torch

from instructkit.data.pretrain import (
    bert_pair,
    maskable_positions,
    mlm_mask,
    nsp_pairs,
    pack_blocks,
    pad_encoder_batch,
    plm_collate,
    plm_order,
)
from instructkit.losses.pretrain import (
    OBJECTIVES,
    bert_pretraining_loss,
    causal_lm_loss,
    masked_lm_loss,
    next_sentence_loss,
    permutation_lm_loss,
)
from instructkit.losses.token_ce import IGNORE_INDEX


def test_masked_lm_loss_by_hand():
    """Positions 0 and 2 are chosen. Position 0: logits (0, 0, 0), target 1: p = 1/3, loss ln 3.
    Position 2: logits (ln 2, 0, 0), target 0: p = 2/(2+1+1) = 1/2, loss ln 2. Position 1 is not
    chosen (its logits would give a large loss). Unshifted: position t predicts labels[t].
    Sum ln 3 + ln 2 = ln 6, count 2."""
    logits = torch.tensor([[[0.0, 0.0, 0.0], [9.0, -9.0, 0.0], [math.log(2.0), 0.0, 0.0]]])
    labels = torch.tensor([[1, IGNORE_INDEX, 0]])
    loss, n = masked_lm_loss(logits, labels)
    assert n.item() == 2
    assert loss.item() == pytest.approx(math.log(6.0), abs=1e-6)


def test_next_sentence_loss_by_hand():
    """Pair 0: logits (0, 0), label 1: ln 2. Pair 1: logits (ln 3, 0), label 1 (random):
    p = 1/(3+1) = 1/4, loss ln 4. Sum ln 8, count 2."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    loss, n = next_sentence_loss(logits, torch.tensor([1, 1]))
    assert n.item() == 2
    assert loss.item() == pytest.approx(math.log(8.0), abs=1e-6)


def test_permutation_lm_loss_by_hand():
    """Row 0 of P scores a predicted position: logits (0, ln 2, 0), target 1: p = 2/4, loss ln 2.
    Row 1 pads P (label -100). Sum ln 2, count 1."""
    logits = torch.tensor([[[0.0, math.log(2.0), 0.0], [5.0, 0.0, 0.0]]])
    loss, n = permutation_lm_loss(logits, torch.tensor([[1, IGNORE_INDEX]]))
    assert n.item() == 1
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_causal_lm_loss_by_hand():
    """Shifted: position 0 (logits 0, 0, 0) predicts labels[1] = 2: ln 3; position 1 (logits
    0, ln 3, 0) predicts labels[2] = 1: p = 3/5, loss ln(5/3); position 2 predicts nothing.
    Sum ln 3 + ln 5 - ln 3 = ln 5, count 2."""
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, math.log(3.0), 0.0], [7.0, 0.0, 0.0]]])
    loss, n = causal_lm_loss(logits, torch.tensor([[0, 2, 1]]))
    assert n.item() == 2
    assert loss.item() == pytest.approx(math.log(5.0), abs=1e-6)


def test_bert_pretraining_loss_is_two_means():
    """(ln 6)/2 from the MLM case above plus (ln 8)/2 from the NSP case."""
    mlm_logits = torch.tensor([[[0.0, 0.0, 0.0], [9.0, -9.0, 0.0], [math.log(2.0), 0.0, 0.0]]])
    nsp_logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    total = bert_pretraining_loss(mlm_logits, torch.tensor([[1, IGNORE_INDEX, 0]]), nsp_logits, torch.tensor([1, 1]))
    assert total.item() == pytest.approx(math.log(6.0) / 2 + math.log(8.0) / 2, abs=1e-6)


def test_objective_registry_matches_config_literal():
    from instructkit import config

    assert set(typing.get_args(config.PretrainObjective)) == set(OBJECTIVES)


# ----------------------------------------------------------------------------------------------
# Parity with transformers' own losses

VOCAB, PAD, CLS, SEP, MASK = 40, 0, 1, 2, 3


def _documents(g: torch.Generator, n_docs: int = 4, n_segs: int = 3) -> list[list[list[int]]]:
    return [
        [
            torch.randint(4, VOCAB, (int(torch.randint(3, 9, (), generator=g)),), generator=g).tolist()
            for _ in range(n_segs)
        ]
        for _ in range(n_docs)
    ]


def test_bert_for_pretraining_loss_equals_ours():
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    model = BertForPreTraining(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
            pad_token_id=PAD,
        )
    ).eval()
    g = torch.Generator().manual_seed(1)
    examples = []
    for pair in nsp_pairs(_documents(g), g):
        enc = bert_pair(pair.a, pair.b, cls_id=CLS, sep_id=SEP, max_length=16)
        ids = torch.tensor(enc["input_ids"])
        inputs, labels = mlm_mask(
            ids, maskable_positions(ids, [PAD, CLS, SEP, MASK]), mask_token_id=MASK, vocab_size=VOCAB, generator=g
        )
        examples.append(
            {**enc, "input_ids": inputs.tolist(), "labels": labels.tolist(), "next_sentence_label": pair.is_random}
        )
    batch = pad_encoder_batch(examples, PAD)
    assert len({len(e["input_ids"]) for e in examples}) > 1  # padding is exercised
    with torch.no_grad():
        out = model(**batch)
        ours = bert_pretraining_loss(
            out.prediction_logits, batch["labels"], out.seq_relationship_logits, batch["next_sentence_label"]
        )
    assert ours.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_xlnet_lm_head_loss_equals_ours():
    from transformers import XLNetConfig, XLNetLMHeadModel

    torch.manual_seed(0)
    model = XLNetLMHeadModel(XLNetConfig(vocab_size=VOCAB, d_model=16, n_layer=2, n_head=2, d_inner=32)).eval()
    g = torch.Generator().manual_seed(2)
    examples = []
    for n in (12, 7, 18):
        ids = torch.randint(4, VOCAB, (n,), generator=g)
        ids[-1] = SEP
        rank, predicted = plm_order(maskable_positions(ids, [PAD, SEP]), g, predict_fraction=1 / 3)
        examples.append({"input_ids": ids.tolist(), "rank": rank.tolist(), "predicted": predicted.tolist()})
    batch = plm_collate(examples, PAD)
    assert (batch["labels"] == IGNORE_INDEX).any()  # rows padding P are exercised
    with torch.no_grad():
        out = model(**batch)
    loss_sum, count = permutation_lm_loss(out.logits, batch["labels"])
    assert out.logits.shape[:2] == batch["labels"].shape
    assert (loss_sum / count).item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_llama_causal_lm_loss_equals_ours():
    from tests.tiny import tiny_llama

    model = tiny_llama(VOCAB).eval()
    g = torch.Generator().manual_seed(3)
    blocks, _ = pack_blocks([d for doc in _documents(g) for d in doc], block_size=10, eos_id=SEP)
    ids = torch.tensor(blocks)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    loss_sum, count = causal_lm_loss(out.logits, ids)
    assert count.item() == ids.numel() - ids.size(0)
    assert (loss_sum / count).item() == pytest.approx(out.loss.item(), rel=1e-6)
