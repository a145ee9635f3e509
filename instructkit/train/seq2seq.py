"""Seq2seq recipe: an encoder-decoder learns to write the answer of instruction records.

Reads top to bottom: config -> data -> model -> encode -> train -> save. The model is any
``AutoModelForSeq2SeqLM`` (BART, T5, a seq2seq run) or, when ``model`` is an encoder, a BERT2BERT
warm-started from it (Rothe et al. 2020; :func:`instructkit.models.seq2seq.warm_start`). The
records and their source/target encoding are :mod:`instructkit.data.seq2seq`, the loss
:class:`instructkit.models.seq2seq.Seq2SeqLoss`, the loop :mod:`instructkit.train.engine`.
Held-out scores are the eval stage's (generation suites over the saved final/).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from instructkit.config import Seq2SeqConfig
from instructkit.errors import InputError
from instructkit.stages import resolve_stage_config


def resolve_warm_start(cfg: Seq2SeqConfig) -> bool:
    """``cfg.warm_start``, else whether ``cfg.model`` is not an encoder-decoder (from its config,
    no weights loaded); an InputError when a warm start is refused for a model that needs one."""
    from instructkit.models.seq2seq import config_of, is_encoder_decoder

    seq2seq_model = is_encoder_decoder(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if cfg.warm_start is None:
        return not seq2seq_model
    if cfg.warm_start and seq2seq_model:
        raise InputError(
            f"{cfg.model} is already an encoder-decoder; warm_start builds one from an encoder (leave it null)",
            field="warm_start",
        )
    if not cfg.warm_start and not seq2seq_model:
        kind = (config_of(cfg.model) or {}).get("model_type", "unknown")
        raise InputError(
            f"{cfg.model} is not an encoder-decoder (model_type {kind}); set warm_start: true to build a "
            "BERT2BERT from it, or name a BART/T5 model",
            field="warm_start",
        )
    return cfg.warm_start


def load_seq2seq(cfg: Seq2SeqConfig, warm: bool, device: Any):
    """The tokenizer and the encoder-decoder (warm-started or loaded whole) with what trains:
    full weights, or a LoRA-family adapter (peft task SEQ_2_SEQ_LM)."""
    from instructkit.models.loading import load_model, load_tokenizer, resolve
    from instructkit.models.peft_methods import METHODS, count_parameters
    from instructkit.models.seq2seq import warm_start
    from instructkit.train.engine import set_dropout, set_seed
    from instructkit.train.setup import Trainable, enable_gradient_checkpointing

    if warm:
        model, tokenizer = warm_start(cfg.model, seed=cfg.train.seed, trust_remote_code=cfg.trust_remote_code)
    else:
        if resolve(cfg.model).folder:
            raise InputError(f"{cfg.model} is an adapter; a seq2seq stage starts from whole weights", field="model")
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        set_seed(cfg.train.seed)
        model = load_model(cfg.model, dtype="fp32", device="cpu", trust_remote_code=cfg.trust_remote_code)
    if cfg.train.dropout is not None:
        set_dropout(model, cfg.train.dropout)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    # apply_method's task list is the decoder's; the LoRA family and full weights build the same
    # way for an encoder-decoder, with peft's seq2seq task type.
    model = METHODS[cfg.peft.method].build(model, cfg.peft, "SEQ_2_SEQ_LM")
    trainable, total = count_parameters(model)
    return Trainable(tokenizer, model.to(device), trainable, total)


def seq2seq(
    config: Seq2SeqConfig | str | Path | dict | None = None,
    overrides: list[str] | None = None,
    *,
    on_step: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train an encoder-decoder on instruction data; returns the run summary (also summary.json)."""
    from instructkit.data.seq2seq import check_records, encode_seq2seq, real_tokens, seq2seq_collate, target_tokens
    from instructkit.models.seq2seq import Seq2SeqLoss, special_ids
    from instructkit.train import engine, setup

    # 1. Resolve the config; check the run folder (a finished run with this config is returned as is).
    cfg = resolve_stage_config(Seq2SeqConfig, "seq2seq", config, overrides)
    stage = setup.open_run(cfg, stage="seq2seq", overwrite=overwrite)
    if stage.finished:
        return stage.run.saved_summary()
    with stage.cleanup_on_failure():
        # 2. Data and the kind of model: bad records and a model that cannot be one fail here, before it loads.
        d = cfg.data
        splits = setup.load_splits(d)
        check_records(splits.train, d.path)
        check_records(splits.val, d.val_path or d.path)
        warm = resolve_warm_start(cfg)

        # 3. The encoder-decoder (BERT2BERT from the encoder, or loaded whole); what trains.
        parts = load_seq2seq(cfg, warm, stage.accelerator.device)
        start_id, eos_id, pad_id = special_ids(parts.model)

        # 4. Encode: source = the prompt's text, target = the answer + eos (the decoder starts from start_id).
        encode = partial(
            encode_seq2seq,
            parts.tokenizer,
            decoder_start_id=start_id,
            eos_id=eos_id,
            max_source_length=d.max_source_length,
            max_target_length=d.max_target_length,
        )
        problem = "no training examples left after encoding (all longer than max_source_length/max_target_length)"
        enc = setup.encode_splits(
            splits, partial(encode, where=d.path), d, problem, encode_val=partial(encode, where=d.val_path or d.path)
        )
        if enc.train_dropped:
            stage.print(f"note: {enc.train_dropped} training examples were too long and were left out")

        # 5. Train: token cross-entropy over the targets, exact across micro-batches.
        started = time.time()
        result = engine.fit(
            loss_module=Seq2SeqLoss(parts.model),
            model=parts.model,
            examples=enc.train,
            collate=seq2seq_collate(pad_id, start_id),
            weight=target_tokens,
            length=real_tokens,
            train=cfg.train,
            optim=cfg.optim,
            run=stage.run,
            accelerator=stage.accelerator,
            val_examples=enc.val,
            on_step=on_step,
        )

    # 6. Save final/: plain encoder-decoder weights (an adapter merged), the tokenizer, the warm-start record.
    summary = setup.stage_summary(
        "seq2seq",
        cfg,
        parts,
        stage.run,
        warm_start=cfg.model if warm else None,
        **result.summary(started),
        val_loss=result.final_val_loss,
        best_val_loss=result.best_val_loss,
        train_examples=len(enc.train),
        val_examples=len(enc.val),
        dropped_too_long=enc.dropped,
    )
    return stage.finish(summary, lambda: save_seq2seq(parts, stage.run, cfg.model if warm else None, cfg.train.seed))


def save_seq2seq(parts, run, warm_start: str | None, seed: int) -> None:
    """final/: the encoder-decoder (a LoRA adapter merged into it) with its generation config and
    tokenizer; for a BERT2BERT, the encoder and seed it was built from."""
    from instructkit.fileio import atomic_dir
    from instructkit.models.peft_methods import is_peft
    from instructkit.models.seq2seq import save_warm_start_record

    plain = parts.model.merge_and_unload() if is_peft(parts.model) else parts.model
    with atomic_dir(run.final) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        parts.tokenizer.save_pretrained(tmp)
        if warm_start is not None:
            save_warm_start_record(tmp, warm_start, seed)
