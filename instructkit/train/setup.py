"""The set-up every training recipe repeats, written once: the run folder and its rerun rules,
the accelerator, the data and its train/validation split, the tokenizer and the model with
what trains, and the final save.

A recipe calls these in order (see ``train/sft.py``) and then the engine's ``fit``; what
differs between recipes (how records become examples, the loss module, what is saved) stays
in the recipe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from instructkit.config import DataConfig, TrainConfig
from instructkit.errors import InputError
from instructkit.fileio import atomic_dir, atomic_write_json
from instructkit.runs import RunDir, RunState, remove_run, remove_stale_temporaries, rerun_state

# ----------------------------------------------------------------------------------------------
# The run folder


@dataclass
class StageRun:
    """One stage's run folder and accelerator, and whether this call made the folder."""

    run: RunDir
    accelerator: Any
    state: RunState
    created: bool  # the folder did not hold a run before this call

    @property
    def finished(self) -> bool:
        return self.state is RunState.FINISHED

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *args: Any) -> None:
        self.accelerator.print(*args, flush=True)

    @contextlib.contextmanager
    def cleanup_on_failure(self) -> Iterator[None]:
        """A stage that fails before its first checkpoint leaves no folder behind (if it made it)."""
        try:
            yield
        except BaseException:
            if self.created and self.is_main and not self.run.has_progress():
                remove_run(self.run.path)
            raise

    def finish(self, summary: dict[str, Any], save: Callable[[], None]) -> dict[str, Any]:
        """Save the outputs (main process), then ``summary.json`` last: its presence means done."""
        if self.is_main:
            save()
            atomic_write_json(self.run.summary, summary)
        self.accelerator.wait_for_everyone()
        return summary


def open_run(cfg: Any, *, stage: str, overwrite: bool = False, train: TrainConfig | None = None) -> StageRun:
    """Check ``cfg.out`` against the run already there (see :mod:`instructkit.runs`), make the
    accelerator, and write ``config.yaml`` unless the stage is finished. ``train`` replaces
    ``cfg.train`` for the accelerator (PPO's fp32 default)."""
    from instructkit.models.loading import check_device
    from instructkit.train.engine import make_accelerator

    run = RunDir(Path(cfg.out))
    state = rerun_state(run.path, cfg, overwrite=overwrite, stage=stage)
    train = train or cfg.train
    if train.device:
        check_device(train.device, field="train.device")
    accelerator = make_accelerator(train)
    created = state is RunState.FRESH
    if accelerator.is_main_process and state is not RunState.FINISHED:
        if created and run.path.exists():
            remove_run(run.path)  # --overwrite, or a folder with nothing worth keeping
        run.path.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run.path)
        remove_stale_temporaries(run.checkpoints)
        run.write_config(cfg)
    accelerator.wait_for_everyone()
    if state is RunState.FINISHED:
        accelerator.print(f"{stage}: {run.path} already finished with this config; nothing to do", flush=True)
    return StageRun(run, accelerator, state, created)


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class Splits:
    train: list[Any]
    val: list[Any]


def read_records(data: DataConfig, path: str | None = None) -> list[Any]:
    """The records of ``path`` (default ``data.path``), validated, with the format and columns
    of ``data``; ``data.dataset_info`` looks ``data.path`` up as a LLaMA-Factory dataset name."""
    from instructkit.data.formats import load_records
    from instructkit.datasets import resolve_data_path

    if data.dataset_info and path is None:
        return load_records(
            dataset_info=resolve_data_path(data.dataset_info), name=data.path, format=data.format, columns=data.columns
        ).records
    return load_records(resolve_data_path(path or data.path), format=data.format, columns=data.columns).records


def load_splits(
    data: DataConfig, convert: Callable[[Sequence[Any], str], list[Any]] | None = None, what: str = "training data"
) -> Splits:
    """Read, limit and split the data; bad records fail here, before a model is loaded.

    Records are split as read, then converted (``convert(records, where)``: rankings to pairs,
    say), so one prompt's pairs stay on one side and stages with the same seed hold out the
    same prompts."""
    from instructkit.data.split import split_records

    if not data.path:
        raise InputError(f"no {what}: set data.path", field="data.path")
    records = read_records(data)
    records = records[: data.limit] if data.limit else records
    if data.val_path:
        train, val = records, read_records(data, data.val_path)
        where_val = data.val_path
    else:
        train, val, _ = split_records(records, val_fraction=data.val_fraction, test_fraction=0.0, seed=data.seed)
        where_val = data.path
    if convert is None:
        return Splits(list(train), list(val))
    return Splits(convert(train, data.path), convert(val, where_val))


