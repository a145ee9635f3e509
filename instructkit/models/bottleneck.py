"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), written here: the
``adapters`` package pins transformers 4.

An adapter is a small residual MLP on a sublayer's output ``h`` (B, T, H)::

    h + up(act(down(h)))        down: H -> H / reduction_factor, up: back to H, up = 0 at start

Houlsby puts one after the attention block's output projection and one after the FFN of every
decoder layer (before each residual add); Pfeiffer keeps only the FFN one. (AdapterHub's
Pfeiffer config also moves the layer norm and residual around the adapter; here the FFN output
gets the adapter as Houlsby's second one does, so both methods share one code path.) With ``up``
zero, the adapted model starts equal to its base.

What this module owns: placing adapters in a loaded model (:func:`attach`), which is still an
ordinary ``nn.Module`` whose ``forward`` (and so HF ``generate``, the KV cache, the serving
engine) includes them; and the saved layout, beside the tokenizer in ``final/``:

* ``bottleneck_adapter.safetensors``: only the adapter tensors, keyed by their names in the
  model (``model.layers.0.self_attn.bottleneck.down.weight``, ...);
* ``bottleneck_config.json``: ``method``, ``reduction_factor``, ``activation``, ``hidden_size``,
  ``bottleneck_size``, ``layers`` (the module paths that carry an adapter) and ``base`` (the
  model spec the adapters sit on).

Adapters are placed with forward hooks on the attention and FFN modules and registered as
their ``bottleneck`` child, so the base weights keep their names (a whole-weights save, as the
reward model's, still loads the base) and the adapters move, copy and train with the model.
They cannot merge into the base weights: the nonlinearity sits between the two projections.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instructkit.errors import InputError

CONFIG_NAME = "bottleneck_config.json"
WEIGHTS_NAME = "bottleneck_adapter.safetensors"
CHILD = "bottleneck"  # the adapter's name under the module it follows
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}  # config.AdapterAct
PLACES = {"houlsby": ("attention", "ffn"), "pfeiffer": ("ffn",)}  # after which sublayers
# The sublayer modules of each place, by the attribute names decoder families give them:
# Llama/Mistral/Qwen (self_attn, mlp) and GPT-2 (attn, mlp).
SUBLAYERS = {"attention": ("self_attn", "attn"), "ffn": ("mlp",)}
LAYER_LISTS = ("layers", "h")  # model.layers (Llama family), transformer.h (GPT-2)


@dataclass(frozen=True)
class BottleneckSpec:
    """What ``bottleneck_config.json`` holds; the adapted model carries it as ``bottleneck_spec``."""

    method: str  # houlsby | pfeiffer
    reduction_factor: int
    activation: str
    hidden_size: int
    layers: tuple[str, ...]  # module paths (attention or FFN) that carry an adapter
    base: str | None = None  # the model spec under the adapters, once saved or loaded

    @property
    def bottleneck_size(self) -> int:
        return max(1, self.hidden_size // self.reduction_factor)


class Bottleneck(nn.Module):
    """``h + up(act(down(h)))`` on the last dimension; ``up`` starts at zero (identity)."""

    def __init__(self, hidden_size: int, bottleneck_size: int, activation: str) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck_size)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck_size, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        return h + self.up(self.act(self.down(h)))


def _after_sublayer(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: the sublayer's output through its adapter (attention modules return a
    tuple whose first element is the hidden states)."""
    adapter = getattr(module, CHILD)
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every decoder layer: the longest ``layers``/``h`` module list whose
    layers have an attention and an FFN module. Unknown architectures are an InputError."""
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or path.rsplit(".", 1)[-1] not in LAYER_LISTS or not len(module):
            continue
        if all(_sublayer(layer, "attention") and _sublayer(layer, "ffn") for layer in module):
            layers = [(f"{path}.{i}", layer) for i, layer in enumerate(module)]
            found = layers if len(layers) > len(found) else found
    if not found:
        names = ", ".join(f"{p} ({' or '.join(SUBLAYERS[p])})" for p in SUBLAYERS)
        raise InputError(
            f"bottleneck adapters: cannot find the decoder layers of {type(model).__name__} (a 'layers' or 'h' "
            f"list of blocks with {names}); the Llama family and GPT-2 are supported; use lora",
            field="peft.method",
        )
    return found


def _sublayer(layer: nn.Module, place: str) -> str | None:
    return next((name for name in SUBLAYERS[place] if isinstance(getattr(layer, name, None), nn.Module)), None)


def hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not size:
        raise InputError(
            f"bottleneck adapters: {type(model).__name__} has no hidden_size in its config", field="peft.method"
        )
    return int(size)


def spec_of(model: nn.Module) -> BottleneckSpec | None:
    """The adapters a model carries (None for a model without bottleneck adapters)."""
    return getattr(model, "bottleneck_spec", None)


def attach(
    model: nn.Module, method: str, reduction_factor: int, activation: str, base: str | None = None
) -> BottleneckSpec:
    """Put ``method``'s adapters into ``model`` (in place, on its device and dtype); only they
    train afterwards (and a reward/value head, ``score``, which the caller turns on)."""
    if spec_of(model) is not None:
        raise InputError("the model already carries bottleneck adapters", field="peft.method")
    size = hidden_size(model)
    if not 1 <= reduction_factor <= size:
        raise InputError(
            f"{reduction_factor} would give a bottleneck of hidden_size {size} / {reduction_factor} "
            f"(must be between 1 and the hidden size {size})",
            field="peft.reduction_factor",
        )
    model.requires_grad_(False)
    param = next(model.parameters())
    paths = []
    for path, layer in decoder_layers(model):
        for place in PLACES[method]:
            name = _sublayer(layer, place)
            sublayer = getattr(layer, name)
            adapter = Bottleneck(size, max(1, size // reduction_factor), activation)
            sublayer.add_module(CHILD, adapter.to(device=param.device, dtype=param.dtype))
            sublayer.register_forward_hook(_after_sublayer)
            paths.append(f"{path}.{name}")
    spec = BottleneckSpec(method, reduction_factor, activation, size, tuple(paths), base)
    model.bottleneck_spec = spec
    return spec


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors, keyed by their names in ``model``."""
    spec = spec_of(model)
    prefixes = tuple(f"{path}.{CHILD}." for path in spec.layers)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith(prefixes)}


def save(model: nn.Module, folder: Path, base_spec: str | None) -> None:
    """Write the two files of the layout into ``folder``. The adapters' base is the one they
    were loaded over, if any, else ``base_spec`` (the model this stage started from)."""
    from safetensors.torch import save_file

    spec = spec_of(model)
    folder = Path(folder)
    save_file(adapter_state(model), str(folder / WEIGHTS_NAME))
    base = spec.base or (str(base_spec) if base_spec is not None else None)
    record = {**asdict(spec), "layers": list(spec.layers), "base": base, "bottleneck_size": spec.bottleneck_size}
    (folder / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read the bottleneck adapter config ({exc})", file=str(path)) from exc
    missing = [k for k in ("method", "reduction_factor", "activation", "hidden_size", "layers") if k not in record]
    if missing or record["method"] not in PLACES or record["activation"] not in ACTIVATIONS:
        problem = f"lacks {', '.join(missing)}" if missing else f"unknown method or activation in {record}"
        raise InputError(f"not a bottleneck adapter config: {problem}", file=str(path))
    return record


def load(model: nn.Module, folder: Path) -> nn.Module:
    """Attach the adapters saved in ``folder`` to ``model`` (its base) and load their weights;
    a base of another width or architecture is an InputError naming the folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    record = read_config(folder)
    if hidden_size(model) != record["hidden_size"]:
        raise InputError(
            f"the adapters were trained on a base of hidden size {record['hidden_size']}, "
            f"this base has {hidden_size(model)}",
            file=str(folder / CONFIG_NAME),
        )
    spec = attach(model, record["method"], record["reduction_factor"], record["activation"], base=record.get("base"))
    if list(spec.layers) != list(record["layers"]):
        raise InputError(
            f"the adapters sit on {len(record['layers'])} modules ({record['layers'][:2]}...) that this base "
            f"does not lay out the same way ({list(spec.layers)[:2]}...)",
            file=str(folder / CONFIG_NAME),
        )
    tensors = load_file(str(folder / WEIGHTS_NAME))
    expected = adapter_state(model)
    if set(tensors) != set(expected):
        odd = sorted(set(tensors) ^ set(expected))
        raise InputError(f"adapter tensors do not match the config: {odd[:3]}", file=str(folder / WEIGHTS_NAME))
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in tensors.items():
            params[name].copy_(value)
    return model


def trainable_again(model: nn.Module, method: str, reduction_factor: int, activation: str) -> None:
    """A stage over a bottleneck-adapter stage keeps training the same adapters; asking for
    other ones is an InputError that says which settings to use."""
    spec = spec_of(model)
    asked = (method, reduction_factor, activation)
    if (spec.method, spec.reduction_factor, spec.activation) != asked:
        raise InputError(
            f"the model carries {spec.method} adapters from an earlier stage (reduction_factor "
            f"{spec.reduction_factor}, adapter_act {spec.activation}); they cannot merge into the base, "
            f"so this stage keeps training them: set peft.method {spec.method}, peft.reduction_factor "
            f"{spec.reduction_factor}, peft.adapter_act {spec.activation}",
            field="peft.method",
        )
    model.requires_grad_(False)
    for path in spec.layers:
        model.get_submodule(f"{path}.{CHILD}").requires_grad_(True)


def copy_adapters(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` (a model built from ``source``'s config, e.g. a reward or value model over
    its backbone) the same adapters, before ``source``'s weights are copied into it."""
    spec = spec_of(source)
    if spec is not None:
        attach(target, spec.method, spec.reduction_factor, spec.activation, base=spec.base)
