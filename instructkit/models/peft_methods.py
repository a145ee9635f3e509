"""What part of a model trains: full fine-tuning, frozen layers, or a peft method.

Each method is a function ``(model, PeftConfig) -> model`` in :data:`METHODS`; recipes look the
method up by name and never branch on it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from instructkit.config import PeftConfig
from instructkit.errors import InputError, did_you_mean


def _full(model: nn.Module, cfg: PeftConfig, task: str = "CAUSAL_LM") -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise InputError(f"cannot find the decoder layers of {type(model).__name__} to freeze", field="peft.method")
    return list(layers)


def _freeze(model: nn.Module, cfg: PeftConfig, task: str = "CAUSAL_LM") -> nn.Module:
    """Train the top ``trainable_layers`` decoder layers (all of the model if 0), optionally
    only their MLP blocks; embeddings stay frozen unless ``freeze_embeddings`` is false."""
    whole = cfg.trainable_layers == 0 and not cfg.ffn_only
    for p in model.parameters():
        p.requires_grad_(whole)
    if not whole:
        layers = _decoder_layers(model)
        for layer in layers[-cfg.trainable_layers :] if cfg.trainable_layers else layers:
            target = getattr(layer, "mlp", None) if cfg.ffn_only else layer
            if target is None:
                raise InputError("ffn_only: the layers have no 'mlp' block", field="peft.ffn_only")
            for p in target.parameters():
                p.requires_grad_(True)
    head = getattr(model, "score", None)  # a reward/value head always trains
    for p in head.parameters() if head is not None else ():
        p.requires_grad_(True)
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        for p in module.parameters() if module is not None else ():
            p.requires_grad_(not cfg.freeze_embeddings)
    return model


def _peft(kind: str) -> Callable[..., nn.Module]:
    def apply(model: nn.Module, cfg: PeftConfig, task: str = "CAUSAL_LM") -> nn.Module:
        import peft

        if kind in ("lora", "dora"):
            pcfg = peft.LoraConfig(
                r=cfg.r,
                lora_alpha=cfg.alpha,
                lora_dropout=cfg.dropout,
                target_modules=cfg.target_modules,
                use_dora=kind == "dora",
                task_type=task,
            )
        else:  # ia3
            target = None if cfg.target_modules == "all-linear" else cfg.target_modules
            pcfg = peft.IA3Config(target_modules=target, task_type=task)
        return peft.get_peft_model(model, pcfg)

    return apply


METHODS: dict[str, Callable[..., nn.Module]] = {
    "full": _full,
    "freeze": _freeze,
    "lora": _peft("lora"),
    "dora": _peft("dora"),
    "ia3": _peft("ia3"),
}


def apply_method(model: nn.Module, cfg: PeftConfig, task: str = "CAUSAL_LM") -> nn.Module:
    """Apply ``cfg.method``; ``task`` is the peft task type (``SEQ_CLS`` for reward models,
    which also keeps the score head trainable and saved)."""
    if cfg.method not in METHODS:
        raise InputError(
            f"unknown method '{cfg.method}' (one of {', '.join(METHODS)}){did_you_mean(cfg.method, METHODS)}",
            field="peft.method",
        )
    if isinstance(cfg.target_modules, list) and cfg.method in ("lora", "dora", "ia3"):
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in cfg.target_modules if t not in names]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise InputError(
                f"no module named {missing[0]!r} in the model{did_you_mean(missing[0], linear)}; "
                f"its linear layers are {', '.join(linear)} (or use all-linear)",
                field="peft.target_modules",
            )
    return METHODS[cfg.method](model, cfg, task)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
