"""Typed stage configs: YAML files plus ``key=value`` overrides, validated when loaded.

Each stage config is a tree of dataclasses whose field comments are the documentation. Loading
rejects unknown keys (naming the closest valid one), wrong types and bad values with an
:class:`InputError` that names the file, the line and the dotted key. Imports no torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from instructkit.errors import InputError, did_you_mean

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# Stage config dataclasses


@dataclasses.dataclass
class DataConfig:
    path: str = ""  # training file (json, jsonl, csv, parquet) or cached Hub dataset id
    format: str | None = None  # alpaca, messages, sharegpt, text, ...; detected when omitted
    columns: dict[str, str] | None = None  # LLaMA-Factory-style column mapping
    val_path: str | None = None  # a separate validation file; else val_fraction of path
    val_fraction: float = 0.05
    seed: int = 0  # seed of the train/validation split
    template: str | None = None  # chat template: the tokenizer's own unless chatml/llama-3/alpaca
    max_length: int = 512  # tokens per example; longer ones lose whole trailing turns
    packing: bool = False  # pack several short examples into one sequence (no cross-attention)
    limit: int | None = None  # use only the first N training records (quick trials)

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("must be in [0, 1)")
        if self.max_length < 8:
            raise ValueError("max_length must be at least 8")


@dataclasses.dataclass
class PeftConfig:
    method: str = "lora"  # full | freeze | lora | dora | ia3
    r: int = 16  # LoRA rank
    alpha: int = 32  # LoRA alpha (scale = alpha / r)
    dropout: float = 0.0  # LoRA dropout
    target_modules: list[str] | str = "all-linear"  # module names, or all-linear
    trainable_layers: int = 0  # freeze: train only the top N decoder layers (0 = all)
    ffn_only: bool = False  # freeze: train only the feed-forward (MLP) blocks
    freeze_embeddings: bool = True  # freeze: keep input/output embeddings frozen


@dataclasses.dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.0  # sgd only
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    max_grad_norm: float | None = 1.0  # gradient clipping; null disables


@dataclasses.dataclass
class TrainConfig:
    batch_size: int = 8  # examples per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    seed: int = 0
    dropout: float | None = None  # set every dropout in the model; null keeps the model's own
    eval_every: int = 0  # validation loss every N steps (0: only at the end)
    early_stopping_patience: int = 0  # stop after N evals without improvement (0: never)
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2  # most recent step checkpoints kept
    log_every: int = 1
    dtype: str | None = None  # fp32 | bf16 | fp16; default fp32 on CPU, bf16 on a GPU
    device: str | None = None  # cpu | cuda; default: cuda when available
    gradient_checkpointing: bool = False
    loss_chunk_size: int = 1024  # tokens per chunk of the vocabulary projection in the loss
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclasses.dataclass
class SFTConfig:
    """Supervised fine-tuning: `instructkit sft --config FILE`."""

    model: str = "smollm2-135m-instruct"  # embedded name, HF folder or id, GGUF file, run folder
    out: str = "runs/sft"  # run folder
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    save_merged: bool = False  # LoRA: also write merged full weights to merged/
    trust_remote_code: bool = False


@dataclasses.dataclass
class RewardConfig:
    """Reward model on ranked comparisons: `instructkit rm --config FILE`."""

    model: str = "smollm2-135m-instruct"  # backbone: usually the SFT run folder
    out: str = "runs/rm"
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(val_fraction=0.2))
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-4))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    center_rewards_coefficient: float = 0.0  # + coef * mean(r^2): keeps scores near 0 (as TRL)
    normalize: bool = True  # after training, shift scores so reference responses average 0
    reference_data: str | None = None  # demonstrations whose mean score becomes 0 (default: best responses)
    trust_remote_code: bool = False


@dataclasses.dataclass
class DPOConfig:
    """Direct preference optimisation and its relatives: `instructkit dpo --config FILE`."""

    model: str = "smollm2-135m-instruct"  # the policy to tune: usually the SFT run folder
    out: str = "runs/dpo"
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(val_fraction=0.1))
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=5e-6))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    loss: str = "sigmoid"  # sigmoid | ipo | hinge | simpo | orpo | kto (see docs/losses.md)
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO
    simpo_gamma: float = 0.5  # SimPO target margin
    orpo_lambda: float = 1.0  # weight of ORPO's odds-ratio term beside its SFT term
    reference: Literal["auto", "precompute", "adapter"] = "auto"  # how reference log-probs are made
    trust_remote_code: bool = False


@dataclasses.dataclass
class PromptDataConfig:
    path: str = ""  # prompts: JSONL/JSON/CSV/Parquet records with `prompt` (string or messages) + extra fields
    template: str | None = None  # chat template of the policy: the tokenizer's own unless chatml/llama-3/alpaca
    max_prompt_length: int = 256  # tokens; longer prompts are left out (and counted)
    limit: int | None = None  # use only the first N prompts
    ptx_path: str | None = None  # PPO-ptx data: demonstrations (assistant tokens train) or plain text
    ptx_format: str | None = None  # format of ptx_path; detected when omitted
    ptx_max_length: int = 512  # tokens per ptx example
    ptx_batch_size: int = 8  # ptx examples per optimizer step

    def __post_init__(self) -> None:
        if self.max_prompt_length < 1 or self.ptx_batch_size < 1:
            raise ValueError("max_prompt_length and ptx_batch_size must be at least 1")


@dataclasses.dataclass
class RewardSourceConfig:
    model: str | None = None  # reward-model folder or `instructkit rm` run folder
    function: str | None = None  # "module:function": (prompt, response, **data) -> float
    template: str | None = None  # chat template the reward model scores with (its tokenizer's own by default)
    batch_size: int = 16  # responses scored per reward-model forward pass

    def __post_init__(self) -> None:
        if self.model and self.function:
            raise ValueError("set reward.model or reward.function, not both")


@dataclasses.dataclass
class AdaptiveKLConfig:
    target: float | None = None  # KL per response (nats) to steer towards; null keeps kl_coef fixed
    horizon: int = 10000  # samples over which the coefficient corrects the error (Ziegler et al. 2019)

    def __post_init__(self) -> None:
        if self.target is not None and self.target <= 0:
            raise ValueError("target must be positive")
        if self.horizon < 1:
            raise ValueError("horizon must be at least 1")


@dataclasses.dataclass
class PPOConfig:
    """PPO(-ptx), GRPO and RLOO from a reward model or function: `instructkit ppo --config FILE`.

    ``train.max_steps`` PPO steps; each samples ``rollout_batch_size`` prompts x ``group_size``
    responses, then takes ``ppo_epochs`` passes over them in mini-batches of
    ``train.batch_size x train.grad_accum`` responses (one optimizer step each).
    """

    model: str = "smollm2-135m-instruct"  # the policy to tune: usually the SFT run folder
    ref_model: str | None = None  # KL reference; null: the policy's initial weights (adapter off with LoRA)
    out: str = "runs/ppo"
    data: PromptDataConfig = dataclasses.field(default_factory=PromptDataConfig)
    reward: RewardSourceConfig = dataclasses.field(default_factory=RewardSourceConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=1e-5, scheduler="constant"))
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(max_steps=100))
    advantage: str = "gae"  # gae | grpo | rloo (group-relative, no value model)
    rollout_batch_size: int = 16  # prompts per PPO step
    group_size: int = 1  # responses per prompt (at least 2 for grpo and rloo)
    generation_batch_size: int = 32  # sequences sampled per generate call
    max_new_tokens: int = 64
    temperature: float = 1.0  # sampling temperature; log-probs are computed at it too
    top_p: float = 1.0
    ppo_epochs: int = 4  # passes over each rollout batch
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    clip_range: float = 0.2  # policy ratio clip
    value_clip_range: float = 0.2  # value clip, in reward units
    vf_coef: float = 0.1  # weight of the value loss
    kl_coef: float = 0.05  # beta: per-token KL penalty in the reward (initial value if adaptive)
    kl_estimator: str = "k1"  # k1 | k3 (Schulman, "Approximating KL Divergence")
    adaptive_kl: AdaptiveKLConfig = dataclasses.field(default_factory=AdaptiveKLConfig)
    whiten_advantages: bool = True
    whiten_rewards: bool = False  # rescale per-token rewards to unit variance (mean kept)
    missing_eos_penalty: float | None = None  # subtracted from the score of responses cut at max_new_tokens
    ptx_coef: float = 0.0  # gamma of InstructGPT Eq. 2: weight of the LM loss on data.ptx_path
    ema_decay: float | None = None  # EMA of the policy weights (final/ holds the EMA); null: off
    save_merged: bool = False  # LoRA: also write merged full weights to merged/
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        positive = ("rollout_batch_size", "group_size", "generation_batch_size", "max_new_tokens", "ppo_epochs")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (PPO samples; log-probs are taken at it)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError("ema_decay must be in (0, 1)")
        if self.ptx_coef < 0 or self.kl_coef < 0 or self.vf_coef < 0:
            raise ValueError("ptx_coef, kl_coef and vf_coef must be >= 0")


# ----------------------------------------------------------------------------------------------
# Loading and validation


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted keys of a YAML mapping to their 1-based line numbers (for error messages)."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                dotted = f"{prefix}{key.value}"
                lines[dotted] = key.start_mark.line + 1
                walk(value, dotted + ".")

    walk(root, "")
    return lines


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert strings from key=value overrides."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise TypeError(errors[0] if errors else f"expected {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(map(str, get_args(tp)))
            raise ValueError(f"'{value}' is not one of {choices}{did_you_mean(str(value), map(str, get_args(tp)))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str) and value.startswith("["):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {type(value).__name__}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, key) for v in value)
    if origin is dict:
        if isinstance(value, str) and value.startswith("{"):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        raise TypeError("expected a section (mapping)")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise TypeError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise TypeError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise TypeError(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise TypeError(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, file: str | None = None,
              lines: dict[str, int] | None = None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping, rejecting unknown keys and bad values."""
    lines = lines or {}
    if not isinstance(data, dict):
        raise InputError("expected a mapping of keys to values", file=file,
                         line=lines.get(prefix.rstrip(".")), field=prefix.rstrip(".") or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise InputError(f"unknown key{did_you_mean(str(key), fields)}", file=file,
                             line=lines.get(dotted), field=dotted)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            section = value if value is not None else {}
            factory = fields[key].default_factory
            if isinstance(section, dict) and factory is not dataclasses.MISSING:
                # Keys given override this stage's own defaults (DPO's lr is not SFT's), not the
                # section class's generic ones.
                section = merge(to_dict(factory()), section)
            kwargs[key] = from_dict(tp, section, file=file, lines=lines, prefix=dotted + ".")
            continue
        try:
            kwargs[key] = _coerce(value, tp, dotted)
        except (TypeError, ValueError) as exc:
            raise InputError(str(exc), file=file, line=lines.get(dotted), field=dotted) from None
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise InputError(str(exc), file=file, line=lines.get(prefix.rstrip(".")),
                         field=prefix.rstrip(".") or cls.__name__) from None


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["train.lr=1e-4", "peft.method=full"]`` -> nested dict of YAML-parsed values."""
    tree: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"override '{item}' is not key=value", field="overrides")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"override '{item}' sets inside a non-section", field=key)
        node[parts[-1]] = value
    return tree


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a YAML mapping, returning it and the line of every dotted key."""
    path = Path(path)
    if not path.is_file():
        raise InputError("config file not found", file=str(path))
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InputError(f"invalid YAML: {getattr(exc, 'problem', exc)}", file=str(path),
                         line=mark.line + 1 if mark else None) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError("a config file must be a mapping of keys to values", file=str(path))
    return data, _key_lines(text)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> T:
    """Load stage config ``cls`` from an optional YAML file, then apply ``key=value`` overrides."""
    data, lines = (read_yaml(path) if path else ({}, {}))
    data = merge(base or {}, data)
    file = str(path) if path else None
    cfg = from_dict(cls, data, file=file, lines=lines)
    if overrides:
        cfg = from_dict(cls, merge(to_dict(cfg), parse_overrides(overrides)), file="command line")
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain YAML-safe data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def resolve_stage_config(cls: type[T], stage: str, config: Any = None, overrides: list[str] | None = None) -> T:
    """A stage's config from an instance, a dict, a stage YAML, or a recipe YAML (its ``stage``
    section, started from the recipe's model), then ``key=value`` overrides.

    What ``instructkit sft|rm|dpo|ppo --config FILE`` and the Python functions of the same
    names accept.
    """
    if isinstance(config, cls):
        return load_config(cls, None, overrides, base=to_dict(config)) if overrides else config
    if isinstance(config, dict):
        return load_config(cls, None, overrides, base=config)
    if config is not None:
        data, _ = read_yaml(config)
        if "stages" in data:  # a recipe: run its section for this stage
            from instructkit.pipeline import load_recipe

            recipe = load_recipe(config)
            stage_cfg = recipe.stage_config(stage)
            base = {**to_dict(stage_cfg), "out": str(Path("runs") / recipe.config.name / stage)}
            return load_config(cls, None, overrides, base=base)
    return load_config(cls, config, overrides)
