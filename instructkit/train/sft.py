"""Supervised fine-tuning recipe: demonstrations in, a model that imitates them out.

Reads top to bottom: config -> data -> model -> encode -> train -> save. Everything shared with
other recipes (the loop, checkpoints, resume, logging) lives in :mod:`instructkit.train.engine`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from instructkit.config import SFTConfig, resolve_stage_config
from instructkit.data.schema import Conversation, Text
from instructkit.errors import InputError


def encode_records(tokenizer, records: list[Any], *, template: str | None, max_length: int,
                   where: str) -> tuple[list[dict[str, list[int]]], int]:
    """Encode conversations (assistant turns trained) or plain text; count dropped examples."""
    from instructkit.data.templates import encode_conversation, encode_text

    encoded, dropped = [], 0
    for i, record in enumerate(records):
        if isinstance(record, Conversation):
            enc = encode_conversation(tokenizer, record.messages, template=template, max_length=max_length,
                                      tools=record.tools)
        elif isinstance(record, Text):
            enc = encode_text(tokenizer, record.text, max_length=max_length)
        else:
            raise InputError(f"SFT trains on demonstrations or plain text, not {type(record).__name__} "
                             f"records", file=where, record=i)
        if enc is None or not any(label != -100 for label in enc.labels):
            dropped += 1
            continue
        encoded.append({"input_ids": list(enc.input_ids), "labels": list(enc.labels)})
    return encoded, dropped


def _field(example: Any, name: str) -> list[int]:
    return example[name] if isinstance(example, dict) else getattr(example, name)


def trained_tokens(example: Any) -> int:
    """Targets that count in the loss: labels at positions 1.. that are not -100."""
    return sum(1 for label in _field(example, "labels")[1:] if label != -100)


def real_tokens(example: Any) -> int:
    return len(_field(example, "input_ids"))


def make_collate(pad_id: int, packed: bool) -> Callable[[list[dict]], dict]:
    from instructkit.data.collate import collate_packed, pad_batch

    if packed:
        return lambda batch: collate_packed(batch, pad_id=pad_id)
    return lambda batch: pad_batch(batch, pad_id=pad_id, side="right")


def sft(config: SFTConfig | str | Path | dict | None = None, overrides: list[str] | None = None, *,
        on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run supervised fine-tuning; returns the run summary (also written to summary.json)."""
    from instructkit.data.formats import load_records
    from instructkit.data.split import split_records
    from instructkit.models.lm import CausalLMLoss
    from instructkit.models.loading import load_model, load_tokenizer
    from instructkit.models.peft_methods import apply_method, count_parameters, is_peft
    from instructkit.train import engine

    # 1. Resolve the config and the run folder (config.yaml is written before anything runs).
    cfg = resolve_stage_config(SFTConfig, "sft", config, overrides)
    if not cfg.data.path:
        raise InputError("no training data: set data.path", field="data.path")
    run = engine.RunDir(Path(cfg.out))
    accelerator = engine.make_accelerator(cfg.train)
    if accelerator.is_main_process:
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_config(cfg)

    # 2. Data: read, validate, split. Bad records fail here, before a model is loaded.
    from instructkit.datasets import resolve_data_path

    data_path = resolve_data_path(cfg.data.path)
    loaded = load_records(data_path, format=cfg.data.format, columns=cfg.data.columns)
    records = loaded.records[: cfg.data.limit] if cfg.data.limit else loaded.records
    if cfg.data.val_path:
        train_records, val_records = records, load_records(resolve_data_path(cfg.data.val_path),
                                                           format=cfg.data.format, columns=cfg.data.columns).records
    else:
        train_records, val_records, _ = split_records(records, val_fraction=cfg.data.val_fraction,
                                                      test_fraction=0.0, seed=cfg.data.seed)

    # 3. Tokenizer and model; choose what trains (full, frozen layers, LoRA, ...).
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    engine.set_seed(cfg.train.seed)
    model = load_model(cfg.model, dtype="fp32", device="cpu", trust_remote_code=cfg.trust_remote_code)
    if cfg.train.dropout is not None:
        engine.set_dropout(model, cfg.train.dropout)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = apply_method(model, cfg.peft)
    trainable, total = count_parameters(model)
    model.to(accelerator.device)

    # 4. Encode with the chat template: only assistant tokens (and their end-of-turn) train.
    train_ex, dropped = encode_records(tokenizer, train_records, template=cfg.data.template,
                                       max_length=cfg.data.max_length, where=cfg.data.path)
    val_ex, val_dropped = encode_records(tokenizer, val_records, template=cfg.data.template,
                                         max_length=cfg.data.max_length, where=cfg.data.val_path or cfg.data.path)
    if not train_ex:
        raise InputError("no trainable examples left after encoding (all too long or without assistant turns)",
                         file=cfg.data.path)
    if cfg.data.packing:
        from instructkit.data.collate import pack_examples

        train_ex = pack_examples(train_ex, cfg.data.max_length)
        val_ex = pack_examples(val_ex, cfg.data.max_length)
    if dropped:
        accelerator.print(f"note: {dropped} training examples did not fit max_length={cfg.data.max_length} "
                          f"and were left out")
    collate = make_collate(tokenizer.pad_token_id, cfg.data.packing)

    # 5. Train: exact token-weighted loss across micro-batches and processes.
    started = time.time()
    result = engine.fit(loss_module=CausalLMLoss(model, cfg.train.loss_chunk_size), model=model,
                        examples=train_ex, collate=collate, weight=trained_tokens, length=real_tokens, train=cfg.train,
                        optim=cfg.optim, run=run, accelerator=accelerator, val_examples=val_ex,
                        on_step=on_step)

    # 6. Save final/: a peft adapter (plus merged/ on request) or full weights, with the tokenizer.
    summary = {
        "stage": "sft",
        "model": cfg.model,
        "method": cfg.peft.method,
        **result.summary(started),
        "val_loss": result.final_val_loss,
        "best_val_loss": result.best_val_loss,
        "train_examples": len(train_ex),
        "val_examples": len(val_ex),
        "dropped_too_long": dropped + val_dropped,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "final": str(run.final),
    }
    if accelerator.is_main_process:
        save_final(model, tokenizer, run, base_spec=cfg.model, merged=cfg.save_merged and is_peft(model))
        engine.atomic_write_json(run.summary, summary)
    accelerator.wait_for_everyone()
    return summary


def save_final(model, tokenizer, run, *, base_spec: str, merged: bool) -> None:
    """Write final/ atomically (adapter or full weights + tokenizer), and merged/ if asked."""
    from instructkit.models.peft_methods import is_peft
    from instructkit.train.engine import atomic_dir

    with atomic_dir(run.final) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if is_peft(model):
            (tmp / "instructkit_base.txt").write_text(str(base_spec) + "\n")
    if merged:
        with atomic_dir(run.path / "merged") as tmp:
            model.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
