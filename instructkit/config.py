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
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin

import yaml

from instructkit.errors import InputError, did_you_mean

T = TypeVar("T")

# ----------------------------------------------------------------------------------------------
# Enumerated values. The registries that implement them live in modules that import torch
# (losses/, models/, data/formats); these Literals let a config be rejected before anything
# heavy is imported, and tests/test_config.py checks each against its registry.

PeftMethod = Literal[
    "full",
    "freeze",
    "bitfit",
    "lora",
    "dora",
    "rslora",
    "vera",
    "loha",
    "lokr",
    "ia3",
    "ln_tuning",
    "qlora",
    "houlsby",
    "pfeiffer",
    "prompt_tuning",
    "prefix_tuning",
    "p_tuning",
]
PeftInit = Literal["default", "gaussian", "pissa", "olora"]  # how a LoRA adapter starts
LORA_FAMILY = ("lora", "dora", "rslora")  # the methods peft.init applies to
WITH_DROPOUT = (*LORA_FAMILY, "qlora", "vera", "loha", "lokr")  # the methods peft.dropout applies to
BOTTLENECK_METHODS = ("houlsby", "pfeiffer")  # bottleneck adapters (models/bottleneck.py)
AdapterAct = Literal["relu", "gelu", "silu"]  # the bottleneck's nonlinearity (models/bottleneck.ACTIVATIONS)
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning", "p_tuning")  # virtual tokens: nothing to fold into weights
NOT_MERGING = (*BOTTLENECK_METHODS, "qlora", *PROMPT_LEARNING)  # trained methods with no merged/ (save_merged refused)
PreferenceLoss = Literal["sigmoid", "ipo", "hinge", "simpo", "orpo", "kto"]
Advantage = Literal["gae", "grpo", "rloo"]
GROUP_RELATIVE = ("grpo", "rloo")  # advantages compare the responses within a prompt's group
KLEstimator = Literal["k1", "k3"]
DType = Literal["fp32", "bf16", "fp16"]
DataFormat = Literal[
    "alpaca", "messages", "sharegpt", "preference", "ranking", "kto", "text", "classification", "prompts"
]
Suite = Literal[
    "exact_match",
    "accuracy",
    "bleu",
    "rouge",
    "reward",
    "winrate",
    "perplexity",
    "ifeval",
    "preference",
    "loss",
    "f1",
    "refusal",
    "injection",
    "robustness",
]
ContinualStrategy = Literal["naive", "replay", "ewc", "lwf", "adapter_per_task"]  # train/continual.STRATEGIES
ReplayBy = Literal["examples", "tokens"]  # what replay.fraction is a share of
PretrainObjective = Literal["clm", "mlm", "nsp", "plm"]  # losses/pretrain.OBJECTIVES
ClassifyTask = Literal["seq_classification", "token_classification"]  # models/heads.HEADS
EncoderTemplate = Literal["joined", "pair"]  # data/tasks.TEMPLATES: how an instruction joins the text
TagAlignment = Literal["first", "all"]  # data/tasks: which sub-tokens of a word carry its tag
FSDPMode = Literal["off", "full", "hybrid"]  # train/fsdp.py
Tracker = Literal["tensorboard", "mlflow", "wandb", "trackio"]  # train/engine.TRACKERS (docs/run.md)
CLASSIFY_METHODS = ("full", "lora", "dora", "rslora")  # what a classify stage trains (train/classify.py)
SEQ2SEQ_METHODS = ("full", "lora", "dora", "rslora")  # what a seq2seq stage trains (train/seq2seq.py)
NAMED_TEMPLATES = ("tokenizer", "chatml", "llama-3", "alpaca")
# peft methods: the base weights stay untouched and peft's disable_adapter() gives them back
# (DPO's reference: adapter, PPO's reference). Bottleneck adapters are ours and have no switch.
PEFT_ADAPTERS = (*LORA_FAMILY, "qlora", "vera", "loha", "lokr", "ia3", "ln_tuning", *PROMPT_LEARNING)


class FieldError(ValueError):
    """A bad value found by a config's ``__post_init__``: ``key`` is relative to its section."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key


def require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise FieldError(key, problem)


def _check_template(template: str | None, key: str = "template") -> None:
    """A named template, a ``.jinja`` file or an inline Jinja string (see data/templates.py)."""
    if template is None or template in NAMED_TEMPLATES or template.endswith(".jinja"):
        return
    if "{{" in template or "{%" in template:
        return
    raise FieldError(
        key,
        f"unknown chat template '{template}'{did_you_mean(template, NAMED_TEMPLATES)}; "
        f"expected one of {', '.join(NAMED_TEMPLATES)}, a .jinja file or a Jinja string",
    )


def _check_trackers(names: list[str]) -> None:
    """Each ``train.report_to`` tracker's package is installed (found without importing it)."""
    import importlib.util

    for i, name in enumerate(names):
        require(names.index(name) == i, "report_to", f"'{name}' is listed twice")
        require(
            importlib.util.find_spec(name) is not None, "report_to", f"'{name}' is not installed (pip install {name})"
        )


def _check_device(device: str | None) -> None:
    if device is None or device in ("cpu", "cuda", "mps"):
        return
    if device.startswith("cuda:") and device[5:].isdigit():
        return
    raise FieldError(
        "device",
        f"unknown device '{device}'{did_you_mean(device, ('cpu', 'cuda', 'mps'))}; expected cpu, cuda, cuda:N or mps",
    )


# ----------------------------------------------------------------------------------------------
# Stage config dataclasses


