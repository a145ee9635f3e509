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


def test_instructgpt_chain_feeds_each_stage_the_previous_output(tmp_path):
    """sft -> rm -> ppo -> dpo: the rm starts from the SFT run, PPO tunes the SFT policy and
    scores with the rm stage's model, DPO starts from the PPO policy; eval sees every policy."""
    from tests.tiny import toy_preferences

    model = tiny_model_dir(tmp_path / "tiny")
    convs = write_jsonl(tmp_path / "sft.jsonl", toy_conversations(16))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", toy_preferences(16))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in toy_preferences(8)])
    train = {"batch_size": 4, "max_steps": 2, "progress": False}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "name": "chain", "model": str(model), "stages": ["sft", "rm", "ppo", "dpo", "eval"],
        "sft": {"data": {"path": str(convs), "val_fraction": 0.0, "max_length": 64}, "peft": {"method": "full"},
                "train": train},
        "rm": {"data": {"path": str(pairs), "val_fraction": 0.25, "max_length": 64}, "peft": {"method": "full"},
               "train": train},
        "ppo": {"data": {"path": str(prompts)}, "peft": {"method": "lora", "r": 2}, "rollout_batch_size": 4,
                "max_new_tokens": 4, "ppo_epochs": 1, "train": train},
        "dpo": {"data": {"path": str(pairs), "val_fraction": 0.0, "max_length": 64},
                "peft": {"method": "lora", "r": 2}, "train": train},
        "eval": {"suites": ["loss"], "data": str(convs), "limit": 4},
    }))
    out = tmp_path / "run"
    summary = run(recipe, out=out)
    config = lambda stage: (out / stage / "config.yaml").read_text()  # noqa: E731
    assert f"model: {out / 'sft'}" in config("rm")
    assert f"model: {out / 'sft'}" in config("ppo") and f"model: {out / 'rm'}" in config("ppo")
    assert f"model: {out / 'ppo'}" in config("dpo")
    assert set(summary["table"]) == {"base", "sft", "ppo", "dpo"}
    assert summary["final_model"] == str(out / "dpo")
