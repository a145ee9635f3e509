"""Pruning: which weights, channels or layers to remove, and removing them.

Unstructured and semi-structured pruning zero weights in place (the model keeps its shape):

- magnitude: score ``|W|``;
- Wanda (Sun et al. 2024, "A simple and effective pruning approach for large language models"):
  score ``|W_ij| * ||X_j||_2``, the weight times the norm of its input feature over a small
  calibration set, compared within each output row;
- N:M (2:4 for sparse tensor cores): in every group of M consecutive weights along the input
  dimension of a row, the N highest-scoring are kept.

Structured pruning makes the model really smaller and is saved as an ordinary HF model:

- whole decoder layers, chosen by the angular distance between the hidden states entering a
  block of ``n`` consecutive layers and leaving it (Gromov et al. 2024, "The unreasonable
  ineffectiveness of the deeper layers"): the block that changes its input least goes;
- FFN channels: the intermediate channels whose removal costs least, scored by the norm of the
  channel's activation over the calibration set times the norm of its down-projection column.

The selection functions are pure (tensors in, masks or indices out) and tested by hand; the
functions that change a model are the thin rest.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from instructkit.errors import InputError

# ----------------------------------------------------------------------------------------------
# Scores and masks (pure)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||``: weight (out, in), input_norms (in,) the L2 norm of each input feature."""
    if input_norms.shape != weight.shape[1:]:
        raise ValueError(f"input norms {tuple(input_norms.shape)} do not match weight {tuple(weight.shape)}")
    return weight.detach().abs() * input_norms.to(weight.dtype)[None, :]


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise InputError(f"sparsity must be in [0, 1), got {sparsity}", field="sparsity")


def unstructured_mask(scores: torch.Tensor, sparsity: float, *, per_row: bool = True) -> torch.Tensor:
    """Boolean keep-mask that drops the ``floor(sparsity * n)`` lowest scores: within each output
    row (Wanda's comparison group) or over the whole matrix (``per_row=False``, classic
    magnitude pruning). Ties go to the earlier index, so the mask is deterministic."""
    _check_sparsity(sparsity)
    groups = scores if per_row else scores.reshape(1, -1)
    drop = math.floor(sparsity * groups.size(1))
    keep = torch.ones_like(groups, dtype=torch.bool)
    if drop:
        # stable sort: among equal scores the earlier index is dropped first.
        order = torch.sort(groups, dim=1, stable=True).indices[:, :drop]
        keep.scatter_(1, order, False)
    return keep.reshape(scores.shape)


