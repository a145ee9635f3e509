"""eval/footprint.py: weights on disk per kind of spec, and decode speed over an exact token count."""

from __future__ import annotations

import itertools

import pytest

from instructkit.eval import footprint
from instructkit.models.loading import load_model_and_tokenizer
from tests.tiny import tiny_model_dir


def test_weights_bytes_counts_the_weight_files_a_spec_loads(tmp_path):
    folder = tiny_model_dir(tmp_path / "m")
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert weights > 0
    assert footprint.weights_bytes(str(folder)) == weights  # tokenizer and config files do not count
    gguf = tmp_path / "one" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"x" * 1234)
    assert footprint.weights_bytes(str(gguf)) == 1234
    assert footprint.weights_bytes(str(gguf.parent)) == 1234  # an export stage's final/


def test_decode_speed_counts_exactly_the_asked_tokens_per_prompt(tmp_path, monkeypatch):
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir(tmp_path / "m")), dtype="fp32", device="cpu")
    # eos may come first; min_new_tokens keeps every prompt at exactly 5 new tokens.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a longer question here"}]]
    clock = itertools.count(start=10.0, step=4.0)  # started at 10 s, finished at 14 s
    monkeypatch.setattr(footprint.time, "perf_counter", lambda: next(clock))
    assert footprint.decode_tokens_per_s(model, tokenizer, prompts, tokens=5) == pytest.approx(2 * 5 / 4.0)
