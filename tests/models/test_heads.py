"""models/heads: the head loss, the task registry, the collate, and the scores, each against a
hand computation (or transformers' own head loss as the peer)."""

from __future__ import annotations

import math

import pytest
import torch

from instructkit.data.tasks import IGNORE_INDEX
from instructkit.models.heads import (
    HEADS,
    classifier_collate,
    entity_scores,
    head_cross_entropy,
    headline,
    label_scores,
    task_from_architectures,
)


def test_sequence_loss_is_a_sum_over_inputs_and_their_count():
    """Row 1: logits (0, 0), label 0 -> ln 2. Row 2: logits (ln 3, 0), label 1 -> -ln(1/4) = ln 4."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    loss_sum, count = head_cross_entropy(logits, torch.tensor([0, 1]))
    assert float(loss_sum) == pytest.approx(math.log(8.0)) and int(count) == 2


def test_token_loss_skips_unlabelled_positions():
    """Positions with -100 (special tokens, padding, later sub-tokens) add nothing and are not counted:
    the two labelled ones are ln 2 (uniform) and ln 4 (as above)."""
    logits = torch.tensor([[[9.0, -9.0], [0.0, 0.0], [math.log(3.0), 0.0], [5.0, 1.0]]])  # (1, 4, 2)
    labels = torch.tensor([[IGNORE_INDEX, 0, 1, IGNORE_INDEX]])
    loss_sum, count = head_cross_entropy(logits, labels)
    assert float(loss_sum) == pytest.approx(math.log(8.0)) and int(count) == 2


def test_sum_over_count_is_transformers_head_loss():
    """transformers' heads return the mean cross-entropy over labelled positions: our sum / count."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 4, generator=g)
    labels = torch.randint(0, 4, (3, 5), generator=g)
    labels[0, 0] = labels[2, 4] = IGNORE_INDEX
    loss_sum, count = head_cross_entropy(logits, labels)
    reference = torch.nn.CrossEntropyLoss()(logits.view(-1, 4), labels.view(-1))  # BertForTokenClassification's
    assert float(loss_sum / count) == pytest.approx(float(reference), abs=1e-6) and int(count) == 13


def test_weights_count_what_the_loss_counts():
    seq, tok = HEADS["seq_classification"], HEADS["token_classification"]
    assert seq.weight({"input_ids": [1, 2, 3], "labels": 2}) == 1
    assert tok.weight({"input_ids": [1, 2, 3, 4], "labels": [IGNORE_INDEX, 0, 3, IGNORE_INDEX]}) == 2


def test_task_from_architectures():
    assert task_from_architectures(["BertForSequenceClassification"]) == "seq_classification"
    assert task_from_architectures(["RobertaForTokenClassification"]) == "token_classification"
    assert task_from_architectures(["BertModel"]) is None
    assert task_from_architectures(None) is None


def test_collate_pads_ids_types_and_token_labels():
    collate = classifier_collate(pad_id=0)
    batch = collate(
        [
            {"input_ids": [101, 7, 102], "token_type_ids": [0, 1, 1], "labels": [IGNORE_INDEX, 2, IGNORE_INDEX]},
            {"input_ids": [101, 102], "token_type_ids": [0, 0], "labels": [IGNORE_INDEX, IGNORE_INDEX]},
        ]
    )
    assert batch["input_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 1, 1], [0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, -100], [-100, -100, -100]]
    seq = collate([{"input_ids": [101, 102], "labels": 1}, {"input_ids": [101, 5, 102], "labels": 0}])
    assert seq["labels"].tolist() == [1, 0] and seq["input_ids"].tolist() == [[101, 102, 0], [101, 5, 102]]


def test_label_scores_by_hand():
    """refs a a b c, preds a b b a. a: tp 1, fp 1 (c read as a), fn 1 -> P R F 1/2. b: tp 1, fp 1,
    fn 0 -> P 1/2, R 1, F 2/3. c: nothing right -> 0. Macro F1 (1/2 + 2/3 + 0) / 3 = 7/18; micro pools
    tp 2, fp 2, fn 2 -> 1/2 (= accuracy, every prediction being some label)."""
    scores = label_scores(["a", "b", "b", "a"], ["a", "a", "b", "c"], ["a", "b", "c"])
    assert scores["accuracy"] == 0.5
    assert scores["f1_macro"] == pytest.approx(7 / 18)
    assert scores["precision_macro"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert scores["recall_macro"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert scores["f1_micro"] == pytest.approx(0.5) and scores["precision_micro"] == pytest.approx(0.5)
    assert scores["per_label"]["b"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert scores["confusion"] == {"labels": ["a", "b", "c"], "matrix": [[1, 1, 0], [0, 1, 0], [1, 0, 0]]}
    assert set(headline(scores)) == {"accuracy", "f1_macro", "f1_micro", "precision_macro", "recall_macro"}


def test_entity_scores_by_hand():
    """Sentence 1: reference PER (words 0-1) and LOC (3); the prediction cuts PER to word 0, so only
    LOC is right. Sentence 2: reference ORG (0-1), predicted ORG (0-1) and a spurious PER (3).
    Entities right 2 of 4 predicted (P 1/2) and 2 of 3 in the reference (R 2/3): F1 = 4/7.
    Tags right: 3 of 4, then 3 of 4 -> token accuracy 6/8."""
    ref = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "O", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "I-ORG", "O", "B-PER"]]
    scores = entity_scores(pred, ref)
    assert scores["entity_precision"] == pytest.approx(0.5)
    assert scores["entity_recall"] == pytest.approx(2 / 3)
    assert scores["entity_f1"] == pytest.approx(4 / 7)
    assert scores["token_accuracy"] == pytest.approx(6 / 8)
    assert scores["per_label"]["LOC"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert scores["per_label"]["PER"]["precision"] == 0.0 and scores["per_label"]["PER"]["support"] == 1
    assert set(headline(scores)) == {"entity_f1", "entity_precision", "entity_recall", "token_accuracy"}


def test_entity_scores_refuse_sentences_of_another_length():
    with pytest.raises(ValueError, match="as many"):
        entity_scores([["O"]], [["O", "O"]])
