"""The quantize stage on a tiny model: what is saved is quantised, reloads quantised, and stays
close to the fp32 model."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from instructkit.cli import main
from instructkit.models.loading import load_model
from instructkit.train.quantize import quantize
from tests.tiny import tiny_model_dir

IDS = torch.tensor([[1, 5, 17, 230, 1000, 42, 7]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("q") / "model", hidden_size=64, intermediate_size=128)


def _logits(spec):
    with torch.no_grad():
        return load_model(str(spec), dtype="fp32", device="cpu").eval()(input_ids=IDS).logits


def _stored(folder, name):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = [k for k in f.keys() if k.startswith(name)]  # noqa: SIM118 (safe_open has no __iter__)
        return {k: f.get_slice(k).get_dtype() for k in keys}


@pytest.mark.parametrize("scheme", ["int8_weight_only", "int8_dynamic", "int4_weight_only"])
def test_saved_weights_are_quantised_and_reload(tmp_path, tiny, scheme):
    summary = quantize({"model": str(tiny), "out": str(tmp_path / "run"), "scheme": scheme})
    final = tmp_path / "run" / "final"
    stored = _stored(final, "model.layers.0.mlp.up_proj._weight_qdata")
    assert "I8" in stored.values(), stored  # int8 values (int4 ones unpacked into int8 on CPU)
    reloaded = load_model(str(tmp_path / "run"), dtype="fp32", device="cpu")
    assert "Int" in type(reloaded.model.layers[0].mlp.up_proj.weight).__name__
    fp32, quantised = _logits(tiny), _logits(tmp_path / "run")
    diff = (fp32 - quantised).abs().max().item()
    assert 0 < diff < 0.5, diff  # changed, by rounding only
    assert summary["bytes_on_disk"] < summary["bytes_before"]


def test_int4_rounds_more_than_int8(tmp_path, tiny):
    fp32 = _logits(tiny)
    diffs = {}
    for scheme in ("int8_weight_only", "int4_weight_only"):
        quantize({"model": str(tiny), "out": str(tmp_path / scheme), "scheme": scheme})
        diffs[scheme] = (fp32 - _logits(tmp_path / scheme)).abs().mean().item()
    assert diffs["int4_weight_only"] > 2 * diffs["int8_weight_only"]


@pytest.mark.parametrize(
    "extra,message",
    [
        ("scheme=nf4", "no CUDA device"),
        ("group_size=64", "group_size applies to int4_weight_only"),
        ("scheme=int3", "is not one of"),
    ],
)
def test_bad_settings_exit_2_before_loading(tmp_path, tiny, capsys, extra, message):
    if extra == "scheme=nf4" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    path = tmp_path / "q.yaml"
    path.write_text(f"model: {tiny}\nout: {tmp_path / 'run'}\n")
    assert main(["quantize", "--config", str(path), *extra.split()]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
