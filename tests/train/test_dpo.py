"""DPO-family recipe on a tiny model: learning, every loss, reference modes, invariances, TRL parity."""

from __future__ import annotations

from pathlib import Path

import pytest

from instructkit.losses.preference import PREFERENCE_LOSSES
from instructkit.train.dpo import dpo
from instructkit.train.engine import MetricsLog
from tests.tiny import toy_preferences, write_jsonl
from tests.train.invariants import assert_accumulation_is_exact, assert_resumes_exactly, losses, trl_parity_args


def config(tiny: Path, data: Path, out: Path, **train) -> dict:
    return {
        "model": str(tiny),
        "out": str(out),
        "data": {"path": str(data), "val_fraction": 0.0, "max_length": 64},
        "peft": {"method": "full"},
        "optim": {"lr": 1e-3, "scheduler": "constant", "warmup_steps": 0},
        "beta": 0.1,
        "train": {"batch_size": 8, "grad_accum": 1, "max_steps": 5, "progress": False, **train},
    }


def records(out: Path) -> list[dict]:
    return MetricsLog(out / "metrics.jsonl").read()


def test_dpo_raises_the_held_out_margin(tiny, pairs, tmp_path):
    cfg = config(tiny, pairs, tmp_path / "dpo", max_steps=15)
    cfg["data"]["val_fraction"] = 0.25
    cfg["beta"], cfg["optim"]["lr"] = 0.5, 3e-3
    summary = dpo(cfg)
    curve = losses(tmp_path / "dpo")
    assert curve[0] == pytest.approx(0.693147, abs=1e-4)  # log 2: policy == reference at step 1
    assert curve[-1] < 0.5 * curve[0]
    assert summary["val_reward_margin"] > 0.5 and summary["val_reward_accuracy"] == 1.0
    assert {"reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"} <= set(records(tmp_path / "dpo")[0])
    assert (tmp_path / "dpo" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("loss", sorted(PREFERENCE_LOSSES))
def test_every_loss_trains(tiny, pairs, tmp_path, loss):
    """Each registry entry runs through the recipe and lowers its own loss on the toy pairs."""
    cfg = config(tiny, pairs, tmp_path / loss, max_steps=8)
    cfg["loss"] = loss
    if loss == "simpo":
        cfg["beta"] = 2.0
    summary = dpo(cfg)
    curve = losses(tmp_path / loss)
    assert summary["loss"] == loss and len(curve) == 8
    assert sum(curve[-2:]) / 2 < sum(curve[:2]) / 2
    assert summary["reference"] == ("precompute" if PREFERENCE_LOSSES[loss].needs_reference else None)


def test_lora_reference_from_the_disabled_adapter_equals_precomputed(tiny, pairs, tmp_path):
    """The two ways of getting reference log-probs give the same training curve."""
    for mode in ("precompute", "adapter"):
        cfg = config(tiny, pairs, tmp_path / mode, max_steps=4)
        cfg["peft"] = {"method": "lora", "r": 4, "alpha": 8}
        cfg["optim"]["lr"] = 1e-2
        cfg["reference"] = mode
        dpo(cfg)
    assert losses(tmp_path / "precompute") == pytest.approx(losses(tmp_path / "adapter"), abs=1e-5)
    assert losses(tmp_path / "adapter")[-1] < losses(tmp_path / "adapter")[0]


def test_gradient_accumulation_is_exact(tiny, pairs, tmp_path):
    assert_accumulation_is_exact(dpo, lambda out, **train: config(tiny, pairs, out, **train), tmp_path)


def test_interrupted_run_resumes_exactly(tiny, pairs, tmp_path):
    assert_resumes_exactly(dpo, lambda out, **train: config(tiny, pairs, out, **train), tmp_path)


def test_loss_matches_trl_dpo_trainer(tiny, tmp_path):
    """Same tiny policy, the same token ids (checked), full batch each step (so data order
    cannot differ), constant lr, AdamW, clipping 1.0, beta 0.1, frozen copy as reference: the
    per-step DPO (sigmoid) loss of our recipe and TRL's DPOTrainer agree within 1% for 10 steps."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from instructkit.data.templates import encode_prompt, encode_prompt_response
    from instructkit.models.loading import load_model, load_tokenizer

    rows = toy_preferences(8)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    dpo(config(tiny, data, tmp_path / "ours", max_steps=10))
    ours = losses(tmp_path / "ours")

    tokenizer = load_tokenizer(tiny)
    # TRL gets plain strings: the rendered prompt, and each response's text (it appends eos,
    # which is the template's end-of-turn token, as our encoding trains it).
    text = [
        {
            "prompt": tokenizer.decode(encode_prompt(tokenizer, r["prompt"])),
            "chosen": r["chosen"][0]["content"],
            "rejected": r["rejected"][0]["content"],
        }
        for r in rows
    ]
    args = trl.DPOConfig(
        **trl_parity_args(tmp_path / "trl"),
        seed=0,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=64,
        disable_tqdm=True,
    )
    trainer = trl.DPOTrainer(
        model=load_model(tiny, dtype="fp32", device="cpu"),
        args=args,
        train_dataset=Dataset.from_list(text),
        processing_class=tokenizer,
    )
    for row, example in zip(rows, trainer.train_dataset):  # the very same tokens are scored
        enc = encode_prompt_response(tokenizer, row["prompt"], row["chosen"])
        assert example["prompt_ids"] + example["chosen_ids"] == enc.input_ids[:-1]
    trainer.train()
    theirs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(ours) == len(theirs) == 10
    assert ours[-1] < ours[0] - 0.1  # it moved, so agreement is not trivial
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        assert a == pytest.approx(b, rel=0.01), f"step {step}: ours {a}, TRL {b}"


def test_unknown_loss_is_an_input_error(tiny, pairs, tmp_path):
    from instructkit.errors import InputError

    cfg = config(tiny, pairs, tmp_path / "x")
    cfg["loss"] = "sigmod"
    with pytest.raises(InputError, match="did you mean 'sigmoid'"):
        dpo(cfg)
