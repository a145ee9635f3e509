"""What part of a model trains: full fine-tuning, frozen layers, bias terms, or a peft method.

Each method is a :class:`Method` in :data:`METHODS`: a function ``(model, PeftConfig, task) ->
model`` and what the method allows (merging, the tasks instructkit can train it for); recipes look
the method up by name through :func:`apply_method` and never branch on it.

Three kinds of saved model come out: whole weights (``full``, ``freeze``, ``bitfit``); a peft
adapter (``save_pretrained`` writes it, ``models.loading`` puts it back on the untouched base it
names; ``qlora``'s base is put back 4-bit, see ``models.qlora``); and bottleneck adapters
(``houlsby``, ``pfeiffer``: instructkit's own layout, see ``models.bottleneck``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from instructkit.config import PeftConfig
from instructkit.errors import InputError, did_you_mean

TASKS = {"CAUSAL_LM": "causal LM", "SEQ_CLS": "reward or value model"}  # peft task type -> what it trains

# Prompt-learning methods live in peft's wrapper forward (virtual tokens prepended to the
# embeddings, or a key/value prefix); instructkit's loss paths call the backbone, and put the
# virtual tokens in themselves (models.lm.virtual_token_inputs), so they train causal LMs and
# reward/value models. They never merge into weights (peft has no merge_and_unload for them).


@dataclass(frozen=True)
class Method:
    """A way to choose what trains, and what it allows."""

    build: Callable[[nn.Module, PeftConfig, str], nn.Module]  # (model, cfg, peft task type) -> model
    adapter: bool = True  # saved as a peft adapter (else whole weights, or bottleneck adapters)
    merges: bool = True  # an adapter ``merge_and_unload`` folds into plain weights
    targets: bool = False  # wraps the modules named by ``peft.target_modules``
    tasks: tuple[str, ...] = tuple(TASKS)  # the peft task types instructkit can train it for
    unsupported: str = ""  # why not, for the other tasks
    bottleneck: bool = False  # places bottleneck adapters: the only methods that train over them
    virtual_tokens: bool = False  # prompt learning: trains activations (virtual tokens), not weights


def _train_head(model: nn.Module) -> None:
    head = getattr(model, "score", None)  # a reward/value head always trains
    for p in head.parameters() if head is not None else ():
        p.requires_grad_(True)


def _full(model: nn.Module, cfg: PeftConfig, task: str) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise InputError(f"cannot find the decoder layers of {type(model).__name__} to freeze", field="peft.method")
    return list(layers)


def _freeze(model: nn.Module, cfg: PeftConfig, task: str) -> nn.Module:
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
    _train_head(model)
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        for p in module.parameters() if module is not None else ():
            p.requires_grad_(not cfg.freeze_embeddings)
    return model


def _bitfit(model: nn.Module, cfg: PeftConfig, task: str) -> nn.Module:
    """BitFit (Ben Zaken et al. 2022): only the model's existing bias terms train (and a reward
    head). Adding biases where there are none would be another method (peft's BEFT, not in every
    pinned peft), so bias-free architectures are refused."""
    biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
    if not biases:
        raise InputError(
            f"bitfit trains bias terms and {type(model).__name__} has none (Llama, SmolLM2 and most "
            "recent decoders use no biases); use ln_tuning (only the norm weights train) or lora",
            field="peft.method",
        )
    model.requires_grad_(False)
    for p in biases:
        p.requires_grad_(True)
    _train_head(model)
    return model


# ----------------------------------------------------------------------------------------------
# peft methods: each builds a peft config; get_peft_model wraps the model.

# How a LoRA adapter starts (peft.init -> peft's init_lora_weights). pissa and olora start it on
# the top singular directions (olora: a QR basis) of each weight and take them out of the base,
# W_res = W - s B0 A0, so training runs on the residual. The saved adapter config keeps the init,
# and peft, loading it, first redoes the same deterministic decomposition on the untouched base:
# the folder loads onto the original base (the save/load test checks the logits). Disabling the
# adapter gives W_res, not W.
INITS: dict[str, bool | str] = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def _norm_names(model: nn.Module) -> list[str]:
    """The (last) names of every normalisation module: LayerNorm, RMSNorm, their relatives."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if "norm" in type(m).__name__.lower()})


