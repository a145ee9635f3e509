"""`instructkit run`: stages in order, finished stages skipped, shipped recipes valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructkit.errors import InputError
from instructkit.pipeline import RECIPES_DIR, load_recipe, run
from tests.tiny import tiny_model_dir, toy_conversations, write_jsonl


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES_DIR.glob("*.yaml")))
def test_every_shipped_recipe_loads_and_validates(recipe):
    loaded = load_recipe(RECIPES_DIR / recipe)
    assert loaded.config.stages
    for stage in loaded.config.stages:  # every stage it runs has a validated, typed config
        stage_cfg = loaded.stage_config(stage)
        assert stage == "eval" or stage_cfg.model == loaded.config.model


def test_unknown_stage_and_key_are_input_errors(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nstages: [sft, evl]\n")
    with pytest.raises(InputError, match="did you mean 'eval'"):
        load_recipe(bad)
    bad.write_text("name: x\nsft:\n  optim:\n    lr_rate: 1\n")
    with pytest.raises(InputError, match=r"r.yaml:4, field 'sft.optim.lr_rate'"):
        load_recipe(bad)


def test_recipe_runs_stages_in_order_and_skips_finished_ones(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "tiny")
    rows = toy_conversations(24)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", rows[:4])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "name": "tiny", "model": str(model), "stages": ["sft", "eval"],
        "sft": {"data": {"path": str(data), "val_fraction": 0.0, "max_length": 64}, "peft": {"method": "full"},
                "optim": {"lr": 1e-2}, "train": {"batch_size": 4, "max_steps": 3, "progress": False}},
        "eval": {"suites": ["exact_match", "loss"], "data": str(test), "max_new_tokens": 4},
    }))
    out = tmp_path / "run"
    summary = run(recipe, out=out)
    assert set(summary["table"]) == {"base", "sft"}
    assert summary["table"]["sft"]["loss"] < summary["table"]["base"]["loss"]  # SFT lowered held-out loss
    assert (out / "sft" / "final").is_dir() and (out / "eval" / "sft.samples.jsonl").is_file()
    stamp = (out / "sft" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    run(recipe, out=out)
    assert "stage sft: already finished, skipped" in capsys.readouterr().out
    assert (out / "sft" / "summary.json").stat().st_mtime_ns == stamp
    run(recipe, out=out, from_stage="eval")
    assert (out / "sft" / "summary.json").stat().st_mtime_ns == stamp
