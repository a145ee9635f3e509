"""Pre-training recipe: plain text in, a model trained on one pre-training objective out.

Reads top to bottom: config -> text -> tokenizer and model -> examples -> train -> save. The
objectives' math is :mod:`instructkit.losses.pretrain`, their data (masking, pairs, orders,
blocks) :mod:`instructkit.data.pretrain`; this file only joins them to the set-up and the engine.
Each objective is a :class:`Recipe` in :data:`RECIPES`: how records become examples, how
examples become a batch, and how an example counts in the loss denominator (known before its
batch, since every random draw is made when examples are made, from ``data.seed``).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instructkit.config import PretrainConfig
from instructkit.errors import InputError
from instructkit.stages import resolve_stage_config


class PretrainLoss(nn.Module):
    """``forward(**batch)`` returns (loss_sum, count) of ``objective`` over the model's output
    (every key of the batch but ``labels``/``next_sentence_label`` goes to the model)."""

    def __init__(self, model: nn.Module, objective: str) -> None:
        super().__init__()
        from instructkit.losses.pretrain import OBJECTIVES

        self.model, self.objective = model, OBJECTIVES[objective]

    def forward(self, labels=None, next_sentence_label=None, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(**inputs)
        targets = next_sentence_label if next_sentence_label is not None else labels
        return self.objective.loss(getattr(out, self.objective.logits), targets)


# ----------------------------------------------------------------------------------------------
# Records to examples, per objective


def _token_ids(tokenizer: Any, texts: Sequence[str], with_words: bool = False):
    enc = tokenizer(list(texts), add_special_tokens=False)
    if not with_words:
        return enc["input_ids"], None
    if not getattr(enc, "is_fast", False):
        raise InputError("whole_word needs a fast tokenizer (word_ids())", field="whole_word")
    return enc["input_ids"], [enc.word_ids(i) for i in range(len(texts))]


def _special(tokenizer: Any, name: str, objective: str) -> int:
    value = getattr(tokenizer, f"{name}_token_id", None)
    if value is None:
        raise InputError(f"objective {objective} needs a tokenizer with a {name} token", field="model")
    return value


def _clm_examples(records, tokenizer, cfg: PretrainConfig, g: torch.Generator) -> tuple[list[dict], int]:
    from instructkit.data.pretrain import pack_blocks

    ids, _ = _token_ids(tokenizer, [r.text for r in records])
    blocks, dropped = pack_blocks(ids, cfg.data.max_length, _special(tokenizer, "eos", "clm"))
    return [{"input_ids": b, "labels": b} for b in blocks], dropped


def _mlm_examples(records, tokenizer, cfg: PretrainConfig, g: torch.Generator) -> tuple[list[dict], int]:
    from instructkit.data.pretrain import maskable_positions, mlm_mask

    cls, sep, mask = (_special(tokenizer, n, "mlm") for n in ("cls", "sep", "mask"))
    ids, words = _token_ids(tokenizer, [r.text for r in records], with_words=cfg.whole_word)
    width, out = cfg.data.max_length - 2, []
    for i, doc in enumerate(ids):
        for start in range(0, len(doc), width):  # a long text becomes several sequences
            seq = torch.tensor([cls, *doc[start : start + width], sep])
            word_ids = [None, *words[i][start : start + width], None] if words else None
            inputs, labels = mlm_mask(
                seq,
                maskable_positions(seq, tokenizer.all_special_ids),
                mask_token_id=mask,
                vocab_size=len(tokenizer),
                generator=g,
                probability=cfg.mlm_probability,
                word_ids=word_ids,
            )
            out.append({"input_ids": inputs.tolist(), "labels": labels.tolist()})
    return out, 0


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _nsp_examples(records, tokenizer, cfg: PretrainConfig, g: torch.Generator) -> tuple[list[dict], int]:
    """Segments are a record's sentences (split after . ! or ?); a record is a document."""
    from instructkit.data.pretrain import bert_pair, nsp_pairs

    cls, sep = (_special(tokenizer, n, "nsp") for n in ("cls", "sep"))
    docs = []
    for r in records:
        sentences = [s for s in _SENTENCE_END.split(r.text.strip()) if s]
        docs.append(_token_ids(tokenizer, sentences)[0] if sentences else [])
    out = []
    for pair in nsp_pairs(docs, g, cfg.nsp_random_probability):
        enc = bert_pair(pair.a, pair.b, cls_id=cls, sep_id=sep, max_length=cfg.data.max_length)
        out.append({**enc, "next_sentence_label": pair.is_random})
    return out, 0


