"""Checks every training recipe must pass, written once: exact gradient accumulation and exact
resume after a crash. ``recipe(config_dict, on_step=...)`` is sft, rm, dpo, ...;
``make_config(out, **train)`` builds that recipe's config for a run folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from instructkit.train.engine import MetricsLog, StopTraining


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in MetricsLog(out / "metrics.jsonl").read()]


def assert_accumulation_is_exact(recipe: Callable, make_config: Callable, tmp_path: Path) -> None:
    """Batch 8 x accumulation 1 and batch 1 x accumulation 8 give the same loss curve."""
    recipe(make_config(tmp_path / "a", batch_size=8, grad_accum=1))
    recipe(make_config(tmp_path / "b", batch_size=1, grad_accum=8))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-5)


def assert_resumes_exactly(
    recipe: Callable, make_config: Callable, tmp_path: Path, crash_after: int = 3, **train
) -> None:
    """A run killed after step ``crash_after`` and rerun reproduces the uninterrupted curve."""
    recipe(make_config(tmp_path / "full", save_every=2, **train))

    def crash(step: int) -> None:
        if step == crash_after:
            raise StopTraining("simulated crash")

    with pytest.raises(StopTraining):
        recipe(make_config(tmp_path / "cut", save_every=2, **train), on_step=crash)
    assert not (tmp_path / "cut" / "final").exists()
    recipe(make_config(tmp_path / "cut", save_every=2, **train))
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")


def trl_parity_args(out: Path) -> dict:
    """The TRL trainer settings the parity tests compare against instructkit's own run: batch 8,
    10 steps at a constant lr 1e-3 without warm-up or decay, clipping at 1, fp32 on CPU, no
    gradient checkpointing, logging every step, no saving, no worker processes."""
    return {
        "output_dir": str(out),
        "per_device_train_batch_size": 8,
        "max_steps": 10,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "dataloader_num_workers": 0,
    }
