"""`evaluate` and `instructkit eval`: suites sharing one generation, --responses without a model,
k-shot for every suite, seeded sampling, errors, and a tiny model end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import instructkit.eval.reward
import instructkit.generation
import instructkit.models.loading
from instructkit.cli import main
from instructkit.errors import InputError
from instructkit.eval.run import SUITES, evaluate, resolve_suites
from tests.tiny import tiny_model_dir, write_jsonl

REFERENCES = ["positive", "negative", "positive"]


def held_out(tmp_path: Path) -> Path:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Label the review."},
                {"role": "user", "content": f"review {i}"},
                {"role": "assistant", "content": ref},
            ]
        }
        for i, ref in enumerate(REFERENCES)
    ]
    return write_jsonl(tmp_path / "held_out.jsonl", rows)


def shots_file(tmp_path: Path) -> Path:
    return write_jsonl(
        tmp_path / "shots.jsonl",
        [{"messages": [{"role": "user", "content": "shot q"}, {"role": "assistant", "content": "shot a"}]}],
    )


def test_suite_names_aliases_and_did_you_mean():
    assert resolve_suites(["loss", "f1", "accuracy", "exact_match"]) == ["perplexity", "accuracy", "exact_match"]
    with pytest.raises(InputError, match="did you mean 'rouge'"):
        resolve_suites(["rogue"])
    assert {
        "exact_match",
        "accuracy",
        "bleu",
        "rouge",
        "reward",
        "winrate",
        "perplexity",
        "ifeval",
        "preference",
        "refusal",
        "injection",
        "robustness",
    } == set(SUITES)


def test_responses_are_scored_by_every_suite_without_loading_a_model(tmp_path, monkeypatch):
    """Given answers: " Positive." (key 0: label right, exact match wrong), "positive" (matched by
    prompt text; wrong label), "positive" (right). Exact match 1/3, accuracy 2/3."""

    def no_model(*args, **kwargs):
        raise AssertionError("no model may be loaded when responses are given")

    monkeypatch.setattr(instructkit.models.loading, "load_model_and_tokenizer", no_model)
    monkeypatch.setattr(instructkit.generation, "generate", no_model)
    data = held_out(tmp_path)
    given = write_jsonl(
        tmp_path / "given.jsonl",
        [
            {"key": 0, "response": " Positive."},
            {"prompt": "review 1", "response": "positive"},
            {"key": "2", "response": "positive"},
        ],
    )
    out = tmp_path / "eval.json"
    result = evaluate(
        model=None,
        suites=["exact_match", "accuracy", "bleu", "rouge"],
        data=str(data),
        responses=str(given),
        out=str(out),
        k_shot=3,
    )
    m = json.loads(out.read_text())
    assert m["exact_match"] == pytest.approx(1 / 3) and m["accuracy"] == pytest.approx(2 / 3)
    assert {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "f1_macro", "per_label"} <= set(m)
    assert m["model"] is None and m["responses"] == str(given) and m["generation"]["decoding"] == "given"
    lines = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert lines == result["samples"] and len(lines) == 3
    assert lines[0]["prompt"] == "review 0" and lines[0]["response"] == " Positive."
    assert lines[0]["reference"] == "positive" and lines[0]["correct"] is False and lines[0]["label_correct"] is True
    assert {"bleu", "chrf", "rouge1", "rougeL"} <= set(lines[1])


def test_missing_response_names_the_record_and_exits_2(tmp_path, capsys):
    data = held_out(tmp_path)
    given = write_jsonl(
        tmp_path / "given.jsonl", [{"key": 0, "response": "positive"}, {"key": 1, "response": "negative"}]
    )
    with pytest.raises(InputError, match="no response for held-out record 2") as err:
        evaluate(suites=["rouge"], data=str(data), responses=str(given))
    assert err.value.file == str(given)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"key": 0, "response": 3}])
    assert main(["eval", "--suite", "bleu", "--data", str(data), "--responses", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "field 'response'" in err
    assert main(["eval", "--suite", "loss", "--data", str(data), "--responses", str(given)]) == 2
    assert "perplexity" in capsys.readouterr().err


class CountingGenerate:
    """Answers every prompt with a fixed text per model, recording each call."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, model, tokenizer, prompts, **kwargs):
        self.calls.append({"model": model, "prompts": prompts, **kwargs})
        return [f"{model} positive" if model == "A" else "positive" for _ in prompts]


