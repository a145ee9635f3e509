"""Pre-training objectives as pure losses: masked LM and next-sentence prediction (BERT, Devlin
et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding",
section 3.1 and appendix A.1), permutation LM (XLNet, Yang et al. 2019, "XLNet: Generalized
Autoregressive Pretraining for Language Understanding", eq. 5 with partial prediction) and causal
LM (the shifted next-token loss of :mod:`instructkit.losses.token_ce`).

Every function is logits in, ``(loss_sum, count)`` out, so the engine's exact accumulation holds:
the caller divides by the count of a whole optimizer step. Which positions are predicted (the BERT
masking rule, the factorisation order) is decided by :mod:`instructkit.data.pretrain`; here only
labels of -100 say "not predicted".

:data:`OBJECTIVES` is the registry the ``pretrain`` stage looks up (``config.PretrainObjective``
lists the same names; a test checks the two agree).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from instructkit.losses.token_ce import IGNORE_INDEX, token_cross_entropy

Loss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _summed_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(
        scores.reshape(-1, scores.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (labels != IGNORE_INDEX).sum()


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM loss: ``sum_{t chosen} -log softmax(logits[b, t])[labels[b, t]]``.

    Unshifted: position t's logits predict the original token *at* t (which the input shows as
    [MASK], a random token or itself, 80/10/10).

    Args:
        logits: (B, T, V) the MLM head's scores at every position.
        labels: (B, T) the original id at chosen positions, -100 elsewhere.

    Returns: (loss_sum, n_chosen).
    """
    return _summed_ce(logits, labels)


def next_sentence_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's next-sentence loss over the 2-way head on [CLS].

    Args:
        logits: (B, 2) scores; class 0 = B follows A in the document, 1 = B is a random segment
            (transformers' ``next_sentence_label`` convention).
        labels: (B,) 0 or 1 (-100 leaves a pair out).

    Returns: (loss_sum, n_pairs).
    """
    return _summed_ce(logits, labels)


def permutation_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """XLNet's permutation-LM loss with partial prediction (Yang et al. 2019, eq. 5):
    ``sum_{k > c} -log p(x_{z_k} | x_{z_<k})`` over the predicted (last) positions of the
    factorisation order ``z``, which the model's query stream sees through ``perm_mask``.

    Args:
        logits: (B, P, V) XLNetLMHeadModel's scores with ``target_mapping`` (B, P, T): row p
            scores the p-th predicted position.
        labels: (B, P) the token at each predicted position, -100 for rows that pad P.

    Returns: (loss_sum, n_predicted).
    """
    return _summed_ce(logits, labels)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token loss over packed blocks: position t's logits predict ``labels[t + 1]``
    (:func:`instructkit.losses.token_ce.token_cross_entropy`)."""
    return token_cross_entropy(logits, labels)


def bert_pretraining_loss(
    mlm_logits: torch.Tensor, mlm_labels: torch.Tensor, nsp_logits: torch.Tensor, nsp_labels: torch.Tensor
) -> torch.Tensor:
    """BERT's joint objective as BertForPreTraining computes it: the mean MLM loss plus the mean
    NSP loss (two means, so it is not a single (sum, count) and the engine does not train it)."""
    mlm_sum, mlm_n = masked_lm_loss(mlm_logits, mlm_labels)
    nsp_sum, nsp_n = next_sentence_loss(nsp_logits, nsp_labels)
    return mlm_sum / mlm_n.clamp(min=1) + nsp_sum / nsp_n.clamp(min=1)


@dataclass(frozen=True)
class Objective:
    """A pre-training objective and what it needs from the model and tokenizer."""

    loss: Loss
    logits: str  # the model output the loss reads: "logits" or "seq_relationship_logits"
    auto_class: str  # the transformers Auto class that loads a model with its head
    needs_mask_token: bool  # the tokenizer must have a mask token (MLM's [MASK])
    needs_cls_sep: bool  # [CLS] A [SEP] B [SEP] pairs (NSP)


OBJECTIVES: dict[str, Objective] = {
    "clm": Objective(causal_lm_loss, "logits", "AutoModelForCausalLM", False, False),
    "mlm": Objective(masked_lm_loss, "logits", "AutoModelForMaskedLM", True, False),
    "nsp": Objective(next_sentence_loss, "seq_relationship_logits", "AutoModelForPreTraining", False, True),
    "plm": Objective(permutation_lm_loss, "logits", "XLNetLMHeadModel", False, False),
}
