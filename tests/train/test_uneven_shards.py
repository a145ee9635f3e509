"""Uneven shards never hang: two processes whose shards differ in size (a one-example validation
split, a training set that two processes cannot split evenly) finish, and with the numbers one
process gets.

Why they can differ in size, and why that is safe: a training step takes ``batch_size x
grad_accum x processes`` examples, so every process always gets the same number of micro-batches
and the examples an epoch cannot fill a step with are skipped by both (``StepPlan``). The held-out
pass is the one place shards are uneven: rank r takes examples r, r+W, ... and one process may get
none. Each process sums (loss_sum, count) over its own share through the *unwrapped* module (no
collective inside) and the two sums are added across processes once, so an empty shard adds
(0, 0) and the mean is the one-process mean.

Each launch runs under a timeout that kills the whole process group and fails the test: a hang
is a failure, not a stuck CI job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instructkit.train.engine import MetricsLog, StepPlan, evaluate_loss, micro_batches, plan_steps
from tests.tiny import toy_conversations, toy_preferences, write_jsonl

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 420  # a tiny two-process run takes about 15 s on 2 loaded cores


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun starts its workers in sessions of their own,
    so killing torchrun's process group would leave them running)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def torchrun(command: str, config: dict, tmp_path: Path, *, port: int) -> None:
    """``torchrun --nproc_per_node 2 -m instructkit COMMAND --config FILE``; fails the test on a
    non-zero exit or after LAUNCH_TIMEOUT_S, when torchrun and its workers are killed. The output
    goes to a file: a pipe would keep the test waiting on whatever worker still holds it."""
    path, log = tmp_path / f"{command}-two.yaml", tmp_path / f"{command}-two.log"
    path.write_text(json.dumps(config))
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [exe, "--nproc_per_node", "2", "--master_port", str(port), "-m", "instructkit", command, "--config"]
    with open(log, "w") as out:
        proc = subprocess.Popen([*args, str(path)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            workers = _children(proc.pid)
            for pid in [proc.pid, *workers]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"two processes did not finish in {LAUNCH_TIMEOUT_S} s (hung?):\n{log.read_text()[-3000:]}")
    assert proc.returncode == 0, log.read_text()[-3000:]


def curve(out: Path) -> list[tuple[int, float, float | None]]:
    return [(r["step"], r["loss"], r.get("val_loss")) for r in MetricsLog(out / "metrics.jsonl").read()]


def assert_same_numbers(one: Path, two: Path, steps: int) -> None:
    a, b = curve(one), curve(two)
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == list(range(1, steps + 1))
    for (step, loss_a, val_a), (_, loss_b, val_b) in zip(a, b):
        assert loss_b == pytest.approx(loss_a, abs=1e-4), step
        assert val_a is not None and val_b == pytest.approx(val_a, abs=1e-4), step
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (one, two))
    assert sb["val_examples"] == sa["val_examples"]


# ----------------------------------------------------------------------------------------------
# Pure parts, one process


def test_every_process_gets_the_same_number_of_micro_batches_when_the_data_does_not_divide():
    """15 examples, 2 processes x batch 4: a step is 8 examples, 1 step an epoch, 7 skipped by both
    (as one process of batch 8 skips them); each rank's micro-batch has exactly 4 examples and the
    two ranks together take the step's 8, each once."""
    from instructkit.config import TrainConfig

    plan, total = plan_steps(15, TrainConfig(batch_size=4, max_steps=3), world=2)
    assert (plan.global_batch, plan.steps_per_epoch, total) == (8, 1, 3)
    assert plan == StepPlan(15, 8, 0)  # the plan of one process with batch 8: the same examples
    for step in range(total):
        indices = plan.indices(step)
        ranks = [micro_batches(indices, 4, 1, r, 2) for r in (0, 1)]
        assert [len(m) for r in ranks for m in r] == [4, 4]
        assert sorted(ranks[0][0] + ranks[1][0]) == sorted(indices)


class _Summed(torch.nn.Module):
    """A loss module whose (loss_sum, count) over a batch is (sum of x, number of rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x * self.w).sum(), torch.tensor(float(len(x)))


class _TwoRanks:
    """Rank ``index`` of 2, whose sum-reduction adds the other rank's already computed total."""

    device = torch.device("cpu")
    num_processes = 2

    def __init__(self, index: int, other: list[torch.Tensor]) -> None:
        self.process_index, self.other, self.seen = index, other, []

    def unwrap_model(self, m):
        return m

    def reduce(self, value, reduction):
        assert reduction == "sum"
        self.seen.append(value.clone())
        return value + self.other[0] if self.other else value


