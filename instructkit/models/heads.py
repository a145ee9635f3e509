"""Task heads on an encoder: sequence classification (one label per input) and token
classification (one tag per word), their loss, their predictions and how they are scored.

Each task is a :class:`Head` in :data:`HEADS`: the transformers ``AutoModelFor...`` class that
puts the head on the encoder, the peft task type (LoRA keeps the head trainable and saved through
``modules_to_save``), and an example's share of the loss denominator (1 per input, or its
labelled tokens). The loss is one function for both, :func:`head_cross_entropy`, a sum and a count,
so the engine's exact accumulation and resume hold unchanged. Scores are read from the head (no
generation): accuracy, precision/recall/F1 and the confusion matrix (scikit-learn) for labels,
entity-level precision/recall/F1 (seqeval) for BIO tags.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from instructkit.data.tasks import IGNORE_INDEX, LabelSet
from instructkit.errors import InputError

# ----------------------------------------------------------------------------------------------
# The loss


def head_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy over the labelled positions, their number).

    Sequence classification: logits (B, C), labels (B,): every input counts once. Token
    classification: logits (B, T, C), labels (B, T) with -100 on special tokens, padding, the
    instruction and (``align: first``) later sub-tokens, which count for nothing. The mean that
    transformers' heads return is ``loss_sum / count``; keeping the two apart is what makes the
    loss of an optimizer step exact over micro-batches of any size.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (N, C)
    flat_labels = labels.reshape(-1)  # (N,)
    loss_sum = nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (flat_labels != IGNORE_INDEX).sum()


class HeadLoss(nn.Module):
    """``forward(labels, **inputs)``: the model's logits on ``inputs``, then :func:`head_cross_entropy`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, labels: torch.Tensor, **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return head_cross_entropy(self.model(**inputs).logits, labels)


# ----------------------------------------------------------------------------------------------
# The tasks


def _one(example: dict[str, Any]) -> int:
    return 1


def _labelled_tokens(example: dict[str, Any]) -> int:
    return sum(label != IGNORE_INDEX for label in example["labels"])


@dataclass(frozen=True)
class Head:
    """One task head: how transformers builds it, how peft wraps it, how an example counts."""

    auto_class: str  # transformers.AutoModelFor...
    architecture: str  # the suffix of a model config's ``architectures`` entry that names this task
    peft_task: str  # peft's TaskType: the head is trained and saved with the adapter (modules_to_save)
    weight: Callable[[dict[str, Any]], int]  # the example's share of the loss denominator
    tagging: bool  # labels per word (tokens + tags data), else one per input (text + label)


HEADS: dict[str, Head] = {
    "seq_classification": Head(
        "AutoModelForSequenceClassification", "ForSequenceClassification", "SEQ_CLS", _one, tagging=False
    ),
    "token_classification": Head(
        "AutoModelForTokenClassification", "ForTokenClassification", "TOKEN_CLS", _labelled_tokens, tagging=True
    ),
}  # = config.ClassifyTask


def task_from_architectures(architectures: Sequence[str] | None) -> str | None:
    """The task a model config's ``architectures`` names (``BertForTokenClassification`` ->
    token_classification), or None when it names none of :data:`HEADS` (``BertModel``)."""
    for name in architectures or ():
        for task, head in HEADS.items():
            if name.endswith(head.architecture):
                return task
    return None