@dataclasses.dataclass
class DataConfig:
    path: str = ""  # training file (json, jsonl, csv, parquet), cached Hub dataset id, or shipped:NAME/SPLIT
    dataset_info: str | None = None  # a LLaMA-Factory dataset_info.json; `path` then names a dataset in it
    format: DataFormat | None = None  # alpaca, messages, sharegpt, text, ...; detected when omitted
    columns: dict[str, str] | None = None  # LLaMA-Factory-style column mapping
    val_path: str | None = None  # a separate validation file; else val_fraction of path
    val_fraction: float = 0.05
    seed: int = 0  # seed of the train/validation split
    template: str | None = None  # chat template: the tokenizer's own unless chatml/llama-3/alpaca
    max_length: int = 512  # tokens per example; longer ones lose whole trailing turns
    # sft (demonstrations): an example longer than max_length loses whole trailing turns and is left
    # out when its first exchange does not fit (whole-turns), or keeps the turns that fit and the
    # next assistant turn cut short, its end-of-turn kept (cut-response). Preference stages always cut.
    truncation: Literal["whole-turns", "cut-response"] = "whole-turns"
    packing: bool = False  # pack several short examples into one sequence (no cross-attention)
    limit: int | None = None  # use only the first N training records (quick trials)

    def __post_init__(self) -> None:
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        require(self.max_length >= 8, "max_length", "must be at least 8")
        require(self.limit is None or self.limit >= 1, "limit", "must be at least 1 (or null for all records)")
        _check_template(self.template)


@dataclasses.dataclass
class PeftConfig:
    method: PeftMethod = "lora"  # what trains: full, freeze, bitfit, lora, dora, rslora, ... (docs/sft.md)
    r: int = 16  # rank of lora, dora, rslora, loha and lokr
    alpha: int = 32  # scale = alpha / r (rslora: alpha / sqrt(r)); lora family, loha and lokr
    dropout: float = 0.0  # on the adapter's input (lora family, vera); rank dropout for loha and lokr
    target_modules: list[str] | str = "all-linear"  # module names or all-linear: lora family, vera, loha, lokr, ia3
    init: PeftInit = "default"  # lora family's start: default (B = 0), gaussian, pissa or olora
    vera_r: int = 256  # vera: rank of the frozen random projections shared by every layer
    num_virtual_tokens: int = 20  # prompt_tuning, prefix_tuning, p_tuning: learned positions before the input
    encoder_hidden_size: int | None = None  # p_tuning: width of its prompt MLP (null: the model's width)
    trainable_layers: int = 0  # freeze: train only the top N decoder layers (0 = all)
    ffn_only: bool = False  # freeze: train only the feed-forward (MLP) blocks
    freeze_embeddings: bool = True  # freeze: keep input/output embeddings frozen
    reduction_factor: int = 16  # houlsby, pfeiffer: bottleneck width = hidden size / reduction_factor
    adapter_act: AdapterAct = "relu"  # houlsby, pfeiffer: the bottleneck's nonlinearity (relu, gelu, silu)

    def __post_init__(self) -> None:
        require(self.r >= 1, "r", "the LoRA rank must be at least 1")
        require(self.alpha > 0, "alpha", "must be positive")
        require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        require(
            not self.dropout or self.method in WITH_DROPOUT,
            "dropout",
            f"{self.method} has no adapter dropout (it applies to {', '.join(WITH_DROPOUT)}); leave it at 0",
        )
        require(self.trainable_layers >= 0, "trainable_layers", "must be >= 0 (0 trains every layer)")
        require(bool(self.target_modules), "target_modules", "name at least one module, or all-linear")
        require(
            self.init == "default" or self.method in LORA_FAMILY,
            "init",
            f"'{self.init}' starts a LoRA adapter ({', '.join(LORA_FAMILY)}), not {self.method}; leave it at default",
        )
        require(self.vera_r >= 1, "vera_r", "must be at least 1")
        require(self.num_virtual_tokens >= 1, "num_virtual_tokens", "must be at least 1")
        require(
            self.encoder_hidden_size is None or self.encoder_hidden_size >= 1,
            "encoder_hidden_size",
            "must be at least 1 (or null for the model's hidden size)",
        )
        require(
            self.reduction_factor >= 1, "reduction_factor", "must be at least 1 (the bottleneck is hidden size / it)"
        )
        for key, default in (("reduction_factor", 16), ("adapter_act", "relu")):
            require(
                getattr(self, key) == default or self.method in BOTTLENECK_METHODS,
                key,
                f"sets a bottleneck adapter ({', '.join(BOTTLENECK_METHODS)}), not {self.method}; leave it at {default}",
            )
        require(self.method != "qlora" or _has_bitsandbytes(), "method", QLORA_NEEDS)