def n_m_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep-mask with exactly ``n`` of every ``m`` consecutive weights along the input dimension."""
    if not 0 < n < m:
        raise InputError(f"N:M sparsity needs 0 < N < M, got {n}:{m}", field="pattern")
    out_features, in_features = scores.shape
    if in_features % m:
        raise InputError(f"{in_features} input features are not a multiple of M={m}", field="pattern")
    groups = scores.reshape(out_features, in_features // m, m)
    top = torch.topk(groups, n, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(out_features, in_features)


def follows_n_m(mask: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every group of ``m`` consecutive weights of every row keeps exactly ``n``."""
    rows, cols = mask.shape
    return cols % m == 0 and bool((mask.reshape(rows, cols // m, m).sum(-1) == n).all())


def angular_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``arccos(cos(x_t, y_t)) / pi``: 0 same direction, 1 opposite.
    x, y: (N, H) hidden states of the same N tokens."""
    cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).clamp(-1.0, 1.0)
    return (torch.arccos(cos) / math.pi).mean()


def layers_to_drop(hidden_states: Sequence[torch.Tensor], n: int) -> tuple[list[int], list[float]]:
    """The ``n`` consecutive layers whose removal changes the residual stream least.

    ``hidden_states[l]`` is the (N, H) input of layer l (``hidden_states[L]`` the last layer's
    output): L + 1 tensors for L layers. Returns the layer indices to drop (the block starting
    at the ``l`` minimising ``angular_distance(h[l], h[l + n])``) and the distance of every start.
    """
    layers = len(hidden_states) - 1
    if not 0 < n < layers:
        raise InputError(f"can drop between 1 and {layers - 1} of {layers} layers, not {n}", field="drop_layers")
    distances = [float(angular_distance(hidden_states[s], hidden_states[s + n])) for s in range(layers - n + 1)]
    start = min(range(len(distances)), key=distances.__getitem__)
    return list(range(start, start + n)), distances


def ffn_channel_scores(activation_norms: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """Importance of each intermediate channel: ``||a_c|| * ||W_down[:, c]||``, the size of what the
    channel adds to the residual stream. activation_norms (I,), down_weight (H, I)."""
    return activation_norms.double() * down_weight.detach().double().norm(dim=0)


def channels_to_keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` highest-scoring channels."""
    if not 0 < keep <= scores.numel():
        raise InputError(f"keep between 1 and {scores.numel()} channels, not {keep}", field="ffn_keep")
    return torch.sort(torch.topk(scores, keep).indices).values


# ----------------------------------------------------------------------------------------------
# Statistics over a calibration set


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    from instructkit.models.lm import base_causal_lm

    lm = base_causal_lm(model)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise InputError(f"cannot find the decoder layers of {type(lm).__name__}", field="model")
    return layers


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers inside the decoder layers (attention and MLP projections), by name;
    embeddings and the LM head are left dense, as Wanda and SparseGPT do."""
    layers = decoder_layers(model)
    return {
        f"layers.{i}.{name}": module
        for i, layer in enumerate(layers)
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear)
    }


def _run_calibration(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], hooks: list[Any], keep: dict
) -> None:
    """Run ``model`` over ``batches`` with ``hooks`` (registered handles) in place, ``keep["mask"]``
    the flat boolean mask of each batch's real tokens; the hooks are removed whatever happens."""
    try:
        for batch in batches:
            keep["mask"] = batch["attention_mask"].reshape(-1).bool()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def input_norms(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """L2 norm of every input feature of every prunable linear layer over the real (unpadded)
    tokens of ``batches`` (dicts with input_ids and attention_mask)."""
    linears = prunable_linears(model)
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
    keep: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].reshape(-1, args[0].size(-1))[keep["mask"]]
            sums[name] += x.double().pow(2).sum(0).cpu()

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    _run_calibration(model, batches, handles, keep)
    return {name: s.sqrt() for name, s in sums.items()}


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the inputs it wanted are recorded."""


Caught = list[tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]]  # (hidden states, args, kwargs) per batch


def first_layer_inputs(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[Caught, list]:
    """What the model passes its first decoder layer for each batch, and each batch's real-token mask."""
    caught: Caught = []
    real: list[torch.Tensor] = []

    def catch(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h = args[0] if args else kwargs.pop("hidden_states")
        caught.append((h, tuple(args[1:]), dict(kwargs)))
        raise _StopForward

    handle = decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            real.append(batch["attention_mask"].reshape(-1).bool())
            with contextlib.suppress(_StopForward):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        handle.remove()
    return caught, real


def _layer_input_norms(layer: nn.Module, caught: Caught, real: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """L2 norm of every input feature of each linear layer inside ``layer``, run on ``caught``."""
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
    current: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].reshape(-1, args[0].size(-1))[current["mask"]]
            sums[name] += x.double().pow(2).sum(0).cpu()

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        for (h, args, kwargs), mask in zip(caught, real):
            current["mask"] = mask
            layer(h, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: s.sqrt() for name, s in sums.items()}


@torch.no_grad()
def sequential_masks(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    mask_of: Callable[[nn.Linear, torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Wanda's layer-by-layer procedure (Sun et al. 2024, the ``prune_wanda`` loop of their code):
    the calibration inputs of decoder layer ``l + 1`` are the outputs of layer ``l`` *after* it is
    pruned, so each layer's input norms see the errors of the layers below it.

    The inputs of the first layer (hidden states and the keyword arguments the model passes it:
    positions, rotary embeddings, mask) are caught once per batch; then each layer in turn runs on
    them to measure the input norms of its linear layers over the real tokens,
    ``mask_of(linear, input_norms)`` gives each linear's keep-mask, the masks are applied, and the
    pruned layer runs again to make the next layer's inputs. The model ends pruned; returns the
    masks by :func:`prunable_linears` name."""
    caught, real = first_layer_inputs(model, batches)
    masks: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(decoder_layers(model)):
        norms = _layer_input_norms(layer, caught, real)
        for name, m in layer.named_modules():
            if isinstance(m, nn.Linear):
                keep = mask_of(m, norms[name])
                m.weight.mul_(keep.to(m.weight.dtype))
                masks[f"layers.{i}.{name}"] = keep
        outs = [layer(h, *args, **kwargs) for h, args, kwargs in caught]
        caught = [(o[0] if isinstance(o, tuple) else o, args, kw) for o, (_, args, kw) in zip(outs, caught)]
    return masks


@torch.no_grad()
def layer_inputs(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """The residual stream entering every decoder layer and leaving the last one, over the real
    tokens of ``batches``: L + 1 tensors of shape (N, H)."""
    layers = decoder_layers(model)
    collected: list[list[torch.Tensor]] = [[] for _ in range(len(layers) + 1)]
    keep: dict[str, torch.Tensor] = {}

    def pre(i: int):
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            collected[i].append(h.reshape(-1, h.size(-1))[keep["mask"]].float().cpu())

        return record

    def post(module: nn.Module, args: Any, output: Any) -> None:
        h = output[0] if isinstance(output, tuple) else output
        collected[-1].append(h.reshape(-1, h.size(-1))[keep["mask"]].float().cpu())

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(post))
    _run_calibration(model, batches, handles, keep)
    return [torch.cat(parts) for parts in collected]


# ----------------------------------------------------------------------------------------------
# Changing the model


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the weights each keep-mask drops (names as :func:`prunable_linears`)."""
    linears = prunable_linears(model)
    for name, mask in masks.items():
        linears[name].weight.mul_(mask.to(linears[name].weight.dtype))


def drop_layers(model: nn.Module, drop: Sequence[int]) -> nn.Module:
    """Remove decoder layers ``drop`` in place; the config and every layer's index follow, so the
    model saves and reloads as an ordinary HF model with fewer layers."""
    from instructkit.models.lm import base_causal_lm

    layers = decoder_layers(model)
    gone = set(drop)
    if not gone or not gone <= set(range(len(layers))) or len(gone) == len(layers):
        raise InputError(f"cannot drop layers {sorted(gone)} of {len(layers)}", field="drop_layers")
    kept = [i for i in range(len(layers)) if i not in gone]
    remaining = nn.ModuleList([layers[i] for i in kept])
    for new, layer in enumerate(remaining):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    decoder = base_causal_lm(model).get_decoder()
    decoder.layers = remaining
    config = base_causal_lm(model).config
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    return model


@torch.no_grad()
def keep_ffn_channels(model: nn.Module, keep: dict[int, torch.Tensor]) -> nn.Module:
    """Keep only the intermediate channels ``keep[layer]`` of each gated MLP (gate/up rows, down
    columns). Every layer must keep the same number, because the config has one
    ``intermediate_size``."""
    from instructkit.models.lm import base_causal_lm

    sizes = {int(idx.numel()) for idx in keep.values()}
    if len(sizes) != 1:
        raise InputError(
            f"every layer must keep the same number of FFN channels, got {sorted(sizes)}", field="ffn_keep"
        )
    layers = decoder_layers(model)
    for i, idx in keep.items():
        mlp = layers[i].mlp
        for proj in ("gate_proj", "up_proj"):
            old = getattr(mlp, proj)
            new = nn.Linear(old.in_features, idx.numel(), bias=old.bias is not None, dtype=old.weight.dtype)
            new.weight.copy_(old.weight[idx])
            if old.bias is not None:
                new.bias.copy_(old.bias[idx])
            setattr(mlp, proj, new)
        old = mlp.down_proj
        new = nn.Linear(idx.numel(), old.out_features, bias=old.bias is not None, dtype=old.weight.dtype)
        new.weight.copy_(old.weight[:, idx])
        if old.bias is not None:
            new.bias.copy_(old.bias)
        mlp.down_proj = new
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = idx.numel()
    base_causal_lm(model).config.intermediate_size = sizes.pop()
    return model


@torch.no_grad()
def ffn_activation_norms(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """L2 norm of each intermediate channel (the input of ``down_proj``) per layer, over real tokens."""
    layers = decoder_layers(model)
    sums = {i: torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for i, layer in enumerate(layers)}
    keep: dict[str, torch.Tensor] = {}

    def hook(i: int):
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].reshape(-1, args[0].size(-1))[keep["mask"]]
            sums[i] += x.double().pow(2).sum(0).cpu()

        return record

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    _run_calibration(model, batches, handles, keep)
    return {i: s.sqrt() for i, s in sums.items()}


def sparsity_of(model: nn.Module) -> float:
    """Fraction of zero weights over the prunable linear layers."""
    zeros = total = 0
    for m in prunable_linears(model).values():
        zeros += int((m.weight == 0).sum())
        total += m.weight.numel()
    return zeros / total if total else 0.0
