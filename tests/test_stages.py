"""The one stage registry, typed enumerations that match their registries, and recipes validated
whole before anything runs (typos, missing data files, bad overrides: exit 2, located, no folder)."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from instructkit import config as config_module
from instructkit.stages import RECIPES_DIR, STAGES, load_recipe, shipped_recipes
from tests.tiny import toy_conversations, toy_preferences, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "instructkit", *args], capture_output=True, text=True, cwd=cwd or REPO, timeout=120
    )


def test_cli_stage_commands_are_the_registry_entries():
    from instructkit.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = {name for name, entry in STAGES.items() if entry.command}
    assert commands <= set(sub.choices) and "eval" in STAGES and not STAGES["eval"].command
    for name in commands:  # each command's function is importable and takes the override list
        assert callable(STAGES[name].load())


@pytest.mark.parametrize(
    ("literal", "registry"),
    [
        ("PeftMethod", "instructkit.models.peft_methods:METHODS"),
        ("PreferenceLoss", "instructkit.losses.preference:PREFERENCE_LOSSES"),
        ("Advantage", "instructkit.losses.rl:ADVANTAGE_ESTIMATORS"),
        ("KLEstimator", "instructkit.losses.rl:KL_ESTIMATORS"),
        ("DataFormat", "instructkit.data.formats:FORMATS_BY_NAME"),
    ],
)
def test_config_enumerations_equal_their_registries(literal, registry):
    import importlib

    module, name = registry.split(":")
    keys = set(getattr(importlib.import_module(module), name))
    assert set(typing.get_args(getattr(config_module, literal))) == keys


def test_suite_and_template_choices_equal_their_registries():
    from instructkit.data.templates import FALLBACK_TEMPLATES, OWN_TEMPLATE
    from instructkit.eval.run import ALIASES, SUITES
    from instructkit.losses.rl import ADVANTAGE_ESTIMATORS

    assert set(typing.get_args(config_module.Suite)) == set(SUITES) | set(ALIASES)
    assert set(config_module.NAMED_TEMPLATES) == {OWN_TEMPLATE, *FALLBACK_TEMPLATES}
    assert set(config_module.GROUP_RELATIVE) == {n for n, e in ADVANTAGE_ESTIMATORS.items() if e.group_relative}


def test_help_imports_no_torch():
    code = (
        "import sys; from instructkit.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_shipped_recipes_have_one_source():
    """The repository's recipes/ is a link to the package's copy, so the two cannot drift."""
    link = REPO / "recipes"
    assert link.is_symlink() and link.resolve() == RECIPES_DIR
    listed = cli("run", "--list")
    assert listed.returncode == 0
    for name in shipped_recipes():
        assert name in listed.stdout


def _recipe(tmp_path: Path, **changes) -> Path:
    convs = write_jsonl(tmp_path / "train.jsonl", toy_conversations(8))
    prefs = write_jsonl(tmp_path / "pairs.jsonl", toy_preferences(8))
    recipe = {
        "name": "t",
        "model": "smollm2-135m-instruct",
        "stages": ["sft", "dpo", "eval"],
        "sft": {"data": {"path": str(convs)}, "train": {"max_steps": 1}},
        "dpo": {"data": {"path": str(prefs)}, "loss": "sigmoid", "train": {"max_steps": 1}},
        "eval": {"suites": ["exact_match"], "data": str(convs)},
    }
    for dotted, value in changes.items():
        node = recipe
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_typo_in_the_last_stage_fails_before_any_stage_starts(tmp_path):
    recipe = _recipe(tmp_path, eval__suites=["exact_match", "preferense"])
    out = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    line = _line_of(recipe, "suites:")
    assert f"recipe.yaml:{line}" in out.stderr and "eval.suites" in out.stderr
    assert "did you mean 'preference'" in out.stderr
    assert not (tmp_path / "run").exists()


def test_enumerated_typo_in_a_later_stage_names_file_line_and_suggestion(tmp_path):
    recipe = _recipe(tmp_path, dpo__loss="sigmod")
    out = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert out.returncode == 2
    assert f"recipe.yaml:{_line_of(recipe, 'loss: sigmod')}, field 'dpo.loss'" in out.stderr
    assert "did you mean 'sigmoid'" in out.stderr and not (tmp_path / "run").exists()


def test_missing_data_file_of_the_second_stage_fails_before_any_stage_starts(tmp_path):
    recipe = _recipe(tmp_path, dpo__data={"path": str(tmp_path / "pairs.jsnl")})
    out = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert out.returncode == 2, out.stderr
    assert "dpo.data.path" in out.stderr and "no such file" in out.stderr
    assert f"did you mean '{tmp_path / 'pairs.jsonl'}'" in out.stderr
    assert "recipe.yaml:" in out.stderr and not (tmp_path / "run").exists()


def test_data_of_the_wrong_kind_is_caught_up_front(tmp_path):
    """Demonstrations given to the DPO stage: found by reading the file, before SFT trains."""
    recipe = _recipe(tmp_path, dpo__data={"path": str(tmp_path / "train.jsonl")})
    out = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert out.returncode == 2 and "dpo.data.path" in out.stderr and "Conversation" in out.stderr
    assert not (tmp_path / "run").exists()


def test_a_bad_override_names_the_override_not_the_file(tmp_path):
    recipe = _recipe(tmp_path)
    out = cli("run", str(recipe), "--out", str(tmp_path / "run"), "dpo.loss=sigmod")
    assert out.returncode == 2
    assert "override 'dpo.loss=sigmod'" in out.stderr and "did you mean 'sigmoid'" in out.stderr
    assert "recipe.yaml" not in out.stderr and not (tmp_path / "run").exists()
    out = cli("run", str(recipe), "--out", str(tmp_path / "run"), "sft.optim.lr=-1")
    assert out.returncode == 2 and "override 'sft.optim.lr=-1'" in out.stderr and "positive" in out.stderr


def test_stage_command_on_a_recipe_locates_override_errors_as_typed(tmp_path):
    recipe = _recipe(tmp_path)
    out = cli("sft", "--config", str(recipe), "peft.method=lorra")
    assert out.returncode == 2 and "override 'peft.method=lorra'" in out.stderr
    assert "did you mean 'lora'" in out.stderr


def test_every_shipped_recipe_passes_the_up_front_checks():
    from instructkit.pipeline import check_data, plan_stages

    for path in shipped_recipes().values():
        loaded = load_recipe(path)
        check_data(plan_stages(loaded, Path("unused")), loaded)  # raises on a missing or bad file


def test_recipe_stage_sections_are_validated_even_when_not_run(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        json.dumps({"stages": ["sft"], "sft": {"data": {"path": "x.jsonl"}}, "ppo": {"advantage": "grpoo"}})
    )
    from instructkit.errors import InputError

    with pytest.raises(InputError, match="did you mean 'grpo'"):
        load_recipe(path)


def test_a_ppo_stage_without_a_reward_fails_before_sft_trains(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}] * 4)
    recipe = _recipe(tmp_path)
    import yaml

    data = yaml.safe_load(recipe.read_text())
    data["stages"] = ["sft", "ppo"]
    data["ppo"] = {"data": {"path": str(prompts)}, "train": {"max_steps": 1}}
    recipe.write_text(yaml.safe_dump(data))
    out = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert out.returncode == 2 and "ppo.reward" in out.stderr and "rm stage" in out.stderr
    assert not (tmp_path / "run").exists()
