"""GPTQ rounding into GGUF's Q8_0 blocks (Frantar et al. 2023, "GPTQ: Accurate post-training
quantization for generative pre-trained transformers").

A Q8_0 tensor stores each run of 32 weights along a row's input dimension as one f16 scale ``d``
and 32 int8 values ``q`` in [-127, 127]; the weight is ``q * d``. Round-to-nearest (what
``gguf.quants`` and llama.cpp's converter write) takes ``d = max|w| / 127`` and rounds every weight
alone. GPTQ writes the same kind of block, but rounds a matrix's columns one at a time and, after
each, moves the columns not yet rounded so that the layer's output on calibration inputs ``X``
changes least: with ``H = X^T X``, rounding column ``j`` with error ``e`` adds
``-e * Hinv[j, j:] / Hinv[j, j]`` to the rest of the row, ``Hinv`` being the upper Cholesky factor
of ``H^-1`` (the paper's Cholesky form of Optimal Brain Quantisation). A block's scale is taken
from its weights as they stand when its first column is reached. The file stays an ordinary
Q8_0 GGUF that any reader loads.

:func:`gptq_q8_0` is the pure rounding of one matrix; :func:`sequential_gptq` runs it over a
causal LM layer by layer, each layer's calibration inputs coming out of the layers below it
already rounded (as the paper's code does).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from instructkit.models.prune import decoder_layers, first_layer_inputs

BLOCK = 32  # Q8_0's block: 32 weights along the input dimension share one scale


def _scale(amax: torch.Tensor) -> torch.Tensor:
    """Q8_0's scale for blocks whose largest |weight| is ``amax``: computed in float32 and rounded to
    f16 as ``gguf.quants`` does, so a block's scale is the one round-to-nearest would store."""
    return (amax.float() / 127).to(torch.float16).to(amax.dtype)


def _round(w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(w), (w / torch.where(d == 0, 1, d)).round().clamp(-127, 127))


def q8_0_nearest(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest Q8_0: int8 values (rows, cols) and f16 scales (rows, cols / 32). The scales
    are ``gguf.quants``'s; the values are rounded against the stored f16 scale (gguf rounds
    against the float32 one before storing it, which can land one step off)."""
    rows, cols = weight.shape
    blocks = weight.detach().double().reshape(rows, cols // BLOCK, BLOCK)
    d = _scale(blocks.abs().amax(-1, keepdim=True))
    return _round(blocks, d).reshape(rows, cols).to(torch.int8), d.squeeze(-1).to(torch.float16)


def gptq_q8_0(
    weight: torch.Tensor, hessian: torch.Tensor, *, damp: float = 0.01, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-round ``weight`` (rows, cols; cols a multiple of 32) into Q8_0 blocks, ``hessian`` the
    (cols, cols) ``X^T X`` of its calibration inputs (any positive multiple of it). ``damp`` adds
    that fraction of the mean diagonal to the diagonal (the paper's 1%); ``block`` columns are
    updated at once (lazy batch updates: the same result). Returns int8 values (rows, cols) and
    f16 scales (rows, cols / 32), the dequantised weight being ``q * d`` block by block."""
    rows, cols = weight.shape
    if cols % BLOCK or block % BLOCK:
        raise ValueError(f"columns ({cols}) and block ({block}) must be multiples of {BLOCK}")
    W = weight.detach().double().clone()
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0  # inputs never seen: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros(rows, cols, dtype=torch.float64)
    D = torch.zeros(rows, cols // BLOCK, dtype=torch.float64)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, err = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=torch.float64)
        H1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if i % BLOCK == 0:
                d = _scale(W1[:, i : i + BLOCK].abs().amax(1))
                D[:, (i1 + i) // BLOCK] = d
            w = W1[:, i]
            q = _round(w, d)
            Q[:, i1 + i] = q
            e = (w - q * d) / H1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * H1[i, i:].unsqueeze(0)
            err[:, i] = e
        W[:, i2:] -= err @ Hinv[i1:i2, i2:]
    return Q.to(torch.int8), D.to(torch.float16)


def dequantize(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``q * d`` block by block, in float32 (what a GGUF reader makes of the blocks)."""
    rows, cols = q.shape
    blocks = q.double().reshape(rows, cols // BLOCK, BLOCK) * d.double().unsqueeze(-1)
    return blocks.reshape(rows, cols).float()


def q8_0_bytes(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The GGUF Q8_0 bytes of int8 values ``q`` (rows, cols) and f16 scales ``d`` (rows, cols / 32):
    per block the scale's two bytes, then the 32 values; shape (rows, cols / 32 * 34), uint8."""
    rows, cols = q.shape
    scales = np.ascontiguousarray(d.astype(np.float16)).view(np.uint8).reshape(rows, cols // BLOCK, 2)
    values = np.ascontiguousarray(q.astype(np.int8)).view(np.uint8).reshape(rows, cols // BLOCK, BLOCK)
    return np.concatenate([scales, values], axis=-1).reshape(rows, -1)


def _layer_hessians(layer: nn.Module, caught: Any, real: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``X^T X`` of every linear layer's input inside ``layer`` over the real tokens of ``caught``.
    Linears fed the same tensor (q, k and v; gate and up) share one matrix, computed once."""
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    sums: dict[str, torch.Tensor] = {}
    same_as: dict[str, str] = {}
    current: dict[str, Any] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            # the tensor is kept with its name, so that its memory cannot be reused in this pass
            first, _ = current["seen"].setdefault(args[0].data_ptr(), (name, args[0]))
            if first != name:
                same_as[name] = first
                return
            x = args[0].reshape(-1, args[0].size(-1))[current["mask"]].double()
            sums[name] = sums.get(name, 0) + x.T @ x

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        for (h, args, kwargs), mask in zip(caught, real):
            current.update(mask=mask, seen={})
            layer(h, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[same_as.get(name, name)] for name in linears}


@torch.no_grad()
def sequential_gptq(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], *, damp: float = 0.01
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ-round every linear layer of every decoder layer of ``model`` into Q8_0, layer by layer
    on the calibration ``batches`` (input_ids, attention_mask): layer ``l + 1``'s inputs are the
    outputs of layer ``l`` already rounded. The model ends holding the dequantised weights; returns
    ``{parameter name: (int8 values, f16 scales)}`` (names as ``model.named_parameters()``)."""
    caught, real = first_layer_inputs(model, batches)
    names = {id(p): n for n, p in model.named_parameters()}
    blocks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in decoder_layers(model):
        hessians = _layer_hessians(layer, caught, real)
        for name, m in layer.named_modules():
            if isinstance(m, nn.Linear) and m.in_features % BLOCK == 0:
                q, d = gptq_q8_0(m.weight, hessians[name], damp=damp)
                m.weight.copy_(dequantize(q, d).to(m.weight.dtype))
                blocks[names[id(m.weight)]] = (q, d)
        outs = [layer(h, *args, **kwargs) for h, args, kwargs in caught]
        caught = [(o[0] if isinstance(o, tuple) else o, args, kw) for o, (_, args, kw) in zip(outs, caught)]
    return blocks
