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
    for i, stage in enumerate(loaded.config.stages):  # every stage it runs has a validated, typed config
        stage_cfg = loaded.stage_config(stage)
        # It starts from the recipe's model, or names an earlier stage (`model: distill`).
        assert stage == "eval" or stage_cfg.model in (loaded.config.model, *loaded.config.stages[:i])


def test_unknown_stage_and_key_are_input_errors(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nstages: [sft, evl]\n")
    with pytest.raises(InputError, match="did you mean 'eval'"):
        load_recipe(bad)
    bad.write_text("name: x\nsft:\n  optim:\n    lr_rate: 1\n")
    with pytest.raises(InputError, match=r"r.yaml:4, field 'sft.optim.lr_rate'"):
        load_recipe(bad)


def _tiny_recipe(tmp_path: Path, *, rows: int = 16, sft: dict | None = None, eval_: dict | None = None) -> Path:
    """A two-stage recipe (full SFT of a tiny model, then eval) on toy conversations; ``sft``
    adds keys to the sft section, ``eval_`` replaces the eval section (``{data}`` and ``{test}``
    name the training file and its first four records)."""
    model = tiny_model_dir(tmp_path / "tiny")
    records = toy_conversations(rows)
    data = write_jsonl(tmp_path / "train.jsonl", records)
    test = write_jsonl(tmp_path / "test.jsonl", records[:4])
    sft_section = {
        "data": {"path": str(data), "val_fraction": 0.0, "max_length": 64},
        "peft": {"method": "full"},
        "train": {"batch_size": 4, "max_steps": 2, "progress": False},
        **(sft or {}),
    }
    eval_section = {"suites": ["loss"], "data": "{data}", "limit": 4} if eval_ is None else eval_
    eval_section = {k: (v.format(data=data, test=test) if isinstance(v, str) else v) for k, v in eval_section.items()}
    recipe = tmp_path / "recipe.yaml"
    spec = {"name": "tiny", "model": str(model), "stages": ["sft", "eval"], "sft": sft_section, "eval": eval_section}
    recipe.write_text(json.dumps(spec))
    return recipe


def test_recipe_runs_stages_in_order_and_skips_finished_ones(tmp_path, capsys):
    recipe = _tiny_recipe(
        tmp_path,
        rows=24,
        sft={"optim": {"lr": 1e-2}, "train": {"batch_size": 4, "max_steps": 3, "progress": False}},
        eval_={"suites": ["exact_match", "loss"], "data": "{test}", "max_new_tokens": 4},
    )
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
    recipe.write_text(
        json.dumps(
            {
                "name": "chain",
                "model": str(model),
                "stages": ["sft", "rm", "ppo", "dpo", "eval"],
                "sft": {
                    "data": {"path": str(convs), "val_fraction": 0.0, "max_length": 64},
                    "peft": {"method": "full"},
                    "train": train,
                },
                "rm": {
                    "data": {"path": str(pairs), "val_fraction": 0.25, "max_length": 64},
                    "peft": {"method": "full"},
                    "train": train,
                },
                "ppo": {
                    "data": {"path": str(prompts)},
                    "peft": {"method": "lora", "r": 2},
                    "rollout_batch_size": 4,
                    "max_new_tokens": 4,
                    "ppo_epochs": 1,
                    "train": train,
                },
                "dpo": {
                    "data": {"path": str(pairs), "val_fraction": 0.0, "max_length": 64},
                    "peft": {"method": "lora", "r": 2},
                    "train": train,
                },
                "eval": {"suites": ["loss"], "data": str(convs), "limit": 4},
            }
        )
    )
    out = tmp_path / "run"
    summary = run(recipe, out=out)
    config = lambda stage: (out / stage / "config.yaml").read_text()  # noqa: E731
    assert f"model: {out / 'sft'}" in config("rm")
    assert f"model: {out / 'sft'}" in config("ppo") and f"model: {out / 'rm'}" in config("ppo")
    assert f"model: {out / 'ppo'}" in config("dpo")
    assert set(summary["table"]) == {"base", "sft", "ppo", "dpo"}
    assert summary["final_model"] == str(out / "dpo")


def test_compression_chain_names_earlier_stages_and_eval_measures_every_models_footprint(tmp_path):
    """sft -> prune -> distill (teacher: sft) -> export (model: sft, GGUF) -> eval with footprint:
    stage names stand for their outputs, and each model's weights on disk are the files it loads."""
    from instructkit.report import write_report

    model = tiny_model_dir(tmp_path / "tiny", num_hidden_layers=3)
    convs = write_jsonl(tmp_path / "sft.jsonl", toy_conversations(16))
    data = {"path": str(convs), "val_fraction": 0.0, "max_length": 64}
    train = {"batch_size": 4, "max_steps": 2, "progress": False}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "name": "compress",
                "model": str(model),
                "stages": ["sft", "prune", "distill", "export", "eval"],
                "sft": {"data": data, "peft": {"method": "lora", "r": 2}, "train": train},
                "prune": {"data": {"path": str(convs), "max_length": 64}, "calibration_examples": 4, "drop_layers": 1},
                "distill": {"teacher": "sft", "data": data, "alpha": 0.5, "train": train},
                "export": {"model": "sft", "format": "gguf", "quant": "f16"},
                "eval": {
                    "suites": ["exact_match"],
                    "data": str(convs),
                    "limit": 2,
                    "max_new_tokens": 3,
                    "footprint": True,
                    "footprint_prompts": 2,
                },
            }
        )
    )
    out = tmp_path / "run"
    summary = run(recipe, out=out)
    distill_config = (out / "distill" / "config.yaml").read_text()
    assert f"teacher: {out / 'sft'}" in distill_config and f"model: {out / 'prune'}" in distill_config
    assert f"model: {out / 'sft'}" in (out / "export" / "config.yaml").read_text()
    table = summary["table"]
    assert list(table) == ["base", "sft", "prune", "distill", "export"]

    def mib(*files):
        return round(sum(f.stat().st_size for f in files) / 2**20, 2)

    gguf = out / "export" / "final" / "model.gguf"
    assert gguf.is_file()
    assert table["export"]["weights_mb"] == mib(gguf)
    assert table["base"]["weights_mb"] == mib(*model.glob("*.safetensors"))
    # A LoRA run costs its base and its adapter.
    assert table["sft"]["weights_mb"] == mib(
        *model.glob("*.safetensors"), *(out / "sft" / "final").glob("*.safetensors")
    )
    assert table["distill"]["weights_mb"] == mib(*(out / "distill" / "final").glob("*.safetensors"))
    assert table["prune"]["parameters_m"] < table["sft"]["parameters_m"]
    assert all(row["decode_tokens_per_s"] > 0 for row in table.values())
    assert json.loads((out / "export" / "summary.json").read_text())["max_abs_logit_diff"] < 1e-2
    assert 'id="footprint"' in write_report(out).read_text()


