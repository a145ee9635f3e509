"""Reward-model recipe: ranked comparisons in, a scalar scorer of (prompt, response) out.

InstructGPT (Ouyang et al. 2022, sec. 3.5): labelers rank K responses to a prompt; every one of
the C(K, 2) comparisons of that prompt goes into the same batch element, and the loss of a
prompt is the mean over its comparisons, so prompts with many responses do not dominate and
the backbone runs once per response rather than once per comparison. Preference pairs are the
K = 2 case. Reads top to bottom: config -> data -> model -> encode -> train -> bias -> save.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instructkit.config import RewardConfig, resolve_stage_config
from instructkit.data.schema import Conversation, Preference, Ranking
from instructkit.errors import InputError


def as_rankings(records: Sequence[Any], where: str) -> list[Ranking]:
    """Rankings from preference pairs (chosen ranks 0, rejected 1) or rankings as they are."""
    out = []
    for i, record in enumerate(records):
        if isinstance(record, Ranking):
            ranks = record.ranks or list(range(len(record.responses)))
            out.append(Ranking(record.prompt, record.responses, ranks))
        elif isinstance(record, Preference):
            out.append(Ranking(record.prompt, [record.chosen, record.rejected], [0, 1]))
        else:
            raise InputError(f"a reward model trains on preference pairs or rankings, not "
                             f"{type(record).__name__} records", file=where, record=i)
    return out


def encode_rankings(tokenizer, rankings: Sequence[Ranking], *, template: str | None,
                    max_length: int) -> tuple[list[dict[str, Any]], int]:
    """Each ranking as {"input_ids": [K sequences], "ranks": [K]}; responses that do not fit are
    cut (never their end-of-turn, where the score is read); a ranking left without an untied
    pair is dropped and counted."""
    from instructkit.data.templates import Truncation, encode_prompt_response

    encoded, dropped = [], 0
    for ranking in rankings:
        ids, ranks = [], []
        for response, rank in zip(ranking.responses, ranking.ranks):
            enc = encode_prompt_response(tokenizer, ranking.prompt, response, template=template,
                                         max_length=max_length, truncation=Truncation.CUT_RESPONSE)
            if enc is not None:
                ids.append(list(enc.input_ids))
                ranks.append(rank)
        if len(set(ranks)) < 2:
            dropped += 1
            continue
        encoded.append({"input_ids": ids, "ranks": ranks})
    return encoded, dropped


def make_collate(pad_id: int) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """All responses of the batch's prompts as one right-padded (N, T) batch, with each
    response's prompt index (``group``) and rank."""

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [ids for example in batch for ids in example["input_ids"]]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = torch.tensor(r)
            attention_mask[i, :len(r)] = 1
        group = torch.tensor([g for g, example in enumerate(batch) for _ in example["input_ids"]])
        rank = torch.tensor([r for example in batch for r in example["ranks"]])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "group": group, "rank": rank}

    return collate


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


@torch.no_grad()
def pairwise_accuracy(loss_module: RankingLoss, examples: Sequence[dict[str, Any]], collate,
                      batch_size: int) -> dict[str, float]:
    """Accuracy over every untied comparison of ``examples``, and the mean per-prompt loss."""
    was_training = loss_module.training
    loss_module.eval()
    loss = prompts = pairs = correct = 0.0
    for start in range(0, len(examples), batch_size):
        batch = collate(list(examples[start:start + batch_size]))
        batch = {k: v.to(next(loss_module.parameters()).device) for k, v in batch.items()}
        loss_sum, n = loss_module(**batch)
        loss, prompts = loss + float(loss_sum), prompts + float(n)
        pairs, correct = pairs + loss_module.last["pairs"], correct + loss_module.last["correct"]
    loss_module.train(was_training)
    return {"accuracy": correct / max(pairs, 1), "loss": loss / max(prompts, 1), "pairs": int(pairs)}


@torch.no_grad()
def mean_score(model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int) -> float:
    from instructkit.models.reward_model import sequence_scores

    was_training = model.training
    model.eval()
    collate = make_collate(pad_id)
    total = 0.0
    device = next(model.parameters()).device
    for start in range(0, len(sequences), batch_size):
        batch = collate([{"input_ids": [s], "ranks": [0]} for s in sequences[start:start + batch_size]])
        total += float(sequence_scores(model, batch["input_ids"].to(device),
                                       batch["attention_mask"].to(device)).sum())
    model.train(was_training)
    return total / max(len(sequences), 1)


def reference_sequences(cfg: RewardConfig, tokenizer, train_ex: list[dict[str, Any]], limit: int = 256) -> list[list[int]]:
    """What should score 0 on average: the given demonstrations, else the best-ranked responses."""
    if cfg.reference_data:
        from instructkit.data.formats import load_records
        from instructkit.data.templates import Truncation, encode_prompt_response
        from instructkit.datasets import resolve_data_path

        seqs = []
        for record in load_records(resolve_data_path(cfg.reference_data)).records[:limit]:
            if not isinstance(record, Conversation) or record.messages[-1].role != "assistant":
                raise InputError("reference_data must be demonstrations ending with an assistant turn",
                                 file=cfg.reference_data)
            enc = encode_prompt_response(tokenizer, record.messages[:-1], record.messages[-1:],
                                         template=cfg.data.template, max_length=cfg.data.max_length,
                                         truncation=Truncation.CUT_RESPONSE)
            if enc is not None:
                seqs.append(list(enc.input_ids))
        return seqs
    best = []
    for example in train_ex[:limit]:
        top = min(example["ranks"])
        best += [ids for ids, r in zip(example["input_ids"], example["ranks"]) if r == top][:1]
    return best


