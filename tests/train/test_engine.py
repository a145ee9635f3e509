"""Engine plumbing: schedules, data order, micro-batch split, atomic files, early stopping."""

from __future__ import annotations

import math

import pytest

from instructkit.config import OptimConfig
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
    """With lr 0 after the first step nothing improves: the first evaluation is the best and,
    with patience 2, training stops two evaluations later (step 3) and restores step 1."""
    from safetensors.torch import load_file

    from instructkit.train.sft import sft
    from tests.tiny import tiny_model_dir, toy_conversations, write_jsonl

    model = tiny_model_dir(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "d.jsonl", toy_conversations(24))
    summary = sft({"model": str(model), "out": str(tmp_path / "run"),
                   "data": {"path": str(data), "val_fraction": 0.25, "max_length": 64},
                   "peft": {"method": "full"},
                   "optim": {"lr": 0.0, "scheduler": "constant"},
                   "train": {"batch_size": 4, "max_steps": 20, "eval_every": 1, "early_stopping_patience": 2,
                             "progress": False}})
    assert summary["stopped_early"] and summary["steps"] == 3
    best = load_file(str(tmp_path / "run" / "checkpoints" / "best" / "trainable.safetensors"))
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    name = next(n for n in best if n.endswith("layers.0.mlp.up_proj.weight"))
    assert (best[name] == final[name.removeprefix("model.") if name not in final else name]).all()
    assert math.isfinite(summary["best_val_loss"])