QLORA_NEEDS = (
    "qlora stores the base in 4-bit NF4 with bitsandbytes, which is not installed: "
    "pip install 'instructkit[qlora]' (bitsandbytes==0.50.2, as requirements.lock), or use lora"
)


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _check_merged(save_merged: bool, peft: PeftConfig) -> None:
    require(
        not save_merged or peft.method not in NOT_MERGING,
        "save_merged",
        f"{peft.method} adapters do not merge into plain weights (docs/sft.md); leave save_merged false",
    )


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

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", f"the learning rate must be positive, got {self.lr}")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(all(0 <= b < 1 for b in self.betas), "betas", "each must be in [0, 1)")
        require(self.momentum >= 0, "momentum", "must be >= 0")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        require(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "max_grad_norm",
            "must be positive (null disables clipping)",
        )


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
    dtype: DType | None = None  # fp32 | bf16 | fp16; default fp32 on CPU, bf16 on a GPU
    device: str | None = None  # cpu | cuda | cuda:N | mps; default: cuda when available
    gradient_checkpointing: bool = False
    loss_chunk_size: int = 1024  # tokens per chunk of the vocabulary projection in the loss
    progress: bool = True
    report_to: list[Tracker] = dataclasses.field(default_factory=list)  # also log metrics + config there (offline)
    # off | full | hybrid: shard weights, gradients and optimizer state across processes (FSDP2;
    # docs/scale.md). full shards over every process; hybrid shards within a node, replicates
    # across nodes. With one process it changes nothing.
    fsdp: FSDPMode = "off"

    def __post_init__(self) -> None:
        _check_trackers(self.report_to)
        for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints", "loss_chunk_size"):
            require(getattr(self, name) >= 1, name, "must be at least 1")
        for name in ("eval_every", "early_stopping_patience", "save_every"):
            require(getattr(self, name) >= 0, name, "must be >= 0 (0 turns it off)")
        require(self.epochs > 0, "epochs", "must be positive")
        require(
            self.max_steps is None or self.max_steps >= 1,
            "max_steps",
            "must be at least 1 (or null to train train.epochs epochs)",
        )
        require(self.dropout is None or 0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        _check_device(self.device)


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

    def __post_init__(self) -> None:
        _check_merged(self.save_merged, self.peft)


@dataclasses.dataclass
class PruneConfig:
    """Pruning: `instructkit prune --config FILE` (docs/prune.md). Structured steps first (whole
    decoder layers, then FFN channels), then weight masks on what remains."""

    model: str = "smollm2-135m-instruct"  # the model to prune (adapters are merged first)
    out: str = "runs/prune"
    data: DataConfig = dataclasses.field(  # calibration demonstrations or text (Wanda, layer and channel choice)
        default_factory=lambda: DataConfig(path="shipped:extract/train", max_length=128)
    )
    calibration_examples: int = 64  # the first N records of data.path
    batch_size: int = 8  # calibration forward passes
    drop_layers: int = 0  # remove this many consecutive decoder layers (least angular change)
    ffn_keep: float = 1.0  # fraction of each layer's FFN channels kept (1: all)
    scores: Literal["magnitude", "wanda"] = "magnitude"  # weight importance: |W|, or |W| x input norm
    pattern: Literal["unstructured", "semi_structured"] = (
        "unstructured"  # semi_structured: 2:4, two of every four weights along a row
    )
    sparsity: float = 0.0  # unstructured: fraction of weights zeroed per row (wanda) or per matrix (magnitude)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # device and seed only
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        require(self.calibration_examples >= 1, "calibration_examples", "must be at least 1")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(self.drop_layers >= 0, "drop_layers", "must be >= 0")
        require(0.0 < self.ffn_keep <= 1.0, "ffn_keep", "must be in (0, 1]")
        require(0.0 <= self.sparsity < 1.0, "sparsity", "must be in [0, 1)")
        require(
            not (self.pattern == "semi_structured" and self.sparsity),
            "sparsity",
            "semi_structured (2:4) fixes the sparsity at 0.5; leave sparsity at 0 with it",
        )
        require(
            bool(self.drop_layers or self.ffn_keep < 1.0 or self.sparsity or self.pattern == "semi_structured"),
            "sparsity",
            "nothing to prune: set sparsity, pattern: semi_structured (2:4), drop_layers or ffn_keep",
        )


@dataclasses.dataclass
class DistillConfig:
    """Knowledge distillation: `instructkit distill --config FILE` (docs/distill.md)."""

    model: str = "smollm2-135m-instruct"  # the student (e.g. a pruned run folder)
    teacher: str = ""  # the teacher: any model spec or run folder (adapters merged)
    out: str = "runs/distill"
    data: DataConfig = dataclasses.field(
        default_factory=DataConfig
    )  # demonstrations (their prompts, for on_policy/sequence)
    peft: PeftConfig = dataclasses.field(
        default_factory=lambda: PeftConfig(method="full")
    )  # what of the student trains
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-4))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mode: Literal["offline", "on_policy", "sequence"] = "offline"  # whose tokens the loss reads (docs/distill.md)
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"  # the divergence (losses/distill.py)
    beta: float = 0.5  # jsd: the mixture weight (0 -> forward KL, 1 -> reverse KL)
    temperature: float = 1.0  # both distributions at softmax(logits / T)
    alpha: float = 1.0  # weight of the divergence; 1 - alpha goes to the SFT cross-entropy
    # offline: where the divergence is read: the trained (answer) tokens, or every real token's next
    # token, prompt included (the loss is still divided by the trained tokens; docs/distill.md)
    positions: Literal["answers", "all"] = "answers"
    max_new_tokens: int = 64  # on_policy and sequence: longest answer sampled or written
    sample_temperature: float = 1.0  # on_policy: the student's sampling temperature
    generation_batch_size: int = 16  # sequence: prompts the teacher answers at once
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        require(0.0 <= self.beta <= 1.0, "beta", "must be in [0, 1]")
        require(self.beta == 0.5 or self.loss == "jsd", "beta", f"beta applies to loss: jsd, not {self.loss}")
        require(self.temperature > 0, "temperature", "must be positive")
        require(0.0 <= self.alpha <= 1.0, "alpha", "must be in [0, 1]")
        require(
            self.mode != "sequence" or (self.alpha == 1.0 and self.loss == "forward_kl" and self.temperature == 1.0),
            "mode",
            "sequence mode fine-tunes on the teacher's answers with cross-entropy; loss, temperature and alpha do not apply",
        )
        require(
            self.positions == "answers" or self.mode == "offline",
            "positions",
            f"positions: all applies to mode offline, not {self.mode}",
        )
        require(self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1")
        require(self.sample_temperature > 0, "sample_temperature", "must be positive")
        require(self.generation_batch_size >= 1, "generation_batch_size", "must be at least 1")

    @property
    def divergence_beta(self) -> float:
        return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(self.loss, self.beta)


@dataclasses.dataclass
class PretrainConfig:
    """Pre-training on plain text: `instructkit pretrain --config FILE` (docs/pretrain.md). One
    objective per run: clm (decoders, packed blocks), mlm and nsp (BERT-style encoders), plm (XLNet)."""

    model: str = "smollm2-135m-instruct"  # the model to train: a decoder for clm, BERT-like for mlm/nsp, XLNet for plm
    out: str = "runs/pretrain"
    objective: PretrainObjective = "clm"  # losses/pretrain.OBJECTIVES
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(format="text"))  # max_length: block size
    peft: PeftConfig = dataclasses.field(default_factory=lambda: PeftConfig(method="full"))  # clm may use any method
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-4))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mlm_probability: float = 0.15  # mlm: share of maskable tokens chosen (then 80% [MASK], 10% random, 10% kept)
    whole_word: bool = False  # mlm: choose whole words (the tokenizer's word_ids()) instead of single tokens
    plm_probability: float = 1 / 6  # plm: share of each sequence predicted (the end of the factorisation order)
    nsp_random_probability: float = 0.5  # nsp: share of pairs whose second segment is from another document
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        require(0.0 < self.mlm_probability < 1.0, "mlm_probability", "must be in (0, 1)")
        require(0.0 < self.plm_probability <= 1.0, "plm_probability", "must be in (0, 1]")
        require(0.0 < self.nsp_random_probability < 1.0, "nsp_random_probability", "must be in (0, 1)")
        require(
            not self.whole_word or self.objective == "mlm",
            "whole_word",
            f"applies to objective mlm, not {self.objective}",
        )
        require(
            self.objective == "clm" or self.peft.method == "full",
            "peft.method",
            f"objective {self.objective} trains the whole model (method: full); adapters are for clm",
        )
        require(self.data.format in (None, "text"), "data.format", "pre-training reads plain text (format: text)")
        require(not self.data.packing, "data.packing", "clm always packs text into blocks of data.max_length")
        require(self.data.template is None, "data.template", "pre-training text has no chat template")


