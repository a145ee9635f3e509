"""Classifier and tagger recipe: an encoder with a task head, trained on instructed
classification records (instruction + text -> label) or tagged sentences (words -> BIO tags).

Reads top to bottom: config -> task -> data and labels -> model -> encode -> untrained score ->
train -> trained score -> save. The task (``seq_classification`` or ``token_classification``) is
the config's, else the model config's ``architectures``; the label set is the training data's and
the validation and held-out data are checked against it before a model loads. The heads, their
loss and scores are :mod:`instructkit.models.heads`; the records, templates and sub-word
alignment :mod:`instructkit.data.tasks`; the loop :mod:`instructkit.train.engine`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from instructkit.config import ClassifyConfig
from instructkit.data.tasks import LabelSet
from instructkit.errors import InputError
from instructkit.stages import resolve_stage_config

LABELS_FILE = "labels.json"  # the label set in final/, beside config.json's id2label
HELDOUT_FILE = "heldout.json"  # the held-out scores, before and after training, in the run folder


def resolve_task(cfg: ClassifyConfig) -> str:
    """``cfg.task``, else the task the model config's ``architectures`` names; an InputError when
    neither says (a plain encoder such as minilm-l6's ``BertModel``)."""
    from instructkit.models.heads import task_from_architectures
    from instructkit.models.loading import resolve

    if cfg.task:
        return cfg.task
    base = resolve(cfg.model).base
    config_file = Path(base) / "config.json"
    if config_file.is_file():
        architectures = json.loads(config_file.read_text()).get("architectures")
    else:
        from transformers import AutoConfig

        architectures = AutoConfig.from_pretrained(base, trust_remote_code=cfg.trust_remote_code).architectures
    task = task_from_architectures(architectures)
    if task is None:
        raise InputError(
            f"cannot tell the task from the model: its config names {architectures or 'no architectures'}, no "
            "...ForSequenceClassification or ...ForTokenClassification head; set task: seq_classification "
            "or task: token_classification",
            field="task",
        )
    return task


@dataclass
class TaskData:
    train: list[Any]
    val: list[Any]
    test: list[Any]
    label_set: LabelSet


def read_data(cfg: ClassifyConfig, tagging: bool) -> TaskData:
    """Train, validation (``val_path`` or ``val_fraction`` of the training file) and held-out
    records, the label set of the training records, every other label checked against it."""
    from instructkit.data.split import split_records
    from instructkit.data.tasks import read_classification, read_tagged
    from instructkit.datasets import resolve_data_path

    d = cfg.data
    if not d.path:
        raise InputError("no training data: set data.path", field="data.path")
    read = read_tagged if tagging else read_classification

    def records(path: str | None) -> list[Any]:
        return read(resolve_data_path(path)) if path else []

    train = records(d.path)[: d.limit] if d.limit else records(d.path)
    if d.val_path:
        val = records(d.val_path)
    elif d.val_fraction:
        train, val, _ = split_records(train, val_fraction=d.val_fraction, test_fraction=0.0, seed=d.seed)
    else:
        val = []
    test = records(d.test_path)
    label_set = LabelSet.from_records(train)
    label_set.check(val, "data.val_path")
    label_set.check(test, "data.test_path")
    return TaskData(train, val, test, label_set)


def load_classifier(cfg: ClassifyConfig, task: str, label_set: LabelSet, device: Any):
    """The tokenizer, and the encoder with a ``task`` head over ``label_set`` (the head seeded by
    ``train.seed``) and what trains: full weights, or a LoRA-family adapter with the head trained
    and saved beside it (peft's ``modules_to_save``, from the task type)."""
    from instructkit.models.heads import HEADS, load_head_model
    from instructkit.models.loading import load_tokenizer, resolve
    from instructkit.models.peft_methods import METHODS, count_parameters
    from instructkit.train.engine import set_dropout, set_seed
    from instructkit.train.setup import Trainable, enable_gradient_checkpointing

    resolved = resolve(cfg.model)
    if resolved.folder:
        raise InputError(f"{cfg.model} is an adapter; a classify stage starts from whole weights", field="model")
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    set_seed(cfg.train.seed)
    model = load_head_model(resolved.base, task, label_set, trust_remote_code=cfg.trust_remote_code)
    if cfg.train.dropout is not None:
        set_dropout(model, cfg.train.dropout)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    # peft_methods.apply_method knows causal LMs and reward heads; the LoRA family and full
    # weights build the same way for an encoder's head, with the head's peft task type.
    model = METHODS[cfg.peft.method].build(model, cfg.peft, HEADS[task].peft_task)
    trainable, total = count_parameters(model)
    return Trainable(tokenizer, model.to(device), trainable, total)


@dataclass
class Encoded:
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    held_out: list[dict[str, Any]]  # tagged: align first, so the labelled positions are the words
    held_out_split: str  # data.test_path, or data.val_path / the validation share without one


def encode_data(cfg: ClassifyConfig, tagging: bool, tokenizer: Any, data: TaskData) -> Encoded:
    from instructkit.data.tasks import encode_classification, encode_tagged_record

    d = cfg.data
    if tagging:
        encode = partial(encode_tagged_record, tokenizer, label_set=data.label_set, max_length=d.max_length)
        train, val = ([encode(r, align=d.align) for r in part] for part in (data.train, data.val))
        held = [encode(r, align="first") for r in (data.test or data.val)]
    else:
        encode = partial(
            encode_classification, tokenizer, label_set=data.label_set, template=d.template, max_length=d.max_length
        )
        train, val = ([encode(r) for r in part] for part in (data.train, data.val))
        held = [encode(r) for r in data.test] if data.test else val
    split = d.test_path or d.val_path or f"{d.path} (validation share)"
    return Encoded(train, val, held, split if held else "")


def classify(
    config: ClassifyConfig | str | Path | dict | None = None,
    overrides: list[str] | None = None,
    *,
    on_step: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a classification or tagging head; returns the run summary (also summary.json)."""
    from instructkit.models.heads import HEADS, HeadLoss, classifier_collate, head_scores
    from instructkit.train import engine, setup

    # 1. Resolve the config; check the run folder (a finished run with this config is returned as is).
    cfg = resolve_stage_config(ClassifyConfig, "classify", config, overrides)
    stage = setup.open_run(cfg, stage="classify", overwrite=overwrite)
    if stage.finished:
        return stage.run.saved_summary()
    with stage.cleanup_on_failure():
        # 2. The task, the data and its labels: unknown labels fail here, before a model loads.
        task = resolve_task(cfg)
        head = HEADS[task]
        data = read_data(cfg, head.tagging)

        # 3. The encoder with a fresh head over the training labels; what trains.
        parts = load_classifier(cfg, task, data.label_set, stage.accelerator.device)

        # 4. Encode: instruction + text (pair or joined), or words with their tags on sub-tokens.
        enc = encode_data(cfg, head.tagging, parts.tokenizer, data)
        collate = classifier_collate(parts.tokenizer.pad_token_id)
        score = partial(head_scores, label_set=data.label_set, collate=collate, batch_size=cfg.eval_batch_size)
        before = score(parts.model, enc.held_out) if enc.held_out else None  # the untrained head

        # 5. Train: cross-entropy summed over inputs (or labelled tokens), exact across micro-batches.
        started = time.time()
        result = engine.fit(
            loss_module=HeadLoss(parts.model),
            model=parts.model,
            examples=enc.train,
            collate=collate,
            weight=head.weight,
            train=cfg.train,
            optim=cfg.optim,
            run=stage.run,
            accelerator=stage.accelerator,
            val_examples=enc.val,
            on_step=on_step,
            count_key="labels",
        )

    # 6. The trained head on the same held-out split.
    after = score(parts.model, enc.held_out) if enc.held_out else None
    held_out = {"task": task, "split": enc.held_out_split, "labels": list(data.label_set.labels)}
    held_out |= {"before": before, "after": after}

    # 7. Save final/ as a plain classifier (adapters merged) with its labels, and heldout.json.
    summary = setup.stage_summary(
        "classify",
        cfg,
        parts,
        stage.run,
        task=task,
        **result.summary(started),
        val_loss=result.final_val_loss,
        best_val_loss=result.best_val_loss,
        train_examples=len(enc.train),
        val_examples=len(enc.val),
        held_out_examples=len(enc.held_out),
        labels=list(data.label_set.labels),
        heldout=held_out,
    )
    return stage.finish(summary, lambda: save_classifier(parts, data.label_set, stage.run, held_out))


def save_classifier(parts, label_set: LabelSet, run, held_out: dict[str, Any]) -> None:
    """final/: the classifier (a LoRA adapter merged into it, the trained head with it), its
    tokenizer and ``labels.json``; the run folder's ``heldout.json``."""
    from instructkit.fileio import atomic_dir, atomic_write_json
    from instructkit.models.peft_methods import is_peft

    plain = parts.model.merge_and_unload() if is_peft(parts.model) else parts.model
    with atomic_dir(run.final) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        parts.tokenizer.save_pretrained(tmp)
        label_set.save(tmp / LABELS_FILE)
    atomic_write_json(run.path / HELDOUT_FILE, held_out)