def load_head_model(base: str, task: str, label_set: LabelSet, *, trust_remote_code: bool = False) -> nn.Module:
    """The encoder at ``base`` (an HF folder or id) with ``task``'s head over ``label_set``, fp32.

    A head already there with the same labels is kept (a classify run's final/); a new one is
    initialised from torch's current random state (seed it first for the same head every run).
    """
    import transformers

    auto = getattr(transformers, HEADS[task].auto_class)
    try:
        return auto.from_pretrained(
            base,
            num_labels=len(label_set),
            id2label=label_set.id2label,
            label2id=label_set.label2id,
            dtype=torch.float32,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except ValueError as exc:  # a config transformers has no such head for (a decoder-only family)
        raise InputError(f"{base} cannot take a {task} head: {exc}", field="model") from exc


# ----------------------------------------------------------------------------------------------
# Batches and predictions


def classifier_collate(pad_id: int) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Right-pad ``input_ids`` (``pad_id``), ``token_type_ids`` (0) and per-token ``labels`` (-100)
    to (B, T), with ``attention_mask``; one label per input stacks to (B,)."""

    def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        T = max(len(e["input_ids"]) for e in examples)
        pad = {"input_ids": pad_id, "token_type_ids": 0, "labels": IGNORE_INDEX}
        out: dict[str, torch.Tensor] = {}
        for key, fill in pad.items():
            if key not in examples[0]:
                continue
            if key == "labels" and not isinstance(examples[0]["labels"], list):
                out[key] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
            else:
                out[key] = torch.tensor([list(e[key]) + [fill] * (T - len(e[key])) for e in examples])
        out["attention_mask"] = torch.tensor(
            [[1] * len(e["input_ids"]) + [0] * (T - len(e["input_ids"])) for e in examples]
        )
        return out

    return collate


def predict(
    model: nn.Module, examples: Sequence[dict[str, Any]], collate: Callable, batch_size: int
) -> list[int | list[int]]:
    """The head's argmax for each example: a label id per input, or for tagged examples the tag
    ids at the labelled positions (with ``align: first`` encoding: one per word), in order."""
    from instructkit.models.passes import no_grad_batches

    out: list[int | list[int]] = []
    for _, batch in no_grad_batches(model, examples, collate, batch_size):
        labels = batch.pop("labels")
        ids = model(**batch).logits.argmax(-1)  # (B,) or (B, T)
        if ids.dim() == 1:
            out += ids.tolist()
        else:
            out += [row[mask].tolist() for row, mask in zip(ids, labels != IGNORE_INDEX)]
    return out


def references(examples: Sequence[dict[str, Any]]) -> list[int | list[int]]:
    """The label ids :func:`predict` is compared with, in the same shape."""
    return [
        e["labels"] if not isinstance(e["labels"], list) else [x for x in e["labels"] if x != IGNORE_INDEX]
        for e in examples
    ]


# ----------------------------------------------------------------------------------------------
# Scores


def label_scores(predicted: Sequence[str], reference: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro and micro precision/recall/F1 over ``labels`` (scikit-learn,
    ``zero_division=0``, as the ``accuracy`` suite), the per-label report and the confusion
    matrix (rows: the reference label, columns: the predicted one, in ``labels`` order)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    if len(predicted) != len(reference):
        raise ValueError(f"{len(predicted)} predictions for {len(reference)} references")
    labels = list(labels)
    out: dict[str, Any] = {"accuracy": sum(p == r for p, r in zip(predicted, reference)) / max(len(reference), 1)}
    for average in ("macro", "micro"):
        p, r, f, _ = precision_recall_fscore_support(
            reference, predicted, labels=labels, average=average, zero_division=0
        )
        out |= {f"precision_{average}": float(p), f"recall_{average}": float(r), f"f1_{average}": float(f)}
    p, r, f, s = precision_recall_fscore_support(reference, predicted, labels=labels, average=None, zero_division=0)
    out["per_label"] = {
        label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, label in enumerate(labels)
    }
    matrix = confusion_matrix(reference, predicted, labels=labels)
    out["confusion"] = {"labels": labels, "matrix": matrix.tolist()}
    out["n"] = len(reference)
    return out


def entity_scores(predicted: Sequence[Sequence[str]], reference: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Entity-level precision, recall and F1 (seqeval's default, conlleval's rules: an entity is
    right when its type and every word's place in it are), micro over entities; the per-type
    report; and the share of words whose tag is right (``token_accuracy``)."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    pred, ref = [list(p) for p in predicted], [list(r) for r in reference]
    if [len(p) for p in pred] != [len(r) for r in ref]:
        raise ValueError("every sentence needs as many predicted tags as reference tags")
    words = sum(len(r) for r in ref)
    report = classification_report(ref, pred, output_dict=True, zero_division=0)
    per_type = {
        name: {
            "precision": float(v["precision"]),
            "recall": float(v["recall"]),
            "f1": float(v["f1-score"]),
            "support": int(v["support"]),
        }
        for name, v in report.items()
        if not name.endswith(" avg")
    }
    return {
        "entity_precision": float(precision_score(ref, pred, zero_division=0)),
        "entity_recall": float(recall_score(ref, pred, zero_division=0)),
        "entity_f1": float(f1_score(ref, pred, zero_division=0)),
        "token_accuracy": sum(a == b for p, r in zip(pred, ref) for a, b in zip(p, r)) / max(words, 1),
        "per_label": per_type,
        "n": len(ref),
    }


def head_scores(
    model: nn.Module, examples: Sequence[dict[str, Any]], label_set: LabelSet, collate: Callable, batch_size: int
) -> dict[str, Any]:
    """The held-out scores of ``model``'s head on encoded ``examples`` (tagged ones encoded with
    ``align: first``, so that the labelled positions are the words): :func:`label_scores` or
    :func:`entity_scores`."""
    names = label_set.labels
    pred, ref = predict(model, examples, collate, batch_size), references(examples)
    if examples and isinstance(examples[0]["labels"], list):
        return entity_scores([[names[i] for i in p] for p in pred], [[names[i] for i in r] for r in ref])
    return label_scores([names[i] for i in pred], [names[i] for i in ref], names)


HEADLINE = ("accuracy", "f1_macro", "f1_micro", "precision_macro", "recall_macro")
TAGGING_HEADLINE = ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")


def headline(scores: dict[str, Any]) -> dict[str, float]:
    """The numbers of a score dict that go in a results table (no report, no matrix)."""
    keys = TAGGING_HEADLINE if "entity_f1" in scores else HEADLINE
    return {k: scores[k] for k in keys if k in scores}
