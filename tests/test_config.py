"""Typed configs: unknown keys with suggestions, types, overrides, and the CLI's exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from instructkit.config import SFTConfig, dump_yaml, load_config
from instructkit.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def test_unknown_key_names_file_line_and_closest_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\noptim:\n  lr: 1e-4\n  weight_decy: 0.1\n")
    with pytest.raises(InputError) as err:
        load_config(SFTConfig, path)
    msg = str(err.value)
    assert f"{path}:4" in msg and "optim.weight_decy" in msg and "did you mean 'weight_decay'" in msg


def test_overrides_are_typed_and_validated():
    cfg = load_config(
        SFTConfig,
        None,
        [
            "optim.lr=3e-4",
            "train.batch_size=2",
            "peft.target_modules=[q_proj,v_proj]",
            "data.packing=true",
            "optim.max_grad_norm=null",
        ],
    )
    assert cfg.optim.lr == 3e-4 and cfg.train.batch_size == 2 and cfg.data.packing is True
    assert cfg.peft.target_modules == ["q_proj", "v_proj"] and cfg.optim.max_grad_norm is None
    with pytest.raises(InputError, match="train.batch_size.*expected an integer"):
        load_config(SFTConfig, None, ["train.batch_size=two"])
    with pytest.raises(InputError, match="did you mean 'cosine'"):
        load_config(SFTConfig, None, ["optim.scheduler=cosin"])
    with pytest.raises(InputError, match="not key=value"):
        load_config(SFTConfig, None, ["optim.lr"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(SFTConfig, None, ["optim.betas=[0.8,0.95]", "data.columns={prompt: q}"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(SFTConfig, path) == cfg


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "instructkit", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_cli_unknown_config_key_exits_2_without_traceback_or_output(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"out: {tmp_path / 'run'}\ntrain:\n  batch_sise: 4\n")
    proc = run_cli("sft", "--config", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{path}:3" in proc.stderr and "did you mean 'batch_size'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_every_command_has_help():
    for args in (
        ["--help"],
        ["run", "--help"],
        ["sft", "--help"],
        ["data", "inspect", "--help"],
        ["eval", "--help"],
        ["generate", "--help"],
        ["chat", "--help"],
    ):
        proc = run_cli(*args)
        assert proc.returncode == 0 and "usage: instructkit" in proc.stdout, args


def test_a_partial_section_keeps_the_stage_defaults():
    """Giving one key of a section overrides that key only: the rest keeps the stage's own
    defaults (DPO's learning rate, the reward model's held-out share), not the section class's."""
    from instructkit.config import DPOConfig, OptimConfig, RewardConfig, from_dict

    dpo = from_dict(DPOConfig, {"optim": {"warmup_steps": 10}})
    assert dpo.optim.warmup_steps == 10 and dpo.optim.lr == DPOConfig().optim.lr != OptimConfig().lr
    rm = from_dict(RewardConfig, {"data": {"path": "pairs.jsonl"}})
    assert rm.data.path == "pairs.jsonl" and rm.data.val_fraction == RewardConfig().data.val_fraction