def test_a_stage_named_as_model_must_run_before(tmp_path):
    recipe = _tiny_recipe(tmp_path)
    spec = json.loads(recipe.read_text())
    spec["stages"] = ["sft", "quantize", "eval"]
    spec["sft"]["model"] = "quantize"
    recipe.write_text(json.dumps(spec))
    with pytest.raises(InputError, match="field 'sft.model'.*quantize stage, which is not a policy stage that runs"):
        run(recipe, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


KILLER = """
import os, signal, sys
from instructkit.train import engine

write = engine.MetricsLog.write

def write_then_die(self, record):
    # SIGKILL in the middle of writing the dpo stage's step-7 line: after the step-5
    # checkpoint, with steps 6 and 7 logged but not checkpointed, and the last line torn.
    if self.path.parent.name == "dpo" and record.get("step") == 7:
        with open(self.path, "a") as f:
            f.write('{"step": 7, "lo')
        os.kill(os.getpid(), signal.SIGKILL)
    write(self, record)

engine.MetricsLog.write = write_then_die
from instructkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_recipe_reruns_skipping_finished_stages_and_matches_an_uninterrupted_run(tmp_path, capsys):
    """kill -9 during the dpo stage, rerun: sft is skipped, dpo resumes from its checkpoint, and
    the curves, weights and evaluation equal those of a run that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from tests.tiny import toy_preferences

    model = tiny_model_dir(tmp_path / "tiny")
    convs = write_jsonl(tmp_path / "sft.jsonl", toy_conversations(16))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", toy_preferences(24))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "name": "killed",
                "model": str(model),
                "stages": ["sft", "dpo", "eval"],
                "sft": {
                    "data": {"path": str(convs), "val_fraction": 0.0, "max_length": 64},
                    "peft": {"method": "full"},
                    "optim": {"lr": 1e-2},
                    "train": {"batch_size": 4, "max_steps": 4, "progress": False},
                },
                "dpo": {
                    "data": {"path": str(pairs), "val_fraction": 0.25, "max_length": 64},
                    "peft": {"method": "full"},
                    "optim": {"lr": 5e-3},
                    "train": {"batch_size": 4, "max_steps": 10, "save_every": 5, "progress": False},
                },
                "eval": {
                    "suites": ["loss", "exact_match", "preference"],
                    "data": str(convs),
                    "limit": 4,
                    "max_new_tokens": 4,
                    "preference_data": str(pairs),
                },
            }
        )
    )
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, str(killer), "run", str(recipe), "--out", str(killed)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (killed / "sft" / "summary.json").is_file() and not (killed / "dpo" / "summary.json").exists()
    assert (killed / "dpo" / "metrics.jsonl").read_text().endswith('{"step": 7, "lo')
    sft_stamp = (killed / "sft" / "summary.json").stat().st_mtime_ns

    capsys.readouterr()
    resumed = run(recipe, out=killed)
    out = capsys.readouterr().out
    assert "stage sft: already finished, skipped" in out and "resuming from" in out and "(step 5 of 10)" in out
    assert (killed / "sft" / "summary.json").stat().st_mtime_ns == sft_stamp

    uninterrupted = run(recipe, out=whole)
    curve = lambda root: [
        (r["step"], r["loss"])
        for r in map(
            json.loads,
            (root / "dpo" / "metrics.jsonl")  # noqa: E731
            .read_text()
            .splitlines(),
        )
        if "loss" in r
    ]
    assert [s for s, _ in curve(killed)] == list(range(1, 11))
    for (_, a), (_, b) in zip(curve(killed), curve(whole)):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    weights = [load_file(next((root / "dpo" / "final").glob("*.safetensors"))) for root in (killed, whole)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-5, atol=1e-6)
    assert set(resumed["table"]) == {"base", "sft", "dpo"}
    for name, row in uninterrupted["table"].items():
        for metric, value in row.items():
            assert resumed["table"][name][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, metric)
    assert (killed / "report.html").is_file()