@dataclasses.dataclass
class ClassifyDataConfig:
    """The data of a classify stage: classification records (text, label, optional instruction) for
    seq_classification; tokens + tags records or CoNLL files for token_classification (docs/classify.md)."""

    path: str = ""  # training file (.jsonl, .json, .csv, .parquet; CoNLL for tagging) or shipped:NAME/SPLIT
    val_path: str | None = None  # a separate validation file; else val_fraction of path
    val_fraction: float = 0.1
    test_path: str | None = None  # held-out split scored from the head before and after training
    seed: int = 0  # seed of the train/validation split
    template: EncoderTemplate = "pair"  # instruction + text: pair ([CLS] instr [SEP] text [SEP]) or joined
    align: TagAlignment = "first"  # token_classification: the tag on a word's first sub-token, or on all
    max_length: int = 128  # tokens per example (the text is cut, never the instruction)
    limit: int | None = None  # use only the first N training records (quick trials)

    def __post_init__(self) -> None:
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        require(self.max_length >= 8, "max_length", "must be at least 8")
        require(self.limit is None or self.limit >= 1, "limit", "must be at least 1 (or null for all records)")


@dataclasses.dataclass
class ClassifyConfig:
    """A classifier or tagger on an encoder: `instructkit classify --config FILE` (docs/classify.md).
    The head's labels are those of the training data; val and test data are checked against them."""

    model: str = "minilm-l6"  # an encoder: embedded name, HF folder or id, or a classify run folder
    out: str = "runs/classify"
    task: ClassifyTask | None = None  # null: from the model config's architectures (...ForSequenceClassification)
    data: ClassifyDataConfig = dataclasses.field(default_factory=ClassifyDataConfig)
    peft: PeftConfig = dataclasses.field(default_factory=lambda: PeftConfig(method="full"))  # full or the LoRA family
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=5e-5, scheduler="linear"))
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(batch_size=16))
    eval_batch_size: int = 64  # held-out predictions per forward pass
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        require(
            self.peft.method in CLASSIFY_METHODS,
            "peft.method",
            f"a classify stage trains {', '.join(CLASSIFY_METHODS)}, not {self.peft.method}",
        )
        require(
            self.data.align == "first" or self.task != "seq_classification",
            "data.align",
            "applies to task token_classification (sub-word tags), not seq_classification",
        )
        require(self.eval_batch_size >= 1, "eval_batch_size", "must be at least 1")


@dataclasses.dataclass
class Seq2SeqDataConfig:
    """The data of a seq2seq stage: any instruction format (alpaca, messages, ...); the source is the
    prompt turns' text, the target the last assistant turn (docs/seq2seq.md)."""

    path: str = ""  # training file (json, jsonl, csv, parquet), cached Hub dataset id, or shipped:NAME/SPLIT
    dataset_info: str | None = None  # a LLaMA-Factory dataset_info.json; `path` then names a dataset in it
    format: DataFormat | None = None  # alpaca, messages, sharegpt, ...; detected when omitted
    columns: dict[str, str] | None = None  # LLaMA-Factory-style column mapping
    val_path: str | None = None  # a separate validation file; else val_fraction of path
    val_fraction: float = 0.05
    seed: int = 0  # seed of the train/validation split
    max_source_length: int = 128  # encoder tokens; longer records are left out (counted in the summary)
    max_target_length: int = 64  # decoder tokens, eos included; longer records are left out
    limit: int | None = None  # use only the first N training records (quick trials)

    def __post_init__(self) -> None:
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        require(self.max_source_length >= 4, "max_source_length", "must be at least 4")
        require(self.max_target_length >= 2, "max_target_length", "must be at least 2 (a token and eos)")
        require(self.limit is None or self.limit >= 1, "limit", "must be at least 1 (or null for all records)")
        require(
            self.format not in ("preference", "ranking", "kto", "text", "classification", "prompts"),
            "format",
            f"a seq2seq stage reads instruction data (alpaca, messages, sharegpt), not {self.format}",
        )


@dataclasses.dataclass
class Seq2SeqConfig:
    """An encoder-decoder tuned on instruction -> answer pairs: `instructkit seq2seq --config FILE`
    (docs/seq2seq.md). BART, T5 or any AutoModelForSeq2SeqLM, or a BERT2BERT warm-started from an encoder."""

    model: str = "minilm-l6"  # a seq2seq model (HF folder, cached Hub id, seq2seq run) or, to warm-start, an encoder
    out: str = "runs/seq2seq"
    warm_start: bool | None = None  # BERT2BERT from `model`; null: when `model` is not an encoder-decoder
    data: Seq2SeqDataConfig = dataclasses.field(default_factory=Seq2SeqDataConfig)
    peft: PeftConfig = dataclasses.field(default_factory=lambda: PeftConfig(method="full"))  # full or the LoRA family
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=5e-5, scheduler="linear"))
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(batch_size=16))
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        require(
            self.peft.method in SEQ2SEQ_METHODS,
            "peft.method",
            f"a seq2seq stage trains {', '.join(SEQ2SEQ_METHODS)}, not {self.peft.method}",
        )


VisionDecoder = Literal["frozen", "lora"]  # train/vision.py: the decoder stays frozen, or LoRA-family adapters train
VISION_METHODS = ("lora", "dora", "rslora")  # the adapters a vision stage puts on its decoder


