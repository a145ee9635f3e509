"""QLoRA's base (Dettmers et al. 2023, Sec. 3): every linear layer of the decoder stored in 4-bit
NormalFloat (NF4), blocks of 64 weights sharing one absmax, the absmaxes themselves quantised
to 8 bits (double quantisation); LoRA (``peft_methods``, method ``qlora``) trains on top, in the
compute dtype of the input. The output head (``lm_head``, tied to the embeddings in most small
models) and a reward/value head (``score``) stay in full precision, as in the paper.

One code path for CPU and GPU: bitsandbytes' ``Linear4bit`` (its CPU backend since 0.45; on a
GPU its CUDA kernels, an untested path here: this machine has no GPU). The model is quantised
after it loads (on the CPU, as every recipe loads it) and then moved with ``.to(device)``.
Quantisation is deterministic, so a saved LoRA adapter put back on the re-quantised base
(``models.loading``, told by ``instructkit_quantization.json`` beside the adapter) gives the
logits it was saved with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from instructkit.config import QLORA_NEEDS
from instructkit.errors import InputError

RECORD_NAME = "instructkit_quantization.json"  # beside a qlora adapter: how to re-quantise its base
BLOCKSIZE = 64  # bitsandbytes' 4-bit block; its CPU kernels need in_features to be a multiple of it
KEEP = ("lm_head", "score")  # heads kept in full precision
RECORD = {"method": "bitsandbytes-nf4", "blocksize": BLOCKSIZE, "double_quant": True, "keep": list(KEEP)}


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError as exc:
        raise InputError(QLORA_NEEDS, field="peft.method") from exc
    return bitsandbytes


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, name, layer) of every plain ``nn.Linear`` to quantise."""
    return [
        (parent, name, child)
        for _, parent in model.named_modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and name not in KEEP
    ]


def quantize_nf4(model: nn.Module) -> nn.Module:
    """Replace the linear layers of ``model`` (in place) by frozen bitsandbytes NF4 layers."""
    bnb = _bitsandbytes()
    linears = _linears(model)
    if not linears:
        raise InputError(f"qlora: {type(model).__name__} has no linear layers to quantise", field="peft.method")
    odd = [(name, layer.in_features) for _, name, layer in linears if layer.in_features % BLOCKSIZE]
    if odd:
        raise InputError(
            f"qlora: layer '{odd[0][0]}' has {odd[0][1]} inputs, not a multiple of bitsandbytes' 4-bit block "
            f"of {BLOCKSIZE}; this model is too small or oddly shaped for 4-bit; use lora",
            field="peft.method",
        )
    for parent, name, layer in linears:
        device = layer.weight.device
        quantized = bnb.nn.Linear4bit(
            layer.in_features, layer.out_features, bias=layer.bias is not None, quant_type="nf4", device="meta"
        )
        quantized.weight = bnb.nn.Params4bit(
            layer.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=BLOCKSIZE
        )
        if layer.bias is not None:
            quantized.bias = nn.Parameter(layer.bias.data, requires_grad=False)
        # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks the weight in place at the first
        # no-grad eval forward and from then on runs a kernel (gemv_4bit) with no autograd: later
        # training passes would send no gradient through the base layers, and sampling and
        # training log-probs would differ (PPO). The plain dequantise-and-matmul path always.
        quantized.support_avx512bf16_for_cpu = False
        setattr(parent, name, quantized.to(device))  # Params4bit quantises when moved to a device
    model.requires_grad_(False)
    model.quantization_record = dict(RECORD)
    return model


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quantization_record", None) is not None  # peft models pass attributes through


def save_record(model: nn.Module, folder: Path) -> None:
    (Path(folder) / RECORD_NAME).write_text(json.dumps(model.quantization_record, indent=2) + "\n", encoding="utf-8")


def check_record(folder: Path) -> None:
    """The record beside an adapter names the one quantisation this module makes."""
    path = Path(folder) / RECORD_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read the quantisation record ({exc})", file=str(path)) from exc
    if record != RECORD:
        raise InputError(f"unknown base quantisation {record} (this version makes {RECORD})", file=str(path))
