"""`instructkit eval --suite ifeval`: scoring given responses (no model) and generated ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructkit.cli import main
from instructkit.eval.run import evaluate
from tests.tiny import tiny_model_dir, write_jsonl


def benchmark_rows() -> list[dict]:
    return [
        {
            "key": 1,
            "prompt": "Say hi. Do not use any commas.",
            "instruction_id_list": ["punctuation:no_comma"],
            "kwargs": [{}],
        },
        {
            "key": 2,
            "prompt": "Write in lowercase, at least 20 words.",
            "instruction_id_list": ["change_case:english_lowercase", "length_constraints:number_words"],
            "kwargs": [{}, {"relation": "at least", "num_words": 20}],
        },
    ]


def test_given_responses_are_scored_without_a_model(tmp_path):
    """Prompt 1 passes (no comma); prompt 2's response is lowercase English but has 10 words,
    not 20: by hand, prompt-level strict = 1/2 and instruction-level strict = 2/3."""
    data = write_jsonl(tmp_path / "input.jsonl", benchmark_rows())
    responses = write_jsonl(
        tmp_path / "responses.jsonl",
        [
            {"key": 1, "response": "hi there"},
            {
                "prompt": benchmark_rows()[1]["prompt"],
                "response": "this is a simple answer written in plain english words",
            },
        ],
    )
    out = tmp_path / "ifeval.json"
    result = evaluate(model=None, suites=["ifeval"], data=str(data), responses=str(responses), out=str(out))
    m = result["metrics"]
    assert m["prompt_level_strict"] == pytest.approx(0.5) and m["instruction_level_strict"] == pytest.approx(2 / 3)
    samples = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert [s["strict"] for s in samples] == [[True], [True, False]]
    assert samples[1]["response"].startswith("this is") and json.loads(out.read_text())["responses"] == str(responses)


def test_missing_response_and_mixed_suites_exit_2(tmp_path, capsys):
    data = write_jsonl(tmp_path / "input.jsonl", benchmark_rows())
    responses = write_jsonl(tmp_path / "responses.jsonl", [{"key": 1, "response": "hi"}])
    assert main(["eval", "--suite", "ifeval", "--data", str(data), "--responses", str(responses)]) == 2
    assert "no response for the prompt with key 2" in capsys.readouterr().err
    assert main(["eval", "--suite", "ifeval,exact_match", "--data", str(data)]) == 2
    assert "suite of its own" in capsys.readouterr().err


def test_responses_are_generated_when_a_model_is_given(tmp_path):
    model = tiny_model_dir(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "input.jsonl", benchmark_rows())
    result = evaluate(model=str(model), suites=["ifeval"], data=str(data), max_new_tokens=4, batch_size=2)
    assert result["metrics"]["num_prompts"] == 2 and all(isinstance(s["response"], str) for s in result["samples"])
    assert result["metrics"]["decoding"] == "greedy"


def test_the_real_benchmark_file_loads(shared_data: Path, tmp_path):
    rows = [json.loads(line) for line in (shared_data / "ifeval" / "input_data.jsonl").read_text().splitlines()]
    responses = write_jsonl(tmp_path / "r.jsonl", [{"key": r["key"], "response": "ok"} for r in rows])
    m = evaluate(
        model=None, suites=["ifeval"], data=str(shared_data / "ifeval" / "input_data.jsonl"), responses=str(responses)
    )["metrics"]
    assert m["num_prompts"] == 541 and 0 <= m["prompt_level_strict"] <= m["prompt_level_loose"] <= 1