@dataclasses.dataclass
class VisionDataConfig:
    """The data of a vision stage: records with images (LLaMA-Factory's mllm_demo.json shape, OpenAI
    image_url content parts, torchtune's image column; data/vision.py), .json or .jsonl (docs/vision.md)."""

    path: str = "shipped:vision/train"  # training records, or shipped:NAME/SPLIT
    val_path: str | None = "shipped:vision/val"  # validation records (held-out loss)
    test_path: str | None = "shipped:vision/test"  # scored by greedy exact match and BLEU before and after training
    template: str | None = None  # chat template: the tokenizer's own unless chatml/llama-3/alpaca
    max_length: int = 256  # tokens per example, image tokens included; longer examples are dropped whole
    limit: int | None = None  # use only the first N training records (quick trials)
    test_limit: int | None = None  # score only the first N test records

    def __post_init__(self) -> None:
        require(self.max_length >= 8, "max_length", "must be at least 8")
        require(self.limit is None or self.limit >= 1, "limit", "must be at least 1 (or null for all records)")
        require(self.test_limit is None or self.test_limit >= 1, "test_limit", "must be at least 1 (or null)")
        _check_template(self.template, "template")


@dataclasses.dataclass
class VisionConfig:
    """Images in, text out (docs/vision.md): EfficientNet-Lite0 (frozen) -> 2-layer MLP projector ->
    a causal LM; `decoder: lora` also trains LoRA on the decoder (the `vision` stage)."""

    model: str = "smollm2-135m-instruct"  # the decoder (any causal LM), or a vision run folder to go on from
    out: str = "runs/vision"
    decoder: VisionDecoder = "lora"  # frozen: only the projector trains; lora: the projector and peft's adapters
    image_size: int = 128  # pixels fed to the encoder (square); its map is image_size / 32 cells a side
    grid: int = 2  # image tokens per side: the encoder's map pooled to grid x grid cells (2: one per quadrant)
    data: VisionDataConfig = dataclasses.field(default_factory=VisionDataConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)  # used when decoder: lora
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-3))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    max_new_tokens: int = 48  # held-out answers: greedy tokens at most
    eval_batch_size: int = 16
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        require(self.image_size >= 32 and self.image_size % 32 == 0, "image_size", "must be a multiple of 32")
        require(1 <= self.grid <= self.image_size // 32, "grid", f"must be in 1..{self.image_size // 32}")
        require(
            self.decoder == "frozen" or self.peft.method in VISION_METHODS,
            "peft.method",
            f"a vision stage's decoder trains {', '.join(VISION_METHODS)}, not {self.peft.method}",
        )
        require(self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1")
        require(self.eval_batch_size >= 1, "eval_batch_size", "must be at least 1")


@dataclasses.dataclass
class VisionProjectorConfig(VisionConfig):
    """The projector-only stage (`vision_projector`): the decoder frozen, only the projector trains."""

    out: str = "runs/vision_projector"
    decoder: VisionDecoder = "frozen"


@dataclasses.dataclass
class QuantizeConfig:
    """Quantisation: `instructkit quantize --config FILE` (docs/quantize.md)."""

    model: str = "smollm2-135m-instruct"  # the model to quantise (adapters are merged first)
    out: str = "runs/quantize"
    scheme: Literal["int8_weight_only", "int8_dynamic", "int4_weight_only", "nf4"] = "int8_weight_only"
    group_size: int = 32  # int4_weight_only: weights sharing one scale
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # device only
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        require(self.group_size in (32, 64, 128, 256), "group_size", "must be 32, 64, 128 or 256")
        require(
            self.group_size == 32 or self.scheme == "int4_weight_only",
            "group_size",
            f"group_size applies to int4_weight_only, not {self.scheme}",
        )


@dataclasses.dataclass
class ExportStageConfig:
    """A recipe's `export` stage: the previous model (or the stage its `model` names) written as one
    GGUF file, or a merged HF folder, and checked against its source (docs/export.md). On its own
    the command is `instructkit export MODEL OUT`."""

    model: str = "smollm2-135m-instruct"  # the model to export: a spec, a run folder or an earlier stage's name
    out: str = "runs/export"
    format: Literal["gguf", "merged"] = "gguf"
    quant: Literal["f16", "q8_0", "q4_0"] = "f16"  # gguf: the tensor type of the weight matrices
    rounding: Literal["nearest", "gptq"] = "nearest"  # q8_0: to nearest, or GPTQ on calibration data
    calibration_data: str = "shipped:extract/train"  # gptq: conversations whose layer outputs it keeps
    calibration_examples: int = 256  # gptq: how many of them
    check_data: str = "shipped:extract/test"  # held-out conversations both models answer in the check
    check_prompts: int = 20  # how many of them, greedily; 0: the logit probe only

    def __post_init__(self) -> None:
        require(self.quant == "f16" or self.format == "gguf", "quant", f"applies to format gguf, not {self.format}")
        require(self.check_prompts >= 0, "check_prompts", "must be >= 0")
        require(self.rounding == "nearest" or self.quant == "q8_0", "rounding", "gptq writes q8_0 blocks only")
        require(self.calibration_examples >= 1, "calibration_examples", "must be >= 1")


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
    loss: PreferenceLoss = "sigmoid"  # sigmoid | ipo | hinge | simpo | orpo | kto (see docs/dpo.md)
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO
    simpo_gamma: float = 0.5  # SimPO target margin
    orpo_lambda: float = 1.0  # weight of ORPO's odds-ratio term beside its SFT term
    reference: Literal["auto", "precompute", "adapter"] = "auto"  # how reference log-probs are made
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        require(
            self.data.truncation == "whole-turns",
            "data.truncation",
            "a preference stage always cuts the response to fit (no choice to make here)",
        )
        require(
            self.data.truncation == "whole-turns",
            "data.truncation",
            "a preference stage always cuts the response to fit (no choice to make here)",
        )
        require(self.beta > 0, "beta", "must be positive")
        require(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        require(self.orpo_lambda >= 0, "orpo_lambda", "must be >= 0")
        require(
            self.reference != "adapter" or self.peft.method in PEFT_ADAPTERS,
            "reference",
            f"reference: adapter needs a peft method ({', '.join(PEFT_ADAPTERS)}); use precompute",
        )


@dataclasses.dataclass
class PromptDataConfig:
    path: str = ""  # prompts: JSONL/JSON/CSV/Parquet records with `prompt` (string or messages) + extra fields
    template: str | None = None  # chat template of the policy: the tokenizer's own unless chatml/llama-3/alpaca
    max_prompt_length: int = 256  # tokens; longer prompts are left out (and counted)
    limit: int | None = None  # use only the first N prompts
    ptx_path: str | None = None  # PPO-ptx data: demonstrations (assistant tokens train) or plain text
    ptx_max_length: int = 512  # tokens per ptx example
    ptx_batch_size: int = 8  # ptx examples per optimizer step

    ptx_format: DataFormat | None = None  # format of ptx_path; detected when omitted

    def __post_init__(self) -> None:
        require(self.max_prompt_length >= 1, "max_prompt_length", "must be at least 1")
        require(self.ptx_batch_size >= 1, "ptx_batch_size", "must be at least 1")
        require(self.ptx_max_length >= 8, "ptx_max_length", "must be at least 8")
        require(self.limit is None or self.limit >= 1, "limit", "must be at least 1 (or null for all prompts)")
        _check_template(self.template)


@dataclasses.dataclass
class RewardSourceConfig:
    model: str | None = None  # reward-model folder or `instructkit rm` run folder
    function: str | None = None  # "module:function": (prompt, response, **data) -> float
    template: str | None = None  # chat template the reward model scores with (its tokenizer's own by default)
    batch_size: int = 16  # responses scored per reward-model forward pass

    def __post_init__(self) -> None:
        require(not (self.model and self.function), "function", "set reward.model or reward.function, not both")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        _check_template(self.template)


@dataclasses.dataclass
class AdaptiveKLConfig:
    target: float | None = None  # KL per response (nats) to steer towards; null keeps kl_coef fixed
    horizon: int = 10000  # samples over which the coefficient corrects the error (Ziegler et al. 2019)

    def __post_init__(self) -> None:
        require(self.target is None or self.target > 0, "target", "must be positive")
        require(self.horizon >= 1, "horizon", "must be at least 1")


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
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-5, scheduler="constant"))
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(max_steps=100))
    advantage: Advantage = "gae"  # gae | grpo | rloo (group-relative, no value model)
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
    critic_warmup_steps: int = 0  # gae: the first N PPO steps train the value model alone (the policy waits)
    kl_coef: float = 0.05  # beta: per-token KL penalty in the reward (initial value if adaptive)
    kl_estimator: KLEstimator = "k1"  # k1 | k3 (Schulman, "Approximating KL Divergence")
    adaptive_kl: AdaptiveKLConfig = dataclasses.field(default_factory=AdaptiveKLConfig)
    whiten_advantages: bool = True
    whiten_rewards: bool = False  # rescale per-token rewards to unit variance (mean kept)
    normalize_rewards: bool = False  # scores as (x - mean) / std over every score seen so far (running)
    missing_eos_penalty: float | None = None  # subtracted from the score of responses cut at max_new_tokens
    ptx_coef: float = 0.0  # gamma of InstructGPT Eq. 2: weight of the LM loss on data.ptx_path
    ema_decay: float | None = None  # EMA of the policy weights (final/ holds the EMA); null: off
    save_merged: bool = False  # LoRA: also write merged full weights to merged/
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        for name in ("rollout_batch_size", "group_size", "generation_batch_size", "max_new_tokens", "ppo_epochs"):
            require(getattr(self, name) >= 1, name, "must be at least 1")
        require(self.temperature > 0, "temperature", "must be > 0 (PPO samples; log-probs are taken at it)")
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        require(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", "must be in (0, 1)")
        for name in ("ptx_coef", "kl_coef", "vf_coef", "critic_warmup_steps"):
            require(getattr(self, name) >= 0, name, "must be >= 0")
        require(
            not self.critic_warmup_steps or self.advantage not in GROUP_RELATIVE,
            "critic_warmup_steps",
            f"{self.advantage} has no value model to warm up",
        )
        require(
            self.advantage not in GROUP_RELATIVE or self.group_size >= 2,
            "group_size",
            f"{self.advantage} compares responses within a group: set group_size >= 2",
        )
        n_seq, mini = self.rollout_batch_size * self.group_size, self.train.batch_size * self.train.grad_accum
        require(
            n_seq % mini == 0,
            "train.batch_size",
            f"rollout_batch_size x group_size = {n_seq} responses do not split into mini-batches of "
            f"train.batch_size x train.grad_accum = {mini}",
        )
        require(not self.train.eval_every, "train.eval_every", "PPO has no validation loss to evaluate or stop on")
        require(self.train.fsdp == "off", "train.fsdp", "PPO is not built with FSDP yet (several processes run DDP)")
        require(
            not self.train.early_stopping_patience,
            "train.early_stopping_patience",
            "PPO has no validation loss to evaluate or stop on",
        )
        require(
            not self.train.dropout,
            "train.dropout",
            "PPO runs with dropout off (log-probs must match between sampling and training)",
        )
        require(
            not self.peft.dropout,
            "peft.dropout",
            "PPO runs with LoRA dropout off (log-probs must match between sampling and training)",
        )
        require(
            self.train.epochs == 1.0,
            "train.epochs",
            "PPO runs train.max_steps steps; epochs over the prompts do not apply",
        )
        require(self.train.max_steps is not None, "train.max_steps", "set the number of PPO steps")
        _check_merged(self.save_merged, self.peft)


@dataclasses.dataclass
class EvalStageConfig:
    """The `eval` stage of a recipe: every model of the recipe on the same held-out data."""

    suites: list[Suite] = dataclasses.field(default_factory=lambda: ["exact_match"])
    data: str = "shipped:extract/test"  # held-out conversations
    max_new_tokens: int = 64
    batch_size: int = 16
    k_shot: int = 0  # also report k-shot prompting of the untuned model when > 0
    limit: int | None = None
    # Held-out preference pairs for the `preference` suite (does each model itself prefer the
    # chosen response?); used when `preference` is among the suites.
    preference_data: str = "shipped:extract_prefs/val"
    # The safety suites' prompts (docs/safety.md): harmful requests and benign look-alikes for
    # `refusal`, prompts with an injected canary for `injection`; `robustness` re-runs
    # `robust_suite` on `data` with perturbed prompts.
    refusal_data: str = "shipped:refusal/test"
    injection_data: str = "shipped:injection/test"
    robust_suite: Suite = "exact_match"
    # Also measure each model's footprint: parameters, weights on disk, and batch-1 greedy decode
    # tokens/s over the first `footprint_prompts` held-out prompts (eval/footprint.py).
    footprint: bool = False
    footprint_prompts: int = 4
    # Also evaluate every model with its weights in these precisions (rows "NAME bf16", "NAME
    # int8" beside the fp32 row; instructkit.decoding.reduced_precision, docs/decoding.md).
    precisions: list[Literal["bf16", "int8"]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        require(bool(self.suites), "suites", "name at least one suite")
        require(self.footprint_prompts >= 1, "footprint_prompts", "must be at least 1")
        require(self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(self.k_shot >= 0, "k_shot", "must be >= 0")
        require(self.limit is None or self.limit >= 1, "limit", "must be at least 1 (or null for all records)")


@dataclasses.dataclass
class ContinualTaskConfig:
    """One task of a continual stage: trained in its turn, measured after every task."""

    name: str = ""  # the task's name: its run folder, its row and column of R, its adapter (adapter_per_task)
    train: str = ""  # training demonstrations: a file or shipped:NAME/SPLIT
    test: str = ""  # held-out conversations scored by exact match before the first task and after every task
    val: str | None = None  # validation demonstrations for the validation loss; null: none
    steps: int | None = None  # optimizer steps on this task; null: train.max_steps, else train.epochs epochs
    limit: int | None = None  # use only the first N training records

    def __post_init__(self) -> None:
        require(bool(self.name), "name", "every task needs a name (its folder and its row of the accuracy matrix)")
        require(
            self.name.replace("_", "").replace("-", "").isalnum(),
            "name",
            f"'{self.name}' names a folder and an adapter: use letters, digits, - and _",
        )
        require(bool(self.train), "train", f"task '{self.name}' has no training data: set train")
        require(bool(self.test), "test", f"task '{self.name}' has no held-out data to measure: set test")
        require(self.steps is None or self.steps >= 1, "steps", "must be at least 1 (or null)")
        require(self.limit is None or self.limit >= 1, "limit", "must be at least 1 (or null for all records)")


@dataclasses.dataclass
class ReplayConfig:
    """The replay strategy: earlier tasks' training examples mixed into each new task's epoch."""

    fraction: float = 0.2  # share of each task's epoch taken from earlier tasks, in [0, 1)
    by: ReplayBy = "examples"  # the share counts examples, or trained tokens

    def __post_init__(self) -> None:
        require(
            0.0 <= self.fraction < 1.0,
            "fraction",
            f"must lie in [0, 1) (the share of each epoch taken from earlier tasks), got {self.fraction}",
        )


@dataclasses.dataclass
class EWCConfig:
    """The ewc strategy (Kirkpatrick et al. 2017): a Fisher-weighted pull to each earlier task's weights."""

    KEY_ALIASES: ClassVar[dict[str, str]] = {"lambda": "lambda_"}  # `lambda` is a Python keyword
    lambda_: float = 100.0  # written `lambda`: the penalty's weight, (lambda / 2) sum_i F_i (theta_i - theta*_i)^2
    fisher_examples: int = 32  # training examples of the finished task the diagonal Fisher averages over

    def __post_init__(self) -> None:
        require(self.lambda_ >= 0, "lambda", "must be >= 0")
        require(self.fisher_examples >= 1, "fisher_examples", "must be at least 1")


@dataclasses.dataclass
class LwFConfig:
    """The lwf strategy (Li and Hoiem 2017): distil the previous model's token distributions."""

    weight: float = 1.0  # weight of the distillation term beside the task loss (both per trained token)
    temperature: float = 2.0  # tau of the softened distributions (the paper uses 2)

    def __post_init__(self) -> None:
        require(self.weight >= 0, "weight", "must be >= 0")
        require(self.temperature > 0, "temperature", "must be > 0")


@dataclasses.dataclass
class ContinualDataConfig:
    template: str | None = None  # chat template: the tokenizer's own unless chatml/llama-3/alpaca
    max_length: int = 512  # tokens per training example; longer ones are left out
    general: str | None = "shipped:generic_text/test"  # plain text whose perplexity measures general ability
    seed: int = 0  # seed of the replay mix

    def __post_init__(self) -> None:
        require(self.max_length >= 8, "max_length", "must be at least 8")
        _check_template(self.template)


@dataclasses.dataclass
class ContinualEvalConfig:
    max_new_tokens: int = 32  # greedy tokens per held-out answer
    batch_size: int = 50  # prompts generated together; texts per perplexity batch
    limit: int | None = None  # score only the first N held-out records of each task

    def __post_init__(self) -> None:
        require(self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(self.limit is None or self.limit >= 1, "limit", "must be at least 1 (or null for all records)")


@dataclasses.dataclass
class ContinualConfig:
    """Continual learning: tasks in sequence, one run per strategy, the accuracy matrix (docs/continual.md)."""

    model: str = "smollm2-135m-instruct"  # every strategy starts from this model
    out: str = "runs/continual"
    tasks: list[ContinualTaskConfig] = dataclasses.field(default_factory=list)  # trained in this order
    strategies: list[ContinualStrategy] = dataclasses.field(default_factory=lambda: ["naive"])
    replay: ReplayConfig = dataclasses.field(default_factory=ReplayConfig)  # the replay strategy only
    ewc: EWCConfig = dataclasses.field(default_factory=EWCConfig)  # the ewc strategy only
    lwf: LwFConfig = dataclasses.field(default_factory=LwFConfig)  # the lwf strategy only
    data: ContinualDataConfig = dataclasses.field(default_factory=ContinualDataConfig)
    eval: ContinualEvalConfig = dataclasses.field(default_factory=ContinualEvalConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        require(len(self.tasks) >= 2, "tasks", "a continual stage needs at least two tasks (name, train, test each)")
        names = [t.name for t in self.tasks]
        twice = next((n for n in names if names.count(n) > 1), None)
        require(twice is None, "tasks", f"task name '{twice}' is used twice; each task needs its own name")
        require(bool(self.strategies), "strategies", "name at least one strategy")
        again = next((s for s in self.strategies if self.strategies.count(s) > 1), None)
        require(again is None, "strategies", f"strategy '{again}' is listed twice")
        for section, default in (("replay", ReplayConfig()), ("ewc", EWCConfig()), ("lwf", LwFConfig())):
            require(
                getattr(self, section) == default or section in self.strategies,
                section,
                f"{section} settings apply to the {section} strategy, which strategies does not list "
                f"({', '.join(self.strategies)}); remove the section or add {section}",
            )
        require(
            self.peft.method in LORA_FAMILY,
            "peft.method",
            f"the continual strategies carry, penalise, distil or route a LoRA adapter: use {', '.join(LORA_FAMILY)}",
        )


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
        elif isinstance(node, yaml.SequenceNode):  # a list of sections (continual.tasks): key.0.name
            for i, item in enumerate(node.value):
                lines[f"{prefix}{i}"] = item.start_mark.line + 1
                walk(item, f"{prefix}{i}.")

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


@dataclasses.dataclass
class Origin:
    """Where the keys of a config came from, so an error names the place the user can fix: a
    YAML file and line, or the ``key=value`` override that set the key."""

    file: str | None = None
    lines: dict[str, int] = dataclasses.field(default_factory=dict)  # dotted key -> 1-based line
    overrides: dict[str, str] = dataclasses.field(default_factory=dict)  # dotted key -> "key=value" as typed

    def error(self, problem: str, dotted: str, *, section: bool = False) -> InputError:
        """An InputError at ``dotted``; for a whole ``section``, at the override inside it if any."""
        text = self.overrides.get(dotted)
        if text is None and section:
            text = next((t for k, t in self.overrides.items() if k.startswith(dotted + ".") or not dotted), None)
        if text is not None:
            return InputError(problem, file=f"override '{text}'")
        line = self.lines.get(dotted)
        key = dotted
        while line is None and "." in key:  # a key the file does not spell out: its section's line
            key = key.rsplit(".", 1)[0]
            line = self.lines.get(key)
        return InputError(problem, file=self.file, line=line, field=dotted or None)


def from_dict(
    cls: type[T],
    data: dict[str, Any],
    *,
    file: str | None = None,
    lines: dict[str, int] | None = None,
    prefix: str = "",
    origin: Origin | None = None,
) -> T:
    """Build dataclass ``cls`` from a nested mapping, rejecting unknown keys and bad values.

    ``prefix`` is the dotted path of this section in the whole config (``sft.`` in a recipe);
    errors are located through ``origin`` (or ``file`` and ``lines``).
    """
    origin = origin or Origin(file, lines or {})
    here = prefix.rstrip(".")
    if not isinstance(data, dict):
        raise origin.error("expected a mapping of keys to values", here)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    aliases: dict[str, str] = getattr(cls, "KEY_ALIASES", {})  # YAML key -> field name (`lambda` -> lambda_)
    kwargs: dict[str, Any] = {}
    for written, value in data.items():
        dotted = f"{prefix}{written}"
        key = aliases.get(written, written)
        if key not in fields:
            raise origin.error(f"unknown key{did_you_mean(str(written), [*aliases, *fields])}", dotted)
        tp = hints[key]
        inner = get_args(tp)[0] if get_origin(tp) is list and get_args(tp) else None
        if inner is not None and dataclasses.is_dataclass(inner):  # a list of sections
            if not isinstance(value, list):
                raise origin.error("expected a list of sections", dotted)
            kwargs[key] = [from_dict(inner, v, prefix=f"{dotted}.{i}.", origin=origin) for i, v in enumerate(value)]
            continue
        if dataclasses.is_dataclass(tp):
            section = value if value is not None else {}
            factory = fields[key].default_factory
            if isinstance(section, dict) and factory is not dataclasses.MISSING:
                # Keys given override this stage's own defaults (DPO's lr is not SFT's), not the
                # section class's generic ones.
                section = merge(to_dict(factory()), section)
            kwargs[key] = from_dict(tp, section, prefix=dotted + ".", origin=origin)
            continue
        try:
            kwargs[key] = _coerce(value, tp, dotted)
        except (TypeError, ValueError) as exc:
            raise origin.error(str(exc), dotted) from None
    try:
        return cls(**kwargs)
    except FieldError as exc:
        raise origin.error(str(exc), f"{prefix}{exc.key}") from None
    except ValueError as exc:
        raise origin.error(str(exc), here or cls.__name__, section=True) from None


def parse_overrides(overrides: list[str] | None, prefix: str = "") -> dict[str, Any]:
    """``["train.lr=1e-4", "peft.method=full"]`` -> nested dict of YAML-parsed values, each under
    ``prefix`` (``"sft."`` applies stage overrides to a recipe's section)."""
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
        parts = (prefix + key.strip()).split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"override '{item}' sets inside a non-section", field=key)
        node[parts[-1]] = value
    return tree


def override_origins(overrides: list[str] | None, prefix: str = "") -> dict[str, str]:
    """Dotted key (with ``prefix``) -> the override that set it, as typed."""
    return {prefix + item.split("=", 1)[0].strip(): item for item in overrides or [] if "=" in item}


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
        raise InputError(
            f"invalid YAML: {getattr(exc, 'problem', exc)}", file=str(path), line=mark.line + 1 if mark else None
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError("a config file must be a mapping of keys to values", file=str(path))
    return data, _key_lines(text)


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> T:
    """Load stage config ``cls``: ``base``, then an optional YAML file, then ``key=value``
    overrides, validated once as a whole (so an override may supply what the file lacks)."""
    data, lines = read_yaml(path) if path else ({}, {})
    data = merge(merge(base or {}, data), parse_overrides(overrides))
    origin = Origin(str(path) if path else None, lines, override_origins(overrides))
    return from_dict(cls, data, origin=origin)


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
