"""Reruns into an existing run folder, bad values, and what a failing stage leaves behind.

A rerun with the same config resumes or does nothing (a finished stage's files are not
rewritten); with a changed config it stops with exit 2 listing the changes and touches nothing;
`--overwrite` and a new `out` both proceed. Bad values stop before any model or data loads.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from instructkit.errors import InputError
from instructkit.train.sft import sft
from tests.tiny import toy_conversations, write_jsonl

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", toy_conversations(16))


def stage_yaml(tmp_path: Path, tiny: Path, data: Path, out: Path) -> Path:
    path = tmp_path / "sft.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny),
                "out": str(out),
                "data": {"path": str(data), "val_fraction": 0.0, "max_length": 64},
                "peft": {"method": "lora", "r": 4, "alpha": 8},
                "optim": {"lr": 2e-4},
                "train": {"batch_size": 4, "max_steps": 2, "progress": False},
            }
        )
    )
    return path


def checksums(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "instructkit", *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


@pytest.fixture(scope="module")
def finished(tiny, data, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("finished")
    cfg = stage_yaml(tmp, tiny, data, tmp / "run")
    assert cli("sft", "--config", str(cfg)).returncode == 0
    return cfg, tmp / "run"


def test_rerunning_a_finished_stage_with_the_same_config_changes_nothing(finished):
    cfg, run = finished
    before = checksums(run)
    out = cli("sft", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "already finished" in out.stderr + out.stdout
    assert checksums(run) == before  # summary.json and config.yaml are not rewritten
    assert '"train_loss": null' not in out.stdout  # the saved summary, not an empty one


@pytest.mark.parametrize(
    ("override", "key"),
    [("optim.lr=1", "optim.lr"), ("peft.method=full", "peft.method"), ("data.path=other.jsonl", "data.path")],
)
def test_a_changed_config_on_rerun_exits_2_listing_the_keys_and_touches_nothing(finished, override, key):
    cfg, run = finished
    before = checksums(run)
    out = cli("sft", "--config", str(cfg), override)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert key in out.stderr and "--overwrite" in out.stderr and "out=" in out.stderr
    assert checksums(run) == before


def test_neutral_settings_may_differ_on_rerun(finished):
    cfg, run = finished
    before = checksums(run)
    assert cli("sft", "--config", str(cfg), "train.log_every=5", "train.progress=true").returncode == 0
    assert checksums(run) == before


def test_overwrite_and_a_new_out_both_proceed(tiny, data, tmp_path):
    cfg = stage_yaml(tmp_path, tiny, data, tmp_path / "run")
    sft(str(cfg))
    new_out = sft(str(cfg), ["optim.lr=1e-3", f"out={tmp_path / 'other'}"])
    assert new_out["steps"] == 2 and (tmp_path / "other" / "summary.json").is_file()
    with pytest.raises(InputError, match="optim.lr"):
        sft(str(cfg), ["optim.lr=1e-3"])
    replaced = sft(str(cfg), ["optim.lr=1e-3"], overwrite=True)
    assert replaced["steps"] == 2
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["lr"] == 1e-3


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.dtype=fp64", "train.dtype"),
        ("train.device=tpu", "train.device"),
        ("optim.lr=-1", "optim.lr"),
        ("peft.r=0", "peft.r"),
        ("train.max_steps=0", "train.max_steps"),
    ],
)
def test_bad_values_are_one_line_and_exit_2_before_anything_loads(tiny, data, tmp_path, override, field):
    cfg = stage_yaml(tmp_path, tiny, data, tmp_path / "run")
    out = cli("sft", "--config", str(cfg), override)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and f"override '{override}'" in out.stderr
    assert not (tmp_path / "run").exists()


def test_what_only_the_model_can_decide_is_a_located_line_before_training(tiny, data, tmp_path):
    cfg = stage_yaml(tmp_path, tiny, data, tmp_path / "run")
    out = cli("sft", "--config", str(cfg), "peft.target_modules=[nope]")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "peft.target_modules" in out.stderr and "nope" in out.stderr and "q_proj" in out.stderr
    assert not (tmp_path / "run").exists()  # failed before its first step: no folder left


def test_cuda_on_a_machine_without_it_is_an_input_error(tiny):
    import torch

    from instructkit.models.loading import load_model

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InputError, match="no CUDA"):
        load_model(str(tiny), device="cuda")


def test_a_stage_that_fails_before_its_first_step_leaves_no_folder(tiny, tmp_path):
    """Every example is longer than max_length: the error comes after the folder was made."""
    long = write_jsonl(
        tmp_path / "long.jsonl",
        [{"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}] * 4,
    )
    cfg = stage_yaml(tmp_path, tiny, long, tmp_path / "run")
    out = cli("sft", "--config", str(cfg), "data.max_length=16")
    assert out.returncode == 2 and "no trainable examples" in out.stderr
    assert not (tmp_path / "run").exists()


def test_stale_temporary_folders_are_removed_on_the_next_run(tiny, data, tmp_path):
    cfg = stage_yaml(tmp_path, tiny, data, tmp_path / "run")
    stale = tmp_path / "run" / "checkpoints" / "step-000001.tmp-abc123"
    stale.mkdir(parents=True)
    sft(str(cfg))
    assert not stale.exists() and (tmp_path / "run" / "summary.json").is_file()