def test_one_generation_per_model_shared_by_every_suite(tmp_path, monkeypatch):
    """Six suites, two models (A and the winrate baseline B): generate runs exactly twice, with
    the same k-shot prompts, seed and temperature for both; the reward judge runs once per model."""
    fake = CountingGenerate()
    loads: list[str] = []
    judged: list[list[str]] = []
    monkeypatch.setattr(instructkit.generation, "generate", fake)
    monkeypatch.setattr(
        instructkit.models.loading, "load_model_and_tokenizer", lambda spec: loads.append(spec) or (spec, f"tok-{spec}")
    )

    def judge(self, prompts, responses):
        judged.append(list(responses))
        return [float(len(r)) for r in responses]  # longer wins: A ("A positive") beats B

    monkeypatch.setattr(instructkit.eval.reward.RewardJudge, "__call__", judge)
    data = held_out(tmp_path)
    result = evaluate(
        model="A",
        baseline="B",
        reward_model="rm",
        data=str(data),
        k_shot=1,
        shots_data=str(shots_file(tmp_path)),
        seed=7,
        temperature=0.7,
        suites=["exact_match", "accuracy", "bleu", "rouge", "reward", "winrate"],
    )
    assert loads == ["A", "B"] and [c["model"] for c in fake.calls] == ["A", "B"]
    assert len(judged) == 2
    for call in fake.calls:
        assert (call["seed"], call["temperature"]) == (7, 0.7)
        assert [(m.role, m.content) for m in call["prompts"][0]] == [
            ("system", "Label the review."),
            ("user", "shot q"),
            ("assistant", "shot a"),
            ("user", "review 0"),
        ]
    m = result["metrics"]
    assert m["exact_match"] == 0.0 and m["wins"] == 3 and m["win_rate"] == 1.0
    assert m["reward_mean"] == len("A positive") and m["baseline_reward_mean"] == len("positive")
    assert m["generation"] == {"decoding": "sampled", "temperature": 0.7, "seed": 7, "max_new_tokens": 64}
    assert result["samples"][0]["baseline_response"] == "positive"


def test_greedy_is_the_default(tmp_path, monkeypatch):
    fake = CountingGenerate()
    monkeypatch.setattr(instructkit.generation, "generate", fake)
    result = evaluate(model="A", loaded=("A", None), suites=["exact_match"], data=str(held_out(tmp_path)))
    assert fake.calls[0]["temperature"] == 0.0 and result["metrics"]["generation"]["decoding"] == "greedy"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def test_sampling_is_reproducible_with_a_seed(tiny, tmp_path):
    """Same seed, same responses; the samples are drawn at temperature 1 from a random model,
    so a different seed gives different text (over 3 prompts x 8 tokens of a 49k vocabulary)."""
    data = str(held_out(tmp_path))
    run = lambda seed: [
        s["response"]
        for s in evaluate(  # noqa: E731
            model=str(tiny), suites=["rouge"], data=data, max_new_tokens=8, temperature=1.0, seed=seed
        )["samples"]
    ]
    first = run(3)
    assert run(3) == first and run(4) != first


def test_tiny_model_end_to_end_through_the_cli(tiny, tmp_path, capsys):
    data = held_out(tmp_path)
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny),
                "--suite",
                "exact_match,f1,bleu,rouge,loss",
                "--data",
                str(data),
                "--out",
                str(out),
                "--max-new-tokens",
                "4",
                "--batch-size",
                "2",
                "--k-shot",
                "1",
                "--shots-from",
                str(shots_file(tmp_path)),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    m = json.loads(out.read_text())
    assert printed["n"] == m["n"] == 3 and m["k_shot"] == 1
    assert {"exact_match", "accuracy", "f1_macro", "bleu", "chrf", "rouge1", "loss", "perplexity"} <= set(m)
    assert m["perplexity"] > 1 and 0 <= m["rougeL"] <= 1
    lines = out.with_suffix(".samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(isinstance(json.loads(line)["response"], str) for line in lines)

    assert main(["eval", "--model", str(tiny), "--suite", "rogue", "--data", str(data)]) == 2
    assert "did you mean 'rouge'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny), "--suite", "reward", "--data", str(data)]) == 2
    assert "--reward-model" in capsys.readouterr().err
