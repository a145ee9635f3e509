"""Reward-model recipe: ranked comparisons in, a scalar scorer of (prompt, response) out.

InstructGPT (Ouyang et al. 2022, sec. 3.5): labelers rank K responses to a prompt; every one of
the C(K, 2) comparisons of that prompt goes into the same batch element, and the loss of a
prompt is the mean over its comparisons, so prompts with many responses do not dominate and
the backbone runs once per response rather than once per comparison. Preference pairs are the
K = 2 case. Reads top to bottom: config -> data -> model -> encode -> train -> bias -> save; the set-up shared
with other recipes lives in :mod:`instructkit.train.setup`, the encoders in :mod:`instructkit.data.encoders`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from instructkit.config import RewardConfig
from instructkit.data.schema import Conversation
from instructkit.errors import InputError
from instructkit.stages import resolve_stage_config


class RankingLoss(nn.Module):
    """(sum over prompts of their mean comparison loss, number of prompts); keeps the last
    batch's comparison counts for logging."""

    def __init__(self, model: nn.Module, center_coefficient: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.center_coefficient = center_coefficient
        self.last: dict[str, float] = {}

    def forward(self, input_ids, attention_mask, group, rank):
        from instructkit.losses.reward import ranking_loss
        from instructkit.models.reward_model import sequence_scores

        scores = sequence_scores(self.model, input_ids, attention_mask)  # (N,)
        out = ranking_loss(scores, group, rank, center_coefficient=self.center_coefficient)
        self.last = {"pairs": float(out.pairs), "correct": float(out.correct)}
        return out.loss_sum, out.prompts


def pairwise_accuracy(
    loss_module: RankingLoss, examples: Sequence[dict[str, Any]], collate, batch_size: int
) -> dict[str, float]:
    """Accuracy over every untied comparison of ``examples``, and the mean per-prompt loss."""
    from instructkit.models.passes import no_grad_batches

    loss = prompts = pairs = correct = 0.0
    for _, batch in no_grad_batches(loss_module, examples, collate, batch_size):
        loss_sum, n = loss_module(**batch)
        loss, prompts = loss + float(loss_sum), prompts + float(n)
        pairs, correct = pairs + loss_module.last["pairs"], correct + loss_module.last["correct"]
    return {"accuracy": correct / max(pairs, 1), "loss": loss / max(prompts, 1), "pairs": int(pairs)}


def mean_score(model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int) -> float:
    """Mean reward-model score of token sequences (each scored at its last token)."""
    from instructkit.data.collate import ranking_collate
    from instructkit.models.passes import no_grad_batches
    from instructkit.models.reward_model import sequence_scores

    collate = ranking_collate(pad_id)
    rows = [{"input_ids": [s], "ranks": [0]} for s in sequences]
    total = 0.0
    for _, batch in no_grad_batches(model, rows, collate, batch_size):
        total += float(sequence_scores(model, batch["input_ids"], batch["attention_mask"]).sum())
    return total / max(len(sequences), 1)


def reference_sequences(
    cfg: RewardConfig, tokenizer, train_ex: list[dict[str, Any]], limit: int = 256
) -> list[list[int]]:
    """What should score 0 on average: the given demonstrations, else the best-ranked responses."""
    if cfg.reference_data:
        from instructkit.data.formats import load_records
        from instructkit.data.templates import Truncation, encode_prompt_response
        from instructkit.datasets import resolve_data_path

        seqs = []
        for record in load_records(resolve_data_path(cfg.reference_data)).records[:limit]:
            if not isinstance(record, Conversation) or record.messages[-1].role != "assistant":
                raise InputError(
                    "reference_data must be demonstrations ending with an assistant turn", file=cfg.reference_data
                )
            enc = encode_prompt_response(
                tokenizer,
                record.messages[:-1],
                record.messages[-1:],
                template=cfg.data.template,
                max_length=cfg.data.max_length,
                truncation=Truncation.CUT_RESPONSE,
            )
            if enc is not None:
                seqs.append(list(enc.input_ids))
        return seqs
    best = []
    for example in train_ex[:limit]:
        top = min(example["ranks"])
        best += [ids for ids, r in zip(example["input_ids"], example["ranks"]) if r == top][:1]
    return best


def rm(
    config: RewardConfig | str | Path | dict | None = None,
    overrides: list[str] | None = None,
    *,
    on_step: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a reward model; returns the run summary (also written to summary.json)."""
    from instructkit.data.collate import ranking_collate
    from instructkit.data.encoders import as_rankings, encode_rankings
    from instructkit.models.reward_model import reward_model_from_causal_lm
    from instructkit.train import engine, setup

    # 1. Config and run folder (a finished run with this config is returned as is).
    cfg = resolve_stage_config(RewardConfig, "rm", config, overrides)
    _refuse_unmergeable_adapter(cfg.peft.method)
    stage = setup.open_run(cfg, stage="rm", overwrite=overwrite)
    if stage.finished:
        return stage.run.saved_summary()
    with stage.cleanup_on_failure():
        # 2. Data: pairs or K-wise rankings, validated before any model loads; held-out split.
        splits = setup.load_splits(cfg.data, as_rankings, what="preference pairs or rankings")

        # 3. Model: the causal LM's backbone with a fresh scalar head, a pad token that is not the
        #    end-of-turn token (the score is read at the last real token), then what trains.
        parts = setup.load_trainable(
            cfg, device=stage.accelerator.device, task="SEQ_CLS", merge_adapter=True, build=reward_model_from_causal_lm
        )

        # 4. Encode every response of every ranking with the chat template.
        d = cfg.data
        encode = partial(encode_rankings, parts.tokenizer, template=d.template, max_length=d.max_length)
        enc = setup.encode_splits(splits, encode, d, "no ranking has two responses of different rank left to compare")
        train_ex, val_ex = enc.train, enc.val
        collate = ranking_collate(parts.tokenizer.pad_token_id)
        loss_module = RankingLoss(parts.model, cfg.center_rewards_coefficient)
        with stage.accelerator.autocast():
            before = pairwise_accuracy(loss_module, val_ex, collate, cfg.train.batch_size) if val_ex else None

        # 5. Train: each prompt weighs 1 in the loss, however many responses it has.
        started = time.time()
        result = engine.fit(
            loss_module=loss_module,
            model=parts.model,
            examples=train_ex,
            collate=collate,
            weight=lambda e: 1,
            length=lambda e: sum(len(s) for s in e["input_ids"]),
            train=cfg.train,
            optim=cfg.optim,
            run=stage.run,
            accelerator=stage.accelerator,
            val_examples=val_ex,
            on_step=on_step,
            count_key="prompts",
            extra_metrics=lambda batch, ran: dict(ran.last),
            finish_metrics=lambda s: {"accuracy": s["correct"] / max(s["pairs"], 1), "pairs": s["pairs"]},
        )

    # 6. Held-out accuracy, then the bias that centres reference responses on 0.
    with stage.accelerator.autocast():
        after = pairwise_accuracy(loss_module, val_ex, collate, cfg.train.batch_size) if val_ex else None
        bias = centring_bias(cfg, parts, train_ex)

    # 7. Save final/ as a plain sequence classifier (adapters merged) that anything can load.
    held_out = {"before": before, "after": after}
    summary = setup.stage_summary(
        "rm", cfg, parts, stage.run, **result.summary(started), **rm_summary(held_out, bias, enc)
    )
    return stage.finish(summary, lambda: save_reward_model(parts.model, parts.tokenizer, stage.run.final, bias=bias))


def centring_bias(cfg: RewardConfig, parts, train_ex: list[dict[str, Any]]) -> float:
    """Minus the mean score of the reference responses (0 when ``normalize`` is off)."""
    if not cfg.normalize:
        return 0.0
    sequences = reference_sequences(cfg, parts.tokenizer, train_ex)
    return -mean_score(parts.model, sequences, parts.tokenizer.pad_token_id, cfg.train.batch_size)


def rm_summary(held_out: dict[str, dict[str, float] | None], bias: float, enc) -> dict[str, Any]:
    """The reward model's own summary fields: held-out loss and accuracy (before and after)."""
    before, after = held_out["before"], held_out["after"]
    return {
        "val_loss": after["loss"] if after else None,
        "val_accuracy": after["accuracy"] if after else None,
        "val_accuracy_before": before["accuracy"] if before else None,
        "val_pairs": after["pairs"] if after else 0,
        "bias": bias,
        "train_prompts": len(enc.train),
        "val_prompts": len(enc.val),
        "dropped_without_pairs": enc.dropped,
    }


def _refuse_unmergeable_adapter(method: str) -> None:
    """final/ is a plain classifier with the adapter merged (save_reward_model): a LoRA over a 4-bit
    base does not merge, so it is refused up front. (Prompt learning's virtual tokens do not merge
    either; they are saved beside the classifier.)"""

    if method == "qlora":
        raise InputError(
            "qlora cannot train a reward model here: final/ is a plain sequence classifier with the adapter "
            "merged, and a LoRA trained over the 4-bit base does not merge into it; use lora or full",
            field="peft.method",
        )


def _classifier_with_trained_head(model: nn.Module) -> nn.Module:
    """The classifier under a peft prompt-learning model, its score head the trained copy
    (peft trains a copy of the head, ``modules_to_save``, and leaves the original)."""
    base = model.get_base_model()
    wrapped = base.score
    if hasattr(wrapped, "modules_to_save"):
        base.score = wrapped.modules_to_save[model.active_adapter]
    return base


def save_reward_model(model: nn.Module, tokenizer, path: Path, *, bias: float) -> None:
    from instructkit.fileio import atomic_dir
    from instructkit.models import bottleneck
    from instructkit.models.peft_methods import is_peft
    from instructkit.models.reward_model import BIAS_KEY, PROMPT_ADAPTER

    virtual = is_peft(model) and model.active_peft_config.is_prompt_learning
    with atomic_dir(path) as tmp:
        if virtual:  # virtual tokens do not merge: the adapter goes beside the classifier
            model.save_pretrained(tmp / PROMPT_ADAPTER, safe_serialization=True)
            plain = _classifier_with_trained_head(model)
        else:
            plain = model.merge_and_unload() if is_peft(model) else model
        setattr(plain.config, BIAS_KEY, bias)
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if bottleneck.spec_of(plain) is not None:  # they do not merge: saved beside, loaded back by load_reward_model
            bottleneck.save(plain, tmp, base_spec=None)