def check_encoded(examples: Sequence[Any], data: DataConfig, problem: str) -> None:
    if not examples:
        raise InputError(problem, file=data.path)


@dataclass
class EncodedSplits:
    train: list[Any]
    val: list[Any]
    train_dropped: int  # examples that did not fit (see each encoder)
    val_dropped: int

    @property
    def dropped(self) -> int:
        return self.train_dropped + self.val_dropped


Encoder = Callable[[Sequence[Any]], tuple[list[Any], int]]


def encode_splits(
    splits: Splits, encode: Encoder, data: DataConfig, problem: str, *, encode_val: Encoder | None = None
) -> EncodedSplits:
    """Both splits through ``encode(records) -> (examples, dropped)`` (``encode_val`` for the
    validation split, when it differs); no training example left is an InputError saying ``problem``."""
    train, train_dropped = encode(splits.train)
    val, val_dropped = (encode_val or encode)(splits.val)
    check_encoded(train, data, problem)
    return EncodedSplits(train, val, train_dropped, val_dropped)


# ----------------------------------------------------------------------------------------------
# Model


@dataclass
class Trainable:
    tokenizer: Any
    model: nn.Module
    trainable_parameters: int
    total_parameters: int


def load_trainable(
    cfg: Any,
    *,
    device: Any,
    task: str = "CAUSAL_LM",
    merge_adapter: bool = False,
    dropout: float | None = None,
    build: Callable[[nn.Module, Any], nn.Module] | None = None,
) -> Trainable:
    """Tokenizer and model of ``cfg.model`` with what trains (``cfg.peft``), on ``device``.

    ``build(causal_lm, tokenizer)`` turns the loaded causal LM into the model that trains (a
    reward model's scalar head); ``dropout`` (else ``cfg.train.dropout``) sets every dropout.
    """
    from instructkit.models.loading import load_model, load_tokenizer
    from instructkit.models.peft_methods import apply_method, count_parameters
    from instructkit.train.engine import set_dropout, set_seed

    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    set_seed(cfg.train.seed)
    model = load_model(
        cfg.model, dtype="fp32", device="cpu", merge_adapter=merge_adapter, trust_remote_code=cfg.trust_remote_code
    )
    if build is not None:
        model = build(model, tokenizer)
    dropout = dropout if dropout is not None else cfg.train.dropout
    if dropout is not None:
        set_dropout(model, dropout)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = apply_method(model, cfg.peft, task=task)
    trainable, total = count_parameters(model)
    return Trainable(tokenizer, model.to(device), trainable, total)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def save_final(model: nn.Module, tokenizer: Any, run: RunDir, *, base_spec: str, merged: bool) -> None:
    """Write final/ atomically (adapter, bottleneck adapters or full weights + tokenizer), and
    merged/ if asked. A qlora adapter also says how its base was quantised (``models.qlora``)."""
    from instructkit.models import bottleneck, qlora
    from instructkit.models.peft_methods import is_peft

    with atomic_dir(run.final) as tmp:
        if bottleneck.spec_of(model) is not None:
            bottleneck.save(model, tmp, base_spec)  # only the adapters; the base is named
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if is_peft(model):
            (tmp / "instructkit_base.txt").write_text(str(base_spec) + "\n")
        if qlora.is_quantized(model):
            qlora.save_record(model, tmp)
    if merged:
        with atomic_dir(run.path / "merged") as tmp:
            model.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)


def stage_summary(stage: str, cfg: Any, parameters: Trainable, run: RunDir, **fields: Any) -> dict[str, Any]:
    """The summary.json fields every stage shares, around the stage's own ``fields``."""
    return {
        "stage": stage,
        "model": cfg.model,
        "method": cfg.peft.method,
        **fields,
        "trainable_parameters": parameters.trainable_parameters,
        "total_parameters": parameters.total_parameters,
        "final": str(run.final),
    }
