"""Engine plumbing: schedules, data order, micro-batch split, metrics, early stopping, extra checkpoint
state and the stop signal."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from instructkit.config import OptimConfig
from instructkit.errors import InputError
from instructkit.train import engine


def test_lr_factor_by_hand():
    """warm-up 2 of 10 steps: factors (s+1)/3 for s < 2; then cosine over the remaining 8:
    at s=2 progress 0 -> 1; at s=6 progress 1/2 -> 0.5; linear at s=6 -> 0.5 as well;
    min_lr_ratio 0.1 maps a cosine 0.5 to 0.1 + 0.9*0.5 = 0.55."""
    cos = OptimConfig(scheduler="cosine", warmup_steps=2)
    assert [engine.lr_factor(s, 10, cos) for s in (0, 1)] == pytest.approx([1 / 3, 2 / 3])
    assert engine.lr_factor(2, 10, cos) == pytest.approx(1.0)
    assert engine.lr_factor(6, 10, cos) == pytest.approx(0.5)
    assert engine.lr_factor(10, 10, cos) == pytest.approx(0.0, abs=1e-12)
    assert engine.lr_factor(6, 10, OptimConfig(scheduler="linear", warmup_steps=2)) == pytest.approx(0.5)
    assert engine.lr_factor(6, 10, OptimConfig(warmup_steps=2, min_lr_ratio=0.1)) == pytest.approx(0.55)
    assert engine.lr_factor(7, 10, OptimConfig(scheduler="constant")) == 1.0
    assert engine.lr_factor(1, 10, OptimConfig(warmup_ratio=0.3)) == pytest.approx(2 / 4)


def test_step_plan_is_a_fresh_permutation_each_epoch_and_depends_only_on_seed_and_step():
    plan = engine.StepPlan(n_examples=10, global_batch=3, seed=7)
    assert plan.steps_per_epoch == 3
    epoch0 = [i for s in range(3) for i in plan.indices(s)]
    epoch1 = [i for s in range(3, 6) for i in plan.indices(s)]
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9  # no repeats within an epoch
    assert epoch0 != epoch1
    assert engine.StepPlan(10, 3, 7).indices(4) == plan.indices(4)
    assert engine.StepPlan(10, 3, 8).indices(0) != plan.indices(0)


def test_micro_batches_partition_the_step_across_ranks():
    indices = list(range(16))  # batch 2, accumulation 4, 2 processes
    parts = [engine.micro_batches(indices, 2, 4, rank, 2) for rank in (0, 1)]
    assert parts[0][0] == [0, 1] and parts[1][0] == [2, 3] and parts[1][3] == [14, 15]
    assert sorted(i for p in parts for mb in p for i in mb) == indices


def test_metrics_truncate_after_resume_point(tmp_path):
    log = engine.MetricsLog(tmp_path / "m.jsonl")
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    log.truncate_after(3)
    assert [r["step"] for r in log.read()] == [1, 2, 3]


def test_metrics_of_a_killed_run_drop_only_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    log = engine.MetricsLog(path)
    assert [r["step"] for r in log.read()] == [1, 2]
    log.truncate_after(1)
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n'
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 0.5}\n')  # torn in the middle: not a kill
    with pytest.raises(ValueError):
        log.read()


def test_early_stopping_keeps_the_best_weights(tmp_path):
    """With lr 1e-12 (the config refuses 0) no step moves the loss by the 1e-6 that counts as an
    improvement: an Adam step of about 1e-12 per weight changes the loss by far less. So the
    first evaluation is the best and, with patience 2, training stops two evaluations later
    (step 3) and restores step 1."""
    from safetensors.torch import load_file

    from instructkit.train.sft import sft
    from tests.tiny import tiny_model_dir, toy_conversations, write_jsonl

    model = tiny_model_dir(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "d.jsonl", toy_conversations(24))
    summary = sft(
        {
            "model": str(model),
            "out": str(tmp_path / "run"),
            "data": {"path": str(data), "val_fraction": 0.25, "max_length": 64},
            "peft": {"method": "full"},
            "optim": {"lr": 1e-12, "scheduler": "constant"},
            "train": {
                "batch_size": 4,
                "max_steps": 20,
                "eval_every": 1,
                "early_stopping_patience": 2,
                "progress": False,
            },
        }
    )
    assert summary["stopped_early"] and summary["steps"] == 3
    best = load_file(str(tmp_path / "run" / "checkpoints" / "best" / "trainable.safetensors"))
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    name = next(n for n in best if n.endswith("layers.0.mlp.up_proj.weight"))
    assert (best[name] == final[name.removeprefix("model.") if name not in final else name]).all()
    assert math.isfinite(summary["best_val_loss"])


# ----------------------------------------------------------------------------------------------
# The loop's pieces through fit: extra checkpoint state, the stop signal


class Regression(nn.Module):
    """A linear model's summed squared error and its row count (the engine's loss contract), and
    extra checkpoint state a resume must restore: the running sum of the losses it trained on and
    the number of training forward passes, changing every step."""

    def __init__(self, on_forward=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.seen_loss = torch.zeros((), dtype=torch.float64)
        self.forwards = 0
        self.on_forward = on_forward  # called with the forward's number, before it computes

    def forward(self, x, y):
        if self.training:
            self.forwards += 1
            if self.on_forward is not None:
                self.on_forward(self.forwards)
        loss = ((self.linear(x).squeeze(-1) - y) ** 2).sum()
        if self.training:
            self.seen_loss += loss.detach().double()
        return loss, torch.tensor(len(x))


class RegressionState:
    """Regression's extra state as the engine's ExtraState (a module's own ``state_dict`` is taken)."""

    def __init__(self, module: Regression) -> None:
        self.module = module

    def state_dict(self):
        return {"forwards": self.module.forwards}, {"seen_loss": self.module.seen_loss}

    def load_state_dict(self, meta, tensors):
        self.module.forwards, self.module.seen_loss = meta["forwards"], tensors["seen_loss"].clone()


def regression_rows(n: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)
    return [{"x": x[i].tolist(), "y": float(y[i])} for i in range(n)]


def collate_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {"x": torch.tensor([r["x"] for r in rows]), "y": torch.tensor([r["y"] for r in rows])}


def fit_regression(out: Path, *, extra: bool = True, on_step=None, on_forward=None, **train) -> Regression:
    """Six optimizer steps of batch 4 x accumulation 2 (two forward passes a step) into ``out``."""
    from instructkit.config import TrainConfig
    from instructkit.runs import RunDir

    module = Regression(on_forward)
    cfg = TrainConfig(**{"batch_size": 4, "grad_accum": 2, "max_steps": 6, "progress": False, "device": "cpu", **train})
    run = RunDir(out)
    run.path.mkdir(parents=True, exist_ok=True)
    engine.fit(
        loss_module=module,
        model=module,
        examples=regression_rows(),
        collate=collate_rows,
        weight=lambda e: 1,
        length=lambda e: 1,
        train=cfg,
        optim=OptimConfig(lr=0.05, scheduler="constant"),
        run=run,
        accelerator=engine.make_accelerator(cfg),
        on_step=on_step,
        extra_state={"regression": RegressionState(module)} if extra else None,
    )
    return module


def assert_same_end(a: Regression, b: Regression) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.forwards == b.forwards == 12 and torch.equal(a.seen_loss, b.seen_loss)


def crash_at(step: int):
    def on_step(s: int) -> None:
        if s == step:
            raise engine.StopTraining("simulated crash")

    return on_step


def test_extra_state_is_checkpointed_and_restored_exactly_on_resume(tmp_path):
    """Crash after step 3 with checkpoints every 2 steps; the rerun resumes from step 2. The
    extra state (a float64 sum of every training loss so far, and a forward count) equals the
    uninterrupted run's only if the checkpoint carried it: a fresh module restarts both at zero,
    so without the hook the rerun would end with 8 forwards, not 12."""
    full = fit_regression(tmp_path / "full", save_every=2)
    with pytest.raises(engine.StopTraining):
        fit_regression(tmp_path / "cut", save_every=2, on_step=crash_at(3))
    checkpoint = tmp_path / "cut" / "checkpoints" / "step-000002"
    saved = json.loads((checkpoint / "state.json").read_text())
    assert saved["extra"] == {"regression": {"forwards": 4}}
    from safetensors.torch import load_file

    assert set(load_file(str(checkpoint / "extra-regression.safetensors"))) == {"seen_loss"}
    resumed = fit_regression(tmp_path / "cut", save_every=2)
    assert_same_end(full, resumed)
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in engine.MetricsLog(out / "metrics.jsonl").read()]


