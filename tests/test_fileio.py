"""Atomic writes: a file or folder is replaced whole or not at all."""

from __future__ import annotations

import pytest

from instructkit import fileio


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    fileio.atomic_write_json(path, {"a": 1})

    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio.os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_write_json(path, {"a": 2})
    assert path.read_text().strip().startswith("{") and '"a": 1' in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "final"
    with fileio.atomic_dir(target) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(RuntimeError), fileio.atomic_dir(target) as tmp:
        (tmp / "x").write_text("2")
        raise RuntimeError
    assert (target / "x").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
