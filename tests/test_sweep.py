"""`instructkit sweep`: the space file checked up front, a 6-trial TPE search on a tiny model that
prunes, a best trial that reproduces alone, a grid in two worker processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructkit.cli import main
from instructkit.errors import InputError
from instructkit.sweep import Param, load_space, sweep
from tests.tiny import tiny_model_dir, toy_conversations, write_jsonl


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    tiny = tiny_model_dir(root / "tiny")
    data = write_jsonl(root / "train.jsonl", toy_conversations(40))
    path = root / "recipe.yaml"
    path.write_text(
        json.dumps(
            {
                "name": "tiny-sweep",
                "model": str(tiny),
                "stages": ["sft"],
                "sft": {
                    "data": {"path": str(data), "val_fraction": 0.2, "max_length": 64},
                    "peft": {"method": "lora", "r": 4, "alpha": 8},
                    "optim": {"lr": 1e-3, "scheduler": "constant", "warmup_steps": 0},
                    "train": {"batch_size": 8, "max_steps": 6, "eval_every": 1, "progress": False},
                },
            }
        )
    )
    return path


def write_space(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


LR_AND_RANK = """\
sft.optim.lr: {type: float, low: 1.0e-5, high: 0.3, log: true}
sft.peft.r: {type: int, low: 2, high: 8}
"""


# ----------------------------------------------------------------------------------------------
# The space file


def test_a_space_file_loads_into_its_parameters(tmp_path):
    space = write_space(tmp_path / "s.yaml", LR_AND_RANK + "sft.optim.scheduler: {type: categorical, choices: [cosine, linear]}\n")  # fmt: skip
    assert load_space(space) == [
        Param("sft.optim.lr", "float", 1e-5, 0.3, log=True),
        Param("sft.peft.r", "int", 2, 8),
        Param("sft.optim.scheduler", "categorical", choices=("cosine", "linear")),
    ]
    assert Param("sft.peft.r", "int", 2, 8, step=2).grid() == [2, 4, 6, 8]


@pytest.mark.parametrize(
    ("text", "line", "key", "problem"),
    [
        ("sft.optim.lr: {type: float, low: 1.0e-5, high: 0.1}\nsft.optim.lrr: {type: float, low: 0, high: 1}\n",
         2, "sft.optim.lrr", "did you mean 'lr'"),
        ("sfft.optim.lr: {type: float, low: 0.1, high: 0.2}\n", 1, "sfft.optim.lr", "did you mean 'sft'"),
        ("sft.optim: {type: float, low: 0.1, high: 0.2}\n", 1, "sft.optim", "a section"),
        ("sft.optim.lr: {type: float, low: 0.2, high: 0.1}\n", 1, "sft.optim.lr", "must be below high"),
        ("sft.optim.lr: {type: float, low: 0, high: 0.1, log: true}\n", 1, "sft.optim.lr", "low > 0"),
        ("sft.peft.r: {type: int, low: 2.5, high: 8}\n", 1, "sft.peft.r", "an integer"),
        ("sft.peft.r: {type: integer, low: 2, high: 8}\n", 1, "sft.peft.r", "type: float|int|categorical"),
        ("sft.peft.r: {type: int, low: 2, high: 8, choices: [1]}\n", 1, "sft.peft.r", "unknown field 'choices'"),
        ("sft.optim.scheduler: {type: categorical, choices: []}\n", 1, "sft.optim.scheduler", "non-empty list"),
    ],
)  # fmt: skip
def test_a_bad_space_is_an_error_at_its_line_and_key(tmp_path, text, line, key, problem):
    space = write_space(tmp_path / "s.yaml", text)
    with pytest.raises(InputError) as err:
        load_space(space)
    message = str(err.value)
    assert f"{space}:{line}" in message and key in message and problem in message, message


def test_a_range_end_the_recipe_rejects_is_caught_before_any_trial(recipe, tmp_path):
    """peft.r must be at least 1 (PeftConfig): a range from 0 fails at the space's line."""
    space = write_space(tmp_path / "s.yaml", "sft.optim.lr: {type: float, low: 0.001, high: 0.1}\nsft.peft.r: {type: int, low: 0, high: 4}\n")  # fmt: skip
    with pytest.raises(InputError, match=r"s\.yaml:2.*sft\.peft\.r.*rejects sft\.peft\.r=0"):
        sweep(recipe, space, out=tmp_path / "out", trials=2)
    assert not (tmp_path / "out").exists()