def _plm_examples(records, tokenizer, cfg: PretrainConfig, g: torch.Generator) -> tuple[list[dict], int]:
    from instructkit.data.pretrain import maskable_positions, plm_order

    ids, _ = _token_ids(tokenizer, [r.text for r in records])
    width, out = cfg.data.max_length, []
    for doc in ids:
        for start in range(0, len(doc), width):
            seq = torch.tensor(doc[start : start + width])
            rank, predicted = plm_order(maskable_positions(seq, tokenizer.all_special_ids), g, cfg.plm_probability)
            if predicted.any():
                out.append({"input_ids": seq.tolist(), "rank": rank.tolist(), "predicted": predicted.tolist()})
    return out, 0


@dataclass(frozen=True)
class Recipe:
    examples: Callable[
        ..., tuple[list[dict], int]
    ]  # (records, tokenizer, cfg, generator) -> (examples, dropped tokens)
    collate: Callable[[Any], Callable[[list[dict]], dict[str, torch.Tensor]]]  # tokenizer -> collate
    weight: Callable[[dict], int]  # the example's share of the loss denominator
    decoder: bool = False  # a causal LM through setup.load_trainable (any peft method), chunked loss


def _block_collate(tokenizer):
    return lambda rows: {
        "input_ids": torch.tensor([r["input_ids"] for r in rows]),
        "attention_mask": torch.ones(len(rows), len(rows[0]["input_ids"]), dtype=torch.long),
        "labels": torch.tensor([r["labels"] for r in rows]),
    }


def _pad_collate(tokenizer):
    from functools import partial

    from instructkit.data.pretrain import pad_encoder_batch

    return partial(pad_encoder_batch, pad_id=tokenizer.pad_token_id)


def _plm_collate(tokenizer):
    from functools import partial

    from instructkit.data.pretrain import plm_collate

    return partial(plm_collate, pad_id=tokenizer.pad_token_id)


def _chosen(example: dict) -> int:
    return sum(label != -100 for label in example["labels"])


RECIPES: dict[str, Recipe] = {
    "clm": Recipe(_clm_examples, _block_collate, lambda e: len(e["input_ids"]) - 1, decoder=True),
    "mlm": Recipe(_mlm_examples, _pad_collate, _chosen),
    "nsp": Recipe(_nsp_examples, _pad_collate, lambda e: 1),
    "plm": Recipe(_plm_examples, _plm_collate, lambda e: sum(e["predicted"])),
}


# ----------------------------------------------------------------------------------------------
# Model


def _load_encoder(cfg: PretrainConfig, device: Any):
    """A BERT-like or XLNet model with the objective's head (full weights: no adapters)."""
    import transformers

    from instructkit.losses.pretrain import OBJECTIVES
    from instructkit.models.loading import load_tokenizer, resolve
    from instructkit.models.peft_methods import count_parameters
    from instructkit.train.engine import set_dropout, set_seed
    from instructkit.train.setup import Trainable, enable_gradient_checkpointing

    resolved = resolve(cfg.model)
    if resolved.folder:
        raise InputError(f"objective {cfg.objective} trains full weights; {cfg.model} is an adapter", field="model")
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    set_seed(cfg.train.seed)
    auto = getattr(transformers, OBJECTIVES[cfg.objective].auto_class)
    model = auto.from_pretrained(
        resolved.base, dtype=torch.float32, use_safetensors=True, trust_remote_code=cfg.trust_remote_code
    )
    if cfg.train.dropout is not None:
        set_dropout(model, cfg.train.dropout)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable, total = count_parameters(model)
    return Trainable(tokenizer, model.to(device), trainable, total)


def _encode(splits, parts, cfg: PretrainConfig):
    from instructkit.train import setup

    recipe = RECIPES[cfg.objective]
    train, dropped = recipe.examples(splits.train, parts.tokenizer, cfg, torch.Generator().manual_seed(cfg.data.seed))
    val_seed = torch.Generator().manual_seed(cfg.data.seed + 1)
    val = recipe.examples(splits.val, parts.tokenizer, cfg, val_seed)[0] if splits.val else []
    setup.check_encoded(train, cfg.data, f"no {cfg.objective} training examples (too little text for the objective)")
    return train, val, dropped


