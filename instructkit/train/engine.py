"""The shared training plumbing every recipe calls: the pieces of a training loop, and ``fit``,
the loop that composes them for recipes whose step is "forward and backward some examples".

The pieces, which a recipe with a loop of its own (PPO's rollout phase) uses directly:

* :func:`plan_steps` / :class:`StepPlan`: which examples make up each optimizer step;
* :func:`optimizer_and_schedule` (:func:`build_optimizer`, :func:`build_scheduler`), :func:`optimizer_step`;
* :class:`Checkpointer`: atomic step checkpoints (trainable weights, optimizer, schedule, RNG,
  loop state, and any :class:`ExtraState` a recipe registers) and exact resume;
* :class:`MetricsLog`, :class:`Progress` and :class:`StopSignal` (the one Ctrl-C / SIGTERM handler);
* :class:`TrainingLoop`: the end of every step, in one order (log, show, checkpoint, stop, call back).

``fit`` adds :class:`Validation` (held-out loss, early stopping). Its loss module returns
``(loss_sum, count)`` for a micro-batch, and the engine divides by the count of the *whole*
optimizer step (all micro-batches, all processes), known before the step starts. So batch 8 x
accumulation 1, batch 2 x accumulation 4 and 2 processes x batch 4 take the same step.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from instructkit.config import OptimConfig, TrainConfig
from instructkit.errors import InputError
from instructkit.fileio import atomic_dir, atomic_write_json, atomic_write_text
from instructkit.models.passes import no_grad_batches

if TYPE_CHECKING:  # recipes take RunDir from instructkit.runs; the engine only receives one
    from instructkit.runs import RunDir
    from instructkit.train.fsdp import Sharded

# ----------------------------------------------------------------------------------------------
# Metrics


class MetricsLog:
    """Append-only ``metrics.jsonl``, one JSON object per logged step, flushed per line."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the curve is not duplicated."""
        if not self.enabled or not self.path.exists():
            return
        kept = [json.dumps(r) for r in self.read() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        """The logged records; a last line torn by a killed process is left out."""
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i != len(lines) - 1:
                    raise
        return records


def flat_config(path: Path) -> dict[str, Any]:
    """A run's config.yaml as dotted keys (``optim.lr``), the values trackers accept: numbers,
    strings and booleans as they are, anything else (lists, null) as its JSON text."""
    import yaml

    def walk(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1], node if isinstance(node, int | float | str | bool) else json.dumps(node)

    return dict(walk(yaml.safe_load(path.read_text()) if path.is_file() else {}, ""))


def _tensorboard(run: RunDir, start_step: int, ids: dict[str, str]):
    from accelerate.tracking import TensorBoardTracker

    # A resumed run drops the events logged after its checkpoint, as metrics.jsonl does.
    return TensorBoardTracker("tensorboard", run.path, **({"purge_step": start_step + 1} if start_step else {}))


def _mlflow(run: RunDir, start_step: int, ids: dict[str, str]):
    import os

    import mlflow
    from accelerate.tracking import MLflowTracker

    if not os.environ.get("MLFLOW_TRACKING_URI"):  # a file store in the run folder, no server
        # MLflow 3 keeps the file store in maintenance mode behind this switch; it is plain files
        # beside the run, read by `mlflow ui --backend-store-uri run/mlruns`.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((run.path / "mlruns").resolve().as_uri())
    return MLflowTracker(experiment_name=run.path.name, run_id=ids.get("mlflow"), run_name=run.path.name)


def _wandb(run: RunDir, start_step: int, ids: dict[str, str]):
    import os

    from accelerate.tracking import WandBTracker

    mode = os.environ.get("WANDB_MODE", "offline")  # online only when the user asks for it
    resume = {"id": ids["wandb"], "resume": "allow"} if "wandb" in ids else {}
    return WandBTracker(run.path.name, dir=str(run.path), mode=mode, **resume)


def _trackio(run: RunDir, start_step: int, ids: dict[str, str]):
    from accelerate.tracking import TrackioTracker

    return TrackioTracker(run.path.name, name=run.path.name)


TRACKERS: dict[str, Callable[[RunDir, int, dict[str, str]], Any]] = {
    "tensorboard": _tensorboard,  # run/tensorboard/: event files
    "mlflow": _mlflow,  # run/mlruns/: MLflow's file store (unless MLFLOW_TRACKING_URI is set)
    "wandb": _wandb,  # run/wandb/: an offline run (`wandb sync` uploads it)
    "trackio": _trackio,  # trackio's local store; untested here (trackio is not installed)
}
"""``train.report_to`` names -> a factory of the accelerate tracker (the ``Tracker`` Literal)."""


class Trackers:
    """What ``metrics.jsonl`` gets, also sent to accelerate's trackers (``train.report_to``), and
    the run's config as their parameters. Main process only. ``metrics.jsonl`` stays the record:
    a tracker sees the same lines, with ``step`` as the x axis. The ids of runs that can be
    continued (MLflow, W&B) are kept in ``trackers.json`` so a resumed run logs into the same one."""

    def __init__(self, names: Sequence[str], run: RunDir, accelerator) -> None:
        self.names = list(names) if accelerator.is_main_process else []
        self.run, self.open_trackers = run, []

    def open(self, start_step: int) -> None:
        if not self.names:
            return
        ids_file = self.run.path / "trackers.json"
        ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
        self.open_trackers = [TRACKERS[name](self.run, start_step, ids) for name in self.names]
        for tracker in self.open_trackers:
            tracker.start()
            tracker.store_init_configuration(flat_config(self.run.config))
        for tracker in self.open_trackers:
            if tracker.name == "mlflow":
                ids["mlflow"] = tracker.active_run.info.run_id
            elif tracker.name == "wandb":
                ids["wandb"] = tracker.run.id
        if ids:
            atomic_write_json(ids_file, ids)

    def log(self, record: Mapping[str, Any]) -> None:
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        for tracker in self.open_trackers:
            tracker.log(values, step=record["step"])

    def close(self) -> None:
        for tracker in self.open_trackers:
            tracker.finish()
        self.open_trackers = []


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; weight decay skips biases and norm weights (1-D parameters)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps: linear warm-up, then decay."""
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.scheduler == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.scheduler == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def optimizer_and_schedule(model: nn.Module, cfg: OptimConfig, total_steps: int) -> tuple[list[nn.Parameter], Any, Any]:
    """``model``'s trainable parameters, the optimizer over them, and the lr schedule of a run of
    ``total_steps`` optimizer steps."""
    params = trainable_parameters(model)
    optimizer = build_optimizer(params, cfg)
    return params, optimizer, build_scheduler(optimizer, cfg, total_steps)


def optimizer_step(
    optimizer,
    scheduler,
    params: list[nn.Parameter],
    max_grad_norm: float | None,
    clip: Callable[..., Any] = torch.nn.utils.clip_grad_norm_,
) -> float | None:
    """Clip the gradients to ``max_grad_norm`` (if set), step, advance the schedule, clear the
    gradients; returns the norm before clipping. ``clip`` is ``accelerator.clip_grad_norm_``
    where gradients may be scaled (fp16) or sharded."""
    grad_norm = float(clip(params, max_grad_norm)) if max_grad_norm else None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ----------------------------------------------------------------------------------------------
# Data order: which examples make up each optimizer step


@dataclass(frozen=True)
class StepPlan:
    """Deterministic order of examples: a fresh seeded permutation each epoch.

    Step ``s`` takes the ``s``-th block of ``global_batch`` indices of epoch ``s // steps_per_epoch``;
    the remainder of an epoch that does not fill a block is skipped. A step's examples depend only
    on (seed, step), which is what makes resume exact: no sampler state to save.
    """

    n_examples: int
    global_batch: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return self.n_examples // self.global_batch

    def indices(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n_examples, generator=g)
        return perm[pos * self.global_batch : (pos + 1) * self.global_batch].tolist()


def plan_steps(n_examples: int, train: TrainConfig, world: int) -> tuple[StepPlan, int]:
    """The data order over ``n_examples`` and the number of optimizer steps: ``train.max_steps``,
    else ``train.epochs`` epochs."""
    global_batch = train.batch_size * train.grad_accum * world
    if n_examples < global_batch:
        raise InputError(
            f"{n_examples} training examples is fewer than one optimizer step needs "
            f"(batch_size {train.batch_size} x grad_accum {train.grad_accum} x {world} processes)",
            field="train.batch_size",
        )
    plan = StepPlan(n_examples, global_batch, train.seed)
    return plan, train.max_steps or max(1, math.ceil(train.epochs * plan.steps_per_epoch))


def micro_batches(indices: Sequence[int], batch_size: int, grad_accum: int, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches of one optimizer step's ``indices``.

    Micro-batch i spans indices[i*B*W:(i+1)*B*W] of which rank r takes the r-th B.
    """
    span = batch_size * world
    return [list(indices[i * span + rank * batch_size : i * span + (rank + 1) * batch_size]) for i in range(grad_accum)]


# ----------------------------------------------------------------------------------------------
# Checkpoints


class ExtraState(Protocol):
    """State a recipe keeps beside the trainable weights and that resume must restore (PPO's EMA
    weights and KL coefficient; a distillation teacher's, an EWC Fisher). ``state_dict`` returns
    a JSON-able dict (saved in the checkpoint's state.json) and named tensors (a safetensors
    file); ``load_state_dict`` receives both back, the tensors on the CPU."""

    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]: ...

    def load_state_dict(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None: ...


class JSONState:
    """An object whose own ``state_dict()`` is a JSON-able dict (a KL controller) as extra state."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return self.obj.state_dict(), {}

    def load_state_dict(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.obj.load_state_dict(meta)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer,
    scheduler,
    state: dict[str, Any],
    rank: int = 0,
    world: int = 1,
    extra_state: Mapping[str, ExtraState] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> None:
    """Trainable weights (safetensors), optimizer, schedule, RNG, loop state and each extra state
    (``extra-NAME.safetensors`` and state.json's ``extra.NAME``), atomically. ``weights`` and
    ``optimizer_state``, when given, are written instead of the model's and the optimizer's own
    (FSDP gathers them in full first)."""
    from safetensors.torch import save_file

    with atomic_dir(path) as tmp:
        save_file(weights if weights is not None else trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / f"rng-{rank}.pt")
        extra = {}
        for name, holder in (extra_state or {}).items():
            extra[name], tensors = holder.state_dict()
            if tensors:
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                    str(tmp / f"extra-{name}.safetensors"),
                )
        atomic_write_json(tmp / "state.json", {**state, "world_size": world, **({"extra": extra} if extra else {})})


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer,
    scheduler,
    rank: int = 0,
    extra_state: Mapping[str, ExtraState] | None = None,
    sharded: Sharded | None = None,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the loop state. With ``sharded``
    (FSDP), the full tensors go into the shards."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    missing = set(weights) - {n for n, _ in model.named_parameters()}
    if missing:
        raise InputError(f"checkpoint does not match the model (e.g. {sorted(missing)[0]})", file=str(path))
    state = json.loads((path / "state.json").read_text())
    saved_extra = state.get("extra", {})
    for name in extra_state or {}:
        if name not in saved_extra:
            raise InputError(f"the checkpoint has no '{name}' state to restore", file=str(path))
    saved_optimizer = torch.load(path / "optimizer.pt", weights_only=True)
    if sharded is not None:
        sharded.load_trainable(weights)
        sharded.load_optimizer_state(optimizer, saved_optimizer)
    else:
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(saved_optimizer)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    for name, holder in (extra_state or {}).items():
        tensor_file = path / f"extra-{name}.safetensors"
        holder.load_state_dict(saved_extra[name], load_file(str(tensor_file)) if tensor_file.is_file() else {})
    return state


def prune_checkpoints(root: Path, keep: int) -> None:
    steps = sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


class Checkpointer:
    """A run's step checkpoints, ``checkpoints/step-NNNNNN``: each written atomically after a
    finished step (the oldest beyond ``keep`` pruned), the newest restored by :meth:`resume`.

    The main process writes the shared files; every process keeps its own RNG stream.
    """

    def __init__(
        self,
        run: RunDir,
        accelerator,
        *,
        model: nn.Module,
        optimizer,
        scheduler,
        keep: int,
        extra_state: Mapping[str, ExtraState] | None = None,
        sharded: Sharded | None = None,
    ) -> None:
        for name in extra_state or {}:
            if not re.fullmatch(r"[a-z0-9_]+", name):  # it names a file
                raise ValueError(f"extra state name {name!r}: use lower-case letters, digits and _")
        self.run, self.accelerator, self.keep = run, accelerator, keep
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.extra_state = dict(extra_state or {})
        self.sharded = sharded

    def resume(self) -> tuple[Path, dict[str, Any]] | None:
        """Load the latest checkpoint, if any: its path and loop state."""
        path = self.run.latest_checkpoint()
        if path is None:
            return None
        acc = self.accelerator
        state = load_checkpoint(
            path,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            rank=acc.process_index,
            extra_state=self.extra_state,
            sharded=self.sharded,
        )
        if state.get("world_size", acc.num_processes) != acc.num_processes:
            acc.print(f"note: resuming a {state['world_size']}-process run on {acc.num_processes} processes")
        return path, state

    def save(self, step: int, state: dict[str, Any]) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = self.run.checkpoints / f"step-{step:06d}"
        full: dict[str, Any] = {}
        if self.sharded is not None:  # every process takes part in gathering the full tensors
            full = {
                "weights": self.sharded.trainable_state(),
                "optimizer_state": self.sharded.optimizer_state(self.optimizer),
            }
        if acc.is_main_process:
            save_checkpoint(
                path,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                state={"step": step, **state},
                rank=acc.process_index,
                world=acc.num_processes,
                extra_state=self.extra_state,
                **full,
            )
            prune_checkpoints(self.run.checkpoints, self.keep)
        acc.wait_for_everyone()
        if not acc.is_main_process:
            torch.save(rng_state(), path / f"rng-{acc.process_index}.pt")


def rng_state() -> dict[str, Any]:
    state = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2] is None,
        "torch": torch.get_rng_state(),
    }
    state["python_version"] = random.getstate()[0]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), None))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout probability in the model (modules and attention-dropout attributes)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = p
    config = getattr(model, "config", None)
    for attr in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, attr, None), float):
            setattr(config, attr, p)


# ----------------------------------------------------------------------------------------------
# Around the steps: stop signals, the progress bar, the end of each step


class StopTraining(Exception):
    """Raised by a callback to end training cleanly (tests use it to simulate a crash)."""


class StopSignal:
    """The one Ctrl-C / SIGTERM handler of a training loop (a context manager around it).

    The first signal asks the loop to stop after the step in progress, once that step is
    checkpointed: a checkpoint taken mid-step would not resume onto the same curve (the RNG has
    moved, a PPO step's optimizer steps are half done). A second signal stops at once, with
    ``KeyboardInterrupt`` and no checkpoint. Handlers can only be installed from the main
    thread; elsewhere the loop keeps whatever the process has.
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, announce: bool = True) -> None:
        self.asked = False
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (getattr(signal, n) for n in self.SIGNALS if hasattr(signal, n)):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        if self.announce:
            print("\nstopping after this step (again to stop now)", file=sys.stderr, flush=True)

    def agreed(self, accelerator) -> bool:
        """Whether any process was asked to stop: all stop after the same step, or none does."""
        if accelerator.num_processes == 1:
            return self.asked
        flag = torch.tensor([float(self.asked)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


class Progress:
    """A tqdm bar when ``enabled`` (``train.progress``, main process); otherwise nothing."""

    def __init__(self, enabled: bool, *, total: int, initial: int, desc: str) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def advance(self, postfix: Mapping[str, str] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix(**postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TrainingLoop:
    """What every training loop does around its steps, written once: resume, then at the end of
    each step log the record (metrics.jsonl and the ``train.report_to`` trackers), advance the bar, checkpoint when due (``train.save_every``, the
    last step, or a stop request), stop if asked (``KeyboardInterrupt``; a request during the
    last step lets the run finish instead), and call ``on_step``, in that order.

    ``with loop:`` installs the :class:`StopSignal` handler and shows the bar (with the record's
    ``show`` keys, e.g. ``{"loss": ".4f"}``); time spent inside :meth:`paused` (evaluation) and in
    checkpoints is left out of :attr:`train_seconds`.
    """

    def __init__(
        self,
        run: RunDir,
        accelerator,
        train: TrainConfig,
        checkpointer: Checkpointer,
        *,
        total_steps: int,
        desc: str = "train",
        show: Mapping[str, str] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.accelerator, self.train, self.checkpointer = accelerator, train, checkpointer
        self.total_steps, self.desc, self.on_step = total_steps, desc, on_step
        self.show = dict(show or {})  # record key -> format spec, shown beside the bar
        self.metrics = MetricsLog(run.metrics, enabled=accelerator.is_main_process)
        self.trackers = Trackers(train.report_to, run, accelerator)
        self.history: list[dict[str, Any]] = []  # the records logged by this call
        self.start_step = 0
        self.stop = StopSignal(announce=accelerator.is_main_process)
        self.progress: Progress | None = None
        self._started, self._paused = time.perf_counter(), 0.0

    def resume(self) -> dict[str, Any] | None:
        """Restore the latest checkpoint, if any, and drop the metrics logged after it; returns
        its loop state (None on a fresh start)."""
        resumed = self.checkpointer.resume()
        if resumed is None:
            return None
        path, state = resumed
        self.start_step = state["step"]
        self.metrics.truncate_after(self.start_step)
        self.accelerator.print(f"resuming from {path} (step {self.start_step} of {self.total_steps})")
        return state

    def __enter__(self) -> TrainingLoop:
        self.stop.__enter__()
        show = self.train.progress and self.accelerator.is_main_process
        self.progress = Progress(show, total=self.total_steps, initial=self.start_step, desc=self.desc)
        self.trackers.open(self.start_step)
        self._started, self._paused = time.perf_counter(), 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.close()
        self.trackers.close()
        self.stop.__exit__(*exc)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - started

    @property
    def train_seconds(self) -> float:
        return time.perf_counter() - self._started - self._paused

    def end_step(
        self, step: int, record: dict[str, Any], *, state: dict[str, Any], log: bool = False, save: bool = False
    ) -> None:
        """After step ``step`` (counted from 1): ``record`` is its metrics line, ``state`` the loop
        state a resume needs besides the step; ``log``/``save`` force a line/a checkpoint."""
        is_last = step == self.total_steps
        if log or is_last or step % self.train.log_every == 0:
            self.metrics.write(record)
            self.history.append(record)
            self.trackers.log(record)
        if self.progress is not None:
            self.progress.advance({k: format(record[k], spec) for k, spec in self.show.items() if k in record})
        stopping = self.stop.agreed(self.accelerator)
        if save or stopping or is_last or (self.train.save_every and step % self.train.save_every == 0):
            with self.paused():
                self.checkpointer.save(step, {"total_steps": self.total_steps, **state})
        if stopping and not is_last:  # after the last step, stopping is finishing: the recipe saves final/
            raise KeyboardInterrupt(f"stopped after step {step}; rerun to resume from its checkpoint")
        if self.on_step is not None:
            self.on_step(step)


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class FitResult:
    steps: int
    best_val_loss: float | None
    final_val_loss: float | None
    stopped_early: bool
    tokens_per_s: float
    train_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)

    def summary(self, started: float) -> dict[str, Any]:
        """The fields every recipe's summary.json shares; ``started`` is the wall-clock start."""
        return {
            "steps": self.steps,
            "train_loss": self.history[-1]["loss"] if self.history else None,
            "stopped_early": self.stopped_early,
            "tokens_per_s": round(self.tokens_per_s, 2),
            "train_seconds": round(self.train_seconds, 2),
            "wall_seconds": round(time.time() - started, 2),
        }


def make_accelerator(train: TrainConfig):
    from accelerate import Accelerator

    device = train.device or ("cuda" if torch.cuda.is_available() else "cpu")
    mixed = "no"
    if device.startswith("cuda") and (train.dtype or "bf16") in ("bf16", "fp16"):
        mixed = train.dtype or "bf16"
    return Accelerator(cpu=device == "cpu", mixed_precision=mixed)


class Validation:
    """``fit``'s held-out loss (every ``train.eval_every`` steps, and after the last) and early
    stopping on it: the best loss so far, the evaluations since it last improved, and with a
    patience the best weights, kept in ``checkpoints/best`` and restored when it stops training."""

    def __init__(
        self,
        examples: Sequence[Any],
        collate,
        train: TrainConfig,
        run: RunDir,
        model: nn.Module,
        total_steps: int,
        sharded: Sharded | None = None,
    ) -> None:
        self.examples, self.collate, self.train, self.run, self.model = examples, collate, train, run, model
        self.sharded = sharded  # FSDP: the forward passes and the best weights are collectives
        self.total_steps, self.patience = total_steps, train.early_stopping_patience
        self.best: float | None = None
        self.last: float | None = None  # of this call: not restored on resume
        self.bad_evals, self.stopped = 0, False

    def due(self, step: int) -> bool:
        every = self.train.eval_every
        return bool(self.examples) and (bool(every and step % every == 0) or step == self.total_steps)

    def evaluate(self, loss_module: nn.Module, step: int, accelerator) -> float:
        self.last = evaluate_loss(
            loss_module, self.examples, self.collate, self.train.batch_size, accelerator, self.sharded is not None
        )
        if self.best is None or self.last < self.best - 1e-6:
            self.best, self.bad_evals = self.last, 0
            if self.patience and (accelerator.is_main_process or self.sharded is not None):
                weights = self.sharded.trainable_state() if self.sharded is not None else trainable_state(self.model)
                if accelerator.is_main_process:
                    self._save_best(step, weights)
        else:
            self.bad_evals += 1
            self.stopped = bool(self.patience) and self.bad_evals >= self.patience
        return self.last

    def state_dict(self) -> dict[str, Any]:
        return {"best_val_loss": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evals = state.get("best_val_loss"), state.get("bad_evals", 0)
        self.stopped = bool(self.patience) and self.bad_evals >= self.patience  # stopped, then interrupted

    def _save_best(self, step: int, weights: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        with atomic_dir(self.run.checkpoints / "best") as tmp:
            save_file(weights, str(tmp / "trainable.safetensors"))
            atomic_write_json(tmp / "state.json", {"step": step, "val_loss": self.last})

    def restore_best(self, step: int, accelerator) -> None:
        """After early stopping at ``step``: the best weights back into the model."""
        from safetensors.torch import load_file

        accelerator.print(
            f"early stopping at step {step}: no validation improvement in {self.bad_evals} "
            f"evaluations (best {self.best:.4f})"
        )
        best = self.run.checkpoints / "best" / "trainable.safetensors"
        if best.exists():
            self.model.load_state_dict(load_file(str(best)), strict=False)


_VALIDATION_HOOKS: list[Callable[[Path, int, float], None]] = []


@contextlib.contextmanager
def validation_hook(callback: Callable[[Path, int, float], None]) -> Iterator[None]:
    """Within the block, every :func:`fit` calls ``callback(run_path, step, val_loss)`` after
    each held-out evaluation, once the step is logged and checkpointed; an exception it raises
    ends that fit (a sweep prunes a trial this way). ``val_loss`` is the same on every process."""
    _VALIDATION_HOOKS.append(callback)
    try:
        yield
    finally:
        _VALIDATION_HOOKS.remove(callback)


def fit(
    *,
    loss_module: nn.Module,
    model: nn.Module,
    examples: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    weight: Callable[[Any], int],
    length: Callable[[Any], int] = lambda e: len(e["input_ids"]),
    train: TrainConfig,
    optim: OptimConfig,
    run: RunDir,
    accelerator,
    val_examples: Sequence[Any] = (),
    extra_metrics: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, float]] | None = None,
    finish_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None,
    on_step: Callable[[int], None] | None = None,
    count_key: str = "tokens",
    extra_state: Mapping[str, ExtraState] | None = None,
) -> FitResult:
    """Train ``loss_module`` (which wraps ``model``) on ``examples`` for the configured steps.

    ``weight(example)`` is the example's share of the loss denominator (trained tokens for SFT,
    1 for a preference pair); ``loss_module(**collate(batch))`` returns (loss_sum, count) where
    count sums those weights. ``length(example)`` counts its real (non-pad) tokens, for the
    tokens/s figure. ``model`` is the object whose trainable parameters are saved;
    ``extra_state`` is saved with them and restored on resume (see :class:`ExtraState`).
    """
    # 1. The data order and the number of steps; each example's share of the loss and its length.
    plan, total_steps = plan_steps(len(examples), train, accelerator.num_processes)
    lengths, weights = [length(e) for e in examples], [weight(e) for e in examples]

    # 2. Optimizer and schedule over the trainable parameters, and what takes one optimizer step.
    #    With train.fsdp on several processes, a sharded copy trains (train/fsdp.py).
    if train.fsdp != "off" and accelerator.num_processes > 1 and extra_state:
        raise InputError(
            f"train.fsdp: this stage keeps extra state ({', '.join(extra_state)}), not built with FSDP yet"
        )
    step_fn = _OptimizerStep.build(model, loss_module, optim, total_steps, accelerator, train.fsdp)
    step_fn.bind_data(examples, weights, collate, train, (extra_metrics, finish_metrics))

    # 3. Checkpoints and the loop around the steps, validation; resume from the last checkpoint.
    checkpointer = step_fn.checkpointer(run, model, train.keep_checkpoints, extra_state)
    show = {"loss": ".4f", "lr": ".2e", "tokens_per_s": ".0f"}
    loop = TrainingLoop(run, accelerator, train, checkpointer, total_steps=total_steps, on_step=on_step, show=show)
    validation = Validation(val_examples, collate, train, run, model, total_steps, step_fn.sharded)
    state = loop.resume()
    if state is None:
        set_seed(train.seed + accelerator.process_index)
    else:
        validation.load_state_dict(state)

    step, real_tokens = loop.start_step, 0
    step_fn.loss_module.train()
    with loop:
        while step < total_steps and not validation.stopped:
            # 4. One optimizer step over this step's examples (all processes, no padding counted).
            indices = plan.indices(step)
            real_tokens += sum(lengths[j] for j in indices)
            denom, loss, lr, extras = step_fn(indices)
            step += 1
            speed, epoch = real_tokens / max(loop.train_seconds, 1e-9), round(step / plan.steps_per_epoch, 4)
            record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": speed, count_key: denom, "epoch": epoch}
            record.update(extras)
            # 5. Validation and early stopping; then log, checkpoint, stop, call back.
            if validation.due(step):
                with loop.paused():
                    record["val_loss"] = validation.evaluate(step_fn.loss_module, step, accelerator)
            loop.end_step(
                step, record, state=validation.state_dict(), log="val_loss" in record, save=validation.stopped
            )
            if "val_loss" in record:
                for hook in tuple(_VALIDATION_HOOKS):  # a sweep's pruner may end the run here
                    hook(run.path, step, record["val_loss"])
    if step_fn.sharded is not None:  # the full weights back into `model`, for the stage to save
        step_fn.sharded.release()
    if validation.stopped:
        validation.restore_best(step, accelerator)
    return FitResult(
        step,
        validation.best,
        validation.last,
        validation.stopped,
        real_tokens / max(loop.train_seconds, 1e-9),
        loop.train_seconds,
        loop.history,
    )


class _OptimizerStep:
    """One optimizer step of :func:`fit`: what it needs is fixed for the run, the step's example
    indices are the argument. Returns (loss denominator, exact step loss, lr, extra metrics)."""

    @classmethod
    def build(
        cls,
        model: nn.Module,
        loss_module: nn.Module,
        optim: OptimConfig,
        total_steps: int,
        accelerator,
        fsdp: str = "off",
    ) -> _OptimizerStep:
        self = cls()
        self.sharded = None
        if fsdp != "off" and accelerator.num_processes > 1:
            from instructkit.train.fsdp import Sharded

            self.sharded = Sharded(loss_module, model, fsdp, accelerator)
            self.params, optimizer, self.scheduler = optimizer_and_schedule(self.sharded.model, optim, total_steps)
            self.loss_module, self.optimizer = self.sharded.loss_module, accelerator.prepare(optimizer)
        else:
            self.params, optimizer, self.scheduler = optimizer_and_schedule(model, optim, total_steps)
            self.loss_module, self.optimizer = accelerator.prepare(loss_module, optimizer)
        self.max_grad_norm, self.accelerator = optim.max_grad_norm, accelerator
        return self

    def bind_data(
        self,
        examples: Sequence[Any],
        weights: list[int],
        collate,
        train: TrainConfig,
        metrics: tuple[Callable | None, Callable | None],
    ) -> None:
        self.examples, self.weights, self.collate, self.train = examples, weights, collate, train
        self.extra_metrics, self.finish_metrics = metrics

    def checkpointer(
        self, run: RunDir, model: nn.Module, keep: int, extra_state: Mapping[str, ExtraState] | None
    ) -> Checkpointer:
        return Checkpointer(
            run,
            self.accelerator,
            model=model if self.sharded is None else self.sharded.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            keep=keep,
            extra_state=extra_state,
            sharded=self.sharded,
        )

    def __call__(self, indices: list[int]) -> tuple[int, float, float, dict[str, float]]:
        acc, train = self.accelerator, self.train
        # The step's loss denominator over all its examples, known before its first micro-batch.
        denom = sum(self.weights[i] for i in indices)
        micro = micro_batches(indices, train.batch_size, train.grad_accum, acc.process_index, acc.num_processes)
        batches = [[self.examples[j] for j in idx] for idx in micro]
        loss_sum, extras = accumulate_gradients(self.loss_module, batches, self.collate, denom, acc, self.extra_metrics)
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = optimizer_step(
            self.optimizer, self.scheduler, self.params, self.max_grad_norm, clip=acc.clip_grad_norm_
        )
        # The exact step loss: summed over processes, divided by the step's count.
        loss = float(_sum_over_processes(loss_sum, acc)) / max(denom, 1)
        return denom, loss, lr, _grad_and_extras(grad_norm, extras, acc, self.finish_metrics)


def accumulate_gradients(
    loss_module: nn.Module,
    batches: Sequence[list[Any]],
    collate,
    denom: int,
    accelerator,
    extra_metrics: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, float]] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward and backward this process's micro-batches of one optimizer step; returns the
    summed loss (this process) and the summed ``extra_metrics``.

    Each part is scaled so the summed gradient equals d(total loss / denom) over the whole step;
    DDP averages across processes, hence ``* world``. Gradients sync on the last micro-batch only.
    """
    device, world = accelerator.device, accelerator.num_processes
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    extras: dict[str, float] = {}
    for i, rows in enumerate(batches):
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        sync = i == len(batches) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(loss_module):
            part, _count = loss_module(**batch)
            accelerator.backward(part * (world / max(denom, 1)))
        loss_sum += part.detach().double()
        ran = accelerator.unwrap_model(loss_module)  # the module that ran: a sharded copy under FSDP
        for k, v in (extra_metrics(batch, ran) if extra_metrics is not None else {}).items():
            extras[k] = extras.get(k, 0.0) + v
    return loss_sum, extras


def _sum_over_processes(value: torch.Tensor, accelerator) -> torch.Tensor:
    return accelerator.reduce(value, reduction="sum") if accelerator.num_processes > 1 else value


def _grad_and_extras(
    grad_norm: float | None,
    extras: dict[str, float],
    accelerator,
    finish: Callable[[dict[str, float]], dict[str, float]] | None,
) -> dict[str, float]:
    """The step's gradient norm, and its extra metrics summed over processes, then ``finish``ed."""
    if extras and accelerator.num_processes > 1:
        keys = sorted(extras)
        values = torch.tensor([extras[k] for k in keys], dtype=torch.float64, device=accelerator.device)
        extras = dict(zip(keys, _sum_over_processes(values, accelerator).tolist()))
    return {
        **({"grad_norm": grad_norm} if grad_norm is not None else {}),
        **(finish(extras) if finish is not None else extras),
    }


def evaluate_loss(
    loss_module: nn.Module, examples: Sequence[Any], collate, batch_size: int, accelerator, sharded: bool = False
) -> float:
    """Count-weighted mean loss over ``examples``, sharded across processes.

    The forward passes go through the unwrapped module: a DDP forward may broadcast buffers, a
    collective, and processes hold different numbers of batches (one of two processes gets no
    example of a single held-out record), so the wrapped module would wait forever. A ``sharded``
    (FSDP) module gathers its weights in every forward, so there every process runs as many
    forwards as the busiest one: the extra ones on the first example, their results dropped."""
    rank, world = accelerator.process_index, accelerator.num_processes
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    mine = [examples[j] for j in range(rank, len(examples), world)]
    loss_module = accelerator.unwrap_model(loss_module)
    extra = 0
    if sharded and world > 1 and examples:  # agreed before the first forward's gather
        n_batches = torch.tensor(math.ceil(len(mine) / batch_size), device=accelerator.device)
        extra = int(accelerator.reduce(n_batches, reduction="max")) - int(n_batches)
    for _, batch in no_grad_batches(loss_module, mine, collate, batch_size, device=accelerator.device):
        loss, count = loss_module(**batch)
        total += torch.stack([loss.double(), count.double()])
    for _, batch in no_grad_batches(loss_module, [examples[0]] * extra, collate, 1, device=accelerator.device):
        loss_module(**batch)
    total = _sum_over_processes(total, accelerator)
    return float(total[0] / total[1].clamp(min=1))