def _lora(variant: str) -> Callable[[nn.Module, PeftConfig, str], Any]:
    def config(model: nn.Module, cfg: PeftConfig, task: str) -> Any:
        import peft

        return peft.LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            use_dora=variant == "dora",
            use_rslora=variant == "rslora",
            init_lora_weights=INITS[cfg.init],
            task_type=task,
        )

    return config


def _vera(model: nn.Module, cfg: PeftConfig, task: str) -> Any:
    import peft

    # One pair of frozen random projections (seeded, saved with the adapter) for every layer;
    # only the per-layer scaling vectors train.
    return peft.VeraConfig(
        r=cfg.vera_r,
        target_modules=cfg.target_modules,
        vera_dropout=cfg.dropout,
        save_projection=True,
        task_type=task,
    )


def _loha(model: nn.Module, cfg: PeftConfig, task: str) -> Any:
    import peft

    return peft.LoHaConfig(
        r=cfg.r, alpha=cfg.alpha, rank_dropout=cfg.dropout, target_modules=cfg.target_modules, task_type=task
    )


def _lokr(model: nn.Module, cfg: PeftConfig, task: str) -> Any:
    import peft

    return peft.LoKrConfig(
        r=cfg.r, alpha=cfg.alpha, rank_dropout=cfg.dropout, target_modules=cfg.target_modules, task_type=task
    )


def _ia3(model: nn.Module, cfg: PeftConfig, task: str) -> Any:
    import peft

    target = None if cfg.target_modules == "all-linear" else cfg.target_modules  # peft's per-architecture default
    return peft.IA3Config(target_modules=target, task_type=task)


def _ln_tuning(model: nn.Module, cfg: PeftConfig, task: str) -> Any:
    import peft

    return peft.LNTuningConfig(target_modules=_norm_names(model), task_type=task)


def _prompt_tuning(model: nn.Module, cfg: PeftConfig, task: str) -> Any:
    import peft

    # Virtual tokens start as embeddings of random vocabulary tokens: on the scale the model
    # expects, unlike N(0, 1) rows.
    return peft.PromptTuningConfig(
        num_virtual_tokens=cfg.num_virtual_tokens, prompt_tuning_init="SAMPLE_VOCAB", task_type=task
    )


def _prefix_tuning(model: nn.Module, cfg: PeftConfig, task: str) -> Any:
    import peft

    from instructkit.models.lm import check_prefix_tuning

    check_prefix_tuning(model)  # peft refuses only gradient checkpointing up front
    return peft.PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type=task)


def _p_tuning(model: nn.Module, cfg: PeftConfig, task: str) -> Any:
    import peft

    width = cfg.encoder_hidden_size or model.get_input_embeddings().embedding_dim
    return peft.PromptEncoderConfig(
        num_virtual_tokens=cfg.num_virtual_tokens, encoder_hidden_size=width, task_type=task
    )


def _bottleneck(method: str) -> Callable[[nn.Module, PeftConfig, str], nn.Module]:
    """Houlsby (after attention and FFN) or Pfeiffer (after the FFN) bottleneck adapters; see
    ``models.bottleneck``. They cannot merge (a nonlinearity sits between the two projections).
    Over a model that already carries them (a stage chained over a bottleneck stage) the same
    adapters keep training."""

    def build(model: nn.Module, cfg: PeftConfig, task: str) -> nn.Module:
        from instructkit.models import bottleneck

        if is_peft(model):
            raise InputError(
                f"{method} adapters go on a plain model, not on a peft adapter model "
                f"({type(model).__name__}); start from the base or a merged folder",
                field="peft.method",
            )
        if bottleneck.spec_of(model) is None:
            bottleneck.attach(model, method, cfg.reduction_factor, cfg.adapter_act)
        else:
            bottleneck.trainable_again(model, method, cfg.reduction_factor, cfg.adapter_act)
        _train_head(model)
        return model

    return build


