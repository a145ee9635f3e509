"""The reward and winrate suites: judged by a tiny reward model built in the test, checked
against the same reward model's scores computed directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import instructkit.models.loading
from instructkit.data.schema import Message
from instructkit.errors import InputError
from instructkit.eval.reward import score_reward, score_winrate
from instructkit.eval.run import evaluate
from tests.tiny import tiny_llama, write_jsonl


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    """A random one-label classifier over a tiny Llama, saved like `instructkit rm` saves one."""
    from instructkit.models.loading import load_tokenizer
    from instructkit.models.reward_model import BIAS_KEY, reward_model_from_causal_lm

    tokenizer = load_tokenizer("smollm2-135m-instruct")  # a fresh one: the pad token is changed
    causal = tiny_llama(len(tokenizer), seed=1)
    causal.config.eos_token_id = tokenizer.eos_token_id
    model = reward_model_from_causal_lm(causal, tokenizer)
    setattr(model.config, BIAS_KEY, 0.25)
    path = tmp_path_factory.mktemp("rm") / "final"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def held_out(tmp_path: Path) -> Path:
    rows = [
        {
            "key": f"k{i}",
            "messages": [{"role": "user", "content": f"name a colour {i}"}, {"role": "assistant", "content": "red"}],
        }
        for i in range(4)
    ]
    return write_jsonl(tmp_path / "held_out.jsonl", rows)


def test_score_reward_and_winrate_by_hand():
    """Rewards 1, 2, 3: mean 2, population std sqrt(2/3). Against 1, 3, 3: 1 = 1 tie, 2 < 3 loss,
    3 = 3 tie -> W 0, T 2, L 1, win rate (0 + 2/2) / 3 = 1/3; baseline mean 7/3."""
    metrics, per = score_reward([1.0, 2.0, 3.0])
    assert metrics == pytest.approx({"reward_mean": 2.0, "reward_std": (2 / 3) ** 0.5})
    assert [p["reward"] for p in per] == [1.0, 2.0, 3.0]
    metrics, per = score_winrate([1.0, 2.0, 3.0], [1.0, 3.0, 3.0], ["x", "y", "z"])
    assert (metrics["wins"], metrics["ties"], metrics["losses"]) == (0, 2, 1)
    assert metrics["win_rate"] == pytest.approx(1 / 3) and metrics["baseline_reward_mean"] == pytest.approx(7 / 3)
    assert [p["outcome"] for p in per] == ["tie", "loss", "tie"] and per[1]["baseline_response"] == "y"


def test_reward_and_winrate_from_response_files(reward_model, tmp_path, monkeypatch):
    """A answers "red" twice and "blue" twice; B answers "red" everywhere. The two "red" prompts
    are exact ties (same text, same prompt, same score); the other two are decided by the reward
    model, whose scores we compute directly with `score` and compare outcome by outcome."""
    from instructkit.models.reward_model import load_reward_model, score

    def no_model(*args, **kwargs):
        raise AssertionError("no policy model may be loaded when responses are given")

    monkeypatch.setattr(instructkit.models.loading, "load_model_and_tokenizer", no_model)
    data = held_out(tmp_path)
    texts_a = ["red", "blue", "red", "blue"]
    a = write_jsonl(tmp_path / "a.jsonl", [{"key": f"k{i}", "response": t} for i, t in enumerate(texts_a)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"name a colour {i}", "response": "red"} for i in range(4)])
    out = tmp_path / "winrate.json"
    result = evaluate(
        suites=["reward", "winrate"],
        data=str(data),
        responses=str(a),
        baseline_responses=str(b),
        reward_model=str(reward_model),
        out=str(out),
    )

    model, tokenizer, bias = load_reward_model(reward_model)
    assert bias == 0.25
    prompts = [[Message("user", f"name a colour {i}")] for i in range(4)]
    direct_a = score(model, tokenizer, prompts, [[Message("assistant", t)] for t in texts_a], bias=bias)
    direct_b = score(model, tokenizer, prompts, [[Message("assistant", "red")]] * 4, bias=bias)
    m = result["metrics"]
    assert m["reward_mean"] == pytest.approx(sum(direct_a) / 4, abs=1e-5)
    assert m["baseline_reward_mean"] == pytest.approx(sum(direct_b) / 4, abs=1e-5)
    expected = [
        "tie",
        "win" if direct_a[1] > direct_b[1] else "loss",
        "tie",
        "win" if direct_a[3] > direct_b[3] else "loss",
    ]
    assert [s["outcome"] for s in result["samples"]] == expected
    assert m["ties"] == 2 and m["wins"] + m["losses"] == 2
    assert m["win_rate"] == pytest.approx((m["wins"] + 1) / 4)
    assert m["win_rate_ci_low"] <= m["win_rate"] <= m["win_rate_ci_high"]
    assert m["judge"] == {"reward_model": str(reward_model), "tie_margin": 0.0, "baseline": str(b)}
    lines = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert [s["key"] for s in lines] == ["k0", "k1", "k2", "k3"]
    assert {"prompt", "response", "reward", "baseline_response", "baseline_reward", "outcome"} <= set(lines[1])

    # A huge tie margin makes every prompt a tie: win rate 1/2.
    wide = evaluate(
        suites=["winrate"],
        data=str(data),
        responses=str(a),
        baseline_responses=str(b),
        reward_model=str(reward_model),
        tie_margin=1e9,
    )["metrics"]
    assert (wide["ties"], wide["win_rate"]) == (4, 0.5)


def test_missing_reward_model_and_baseline_are_input_errors(tmp_path):
    data = held_out(tmp_path)
    a = write_jsonl(tmp_path / "a.jsonl", [{"key": f"k{i}", "response": "red"} for i in range(4)])
    with pytest.raises(InputError, match="--reward-model") as err:
        evaluate(suites=["reward"], data=str(data), responses=str(a))
    assert err.value.field == "reward_model"
    with pytest.raises(InputError, match="exactly one of --baseline"):
        evaluate(suites=["winrate"], data=str(data), responses=str(a), reward_model="rm")
    with pytest.raises(InputError, match="tie_margin"):
        evaluate(
            suites=["winrate"],
            data=str(data),
            responses=str(a),
            reward_model="rm",
            baseline_responses=str(a),
            tie_margin=-0.5,
        )
