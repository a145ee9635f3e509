"""The vision recipe on a tiny Llama built from a config (SmolLM2's tokenizer) behind the shipped
EfficientNet-Lite0: the loss falls, a crashed run resumes to the same curve, the projector-only
stage trains nothing of the decoder, a LoRA stage goes on from its projector, and final/ reloads
to the same greedy answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from instructkit.train.vision import vision, vision_projector
from tests.tiny import tiny_model_dir
from tests.train.invariants import assert_resumes_exactly, losses


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("vis") / "tiny")


def config(out: Path, decoder: Path | str, **train) -> dict:
    return {
        "model": str(decoder),
        "out": str(out),
        "grid": 2,
        "data": {"limit": 16, "val_path": None, "test_limit": 4},
        "max_new_tokens": 4,
        "optim": {"lr": 1e-2, "warmup_steps": 0, "scheduler": "constant"},
        "train": {"batch_size": 4, "max_steps": 6, "progress": False, "seed": 0, **train},
    }


def test_projector_stage_loss_falls_and_trains_only_the_projector(tmp_path, decoder_dir):
    """Four records, batch 4: every step sees the same batch, so the loss is a function of the
    projector alone and must fall step after step. The random decoder is frozen, so it falls
    little (from about ln(49152) = 10.8: only the 4 image tokens' inputs can change)."""
    cfg = config(tmp_path / "p", decoder_dir, max_steps=8)
    cfg["data"]["limit"] = 4
    s = vision_projector(cfg)
    curve = losses(tmp_path / "p")
    assert len(curve) == 8 and all(b <= a + 1e-4 for a, b in zip(curve, curve[1:])) and curve[-1] < curve[0] - 0.01
    # Trainable: the projector alone, 1280 -> 32 -> 32 (weights and biases).
    assert s["trainable_parameters"] == 1280 * 32 + 32 + 32 * 32 + 32
    final = tmp_path / "p" / "final"
    assert (final / "projector.safetensors").is_file() and not (final / "adapter_config.json").exists()
    held = json.loads((tmp_path / "p" / "heldout.json").read_text())
    assert held["before"]["n"] == 4 and held["after"]["n"] == 4


def test_resumes_exactly(tmp_path, decoder_dir):
    assert_resumes_exactly(
        lambda cfg, on_step=None: vision_projector(cfg, on_step=on_step),
        lambda out, **train: config(out, decoder_dir, **train),
        tmp_path,
    )


def test_lora_stage_goes_on_from_the_projector_and_final_reloads(tmp_path, decoder_dir):
    from safetensors.torch import load_file

    from instructkit.data.vision import read_image_records
    from instructkit.generation import generate_with_images
    from instructkit.models.vision import load_vision_model

    first = config(tmp_path / "p", decoder_dir)
    first["data"]["limit"] = 4  # one batch, seen at every step of both stages
    vision_projector(first)
    cfg = config(tmp_path / "l", tmp_path / "p", max_steps=6)
    cfg["data"]["limit"] = 4
    cfg["peft"] = {"method": "lora", "r": 4, "alpha": 8}
    s = vision(cfg)
    assert s["decoder"] == "lora" and (tmp_path / "l" / "final" / "adapter_config.json").is_file()
    # It starts from the first stage's projector: its first loss (LoRA's B starts at zero, so the
    # decoder is unchanged) is that of the projector after the first stage's last step, below the
    # last loss the first stage logged (before that step). LoRA then moves the decoder itself.
    p_curve, l_curve = losses(tmp_path / "p"), losses(tmp_path / "l")
    assert l_curve[0] < p_curve[-1]
    assert l_curve[-1] < l_curve[0] - 0.1
    assert json.loads((tmp_path / "l" / "final" / "vision.json").read_text())["decoder"] == str(decoder_dir)
    assert set(load_file(str(tmp_path / "l" / "final" / "projector.safetensors"))) == {
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
    }

    model, tok = load_vision_model(tmp_path / "l")
    records = read_image_records("shipped:vision/test", limit=4)
    prompts = [(r.messages[:-1], r.images) for r in records]
    answers = generate_with_images(model, tok, prompts, max_new_tokens=4)
    saved = json.loads((tmp_path / "l" / "heldout.json").read_text())["after"]["samples"]
    assert answers == [x["response"] for x in saved]  # the reloaded final/ answers as the run did
    with torch.no_grad():  # batch 1 and batch 4 answer alike (left padding is masked)
        assert generate_with_images(model, tok, prompts[:1], max_new_tokens=4) == answers[:1]
