"""Task metrics over (response, reference) pairs: exact match, label accuracy with a
precision/recall/F1 report, corpus BLEU and chrF (sacrebleu), ROUGE F-measures (rouge-score).

Every scorer is a pure function of two equal-length lists of strings, returning
``(metrics, per_example)``: the summary numbers, and one dict of scores per pair in order,
which the runner merges into that example's line of the samples file. No model, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from instructkit.eval.exact_match import exact_match

Scored = tuple[dict[str, Any], list[dict[str, Any]]]

# A label is compared after :func:`normalize_label`; these trail a label in free text ("Positive.").
_TRAILING = ".!?;:,"


def normalize_label(text: str) -> str:
    """A classification answer in comparable form: case-folded, inner whitespace collapsed to one
    space, surrounding whitespace and trailing ``.!?;:,`` removed (``" Positive.\\n"`` ->
    ``"positive"``). Anything else (quotes, inner punctuation) still counts."""
    return re.sub(r"\s+", " ", text).strip().rstrip(_TRAILING).strip().casefold()


def score_exact_match(responses: Sequence[str], references: Sequence[str]) -> Scored:
    """``exact_match``: fraction of responses equal to their reference up to surrounding whitespace."""
    correct = [exact_match(r, ref) for r, ref in zip(responses, references, strict=True)]
    return {"exact_match": _mean(correct)}, [{"correct": c} for c in correct]


def score_accuracy(responses: Sequence[str], references: Sequence[str]) -> Scored:
    """Label accuracy and a precision/recall/F1 report over the reference labels.

    Labels are the normalised references (:func:`normalize_label`); the label set is the
    distinct reference labels, so a response that is no label at all (free text, a typo) is a
    miss: it lowers the recall of the true label and is counted in ``off_label``. Per label:
    precision, recall, F1 and support (scikit-learn's ``precision_recall_fscore_support``,
    ``zero_division=0``). ``*_macro`` is the unweighted mean over labels; ``*_micro`` pools the
    counts, so ``recall_micro == accuracy`` and ``precision_micro`` is accuracy among responses
    that are some label.
    """
    from sklearn.metrics import precision_recall_fscore_support

    preds = [normalize_label(r) for r in responses]
    refs = [normalize_label(r) for r in references]
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} responses for {len(refs)} references")
    labels = sorted(set(refs))
    metrics: dict[str, Any] = {"accuracy": _mean([p == r for p, r in zip(preds, refs)])}
    if labels:
        for average in ("macro", "micro"):
            p, r, f, _ = precision_recall_fscore_support(refs, preds, labels=labels, average=average, zero_division=0)
            metrics |= {f"precision_{average}": float(p), f"recall_{average}": float(r), f"f1_{average}": float(f)}
        p, r, f, s = precision_recall_fscore_support(refs, preds, labels=labels, average=None, zero_division=0)
        report = {
            label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, label in enumerate(labels)
        }
    else:
        metrics |= {f"{m}_{a}": 0.0 for a in ("macro", "micro") for m in ("precision", "recall", "f1")}
        report = {}
    metrics["off_label"] = sum(p not in report for p in preds)
    metrics["per_label"] = report
    per_example = [{"label": p, "reference_label": r, "label_correct": p == r} for p, r in zip(preds, refs)]
    return metrics, per_example


def score_bleu(responses: Sequence[str], references: Sequence[str]) -> Scored:
    """``bleu`` and ``chrf``: sacrebleu's corpus BLEU (13a tokenisation, one reference) and chrF,
    both 0-100; each example also gets its sentence-level BLEU and chrF."""
    import sacrebleu

    responses, references = list(responses), list(references)
    if len(responses) != len(references):
        raise ValueError(f"{len(responses)} responses for {len(references)} references")
    if not responses:
        return {"bleu": 0.0, "chrf": 0.0}, []
    metrics = {
        "bleu": float(sacrebleu.corpus_bleu(responses, [references]).score),
        "chrf": float(sacrebleu.corpus_chrf(responses, [references]).score),
    }
    per_example = [
        {"bleu": float(sacrebleu.sentence_bleu(r, [ref]).score), "chrf": float(sacrebleu.sentence_chrf(r, [ref]).score)}
        for r, ref in zip(responses, references)
    ]
    return metrics, per_example


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def score_rouge(responses: Sequence[str], references: Sequence[str]) -> Scored:
    """``rouge1``, ``rouge2``, ``rougeL``: mean over examples of rouge-score's F-measure (0-1).

    rouge-score's default tokenizer: lowercase, non-alphanumerics become spaces, no stemming.
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    per_example = [
        {t: float(s.fmeasure) for t, s in scorer.score(ref, r).items()}
        for r, ref in zip(responses, references, strict=True)
    ]
    return {t: _mean([e[t] for e in per_example]) for t in ROUGE_TYPES}, per_example


def _mean(values: Sequence[float]) -> float:
    return float(sum(values)) / len(values) if values else 0.0
