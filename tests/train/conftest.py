"""Fixtures shared by the recipe tests: one tiny model and the toy data, per test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import tiny_model_dir, toy_preferences, write_jsonl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", toy_preferences(40))
