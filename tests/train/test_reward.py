"""Reward-model recipe on a tiny model: learning, K-wise rankings, bias, invariances, TRL parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructkit.train.engine import MetricsLog
from instructkit.train.reward import rm
from tests.tiny import toy_preferences, write_jsonl
from tests.train.invariants import assert_accumulation_is_exact, assert_resumes_exactly, losses, trl_parity_args


def config(tiny: Path, data: Path, out: Path, **train) -> dict:
    return {
        "model": str(tiny),
        "out": str(out),
        "data": {"path": str(data), "val_fraction": 0.0, "max_length": 64},
        "peft": {"method": "full"},
        "optim": {"lr": 1e-3, "scheduler": "constant", "warmup_steps": 0},
        "train": {"batch_size": 8, "grad_accum": 1, "max_steps": 5, "progress": False, **train},
    }


def test_reward_model_learns_the_preference_and_is_centred(tiny, pairs, tmp_path):
    from instructkit.models.reward_model import load_reward_model, score
    from tests.tiny import toy_preferences

    cfg = config(tiny, pairs, tmp_path / "rm", max_steps=20)
    cfg["data"]["val_fraction"] = 0.25
    summary = rm(cfg)
    curve = losses(tmp_path / "rm")
    assert sum(curve[-4:]) / 4 < 0.5 * sum(curve[:4]) / 4
    assert summary["val_accuracy"] == 1.0 and summary["val_pairs"] == 10
    first = MetricsLog(tmp_path / "rm" / "metrics.jsonl").read()[0]
    assert {"loss", "accuracy", "pairs", "prompts"} <= set(first) and first["pairs"] == 8
    # final/ is a plain sequence classifier: loads with transformers and with our loader.
    model, tokenizer, bias = load_reward_model(tmp_path / "rm")
    assert bias == pytest.approx(summary["bias"]) and tokenizer.pad_token_id != tokenizer.eos_token_id
    rows = toy_preferences(40)
    prompts = [r["prompt"] for r in rows]
    chosen = score(model, tokenizer, prompts, [r["chosen"] for r in rows], bias=bias)
    rejected = score(model, tokenizer, prompts, [r["rejected"] for r in rows], bias=bias)
    assert all(c > r for c, r in zip(chosen, rejected))
    # The bias centres the best responses of the training prompts on 0 (the 30 train prompts).
    from instructkit.data.formats import load_records
    from instructkit.data.split import split_records

    train, _, _ = split_records(load_records(pairs).records, val_fraction=0.25, test_fraction=0.0, seed=0)
    train_prompts = {r.prompt[0].content for r in train}
    centred = [c for c, r in zip(chosen, rows) if r["prompt"][0]["content"] in train_prompts]
    assert len(centred) == 30
    assert abs(sum(centred) / len(centred)) < 1e-4
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "final")
    assert plain.config.num_labels == 1


def test_k_wise_rankings_train_with_ties_dropped(tiny, tmp_path):
    """Four responses per prompt, one tie: a prompt contributes C(4,2) - 1 = 5 comparisons."""
    rows = []
    for pair in toy_preferences(16):
        good, bad = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        rows.append(
            {
                "prompt": pair["prompt"],
                "ranks": [0, 1, 1, 2],
                "responses": [[{"role": "assistant", "content": t}] for t in (good, good + " ok", bad + " ok", bad)],
            }
        )
    data = write_jsonl(tmp_path / "ranked.jsonl", rows)
    summary = rm(config(tiny, data, tmp_path / "rm", max_steps=3))
    first = MetricsLog(tmp_path / "rm" / "metrics.jsonl").read()[0]
    assert first["prompts"] == 8 and first["pairs"] == 8 * 5
    assert summary["steps"] == 3


def test_gradient_accumulation_is_exact(tiny, pairs, tmp_path):
    assert_accumulation_is_exact(rm, lambda out, **train: config(tiny, pairs, out, **train), tmp_path)


def test_interrupted_run_resumes_exactly(tiny, pairs, tmp_path):
    assert_resumes_exactly(rm, lambda out, **train: config(tiny, pairs, out, **train), tmp_path)


def test_loss_matches_trl_reward_trainer(tiny, tmp_path):
    """Same tiny backbone and head init, the same token ids, full batch each step (so data
    order cannot differ), constant lr, AdamW, clipping 1.0: the per-step training loss of our
    recipe and of TRL's RewardTrainer agree within 1% for 10 steps."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from instructkit.data.templates import encode_prompt_response
    from instructkit.models.loading import load_model, load_tokenizer
    from instructkit.models.reward_model import reward_model_from_causal_lm

    rows = toy_preferences(8)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    ours = rm(config(tiny, data, tmp_path / "ours", max_steps=10) | {"normalize": False})
    ours_curve = losses(tmp_path / "ours")

    tokenizer = load_tokenizer(tiny)
    model = reward_model_from_causal_lm(load_model(tiny, dtype="fp32", device="cpu"), tokenizer)
    enc = lambda r, k: list(encode_prompt_response(tokenizer, r["prompt"], r[k], max_length=64).input_ids)  # noqa: E731
    dataset = Dataset.from_list([{"chosen_ids": enc(r, "chosen"), "rejected_ids": enc(r, "rejected")} for r in rows])
    args = trl.RewardConfig(
        **trl_parity_args(tmp_path / "trl"),
        center_rewards_coefficient=None,
        seed=0,
        max_length=64,
        disable_tqdm=True,
    )
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trl_curve = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(trl_curve) == len(ours_curve) == 10 and ours["steps"] == 10
    assert ours_curve[-1] < 0.8 * ours_curve[0]  # it moved, so agreement is not trivial
    for step, (a, b) in enumerate(zip(ours_curve, trl_curve), 1):
        assert a == pytest.approx(b, rel=0.01), f"step {step}: ours {a}, TRL {b}"


def test_bad_data_is_an_input_error(tiny, tmp_path):
    from instructkit.errors import InputError

    sft_rows = write_jsonl(
        tmp_path / "sft.jsonl",
        [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}],
    )
    with pytest.raises(InputError, match="preference pairs or rankings"):
        rm(config(tiny, sft_rows, tmp_path / "rm"))
    assert not (tmp_path / "rm" / "final").exists()
    assert json.loads(json.dumps(config(tiny, sft_rows, tmp_path)))  # config is plain data