def held_out_loss(loss_module: nn.Module, val_examples: list[dict], collate, cfg: PretrainConfig, accelerator):
    """The count-weighted mean held-out loss of the model as it is now (None without held-out
    text): the engine's validation pass, so it is the same number ``fit`` reports as val_loss."""
    from instructkit.train.engine import evaluate_loss

    if not val_examples:
        return None
    return evaluate_loss(loss_module, val_examples, collate, cfg.train.batch_size, accelerator)


def _before_after(objective: str, before: float | None, after: float | None) -> dict[str, float | None]:
    """The summary's held-out numbers: the loss before training (after is ``val_loss``) and, for
    clm, whose loss is the mean next-token cross-entropy, the perplexity exp(loss) before and after."""
    out: dict[str, float | None] = {"val_loss_before": before}
    if objective == "clm":
        out["perplexity_before"] = math.exp(before) if before is not None else None
        out["perplexity_after"] = math.exp(after) if after is not None else None
    return out


def pretrain(
    config: PretrainConfig | str | Path | dict | None = None,
    overrides: list[str] | None = None,
    *,
    on_step: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Pre-train on plain text with ``objective``; returns the run summary (also summary.json)."""
    from instructkit.models.lm import CausalLMLoss
    from instructkit.train import engine, setup

    # 1. Resolve the config; check the run folder (a finished run with this config is returned as is).
    cfg = resolve_stage_config(PretrainConfig, "pretrain", config, overrides)
    stage = setup.open_run(cfg, stage="pretrain", overwrite=overwrite)
    if stage.finished:
        return stage.run.saved_summary()
    with stage.cleanup_on_failure():
        # 2. Text: read, validate, split (records are documents). Bad records fail before a model loads.
        splits = setup.load_splits(cfg.data, what="pre-training text")

        # 3. Tokenizer and model: a causal LM (any method) for clm, the objective's head otherwise.
        recipe, device = RECIPES[cfg.objective], stage.accelerator.device
        parts = setup.load_trainable(cfg, device=device) if recipe.decoder else _load_encoder(cfg, device)

        # 4. Examples: blocks, masked sequences, sentence pairs or factorisation orders (seeded).
        train_ex, val_ex, dropped = _encode(splits, parts, cfg)
        if dropped:
            stage.print(
                f"note: the last {dropped} tokens did not fill a block of {cfg.data.max_length} and were left out"
            )

        # 5. The held-out loss of the model as loaded (step 0), the "before" of the summary.
        chunk = cfg.train.loss_chunk_size
        loss = CausalLMLoss(parts.model, chunk) if recipe.decoder else PretrainLoss(parts.model, cfg.objective)
        collate = recipe.collate(parts.tokenizer)
        before = held_out_loss(loss, val_ex, collate, cfg, stage.accelerator)

        # 6. Train: the objective's (loss_sum, count), exact across micro-batches and processes.
        started = time.time()
        result = engine.fit(
            loss_module=loss,
            model=parts.model,
            examples=train_ex,
            collate=collate,
            weight=recipe.weight,
            train=cfg.train,
            optim=cfg.optim,
            run=stage.run,
            accelerator=stage.accelerator,
            val_examples=val_ex,
            on_step=on_step,
            count_key="targets",
        )

    # 7. Save final/ (full weights or the clm adapter, with the tokenizer) and the summary.
    held_out = _before_after(cfg.objective, before, result.final_val_loss)
    if held_out.get("perplexity_before") is not None:
        stage.print(f"held-out perplexity {held_out['perplexity_before']:.3f} -> {held_out['perplexity_after']:.3f}")
    summary = setup.stage_summary(
        "pretrain",
        cfg,
        parts,
        stage.run,
        objective=cfg.objective,
        **result.summary(started),
        val_loss=result.final_val_loss,
        best_val_loss=result.best_val_loss,
        **held_out,
        train_examples=len(train_ex),
        val_examples=len(val_ex),
        dropped_tokens=dropped,
    )
    return stage.finish(
        summary, lambda: setup.save_final(parts.model, parts.tokenizer, stage.run, base_spec=cfg.model, merged=False)
    )