def test_an_empty_validation_shard_adds_nothing_and_the_mean_is_the_one_process_mean():
    """One held-out example (x = 3) for 2 processes: rank 0 holds it, rank 1 none. Rank 1's
    contribution is (0, 0); the sum is (3, 1), the mean 3.0, as one process computes it."""
    examples = [{"x": 3.0}]

    def collate(rows):
        return {"x": torch.tensor([r["x"] for r in rows])}

    module = _Summed()
    empty = _TwoRanks(1, [])
    evaluate_loss(module, examples, collate, 4, empty)
    assert empty.seen[0].tolist() == [0.0, 0.0]
    holder = _TwoRanks(0, [empty.seen[0]])
    assert evaluate_loss(module, examples, collate, 4, holder) == 3.0

    class _One(_TwoRanks):
        num_processes = 1

    assert evaluate_loss(module, examples, collate, 4, _One(0, [])) == 3.0


def test_an_odd_validation_split_is_weighted_by_count_not_by_process():
    """Three held-out examples x = 1, 2, 6 over 2 processes: rank 0 gets 1 and 6 (sum 7, count 2),
    rank 1 gets 2 (sum 2, count 1). The mean is 9 / 3 = 3, not the mean of the means (3.5 + 2) / 2."""
    examples = [{"x": 1.0}, {"x": 2.0}, {"x": 6.0}]

    def collate(rows):
        return {"x": torch.tensor([r["x"] for r in rows])}

    module = _Summed()
    rank1 = _TwoRanks(1, [])
    evaluate_loss(module, examples, collate, 1, rank1)
    assert rank1.seen[0].tolist() == [2.0, 1.0]
    assert evaluate_loss(module, examples, collate, 1, _TwoRanks(0, [rank1.seen[0]])) == 3.0


# ----------------------------------------------------------------------------------------------
# Two processes through torchrun against one


def sft_config(tiny: Path, data: Path, out: Path, batch_size: int) -> dict:
    return {
        "model": str(tiny),
        "out": str(out),
        # The README's quick trial: 16 records, val_fraction 0.05 -> 1 held-out, 15 to train.
        "data": {"path": str(data), "val_fraction": 0.05, "max_length": 64, "limit": 16},
        "peft": {"method": "lora", "r": 4, "alpha": 8},
        "optim": {"lr": 1e-2, "scheduler": "linear", "warmup_steps": 1},
        "train": {"batch_size": batch_size, "max_steps": 3, "eval_every": 1, "progress": False},
    }


@pytest.mark.dist
def test_sft_with_one_held_out_example_and_an_odd_training_set_matches_one_process(tiny, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", toy_conversations(40))
    from instructkit.train.sft import sft

    single = sft(sft_config(tiny, data, tmp_path / "one", batch_size=8))
    assert (single["train_examples"], single["val_examples"]) == (15, 1)  # the shape this test is about
    torchrun("sft", sft_config(tiny, data, tmp_path / "two", batch_size=4), tmp_path, port=29631)
    assert_same_numbers(tmp_path / "one", tmp_path / "two", steps=3)


def preference_config(tiny: Path, data: Path, val: Path, out: Path, batch_size: int) -> dict:
    return {
        "model": str(tiny),
        "out": str(out),
        "data": {"path": str(data), "val_path": str(val), "max_length": 64, "limit": 15},
        "peft": {"method": "full"},
        "optim": {"lr": 1e-3, "scheduler": "constant", "warmup_steps": 0},
        "train": {"batch_size": batch_size, "max_steps": 2, "eval_every": 1, "progress": False},
    }


@pytest.mark.dist
def test_dpo_with_one_held_out_pair_and_an_odd_training_set_matches_one_process(tiny, tmp_path):
    """15 pairs, 2 processes x batch 2 (4 a step, 3 left over) against 1 x batch 4; one held-out
    pair. The fit's per-step held-out loss and the closing held-out statistics both agree."""
    from instructkit.train.dpo import dpo

    data = write_jsonl(tmp_path / "pairs.jsonl", toy_preferences(40))
    val = write_jsonl(tmp_path / "val.jsonl", toy_preferences(1))
    one = dpo(preference_config(tiny, data, val, tmp_path / "one", batch_size=4))
    torchrun("dpo", preference_config(tiny, data, val, tmp_path / "two", batch_size=2), tmp_path, port=29632)
    assert_same_numbers(tmp_path / "one", tmp_path / "two", steps=2)
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    for key in ("val_loss", "val_reward_margin", "val_reward_accuracy"):
        if key in one:
            assert two[key] == pytest.approx(one[key], abs=1e-4), key