def test_a_checkpoint_without_the_extra_state_is_refused(tmp_path):
    with pytest.raises(engine.StopTraining):
        fit_regression(tmp_path / "run", extra=False, save_every=2, on_step=crash_at(3))
    with pytest.raises(InputError, match="no 'regression' state"):
        fit_regression(tmp_path / "run", save_every=2)


def send_sigterm_at(*forwards: int):
    """An on_forward callback that sends this process SIGTERM at the given forward passes."""

    def on_forward(n: int) -> None:
        for _ in range(forwards.count(n)):
            os.kill(os.getpid(), signal.SIGTERM)

    return on_forward


def test_sigterm_mid_step_finishes_the_step_checkpoints_it_and_the_rerun_resumes_exactly(tmp_path):
    """SIGTERM arrives in the first forward pass of step 3 (forward 5 of 12). Step 3 still runs
    its second micro-batch and optimizer step, is logged and checkpointed (without the signal,
    save_every 0 checkpoints only the last step), and the run ends with KeyboardInterrupt before
    step 4. The rerun resumes at step 3 and ends where an uninterrupted run does. The handler is
    the one in place before the loop again afterwards."""
    full = fit_regression(tmp_path / "full")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        fit_regression(tmp_path / "sig", on_forward=send_sigterm_at(5))
    assert signal.getsignal(signal.SIGTERM) is before
    steps = sorted(p.name for p in (tmp_path / "sig" / "checkpoints").glob("step-*"))
    assert steps == ["step-000003"]
    assert len(losses(tmp_path / "sig")) == 3 and not (tmp_path / "sig" / "final").exists()
    resumed = fit_regression(tmp_path / "sig")
    assert_same_end(full, resumed)
    assert losses(tmp_path / "full") == losses(tmp_path / "sig")


def test_a_second_signal_stops_at_once_without_a_checkpoint_of_the_step_in_progress(tmp_path):
    """Two SIGTERMs in step 3's first forward pass: KeyboardInterrupt there and then. The last
    checkpoint is step 2's (save_every 1), not a half-done step 3; the rerun still matches."""
    full = fit_regression(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        fit_regression(tmp_path / "twice", save_every=1, on_forward=send_sigterm_at(5, 5))
    last = max(int(p.name.split("-")[1]) for p in (tmp_path / "twice" / "checkpoints").glob("step-*"))
    assert last == 2 and len(losses(tmp_path / "twice")) == 2
    assert_same_end(full, fit_regression(tmp_path / "twice", save_every=1))


def test_a_signal_during_the_last_step_lets_the_run_finish(tmp_path):
    """SIGTERM in step 6's first forward pass (forward 11 of 12): after the last step stopping is
    finishing, so fit returns (no KeyboardInterrupt) with the last step checkpointed."""
    full = fit_regression(tmp_path / "full")
    assert_same_end(full, fit_regression(tmp_path / "last", on_forward=send_sigterm_at(11)))
    assert (tmp_path / "last" / "checkpoints" / "step-000006").is_dir()
