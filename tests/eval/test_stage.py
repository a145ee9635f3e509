"""The recipe's eval stage: every model into one folder, each own-format suite in files of its
own, k-shot only where demonstrations apply, the numbers equal to `evaluate` called directly,
and the folder written whole or not at all."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from instructkit.errors import InputError
from instructkit.eval.run import evaluate
from instructkit.eval.stage import eval_stage
from tests.tiny import tiny_model_dir, toy_conversations, toy_preferences, write_jsonl


@dataclasses.dataclass
class StageConfig:
    """The fields of the recipe's eval section (instructkit.pipeline.EvalStageConfig)."""

    suites: list[str]
    data: str
    preference_data: str
    max_new_tokens: int = 4
    batch_size: int = 2
    k_shot: int = 1
    limit: int | None = 3
    footprint: bool = False
    footprint_prompts: int = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, StageConfig]:
    root = tmp_path_factory.mktemp("stage")
    model = tiny_model_dir(root / "tiny")
    convs = write_jsonl(root / "convs.jsonl", toy_conversations(5))
    pairs = write_jsonl(root / "pairs.jsonl", toy_preferences(5))
    return model, StageConfig(["exact_match", "loss", "preference"], str(convs), str(pairs))


def test_files_table_and_numbers_match_evaluate(setup, tmp_path):
    model, cfg = setup
    out = tmp_path / "eval"
    summary = eval_stage(cfg, [("base", str(model)), ("sft", str(model))], out)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["stage"] == "eval" and summary["data"] == cfg.data
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "summary.json",
            "base.json",
            "base.samples.jsonl",
            "base_1-shot.json",
            "base_1-shot.samples.jsonl",
            "sft.json",
            "sft.samples.jsonl",
            "base.preference.json",
            "base.preference.samples.jsonl",
            "sft.preference.json",
            "sft.preference.samples.jsonl",
        ]
    )
    table = summary["table"]
    assert list(table) == ["base", "base 1-shot", "sft"]
    assert {"exact_match", "loss", "perplexity", "pref_accuracy", "pref_margin"} <= set(table["base"])
    assert "pref_accuracy" not in table["base 1-shot"]  # demonstrations change no log-likelihood
    assert table["base"]["n"] == 3 and table["base 1-shot"]["k_shot"] == 1

    direct = evaluate(model=str(model), suites=["preference"], data=cfg.preference_data, limit=3)["metrics"]
    assert table["base"]["pref_margin"] == pytest.approx(direct["pref_margin"])
    conv = evaluate(model=str(model), suites=["exact_match", "loss"], data=cfg.data, limit=3, max_new_tokens=4)
    assert table["sft"]["perplexity"] == pytest.approx(conv["metrics"]["perplexity"])
    for name in ("base.json", "base.preference.json", "base_1-shot.json"):
        written = json.loads((out / name).read_text())
        assert written["model"] == str(model) and written["data"] in (cfg.data, cfg.preference_data)
    samples = (out / "base.preference.samples.jsonl").read_text().splitlines()
    assert len(samples) == 3 and "prefers_chosen" in json.loads(samples[0])


def test_a_failing_model_leaves_the_previous_folder_as_it_was(setup, tmp_path):
    model, cfg = setup
    out = tmp_path / "eval"
    cfg = dataclasses.replace(cfg, suites=["loss"], k_shot=0)
    eval_stage(cfg, [("base", str(model))], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(InputError, match="no such model"):
        eval_stage(cfg, [("base", str(model)), ("broken", str(tmp_path / "missing"))], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]  # no temporary folder left behind
