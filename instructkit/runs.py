"""Run folders, and what a rerun into one may do.

A stage's run folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl``,
``summary.json`` (written last: the stage finished), ``checkpoints/`` and ``final/``. A rerun
compares its newly resolved config with the saved one before touching anything:

* same config (up to :data:`RERUN_NEUTRAL` keys, which cannot change the result): a finished
  stage is skipped, an interrupted one resumes from its last checkpoint;
* a different config: an error listing the keys with their old and new values, unless the
  caller asked to overwrite (then the folder is replaced);
* a folder with neither a summary nor a checkpoint holds nothing to keep and is started over.

Standard library and YAML only (no torch), so ``instructkit run`` checks every stage of a
recipe against its folder before the first one starts.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from instructkit.config import to_dict
from instructkit.errors import InputError

RERUN_NEUTRAL = frozenset(
    {
        "out",
        "train.progress",
        "train.log_every",
        "train.save_every",
        "train.keep_checkpoints",
        "train.report_to",
        "train.fsdp",
    }
)
"""Dotted keys that may differ on a rerun: the folder's own name (a run folder may be moved, or
named relative or absolute), progress display, logging and checkpoint cadence (resume is exact
whatever the cadence), where else the metrics are sent (train.report_to), and whether the
weights are sharded across processes (train.fsdp: the same numbers either way, tests/train/test_fsdp.py)."""


@dataclasses.dataclass
class RunDir:
    """A run folder: config.yaml, metrics.jsonl, summary.json, checkpoints/, final/."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    def write_config(self, cfg: Any) -> None:
        from instructkit.config import dump_yaml
        from instructkit.fileio import atomic_write_text

        atomic_write_text(self.config, dump_yaml(cfg))

    def latest_checkpoint(self) -> Path | None:
        """The newest finished ``step-N`` checkpoint (a ``step-N.tmp-*`` being written is not one)."""
        steps = [p for p in self.checkpoints.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
        return max(steps, key=lambda p: int(p.name[5:])) if steps else None

    def is_finished(self) -> bool:
        return self.summary.is_file()

    def has_progress(self) -> bool:
        """Anything a rerun could lose: a summary or a step checkpoint."""
        return self.is_finished() or self.latest_checkpoint() is not None

    def saved_summary(self) -> dict[str, Any]:
        return json.loads(self.summary.read_text())


class RunState(enum.Enum):
    FRESH = "fresh"  # nothing there (or nothing worth keeping): start from step 0
    RESUME = "resume"  # same config, a checkpoint: continue from it
    FINISHED = "finished"  # same config, finished: nothing to do


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


UNSET = "(unset)"


def config_changes(
    saved: dict[str, Any],
    new: dict[str, Any],
    neutral: frozenset[str] = RERUN_NEUTRAL,
    defaults: dict[str, Any] | None = None,
) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, new value) for every key whose value differs, neutral keys
    left out. Both sides are plain YAML data (see :func:`instructkit.config.to_dict`); a key the
    saved config lacks counts as its value in ``defaults`` (a field added since it was saved)."""
    a, b, d = flatten(saved), flatten(new), flatten(defaults or {})
    changes = []
    for key in sorted(set(a) | set(b)):
        old, value = a.get(key, d.get(key, UNSET)), b.get(key, d.get(key, UNSET))
        if key in neutral or old == value:
            continue
        changes.append((key, old, value))
    return changes


def describe_changes(changes: list[tuple[str, Any, Any]], most: int = 8) -> str:
    shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes[:most])
    return shown + (f"; and {len(changes) - most} more" if len(changes) > most else "")


def rerun_state(path: str | Path, cfg: Any, *, overwrite: bool = False, stage: str | None = None) -> RunState:
    """What a run of ``cfg`` into ``path`` will do; raises :class:`InputError` (touching
    nothing) when the folder holds a run of a different config and ``overwrite`` is false."""
    run = RunDir(Path(path))
    if not run.has_progress():
        return RunState.FRESH
    if overwrite:
        return RunState.FRESH
    saved = _read_saved_config(run)
    plain, defaults = _plain(cfg), _defaults(cfg)
    changes = config_changes(saved, plain, defaults=defaults)
    changes = _same_global_batch(run, changes, {**flatten(defaults), **flatten(saved)}, flatten(plain))
    if changes:
        how = f"rerun the recipe from this stage (instructkit run ... --from {stage})" if stage else ""
        raise InputError(
            f"the run there was made with another config ({describe_changes(changes)}); nothing was changed. "
            f"To keep it, write elsewhere (a new out=... or --out); to replace it, pass --overwrite"
            + (f"; or {how}" if how else ""),
            file=str(run.path),
        )
    return RunState.FINISHED if run.is_finished() else RunState.RESUME


_PER_PROCESS = ("train.batch_size", "train.grad_accum")


def _same_global_batch(
    run: RunDir, changes: list[tuple[str, Any, Any]], saved: dict[str, Any], new: dict[str, Any]
) -> list[tuple[str, Any, Any]]:
    """``changes`` without ``train.batch_size`` and ``train.grad_accum`` when an unfinished run
    resumes on another number of processes with the same examples per optimizer step
    (batch_size x grad_accum x processes): its checkpoint was taken at that global batch, so the
    run goes on exactly (2 processes x batch 4 resume as 1 x batch 8, or 1 x 4 with grad_accum 2).
    ``saved`` and ``new`` are the flattened configs; the processes now are torchrun's ``WORLD_SIZE``."""
    checkpoint = run.latest_checkpoint()
    if not any(key in _PER_PROCESS for key, _, _ in changes) or run.is_finished() or checkpoint is None:
        return changes
    try:
        world_then = int(json.loads((checkpoint / "state.json").read_text()).get("world_size", 1))
        before = saved["train.batch_size"] * saved.get("train.grad_accum", 1) * world_then
        after = new["train.batch_size"] * new.get("train.grad_accum", 1) * int(os.environ.get("WORLD_SIZE", "1"))
    except (OSError, ValueError, KeyError, TypeError):
        return changes
    return [c for c in changes if c[0] not in _PER_PROCESS] if before == after else changes


def _plain(cfg: Any) -> dict[str, Any]:
    """The config as it reads back from config.yaml (tuples as lists)."""
    return yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _defaults(cfg: Any) -> dict[str, Any]:
    try:
        return _plain(type(cfg)())
    except (TypeError, ValueError):
        return {}


def _read_saved_config(run: RunDir) -> dict[str, Any]:
    if not run.config.is_file():
        raise InputError(
            "the folder holds a run without its config.yaml, so a rerun cannot tell whether it "
            "matches; use a new out=... or --overwrite",
            file=str(run.path),
        )
    try:
        data = yaml.safe_load(run.config.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(
            f"unreadable config.yaml ({exc}); use a new out=... or --overwrite", file=str(run.config)
        ) from None
    return data if isinstance(data, dict) else {}


def remove_run(path: str | Path) -> None:
    """Delete a run folder (``--overwrite``, or a stage that failed before its first step)."""
    shutil.rmtree(Path(path), ignore_errors=True)


def remove_stale_temporaries(parent: str | Path) -> None:
    """Remove ``NAME.tmp-*`` and ``NAME.old`` folders an interrupted atomic write left in
    ``parent`` (see :func:`instructkit.fileio.atomic_dir`); they are never a result."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for child in parent.iterdir():
        if child.is_dir() and (".tmp-" in child.name or child.name.endswith(".old")):
            shutil.rmtree(child, ignore_errors=True)
