"""Task metrics as pure functions, each against numbers worked out by hand in the docstring."""

from __future__ import annotations

import math

import pytest

from instructkit.eval.tasks import normalize_label, score_accuracy, score_bleu, score_exact_match, score_rouge


def test_normalize_label():
    assert normalize_label(" Positive.\n") == "positive"
    assert normalize_label("NOT  \t sure!") == "not sure"
    assert normalize_label("e.g. yes") == "e.g. yes"  # inner punctuation counts
    assert normalize_label("'yes'") != normalize_label("yes")


def test_exact_match_fraction():
    metrics, per = score_exact_match(["a ", "b", "C"], ["a", "b", "c"])
    assert metrics == {"exact_match": pytest.approx(2 / 3)}
    assert [p["correct"] for p in per] == [True, True, False]


def test_accuracy_and_f1_on_a_hand_made_confusion_matrix():
    """References cat cat cat dog dog bird; responses cat cat dog dog cat fish (after normalising).

    Confusion (rows = reference, columns = response):
        cat:  cat 2, dog 1           -> cat  TP 2, FN 1; FP 1 (a dog answered cat)
        dog:  dog 1, cat 1           -> dog  TP 1, FN 1; FP 1 (a cat answered dog)
        bird: fish 1 (not a label)   -> bird TP 0, FN 1; FP 0
    Per label: cat P = R = F1 = 2/3; dog P = R = F1 = 1/2; bird 0 (zero division -> 0).
    Macro: (2/3 + 1/2 + 0) / 3 = 7/18 for P, R and F1.
    Micro: TP 3, FP 2 (fish is no label, so no one's false positive), FN 3:
        P = 3/5, R = 3/6 = 1/2, F1 = 2 * 3/5 * 1/2 / (3/5 + 1/2) = 6/11. Accuracy 3/6.
    """
    refs = ["Cat", "cat.", "cat", "dog", "DOG", "bird"]
    responses = [" cat", "Cat!", "dog", "dog\n", "cat", "fish"]
    metrics, per = score_accuracy(responses, refs)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["per_label"] == {
        "bird": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "cat": {
            "precision": pytest.approx(2 / 3),
            "recall": pytest.approx(2 / 3),
            "f1": pytest.approx(2 / 3),
            "support": 3,
        },
        "dog": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
    }
    for m in ("precision_macro", "recall_macro", "f1_macro"):
        assert metrics[m] == pytest.approx(7 / 18)
    assert metrics["precision_micro"] == pytest.approx(3 / 5)
    assert metrics["recall_micro"] == pytest.approx(1 / 2) == metrics["accuracy"]
    assert metrics["f1_micro"] == pytest.approx(6 / 11)
    assert metrics["off_label"] == 1
    assert [p["label_correct"] for p in per] == [True, True, False, True, False, False]
    assert per[5] == {"label": "fish", "reference_label": "bird", "label_correct": False}


def test_accuracy_of_nothing_is_zero():
    metrics, per = score_accuracy([], [])
    assert metrics["accuracy"] == 0.0 and metrics["f1_macro"] == 0.0 and per == []


def test_bleu_of_identical_text_is_100_and_a_hand_case():
    """Hypothesis "the cat sat on the mat", reference "the cat sat on a mat" (6 tokens each, so
    the brevity penalty is 1). Clipped n-gram precisions: 1-grams 5/6 ("the" counts once),
    2-grams 3/5 (the cat, cat sat, sat on), 3-grams 2/4, 4-grams 1/3.
    BLEU = 100 * (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = 100 * (1/12) ** (1/4) ~ 53.73."""
    same, _ = score_bleu(["the quick brown fox jumps"], ["the quick brown fox jumps"])
    assert same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    metrics, per = score_bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert metrics["bleu"] == pytest.approx(100 * (1 / 12) ** 0.25, rel=1e-6)
    assert per[0]["bleu"] == pytest.approx(metrics["bleu"])  # one sentence: corpus == sentence
    assert 0 < metrics["chrf"] < 100


def test_bleu_is_a_corpus_statistic_not_a_mean_of_sentences():
    """Two sentences, one identical and one with no 4-gram match: sentence BLEU 100 and 0 would
    average to 50, but corpus BLEU pools n-gram counts, so it is neither 50 nor 0."""
    metrics, per = score_bleu(["a b c d", "w x y z"], ["a b c d", "e f g h"])
    assert per[0]["bleu"] == pytest.approx(100.0) and per[1]["bleu"] == pytest.approx(0.0)
    # pooled precisions 4/8, 3/6, 2/4, 1/2; equal lengths -> BLEU = 100 * 0.5
    assert metrics["bleu"] == pytest.approx(50.0)


def test_rouge_by_hand():
    """Reference "the cat sat on the mat", prediction "the cat lay on a mat".
    ROUGE-1: overlap the, cat, on, mat = 4 of 6 on both sides -> F = 2/3.
    ROUGE-2: bigrams shared: "the cat" only, 1 of 5 each -> F = 1/5.
    ROUGE-L: longest common subsequence the cat on mat = 4 -> F = 2/3.
    The second pair is identical (all 1), so the means are (x + 1) / 2."""
    metrics, per = score_rouge(["the cat lay on a mat", "Hello, world"], ["the cat sat on the mat", "hello world"])
    assert per[0] == pytest.approx({"rouge1": 2 / 3, "rouge2": 1 / 5, "rougeL": 2 / 3})
    assert per[1] == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    assert metrics == pytest.approx({"rouge1": 5 / 6, "rouge2": 3 / 5, "rougeL": 5 / 6})
    assert not any(math.isnan(v) for v in metrics.values())
