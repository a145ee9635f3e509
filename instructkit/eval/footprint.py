"""What a model costs to keep and to run: parameters, weights on disk, batch-1 decode speed.

The eval stage adds these to each model's row when its config says ``footprint: true`` (the
compression recipe does), so a table and a plot can set size and speed against held-out quality.

- ``weights_mb``: the bytes of the files that hold the weights a spec loads, in MiB: a GGUF file
  itself; a folder's ``*.safetensors`` (or ``*.bin``); an adapter's folder plus the base it sits on
  (and any adapters merged under it), so a LoRA run costs what serving it needs.
- ``parameters_m``: the loaded model's parameter count in millions (quantised tensors count their
  logical elements).
- ``decode_tokens_per_s``: greedy decoding at batch 1 of exactly ``tokens`` new tokens
  (``min_new_tokens`` keeps eos from ending it early) on each of the first prompts, after one
  warm-up call; new tokens over wall time, prompt prefill included.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def _folder_weights(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def weights_bytes(spec: str) -> int:
    """Bytes on disk of the weights ``spec`` loads (see the module docstring)."""
    from instructkit.models.embedded import EMBEDDED, embedded_model_dir
    from instructkit.models.loading import resolve

    path = Path(spec)
    if path.is_file():  # a .gguf file: the file is the model
        return path.stat().st_size
    if (path / "final").is_dir():
        path = path / "final"
    gguf = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if gguf and not (path / "config.json").is_file():
        return sum(p.stat().st_size for p in gguf)
    resolved = resolve(spec)
    base = Path(embedded_model_dir(resolved.base)) if resolved.base in EMBEDDED else Path(resolved.base)
    folders = [base, *map(Path, resolved.merged_first)]
    if resolved.folder and Path(resolved.folder) != base:
        folders.append(Path(resolved.folder))
    return sum(_folder_weights(f) for f in folders if f.is_dir())


def decode_tokens_per_s(model: Any, tokenizer: Any, prompts: Sequence[Sequence[Any]], tokens: int) -> float:
    """Batch-1 greedy decode speed over ``prompts`` (chat messages), ``tokens`` new tokens each."""
    import torch

    from instructkit.data.templates import encode_prompt
    from instructkit.generation import generate_new
    from instructkit.models.passes import eval_mode, module_device

    device = module_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False, "pad_token_id": pad}
    rows = [torch.tensor([encode_prompt(tokenizer, list(p))], device=device) for p in prompts]
    with eval_mode(model):
        generate_new(model, rows[0], torch.ones_like(rows[0]), **kwargs)  # warm-up
        new, started = 0, time.perf_counter()
        for ids in rows:
            out, width = generate_new(model, ids, torch.ones_like(ids), **kwargs)
            new += out.shape[1] - width
        elapsed = time.perf_counter() - started
    return new / elapsed


def footprint(spec: str, model: Any, tokenizer: Any, prompts: Sequence[Sequence[Any]], tokens: int) -> dict[str, float]:
    """The three numbers of the module docstring for ``spec``, loaded as ``model``."""
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "weights_mb": round(weights_bytes(spec) / 2**20, 2),
        "parameters_m": round(parameters / 1e6, 3),
        "decode_tokens_per_s": round(decode_tokens_per_s(model, tokenizer, prompts, tokens), 2),
    }
