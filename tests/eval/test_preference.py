"""The `preference` suite: the model's own log-likelihood preference on held-out pairs."""

from __future__ import annotations

import pytest
import torch

from instructkit.errors import InputError
from instructkit.eval.preference import evaluate_preferences, log_prob_pairs, summarize
from instructkit.eval.run import evaluate
from tests.tiny import real_tokenizer, tiny_llama, tiny_model_dir, toy_preferences, write_jsonl


def test_summarize_by_hand():
    """Three pairs: margins +2, -1, 0 -> accuracy 1/3 (a tie does not count), mean margin 1/3.
    Per token: 2/1 - 4/4 = 1 > 0; -3/3 - (-2/1) = 1 > 0; -6/2 - (-6/3) = -1 < 0 -> 2/3."""
    scored = [
        {"chosen_logp": 2.0, "rejected_logp": 0.0, "chosen_tokens": 1, "rejected_tokens": 4},
        {"chosen_logp": -3.0, "rejected_logp": -2.0, "chosen_tokens": 3, "rejected_tokens": 1},
        {"chosen_logp": -6.0, "rejected_logp": -6.0, "chosen_tokens": 2, "rejected_tokens": 3},
    ]
    # third pair: per-token -3 vs -2 -> chosen loses; second pair: -1 vs -2 -> chosen wins
    out = summarize(scored)
    assert out["pref_accuracy"] == pytest.approx(1 / 3)
    assert out["pref_margin"] == pytest.approx(1 / 3)
    assert out["pref_accuracy_per_token"] == pytest.approx(2 / 3)
    assert out["pref_pairs"] == 3
    with pytest.raises(InputError):
        summarize([])


def _unbatched_logp(model, ids, labels) -> float:
    """Independent reference: one unpadded row, log_softmax over the full vocabulary, summed at
    the labelled positions (position t predicts token t + 1)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logps = torch.log_softmax(logits, -1)
    return sum(float(logps[t - 1, labels[t]]) for t in range(1, len(ids)) if labels[t] != -100)


def test_batched_log_probs_match_one_row_at_a_time_and_skip_what_does_not_fit():
    from instructkit.data.encoders import encode_preferences as encode_examples
    from instructkit.data.schema import Message, Preference

    tokenizer = real_tokenizer()
    model = tiny_llama(len(tokenizer)).eval()
    pairs = [
        Preference(
            [Message("user", "reverse: red blue")],
            [Message("assistant", "blue red")],
            [Message("assistant", "red blue wrong and longer than the chosen one")],
        ),
        Preference(
            [Message("user", "reverse: " + "cat " * 200)], [Message("assistant", "x")], [Message("assistant", "y")]
        ),  # prompt alone is longer than max_length: dropped
        Preference([Message("user", "reverse: sun")], [Message("assistant", "sun")], [Message("assistant", "moon")]),
    ]
    scored = log_prob_pairs(model, tokenizer, pairs, batch_size=2, max_length=64)
    assert [s["index"] for s in scored] == [0, 2]
    for s in scored:
        (encoded,), _ = encode_examples(tokenizer, [pairs[s["index"]]], template=None, max_length=64, paired=True)
        assert s["chosen_logp"] == pytest.approx(_unbatched_logp(model, *encoded["chosen"]), abs=1e-4)
        assert s["rejected_logp"] == pytest.approx(_unbatched_logp(model, *encoded["rejected"]), abs=1e-4)
        assert s["chosen_tokens"] == sum(1 for x in encoded["chosen"][1][1:] if x != -100)


def test_identical_responses_are_a_tie_and_the_suite_runs_through_evaluate(tmp_path):
    tokenizer = real_tokenizer()
    model = tiny_llama(len(tokenizer)).eval()
    rows = toy_preferences(6)
    rows[0]["rejected"] = rows[0]["chosen"]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = evaluate_preferences(model, tokenizer, data=str(data))
    first = result["samples"][0]
    assert first["chosen_logp"] == pytest.approx(first["rejected_logp"]) and not first["prefers_chosen"]
    assert result["pref_pairs"] == 6 == len(result["samples"])

    out = tmp_path / "pref.json"
    via_evaluate = evaluate(
        model="tiny", suites=["preference"], data=str(data), loaded=(model, tokenizer), out=str(out)
    )
    assert via_evaluate["metrics"]["pref_margin"] == pytest.approx(result["pref_margin"])
    assert out.is_file() and out.with_suffix(".samples.jsonl").read_text().count("\n") == 6
    with pytest.raises(InputError, match="suite of its own"):
        evaluate(model="tiny", suites=["preference", "exact_match"], data=str(data), loaded=(model, tokenizer))


def test_dpo_training_raises_the_held_out_preference(tmp_path):
    """A few DPO steps on toy pairs make the policy prefer held-out chosen responses more."""
    from instructkit.train.dpo import dpo

    model_dir = tiny_model_dir(tmp_path / "tiny")
    rows = toy_preferences(40)
    train, held_out = write_jsonl(tmp_path / "train.jsonl", rows[:32]), write_jsonl(tmp_path / "val.jsonl", rows[32:])
    from instructkit.models.loading import load_model_and_tokenizer

    before = evaluate(model=str(model_dir), suites=["preference"], data=str(held_out))["metrics"]
    dpo(
        {
            "model": str(model_dir),
            "out": str(tmp_path / "dpo"),
            "data": {"path": str(train), "val_fraction": 0.0},
            "peft": {"method": "full"},
            "optim": {"lr": 5e-3},
            "train": {"batch_size": 8, "max_steps": 12, "progress": False},
        }
    )
    after = evaluate(
        model=str(tmp_path / "dpo"),
        suites=["preference"],
        data=str(held_out),
        loaded=load_model_and_tokenizer(str(tmp_path / "dpo")),
    )["metrics"]
    assert after["pref_margin"] > before["pref_margin"] + 1.0
    assert after["pref_accuracy"] >= before["pref_accuracy"]
