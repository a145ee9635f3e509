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


@pytest.fixture(scope="module", autouse=True)
def _remove_module_folders(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Module-scoped fixtures' folders (models, run folders) are removed once their module's tests
    pass; pytest itself keeps them to the end of the session, and the whole suite writes several
    GB of them. A module with a failure keeps its folders to look at."""
    import shutil

    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed == failed_before:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)
