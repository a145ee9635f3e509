"""The prune stage end to end on a tiny model: what it removes is gone from the saved model."""

from __future__ import annotations

import json

import pytest
import torch

from instructkit.cli import main
from instructkit.models import prune as P
from instructkit.models.loading import load_model
from instructkit.train.prune import prune
from tests.tiny import tiny_model_dir, toy_conversations, write_jsonl


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("deep") / "model", num_hidden_layers=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", toy_conversations(12))


def cfg(model, data, out, **kw):
    return {"model": str(model), "out": str(out), "data": {"path": str(data), "max_length": 64}, **kw}


def test_structured_pruning_saves_a_smaller_model(tmp_path, deep, data):
    summary = prune(cfg(deep, data, tmp_path / "run", drop_layers=2, ffn_keep=0.5, calibration_examples=8))
    model = load_model(str(tmp_path / "run"), dtype="fp32", device="cpu")
    assert model.config.num_hidden_layers == 2 and summary["layers_after"] == 2
    assert model.config.intermediate_size == 32
    assert len(summary["dropped_layers"]) == 2
    assert summary["dropped_layers"] == list(
        range(summary["angular_distances"].index(min(summary["angular_distances"])), 2 + summary["dropped_layers"][0])
    )
    assert summary["parameters_after"] == sum(p.numel() for p in model.parameters())
    assert summary["parameters_after"] < summary["parameters_before"]
    assert summary["calibration_examples"] == 8
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["bytes_on_disk"] > 0


def test_wanda_two_four_on_every_matrix(tmp_path, deep, data):
    summary = prune(cfg(deep, data, tmp_path / "run", scores="wanda", pattern="semi_structured"))
    model = load_model(str(tmp_path / "run"), dtype="fp32", device="cpu")
    for name, linear in P.prunable_linears(model).items():
        assert P.follows_n_m(linear.weight != 0), name
    assert summary["sparsity"] == pytest.approx(0.5)


def test_magnitude_sparsity_is_exact_per_matrix(tmp_path, deep, data):
    prune(cfg(deep, data, tmp_path / "run", sparsity=0.25))
    model = load_model(str(tmp_path / "run"), dtype="fp32", device="cpu")
    for linear in P.prunable_linears(model).values():
        zeros = int((linear.weight == 0).sum())
        assert zeros == int(0.25 * linear.weight.numel())
    # the survivors are the largest weights: every kept |w| >= every zeroed original |w|
    original = load_model(str(deep), dtype="fp32", device="cpu")
    a = P.prunable_linears(original)["layers.0.mlp.up_proj"].weight.abs()
    kept = P.prunable_linears(model)["layers.0.mlp.up_proj"].weight != 0
    assert a[kept].min() >= a[~kept].max()
    assert torch.equal(
        P.prunable_linears(model)["layers.0.mlp.up_proj"].weight[kept],
        original.model.layers[0].mlp.up_proj.weight[kept],
    )


@pytest.mark.parametrize(
    "extra,message",
    [
        ("sparsity=1.0", "must be in [0, 1)"),
        ("pattern=semi_structured sparsity=0.3", "fixes the sparsity at 0.5"),
        ("ffn_keep=0", "must be in (0, 1]"),
        ("scores=wand", "did you mean 'wanda'"),
    ],
)
def test_bad_settings_exit_2_before_loading(tmp_path, deep, data, capsys, extra, message):
    path = tmp_path / "prune.yaml"
    path.write_text(f"model: {deep}\nout: {tmp_path / 'run'}\ndata: {{path: {data}}}\n")
    assert main(["prune", "--config", str(path), *extra.split()]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
