"""Supervised fine-tuning recipe: demonstrations in, a model that imitates them out.

Reads top to bottom: config -> data -> model -> encode -> train -> save. The set-up shared with
the other recipes lives in :mod:`instructkit.train.setup`, the loop, checkpoints and resume in
:mod:`instructkit.train.engine`, the encoders in :mod:`instructkit.data.encoders`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from instructkit.config import SFTConfig
from instructkit.stages import resolve_stage_config


def sft(
    config: SFTConfig | str | Path | dict | None = None,
    overrides: list[str] | None = None,
    *,
    on_step: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run supervised fine-tuning; returns the run summary (also written to summary.json)."""
    from instructkit.data.collate import lm_collate, pack_examples
    from instructkit.data.encoders import encode_records, real_tokens, trained_tokens
    from instructkit.models.lm import CausalLMLoss
    from instructkit.models.peft_methods import is_peft
    from instructkit.train import engine, setup

    # 1. Resolve the config; check the run folder (a finished run with this config is returned as is).
    cfg = resolve_stage_config(SFTConfig, "sft", config, overrides)
    stage = setup.open_run(cfg, stage="sft", overwrite=overwrite)
    if stage.finished:
        return stage.run.saved_summary()
    with stage.cleanup_on_failure():
        # 2. Data: read, validate, split. Bad records fail here, before a model is loaded.
        splits = setup.load_splits(cfg.data)

        # 3. Tokenizer and model; choose what trains (full, frozen layers, LoRA, ...). An adapter run
        #    as the model is merged first, so a new LoRA trains on top of it rather than replacing it.
        parts = setup.load_trainable(cfg, device=stage.accelerator.device, merge_adapter=True)

        # 4. Encode with the chat template: only assistant tokens (and their end-of-turn) train.
        d = cfg.data
        cut: dict[str, int] = {}
        encode = partial(
            encode_records, parts.tokenizer, template=d.template, max_length=d.max_length, truncation=d.truncation
        )
        problem = "no trainable examples left after encoding (all too long or without assistant turns)"
        enc = setup.encode_splits(
            splits,
            partial(encode, where=d.path, counts=cut),
            d,
            problem,
            encode_val=partial(encode, where=d.val_path or d.path),
        )
        train_ex, val_ex = enc.train, enc.val
        if d.packing:
            train_ex, val_ex = pack_examples(train_ex, d.max_length), pack_examples(val_ex, d.max_length)
        if enc.train_dropped:
            keep = " (data.truncation: cut-response keeps them)" if d.truncation == "whole-turns" else ""
            stage.print(
                f"note: {enc.train_dropped} training examples did not fit max_length={d.max_length} "
                f"and were left out{keep}"
            )
        if cut.get("cut"):
            stage.print(
                f"note: {cut['cut']} training examples were longer than max_length={d.max_length}: "
                "their last kept assistant turn was cut to fit (data.truncation: cut-response)"
            )

        # 5. Train: exact token-weighted loss across micro-batches and processes.
        started = time.time()
        result = engine.fit(
            loss_module=CausalLMLoss(parts.model, cfg.train.loss_chunk_size),
            model=parts.model,
            examples=train_ex,
            collate=lm_collate(parts.tokenizer.pad_token_id, d.packing),
            weight=trained_tokens,
            length=real_tokens,
            train=cfg.train,
            optim=cfg.optim,
            run=stage.run,
            accelerator=stage.accelerator,
            val_examples=val_ex,
            on_step=on_step,
        )

    # 6. Save final/: a peft adapter (plus merged/ on request) or full weights, with the tokenizer.
    summary = setup.stage_summary(
        "sft",
        cfg,
        parts,
        stage.run,
        **result.summary(started),
        val_loss=result.final_val_loss,
        best_val_loss=result.best_val_loss,
        train_examples=len(train_ex),
        val_examples=len(val_ex),
        dropped_too_long=enc.dropped,
        cut_to_fit=cut.get("cut", 0),
    )
    merged = cfg.save_merged and is_peft(parts.model)
    return stage.finish(
        summary, lambda: setup.save_final(parts.model, parts.tokenizer, stage.run, base_spec=cfg.model, merged=merged)
    )