def _qlora(model: nn.Module, cfg: PeftConfig, task: str) -> nn.Module:
    """QLoRA (Dettmers et al. 2023): the base's linear layers to 4-bit NF4 (bitsandbytes, double
    quantisation), then LoRA on top; see ``models.qlora``."""
    import peft

    from instructkit.models.qlora import quantize_nf4

    quantize_nf4(model)
    return peft.get_peft_model(model, _lora("lora")(model, cfg, task))


def _peft(
    make_config: Callable[[nn.Module, PeftConfig, str], Any],
) -> Callable[[nn.Module, PeftConfig, str], nn.Module]:
    def build(model: nn.Module, cfg: PeftConfig, task: str) -> nn.Module:
        import peft

        return peft.get_peft_model(model, make_config(model, cfg, task))

    return build


_PROMPT = dict(merges=False, virtual_tokens=True)

METHODS: dict[str, Method] = {
    "full": Method(_full, adapter=False, merges=False),
    "freeze": Method(_freeze, adapter=False, merges=False),
    "bitfit": Method(_bitfit, adapter=False, merges=False),
    "lora": Method(_peft(_lora("lora")), targets=True),
    "dora": Method(_peft(_lora("dora")), targets=True),
    "rslora": Method(_peft(_lora("rslora")), targets=True),
    "vera": Method(_peft(_vera), targets=True),
    "loha": Method(_peft(_loha), targets=True),
    "lokr": Method(_peft(_lokr), targets=True),
    "ia3": Method(_peft(_ia3), targets=True),
    "ln_tuning": Method(_peft(_ln_tuning)),
    "qlora": Method(_qlora, merges=False, targets=True),  # a merge would re-quantise W + BA to 4 bits
    "houlsby": Method(_bottleneck("houlsby"), adapter=False, merges=False, bottleneck=True),
    "pfeiffer": Method(_bottleneck("pfeiffer"), adapter=False, merges=False, bottleneck=True),
    "prompt_tuning": Method(_peft(_prompt_tuning), **_PROMPT),
    "prefix_tuning": Method(_peft(_prefix_tuning), **_PROMPT),
    "p_tuning": Method(_peft(_p_tuning), **_PROMPT),
}


def _check_targets(model: nn.Module, cfg: PeftConfig) -> None:
    if not isinstance(cfg.target_modules, list):
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise InputError(
            f"no module named {missing[0]!r} in the model{did_you_mean(missing[0], linear)}; "
            f"its linear layers are {', '.join(linear)} (or use all-linear)",
            field="peft.target_modules",
        )


def apply_method(model: nn.Module, cfg: PeftConfig, task: str = "CAUSAL_LM") -> nn.Module:
    """Apply ``cfg.method``; ``task`` is the peft task type (``SEQ_CLS`` for reward models,
    which also keeps the score head trainable and saved)."""
    method = METHODS.get(cfg.method)
    if method is None:
        raise InputError(
            f"unknown method '{cfg.method}' (one of {', '.join(METHODS)}){did_you_mean(cfg.method, METHODS)}",
            field="peft.method",
        )
    if task not in method.tasks:
        raise InputError(
            f"{cfg.method} cannot train a {TASKS.get(task, task)} ({task}): {method.unsupported}", field="peft.method"
        )
    carried = getattr(model, "bottleneck_spec", None)
    if carried is not None and not method.bottleneck:
        raise InputError(
            f"the model carries {carried.method} adapters from an earlier stage, which cannot merge into its "
            f"base; train this stage with peft.method {carried.method} (the same adapters keep training)",
            field="peft.method",
        )
    if method.targets:
        _check_targets(model, cfg)
    return method.build(model, cfg, task)


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
