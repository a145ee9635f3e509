"""Pruning recipe: a model and a small calibration set in, a smaller or sparser model out.

Reads top to bottom: config -> calibration data -> model -> structured pruning (whole decoder
layers, FFN channels) -> unstructured or 2:4 masks -> save. The choices themselves are the pure
functions of :mod:`instructkit.models.prune`; nothing here trains, so a pruned model usually
goes on to a distillation or SFT stage that heals it.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

from instructkit.config import PruneConfig
from instructkit.stages import resolve_stage_config


def _calibration(cfg: PruneConfig, tokenizer: Any) -> list[dict[str, Any]]:
    """The calibration set as right-padded batches (input_ids, attention_mask)."""
    from instructkit.data.collate import lm_collate
    from instructkit.data.encoders import encode_records
    from instructkit.errors import InputError
    from instructkit.train import setup

    records = setup.read_records(cfg.data)[: cfg.calibration_examples]
    d = cfg.data
    examples, _ = encode_records(tokenizer, records, template=d.template, max_length=d.max_length, where=d.path)
    if not examples:
        raise InputError("no calibration example fits max_length", file=d.path, field="data.max_length")
    collate = lm_collate(tokenizer.pad_token_id)
    return [
        {k: v for k, v in collate(examples[i : i + cfg.batch_size]).items() if k in ("input_ids", "attention_mask")}
        for i in range(0, len(examples), cfg.batch_size)
    ]


def _masks(cfg: PruneConfig, model: Any, batches: list[dict[str, Any]]) -> dict[str, Any]:
    from instructkit.models import prune as P

    def keep(scores: Any) -> Any:
        if cfg.pattern == "semi_structured":
            return P.n_m_mask(scores, 2, 4)
        return P.unstructured_mask(scores, cfg.sparsity, per_row=cfg.scores == "wanda")

    if cfg.scores == "wanda":  # layer by layer, each layer's norms after the layers below are pruned
        return P.sequential_masks(model, batches, lambda m, norms: keep(P.wanda_scores(m.weight, norms)))
    return {name: keep(P.magnitude_scores(m.weight)) for name, m in P.prunable_linears(model).items()}


def prune(
    config: PruneConfig | str | Path | dict | None = None,
    overrides: list[str] | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prune ``config.model``; returns the run summary (also written to summary.json)."""
    import torch

    from instructkit.models import prune as P
    from instructkit.models.loading import load_model, load_tokenizer
    from instructkit.models.peft_methods import count_parameters
    from instructkit.train import setup

    # 1. Config and run folder.
    cfg = resolve_stage_config(PruneConfig, "prune", config, overrides)
    stage = setup.open_run(cfg, stage="prune", overwrite=overwrite)
    if stage.finished:
        return stage.run.saved_summary()
    started = time.time()
    with stage.cleanup_on_failure():
        # 2. Calibration data (bad records fail here, before the model loads), tokenizer, model.
        setup.read_records(cfg.data)
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        batches = _calibration(cfg, tokenizer)
        model = load_model(
            cfg.model, dtype="fp32", device="cpu", merge_adapter=True, trust_remote_code=cfg.trust_remote_code
        ).eval()
        _, before = count_parameters(model)
        layers_before = len(P.decoder_layers(model))
        facts: dict[str, Any] = {}
        with torch.no_grad():
            # 3. Structured: the block of layers that changes the residual stream least goes.
            if cfg.drop_layers:
                drop, distances = P.layers_to_drop(P.layer_inputs(model, batches), cfg.drop_layers)
                P.drop_layers(model, drop)
                facts.update(dropped_layers=drop, angular_distances=[round(d, 5) for d in distances])
            # 4. Structured: FFN channels, the same number kept in every layer.
            if cfg.ffn_keep < 1.0:
                norms = P.ffn_activation_norms(model, batches)
                layers = P.decoder_layers(model)
                keep = max(1, round(cfg.ffn_keep * layers[0].mlp.down_proj.in_features))
                P.keep_ffn_channels(
                    model,
                    {
                        i: P.channels_to_keep(P.ffn_channel_scores(norms[i], layer.mlp.down_proj.weight), keep)
                        for i, layer in enumerate(layers)
                    },
                )
                facts["ffn_channels_kept"] = keep
            # 5. Unstructured or 2:4 masks over the linear layers that remain.
            if cfg.sparsity or cfg.pattern == "semi_structured":
                P.apply_masks(model, _masks(cfg, model, batches))
        _, after = count_parameters(model)
        summary = {
            "stage": "prune",
            "model": cfg.model,
            "scores": cfg.scores,
            "pattern": cfg.pattern,
            "layers_before": layers_before,
            "layers_after": len(P.decoder_layers(model)),
            "parameters_before": before,
            "parameters_after": after,
            "sparsity": round(P.sparsity_of(model), 6),
            "calibration_examples": sum(int(b["input_ids"].shape[0]) for b in batches),
            **facts,
            "wall_seconds": round(time.time() - started, 2),
            "final": str(stage.run.final),
        }
    return stage.finish(summary, partial(_save, model, tokenizer, stage.run, summary))


def _save(model: Any, tokenizer: Any, run: Any, summary: dict[str, Any]) -> None:
    from instructkit.fileio import atomic_dir

    with atomic_dir(run.final) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    summary["bytes_on_disk"] = sum(p.stat().st_size for p in Path(run.final).glob("*.safetensors"))
