"""The shared training plumbing every recipe calls: run folders, the accelerate loop with exact
gradient accumulation, optimizers and schedules, checkpoints with exact resume, and logging.

Recipes (``sft.py``, later ``reward.py``, ``dpo.py``) build a loss module and a list of encoded
examples, then call :func:`fit`. The loop is method-agnostic: a loss module returns
``(loss_sum, count)`` for a micro-batch, and the engine divides by the count of the *whole*
optimizer step (all micro-batches, all processes), known before the step starts. So batch 8 x
accumulation 1, batch 2 x accumulation 4 and 2 processes x batch 4 take the same step.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instructkit.config import OptimConfig, TrainConfig, dump_yaml
from instructkit.errors import InputError
from instructkit.fileio import atomic_dir, atomic_write_json, atomic_write_text  # noqa: F401 (re-exported)

# ----------------------------------------------------------------------------------------------
# Files: the run folder (atomic writes live in instructkit.fileio)


@dataclass
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
        atomic_write_text(self.config, dump_yaml(cfg))

    def latest_checkpoint(self) -> Path | None:
        steps = sorted(self.checkpoints.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        return steps[-1] if steps else None


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


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; weight decay skips biases and norm weights (1-D parameters)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
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
        return perm[pos * self.global_batch:(pos + 1) * self.global_batch].tolist()


def micro_batches(indices: Sequence[int], batch_size: int, grad_accum: int, rank: int,
                  world: int) -> list[list[int]]:
    """This process's micro-batches of one optimizer step's ``indices``.

    Micro-batch i spans indices[i*B*W:(i+1)*B*W] of which rank r takes the r-th B.
    """
    span = batch_size * world
    return [list(indices[i * span + rank * batch_size: i * span + (rank + 1) * batch_size])
            for i in range(grad_accum)]


# ----------------------------------------------------------------------------------------------
# Checkpoints


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, *, model: nn.Module, optimizer, scheduler, state: dict[str, Any],
                    rank: int = 0, world: int = 1) -> None:
    """Trainable weights (safetensors), optimizer, schedule, RNG and loop state, atomically."""
    from safetensors.torch import save_file

    with atomic_dir(path) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / f"rng-{rank}.pt")
        atomic_write_json(tmp / "state.json", {**state, "world_size": world})


def load_checkpoint(path: Path, *, model: nn.Module, optimizer, scheduler, rank: int = 0) -> dict[str, Any]:
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    missing = set(weights) - {n for n, _ in model.named_parameters()}
    if missing:
        raise InputError(f"checkpoint does not match the model (e.g. {sorted(missing)[0]})", file=str(path))
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((path / "state.json").read_text())


def prune_checkpoints(root: Path, keep: int) -> None:
    steps = sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2] is None,
             "torch": torch.get_rng_state()}
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
        return {"steps": self.steps, "train_loss": self.history[-1]["loss"] if self.history else None,
                "stopped_early": self.stopped_early, "tokens_per_s": round(self.tokens_per_s, 2),
                "train_seconds": round(self.train_seconds, 2), "wall_seconds": round(time.time() - started, 2)}


class StopTraining(Exception):
    """Raised by a callback to end training cleanly (tests use it to simulate a crash)."""


def make_accelerator(train: TrainConfig):
    from accelerate import Accelerator

    device = train.device or ("cuda" if torch.cuda.is_available() else "cpu")
    mixed = "no"
    if device.startswith("cuda") and (train.dtype or "bf16") in ("bf16", "fp16"):
        mixed = train.dtype or "bf16"
    return Accelerator(cpu=device == "cpu", mixed_precision=mixed)


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
    extra_metrics: Callable[[dict[str, torch.Tensor]], dict[str, float]] | None = None,
    finish_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None,
    on_step: Callable[[int], None] | None = None,
    count_key: str = "tokens",
) -> FitResult:
    """Train ``loss_module`` (which wraps ``model``) on ``examples`` for the configured steps.

    ``weight(example)`` is the example's share of the loss denominator (trained tokens for SFT,
    1 for a preference pair); ``loss_module(**collate(batch))`` returns (loss_sum, count) where
    count sums those weights. ``length(example)`` counts its real (non-pad) tokens, for the
    tokens/s figure. ``model`` is the object whose trainable parameters are saved.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    global_batch = train.batch_size * train.grad_accum * world
    if len(examples) < global_batch:
        raise InputError(
            f"{len(examples)} training examples is fewer than one optimizer step needs "
            f"(batch_size {train.batch_size} x grad_accum {train.grad_accum} x {world} processes)",
            field="train.batch_size")
    plan = StepPlan(len(examples), global_batch, train.seed)
    total_steps = train.max_steps or max(1, math.ceil(train.epochs * plan.steps_per_epoch))
    weights = [weight(e) for e in examples]
    lengths = [length(e) for e in examples]

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, optim)
    scheduler = build_scheduler(optimizer, optim, total_steps)
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)

    metrics = MetricsLog(run.metrics, enabled=accelerator.is_main_process)
    start_step, best_val, bad_evals, history = 0, None, 0, []
    resume_from = run.latest_checkpoint()
    if resume_from is not None:
        state = load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler, rank=rank)
        if state.get("world_size", world) != world:
            accelerator.print(f"note: resuming a {state['world_size']}-process run on {world} processes")
        start_step, best_val, bad_evals = state["step"], state.get("best_val_loss"), state.get("bad_evals", 0)
        metrics.truncate_after(start_step)
        accelerator.print(f"resuming from {resume_from} (step {start_step} of {total_steps})")
    else:
        set_seed(train.seed + rank)

    def checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        state = {"step": step, "total_steps": total_steps, "best_val_loss": best_val, "bad_evals": bad_evals}
        path = run.checkpoints / f"step-{step:06d}"
        if accelerator.is_main_process:
            save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler,
                            state=state, rank=rank, world=world)
            prune_checkpoints(run.checkpoints, train.keep_checkpoints)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:  # every rank keeps its own RNG stream
            torch.save(rng_state(), path / f"rng-{rank}.pt")

    progress = None
    if train.progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    device = accelerator.device
    loss_module.train()
    stopped_early, last_val = False, None
    t_start, real_tokens, paused = time.perf_counter(), 0, 0.0  # paused: eval/checkpoint seconds
    step = start_step
    previous_handler = signal.getsignal(signal.SIGTERM)
    if accelerator.is_main_process and hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while step < total_steps:
            # 1. The examples of this optimizer step, and its loss denominator over all of them.
            indices = plan.indices(step)
            denom = sum(weights[i] for i in indices)
            # 2. Forward/backward each micro-batch of this process, scaled so the summed gradient
            #    equals d(total loss / denom); DDP averages across processes, hence * world.
            real_tokens += sum(lengths[j] for j in indices)  # all processes, no padding
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            extras: dict[str, float] = {}
            micro = micro_batches(indices, train.batch_size, train.grad_accum, rank, world)
            for i, idx in enumerate(micro):
                batch = {k: v.to(device) for k, v in collate([examples[j] for j in idx]).items()}
                sync = i == len(micro) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(loss_module):
                    part, _count = loss_module(**batch)
                    accelerator.backward(part * (world / max(denom, 1)))
                loss_sum += part.detach().double()
                if extra_metrics is not None:
                    for k, v in extra_metrics(batch).items():
                        extras[k] = extras.get(k, 0.0) + v
            # 3. Clip, step, schedule.
            grad_norm = None
            if optim.max_grad_norm:
                grad_norm = float(accelerator.clip_grad_norm_(params, optim.max_grad_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # 4. Log the exact step loss (summed over processes, divided by the step's count).
            total = accelerator.reduce(loss_sum, reduction="sum") if world > 1 else loss_sum
            loss = float(total) / max(denom, 1)
            elapsed = time.perf_counter() - t_start - paused
            record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": real_tokens / max(elapsed, 1e-9),
                      count_key: denom, "epoch": round(step / plan.steps_per_epoch, 4)}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if extras and world > 1:
                keys = sorted(extras)
                summed = accelerator.reduce(torch.tensor([extras[k] for k in keys], dtype=torch.float64,
                                                         device=device), reduction="sum")
                extras = dict(zip(keys, summed.tolist()))
            record.update(finish_metrics(extras) if finish_metrics is not None else extras)
            # 5. Validation and early stopping.
            is_last = step == total_steps
            if val_examples and ((train.eval_every and step % train.eval_every == 0) or is_last):
                t_eval = time.perf_counter()
                last_val = evaluate_loss(loss_module, val_examples, collate, train.batch_size, accelerator)
                record["val_loss"] = last_val
                if best_val is None or last_val < best_val - 1e-6:
                    best_val, bad_evals = last_val, 0
                    if train.early_stopping_patience and accelerator.is_main_process:
                        from safetensors.torch import save_file

                        with atomic_dir(run.checkpoints / "best") as tmp:
                            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
                            atomic_write_json(tmp / "state.json", {"step": step, "val_loss": last_val})
                else:
                    bad_evals += 1
                    if train.early_stopping_patience and bad_evals >= train.early_stopping_patience:
                        stopped_early = True
                paused += time.perf_counter() - t_eval
            if step % train.log_every == 0 or is_last or "val_loss" in record:
                metrics.write(record)
                history.append(record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            # 6. Checkpoint.
            if (train.save_every and step % train.save_every == 0) or is_last or stopped_early:
                t_save = time.perf_counter()
                checkpoint(step)
                paused += time.perf_counter() - t_save
            if on_step is not None:
                on_step(step)
            if stopped_early:
                accelerator.print(f"early stopping at step {step}: no validation improvement in "
                                  f"{bad_evals} evaluations (best {best_val:.4f})")
                break
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM between steps: keep what the finished steps did.
        if step > start_step:
            checkpoint(step)
        raise
    finally:
        if progress is not None:
            progress.close()
        if accelerator.is_main_process and hasattr(signal, "SIGTERM"):
            signal.signal(signal.SIGTERM, previous_handler)

    if stopped_early and (run.checkpoints / "best").exists():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(run.checkpoints / "best" / "trainable.safetensors")), strict=False)
    elapsed = time.perf_counter() - t_start - paused
    return FitResult(steps=step, best_val_loss=best_val, final_val_loss=last_val, stopped_early=stopped_early,
                     tokens_per_s=real_tokens / max(elapsed, 1e-9), train_seconds=elapsed, history=history)


@torch.no_grad()
def evaluate_loss(loss_module: nn.Module, examples: Sequence[Any], collate, batch_size: int, accelerator) -> float:
    """Count-weighted mean loss over ``examples``, sharded across processes."""
    was_training = loss_module.training
    loss_module.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    mine = list(range(rank, len(examples), world))
    for start in range(0, len(mine), batch_size):
        batch = collate([examples[j] for j in mine[start:start + batch_size]])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        loss, count = loss_module(**batch)
        total += torch.stack([loss.double(), count.double()])
    if world > 1:
        total = accelerator.reduce(total, reduction="sum")
    loss_module.train(was_training)
    return float(total[0] / total[1].clamp(min=1))
