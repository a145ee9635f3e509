"""Fixtures shared by every test folder."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository: real third-party files (LLaMA-Factory demos,
    IFEval). CI has it, so a missing folder fails the tests instead of skipping them."""
    path = REPO_ROOT.parent / "shared" / "data"
    assert path.is_dir(), f"shared data folder not found at {path} (expected beside the repo)"
    return path


@pytest.fixture(scope="session")
def llama_factory_data(shared_data: Path) -> Path:
    """LLaMA-Factory's demo data folder: dataset_info.json and the files it names."""
    path = shared_data / "peers" / "llama-factory"
    assert (path / "dataset_info.json").is_file(), f"no dataset_info.json in {path}"
    return path
