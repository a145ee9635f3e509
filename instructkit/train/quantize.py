"""Quantisation recipe: a model in, its weights in 8 or 4 bits out, saved so transformers reloads it.

Reads top to bottom: config -> model (adapters merged, written once in fp32) -> quantise while
loading it back through transformers' ``TorchAoConfig`` -> save. torchao does the arithmetic on
CPU (and GPU); ``nf4`` is bitsandbytes' 4-bit NormalFloat, for GPUs. The saved folder's
``config.json`` carries the quantisation config, so ``from_pretrained`` (and every instructkit
command) loads it quantised again.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from instructkit.config import QuantizeConfig
from instructkit.stages import resolve_stage_config


def quantization_config(cfg: QuantizeConfig) -> Any:
    """The transformers quantisation config of ``cfg.scheme``."""
    from instructkit.errors import InputError

    if cfg.scheme == "nf4":
        import torch
        from transformers import BitsAndBytesConfig

        if not torch.cuda.is_available():
            raise InputError(
                "nf4 is bitsandbytes' GPU path and this machine has no CUDA device; on CPU use int8_weight_only, "
                "int8_dynamic or int4_weight_only (torchao)",
                field="scheme",
            )
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    try:
        import torch
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
        )
        from torchao.quantization.granularity import PerGroup
        from transformers import TorchAoConfig
    except ImportError as exc:  # torchao is pinned in requirements.lock; this is for other installs
        raise InputError(f"quantisation needs torchao ({exc})", field="scheme") from exc
    schemes = {
        "int8_weight_only": lambda: Int8WeightOnlyConfig(),
        "int8_dynamic": lambda: Int8DynamicActivationInt8WeightConfig(),
        # torchao's int4 kernels are CUDA's; on CPU the int4 values are stored unpacked in int8.
        "int4_weight_only": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(cfg.group_size)),
    }
    return TorchAoConfig(schemes[cfg.scheme]())


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def quantize(
    config: QuantizeConfig | str | Path | dict | None = None,
    overrides: list[str] | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Quantise ``config.model``; returns the run summary (also written to summary.json)."""
    from transformers import AutoModelForCausalLM

    from instructkit.fileio import atomic_dir
    from instructkit.models.loading import load_model, load_tokenizer
    from instructkit.models.peft_methods import count_parameters
    from instructkit.train import setup

    # 1. Config and run folder; the quantisation config first (an unusable scheme stops here).
    cfg = resolve_stage_config(QuantizeConfig, "quantize", config, overrides)
    qconfig = quantization_config(cfg)
    stage = setup.open_run(cfg, stage="quantize", overwrite=overwrite)
    if stage.finished:
        return stage.run.saved_summary()
    started = time.time()
    with stage.cleanup_on_failure(), tempfile.TemporaryDirectory(dir=stage.run.path) as tmp:
        # 2. The full-precision model with its adapters merged, as a plain HF folder.
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        full = load_model(
            cfg.model, dtype="fp32", device="cpu", merge_adapter=True, trust_remote_code=cfg.trust_remote_code
        )
        _, parameters = count_parameters(full)
        full.save_pretrained(tmp, safe_serialization=True)
        before = _weights_bytes(Path(tmp))
        del full
        # 3. Loaded back through transformers, quantised as it loads, and saved with its config.
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=qconfig, dtype="float32")
        summary = {
            "stage": "quantize",
            "model": cfg.model,
            "scheme": cfg.scheme,
            "group_size": cfg.group_size if cfg.scheme == "int4_weight_only" else None,
            "parameters": parameters,
            "bytes_before": before,
            "wall_seconds": None,
            "final": str(stage.run.final),
        }

        def save() -> None:
            with atomic_dir(stage.run.final) as out:
                model.save_pretrained(out, safe_serialization=True)
                tokenizer.save_pretrained(out)
            summary["bytes_on_disk"] = _weights_bytes(Path(stage.run.final))
            summary["wall_seconds"] = round(time.time() - started, 2)

        return stage.finish(summary, save)
