"""Export recipe: a recipe's `export` stage, the model of an earlier stage out as one GGUF file (or a
merged HF folder), checked against its source.

Reads top to bottom: config -> run folder -> :func:`instructkit.export.export` into ``final/``
(adapters merged, the file loaded back and its logits compared with the source's) -> summary. The
next stages load ``final/`` as any model: a folder holding one ``.gguf`` file is that file.
The command on its own is ``instructkit export MODEL OUT`` (docs/export.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from instructkit.config import ExportStageConfig, TrainConfig
from instructkit.stages import resolve_stage_config


def export_stage(
    config: ExportStageConfig | str | Path | dict | None = None,
    overrides: list[str] | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export ``config.model`` into ``config.out/final``; returns the run summary (summary.json)."""
    from instructkit.export import export
    from instructkit.fileio import atomic_dir
    from instructkit.train import setup

    cfg = resolve_stage_config(ExportStageConfig, "export", config, overrides)
    stage = setup.open_run(cfg, stage="export", overwrite=overwrite, train=TrainConfig(device="cpu"))
    if stage.finished:
        return stage.run.saved_summary()
    started = time.time()
    summary: dict[str, Any] = {"stage": "export", "model": cfg.model, "final": str(stage.run.final)}

    def save() -> None:
        with atomic_dir(stage.run.final) as tmp:
            target = tmp / "model.gguf" if cfg.format == "gguf" else tmp / "model"
            result = export(
                cfg.model,
                target,
                fmt=cfg.format,
                quant=cfg.quant,
                check_data=cfg.check_data,
                check_prompts=cfg.check_prompts,
                rounding=cfg.rounding,
                calibration_data=cfg.calibration_data,
                calibration_examples=cfg.calibration_examples,
            )
            if cfg.format == "merged":  # the folder's files, not a folder inside final/
                for f in target.iterdir():
                    f.rename(tmp / f.name)
                target.rmdir()
        summary.update({k: v for k, v in result.items() if k != "out"}, wall_seconds=round(time.time() - started, 2))

    with stage.cleanup_on_failure():
        return stage.finish(summary, save)