def rm(config: RewardConfig | str | Path | dict | None = None, overrides: list[str] | None = None, *,
       on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train a reward model; returns the run summary (also written to summary.json)."""
    from instructkit.data.formats import load_records
    from instructkit.data.split import split_records
    from instructkit.datasets import resolve_data_path
    from instructkit.models.loading import load_model, load_tokenizer
    from instructkit.models.peft_methods import apply_method, count_parameters
    from instructkit.models.reward_model import reward_model_from_causal_lm
    from instructkit.train import engine

    # 1. Config and run folder.
    cfg = resolve_stage_config(RewardConfig, "rm", config, overrides)
    if not cfg.data.path:
        raise InputError("no training data: set data.path (preference pairs or rankings)", field="data.path")
    run = engine.RunDir(Path(cfg.out))
    accelerator = engine.make_accelerator(cfg.train)
    if accelerator.is_main_process:
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_config(cfg)

    # 2. Data: pairs or K-wise rankings, validated before any model loads; held-out split.
    loaded = load_records(resolve_data_path(cfg.data.path), format=cfg.data.format, columns=cfg.data.columns)
    records = loaded.records[: cfg.data.limit] if cfg.data.limit else loaded.records
    if cfg.data.val_path:
        val_records = as_rankings(load_records(resolve_data_path(cfg.data.val_path), format=cfg.data.format,
                                               columns=cfg.data.columns).records, cfg.data.val_path)
        train_records = as_rankings(records, cfg.data.path)
    else:  # split the records as read, so DPO with the same seed holds out the same prompts
        train_part, val_part, _ = split_records(records, val_fraction=cfg.data.val_fraction, test_fraction=0.0,
                                                seed=cfg.data.seed)
        train_records, val_records = as_rankings(train_part, cfg.data.path), as_rankings(val_part, cfg.data.path)

    # 3. Model: the causal LM's backbone with a fresh scalar head, a pad token that is not the
    #    end-of-turn token (the score is read at the last real token), then what trains.
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    engine.set_seed(cfg.train.seed)
    causal_lm = load_model(cfg.model, dtype="fp32", device="cpu", merge_adapter=True,
                           trust_remote_code=cfg.trust_remote_code)
    model = reward_model_from_causal_lm(causal_lm, tokenizer)
    del causal_lm
    if cfg.train.dropout is not None:
        engine.set_dropout(model, cfg.train.dropout)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = apply_method(model, cfg.peft, task="SEQ_CLS")
    trainable, total = count_parameters(model)
    model.to(accelerator.device)

    # 4. Encode every response of every ranking with the chat template.
    train_ex, dropped = encode_rankings(tokenizer, train_records, template=cfg.data.template,
                                        max_length=cfg.data.max_length)
    val_ex, val_dropped = encode_rankings(tokenizer, val_records, template=cfg.data.template,
                                          max_length=cfg.data.max_length)
    if not train_ex:
        raise InputError("no ranking has two responses of different rank left to compare", file=cfg.data.path)
    collate = make_collate(tokenizer.pad_token_id)
    loss_module = RankingLoss(model, cfg.center_rewards_coefficient)
    with accelerator.autocast():
        before = pairwise_accuracy(loss_module, val_ex, collate, cfg.train.batch_size) if val_ex else None

    # 5. Train: each prompt weighs 1 in the loss, however many responses it has.
    started = time.time()
    result = engine.fit(
        loss_module=loss_module, model=model, examples=train_ex, collate=collate, weight=lambda e: 1,
        length=lambda e: sum(len(s) for s in e["input_ids"]), train=cfg.train, optim=cfg.optim, run=run,
        accelerator=accelerator, val_examples=val_ex, on_step=on_step, count_key="prompts",
        extra_metrics=lambda batch: dict(loss_module.last),
        finish_metrics=lambda s: {"accuracy": s["correct"] / max(s["pairs"], 1), "pairs": s["pairs"]})

    # 6. Held-out accuracy, then the bias that centres reference responses on 0.
    with accelerator.autocast():
        after = pairwise_accuracy(loss_module, val_ex, collate, cfg.train.batch_size) if val_ex else None
        bias = 0.0
        if cfg.normalize:
            bias = -mean_score(model, reference_sequences(cfg, tokenizer, train_ex), tokenizer.pad_token_id,
                               cfg.train.batch_size)

    summary = {
        "stage": "rm",
        "model": cfg.model,
        "method": cfg.peft.method,
        **result.summary(started),
        "val_loss": after["loss"] if after else None,
        "val_accuracy": after["accuracy"] if after else None,
        "val_accuracy_before": before["accuracy"] if before else None,
        "val_pairs": after["pairs"] if after else 0,
        "bias": bias,
        "train_prompts": len(train_ex),
        "val_prompts": len(val_ex),
        "dropped_without_pairs": dropped + val_dropped,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "final": str(run.final),
    }
    # 7. Save final/ as a plain sequence classifier (adapters merged) that anything can load.
    if accelerator.is_main_process:
        save_reward_model(model, tokenizer, run.final, bias=bias)
        engine.atomic_write_json(run.summary, summary)
    accelerator.wait_for_everyone()
    return summary


def save_reward_model(model: nn.Module, tokenizer, path: Path, *, bias: float) -> None:
    from instructkit.models.peft_methods import is_peft
    from instructkit.models.reward_model import BIAS_KEY
    from instructkit.train.engine import atomic_dir

    plain = model.merge_and_unload() if is_peft(model) else model
    setattr(plain.config, BIAS_KEY, bias)
    with atomic_dir(path) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
