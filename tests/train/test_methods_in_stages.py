"""Every method of the registry through every training stage on a tiny model: SFT, DPO over the
SFT run, a reward model and PPO. A method a stage cannot take is refused with a reason before
training (never a crash), and a recipe that would chain from an adapter that cannot merge is
refused before anything runs."""

from __future__ import annotations

import json
import math

import pytest

from instructkit.errors import InputError
from instructkit.models.peft_methods import METHODS
from instructkit.pipeline import run
from tests.tiny import tiny_model_dir, toy_conversations, toy_preferences, write_jsonl

# What the stages refuse, by design (docs/sft.md says why).
REFUSED = {("qlora", "rm"): "cannot train a reward model here"}
CHAINS_REFUSED = ("prompt_tuning", "prefix_tuning", "p_tuning", "qlora")  # DPO cannot start from their SFT run


def _peft(method: str) -> dict:
    extra = {
        "prompt_tuning": {"num_virtual_tokens": 4},
        "prefix_tuning": {"num_virtual_tokens": 4},
        "p_tuning": {"num_virtual_tokens": 4},
        "vera": {"vera_r": 8},
    }
    return {
        "method": method,
        **({"r": 4, "alpha": 8} if method in ("lora", "dora", "rslora", "loha", "lokr", "qlora") else {}),
        **extra.get(method, {}),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    return {
        "plain": tiny_model_dir(root / "plain"),
        "biased": tiny_model_dir(root / "biased", attention_bias=True, mlp_bias=True),  # for bitfit
        "wide": tiny_model_dir(root / "wide", hidden_size=64, intermediate_size=128),  # 4-bit blocks of 64
        "conv": write_jsonl(root / "c.jsonl", toy_conversations(8)),
        "pairs": write_jsonl(root / "p.jsonl", toy_preferences(8)),
        "prompts": write_jsonl(root / "q.jsonl", [{"prompt": r["prompt"]} for r in toy_preferences(4)]),
        "root": root,
    }


def _model(world, method):
    return world["biased" if method == "bitfit" else "wide" if method == "qlora" else "plain"]


def _stage(world, method, name, model):
    from instructkit.train.dpo import dpo
    from instructkit.train.ppo import ppo
    from instructkit.train.reward import rm
    from instructkit.train.sft import sft

    data = {"val_fraction": 0.0, "max_length": 64}
    common = {"model": str(model), "out": str(world["root"] / f"{method}-{name}"), "peft": _peft(method)}
    train = {"batch_size": 4, "max_steps": 1, "progress": False}
    if name == "sft":
        return sft({**common, "data": {"path": str(world["conv"]), **data}, "train": train})
    if name == "dpo":
        return dpo({**common, "data": {"path": str(world["pairs"]), **data}, "train": train})
    if name == "rm":
        return rm({**common, "data": {"path": str(world["pairs"]), **data}, "train": train})
    reward = {"function": "tests.train.test_methods_in_stages:response_length"}
    return ppo(
        {
            **common,
            "data": {"path": str(world["prompts"])},
            "reward": reward,
            "max_new_tokens": 4,
            "rollout_batch_size": 4,
            "ppo_epochs": 1,
            "train": train,
        }
    )


def response_length(prompt: str, response: str, **data) -> float:
    return len(response) / 10.0


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_through_every_stage(world, method):
    model = _model(world, method)
    sft = _stage(world, method, "sft", model)
    assert math.isfinite(sft["train_loss"]) and sft["method"] == method
    for name in ("dpo", "rm", "ppo"):
        start = world["root"] / f"{method}-sft" if name == "dpo" else model
        if name == "dpo" and method in CHAINS_REFUSED:
            with pytest.raises(InputError, match="cannot"):
                _stage(world, method, name, start)
            continue
        if (method, name) in REFUSED:
            with pytest.raises(InputError, match=REFUSED[method, name]):
                _stage(world, method, name, start)
            continue
        summary = _stage(world, method, name, start)
        assert summary["method"] == method and summary["steps"] == 1, name


@pytest.mark.parametrize("method", CHAINS_REFUSED)
def test_a_recipe_chaining_from_an_unmergeable_adapter_is_refused_before_anything_runs(tmp_path, world, method):
    recipe = tmp_path / "r.yaml"
    train = {"batch_size": 4, "max_steps": 1, "progress": False}
    data = {"val_fraction": 0.0, "max_length": 64}
    recipe.write_text(
        json.dumps(
            {
                "name": "chain",
                "model": str(_model(world, method)),
                "stages": ["sft", "dpo"],
                "sft": {"data": {"path": str(world["conv"]), **data}, "peft": _peft(method), "train": train},
                "dpo": {"data": {"path": str(world["pairs"]), **data}, "train": train},
            }
        )
    )
    with pytest.raises(
        InputError, match=rf"field 'dpo.model'.*starts from the sft stage, whose {method} adapter cannot be merged"
    ):
        run(recipe, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning"])
def test_a_prompt_learning_reward_model_scores_the_same_after_reload(world, method):
    """Its virtual tokens are saved beside the classifier (they do not merge) and put back on load:
    the reloaded model gives the reference demonstrations the mean score the stage centred to 0
    (with the trained model in memory), and without the virtual tokens it would not."""
    from transformers import AutoModelForSequenceClassification

    from instructkit.config import RewardConfig, from_dict
    from instructkit.models.reward_model import load_reward_model
    from instructkit.train.reward import mean_score, reference_sequences, rm

    cfg = {
        "model": str(world["plain"]),
        "out": str(world["root"] / f"{method}-rm-ref"),
        "peft": _peft(method),
        "data": {"path": str(world["pairs"]), "val_fraction": 0.0, "max_length": 64},
        "train": {"batch_size": 4, "max_steps": 2, "progress": False},
        "reference_data": str(world["conv"]),
    }
    summary = rm(cfg)
    final = world["root"] / f"{method}-rm-ref" / "final"
    assert (final / "prompt_adapter" / "adapter_config.json").is_file()
    model, tokenizer, bias = load_reward_model(str(final), device="cpu")
    assert bias == summary["bias"] and abs(bias) > 1e-6
    seqs = reference_sequences(from_dict(RewardConfig, cfg), tokenizer, [])
    assert mean_score(model, seqs, tokenizer.pad_token_id, 4) + bias == pytest.approx(0.0, abs=1e-5)
    plain = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert abs(mean_score(plain, seqs, tokenizer.pad_token_id, 4) + bias) > 1e-4