def test_the_cli_exits_2_with_the_place(recipe, tmp_path, capsys):
    space = write_space(tmp_path / "s.yaml", "sft.optim.lrr: {type: float, low: 0.001, high: 0.1}\n")
    assert main(["sweep", str(recipe), "--space", str(space), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{space}:1" in err and "sft.optim.lrr" in err and "did you mean 'lr'" in err
    assert main(["sweep", str(recipe), "--space", str(space), "--sampler", "tps"]) == 2
    assert "did you mean 'tpe'" in capsys.readouterr().err


def test_ray_backend_says_it_is_not_installed(recipe, tmp_path):
    pytest.importorskip("optuna")
    try:
        import ray  # noqa: F401

        pytest.skip("ray is installed here; the path is untested")
    except ImportError:
        pass
    space = write_space(tmp_path / "s.yaml", LR_AND_RANK)
    with pytest.raises(InputError, match="ray.*not installed"):
        sweep(recipe, space, out=tmp_path / "out", trials=2, backend="ray")


# ----------------------------------------------------------------------------------------------
# Searches


def test_six_trials_over_lr_and_rank_prune_early_and_the_best_reproduces_alone(recipe, tmp_path):
    """TPE (seed 0) over lr in [1e-5, 0.3] (log) and LoRA rank in [2, 8], 6 steps a trial with a
    held-out loss after each, the median pruner after 2 finished trials: at least one trial stops
    before step 6 because its held-out loss at some step is worse than the median of earlier
    trials at that step. The best trial's overrides, run alone, give its val_loss again (the run
    is deterministic on the CPU: same seed, same data order)."""
    from instructkit.pipeline import run

    space = write_space(tmp_path / "s.yaml", LR_AND_RANK)
    out = tmp_path / "sweep"
    summary = sweep(recipe, space, out=out, trials=6)
    trials = summary["trials"]
    assert len(trials) == 6 and {t["state"] for t in trials} <= {"complete", "pruned"}
    pruned = [t for t in trials if t["state"] == "pruned"]
    assert pruned and all(t["last_step"] < 6 for t in pruned), [(t["state"], t["last_step"]) for t in trials]
    complete = [t for t in trials if t["state"] == "complete"]
    for t in complete:  # each an ordinary run folder whose summary is the trial's value
        stage = json.loads((Path(t["folder"]) / "sft" / "summary.json").read_text())
        assert stage["val_loss"] == t["val_loss"] and stage["steps"] == 6
        assert sorted(int(s) for s in t["curve"]) == [1, 2, 3, 4, 5, 6]
    best = summary["best"]
    assert best["val_loss"] == min(t["val_loss"] for t in complete)
    assert json.loads((out / "sweep.json").read_text())["best"]["trial"] == best["trial"]
    assert "data:image/png;base64," in (out / "report.html").read_text()

    alone = run(recipe, out=tmp_path / "alone", overrides=summary["best_overrides"])
    assert alone["stages"]["sft"]["val_loss"] == pytest.approx(best["val_loss"], abs=1e-6)


def test_a_grid_in_two_worker_processes_runs_each_point_once(recipe, tmp_path):
    space = write_space(tmp_path / "s.yaml", "sft.peft.r: {type: categorical, choices: [2, 8]}\n")
    summary = sweep(recipe, space, out=tmp_path / "grid", trials=2, sampler="grid", jobs=2)
    assert sorted(t["params"]["sft.peft.r"] for t in summary["trials"]) == [2, 8]
    assert len({t["folder"] for t in summary["trials"]}) == 2
    for t in summary["trials"]:
        if t["state"] == "complete":
            assert (Path(t["folder"]) / "sft" / "summary.json").is_file()