def _checksums(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_changed_stage_config_on_rerun_is_an_error_that_touches_nothing(tmp_path):
    """`run ... sft.train.max_steps=50` after a finished run: not a skip of the 2-step SFT with 50
    written into the recipe's config.yaml, but exit 2 naming the key, old and new value."""
    recipe, out = _tiny_recipe(tmp_path), tmp_path / "run"
    run(recipe, out=out)
    before = _checksums(out)
    with pytest.raises(InputError, match=r"train.max_steps: 2 -> 50") as err:
        run(recipe, out=out, overrides=["sft.train.max_steps=50"])
    assert "--from sft" in str(err.value) and "--overwrite" in str(err.value)
    assert _checksums(out) == before
    with pytest.raises(InputError, match=r"limit: 4 -> 2"):
        run(recipe, out=out, overrides=["eval.limit=2"])
    assert _checksums(out) == before


def test_from_overwrite_and_a_new_out_rerun_what_changed(tmp_path):
    recipe, out = _tiny_recipe(tmp_path), tmp_path / "run"
    run(recipe, out=out)
    sft_stamp = (out / "sft" / "summary.json").stat().st_mtime_ns
    run(recipe, out=out, overrides=["eval.limit=2"], from_stage="eval")  # sft kept, eval redone
    assert (out / "sft" / "summary.json").stat().st_mtime_ns == sft_stamp
    assert "limit: 2" in (out / "eval" / "config.yaml").read_text()
    summary = run(recipe, out=out, overrides=["eval.limit=2", "sft.train.max_steps=3"], overwrite=True)
    assert summary["stages"]["sft"]["steps"] == 3  # the first changed stage and all after it reran
    other = run(recipe, out=tmp_path / "other", overrides=["sft.train.max_steps=1"])
    assert other["stages"]["sft"]["steps"] == 1


def test_temporary_folders_of_an_interrupted_stage_are_removed_on_the_next_run(tmp_path):
    recipe, out = _tiny_recipe(tmp_path), tmp_path / "run"
    stale = out / "eval.tmp-x1y2z3"
    stale.mkdir(parents=True)
    (stale / "base.json").write_text("{}")
    run(recipe, out=out)
    assert not stale.exists() and (out / "eval" / "summary.json").is_file()


def test_the_rlvr_recipe_runs_end_to_end_and_scores_its_shipped_held_out_prompts(tmp_path):
    """The shipped rlvr recipe, shrunk onto a tiny model: GRPO with the IFEval checkers as the
    reward, then the ifeval suite on ``shipped:rlvr_prompts/test`` (a ``shipped:`` name, which
    the suite once failed to resolve after the whole PPO stage had run)."""
    model = tiny_model_dir(tmp_path / "tiny")
    overrides = [
        f"model={model}",
        "ppo.train.max_steps=1",
        "ppo.train.batch_size=4",
        "ppo.rollout_batch_size=2",
        "ppo.group_size=2",
        "ppo.max_new_tokens=4",
        "ppo.data.limit=4",
        "eval.limit=3",
        "eval.max_new_tokens=4",
    ]
    out = tmp_path / "run"
    summary = run(RECIPES_DIR / "rlvr.yaml", out=out, overrides=overrides)
    assert set(summary["table"]) == {"base", "ppo"}
    for row in summary["table"].values():
        assert row["n"] == 3 and 0.0 <= row["prompt_level_loose"] <= 1.0
    metrics = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    # the checkers' scores: the share of a prompt's 1 or 2 constraints followed, so each response
    # scores 0, 0.5 or 1 and the mean of 2 prompts x 2 responses is a multiple of 1/8
    assert (metrics[0]["score_mean"] * 8) == pytest.approx(round(metrics[0]["score_mean"] * 8))
