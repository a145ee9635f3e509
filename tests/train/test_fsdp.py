"""FSDP (``train.fsdp``): two processes on this CPU (gloo) that shard the weights, gradients and
optimizer state give the one-process numbers, for SFT and for DPO, and a run checkpointed on two
processes resumes on one with the uninterrupted curve.

The one-process run is the reference: 1 process x batch 8 against 2 x batch 4 (the same examples
a step, ``StepPlan``). FSDP changes where the arithmetic happens (each process gathers a block's
weights for its forward and backward, gradients are reduce-scattered), not what it computes, so
the per-step losses agree to float rounding (1e-4 is asserted; about 1e-6 is typical).
"""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from instructkit.errors import InputError
from instructkit.runs import RunState, rerun_state
from instructkit.train.fsdp import transformer_blocks
from tests.tiny import tiny_llama, toy_conversations, toy_preferences, write_jsonl
from tests.train.test_uneven_shards import assert_same_numbers, preference_config, sft_config, torchrun


def _fsdp(config: dict, mode: str) -> dict:
    return {**config, "train": {**config["train"], "fsdp": mode, "save_every": 1, "keep_checkpoints": 3}}


def test_the_units_are_the_decoder_layers():
    model = tiny_llama(vocab_size=64, num_hidden_layers=3)
    blocks = transformer_blocks(model)
    assert blocks == list(model.model.layers)


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["full", "hybrid"])
def test_sft_sharded_on_two_processes_matches_one_and_resumes_on_one(tiny, tmp_path, mode):
    from instructkit.train.sft import sft

    data = write_jsonl(tmp_path / "train.jsonl", toy_conversations(40))
    sft(sft_config(tiny, data, tmp_path / "one", batch_size=8))
    two = _fsdp(sft_config(tiny, data, tmp_path / "two", batch_size=4), mode)
    torchrun("sft", two, tmp_path, port=29641 if mode == "full" else 29642)

    # 1. The same curve, and the same adapter at the end (gathered back from the shards).
    assert_same_numbers(tmp_path / "one", tmp_path / "two", steps=3)
    a = load_file(str(tmp_path / "one" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "adapter_model.safetensors"))
    assert set(a) == set(b) and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5

    # 2. It was sharded: each process held about half of the parameter values.
    log = (tmp_path / "sft-two.log").read_text()
    line = next(x for x in log.splitlines() if x.startswith(f"fsdp {mode}:"))
    held, total = (int(n.replace(",", "")) for n in line.split("holds ")[1].split(" parameter")[0].split(" of "))
    assert "sharded over 2 processes" in line and abs(held / total - 0.5) < 0.05, line

    # 3. Cut after step 2 on two processes, resumed on one (batch 8: the same 8 examples a step).
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "two", cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-000003")
    (cut / "summary.json").unlink()
    resumed = sft_config(tiny, data, cut, batch_size=8)
    assert rerun_state(cut, _as_config(resumed)) is RunState.RESUME  # batch 4 x 2 processes = 8 x 1
    sft(resumed)
    assert json.loads((cut / "checkpoints" / "step-000002" / "state.json").read_text())["world_size"] == 2
    assert_same_numbers(tmp_path / "one", cut, steps=3)


def _as_config(config: dict):
    from instructkit.config import SFTConfig, from_dict

    return from_dict(SFTConfig, config)


@pytest.mark.dist
def test_dpo_sharded_on_two_processes_matches_one(tiny, tmp_path):
    """Full fine-tuning with a precomputed reference: the closing held-out statistics agree too."""
    from instructkit.train.dpo import dpo

    data = write_jsonl(tmp_path / "pairs.jsonl", toy_preferences(40))
    val = write_jsonl(tmp_path / "val.jsonl", toy_preferences(1))
    one = dpo(preference_config(tiny, data, val, tmp_path / "one", batch_size=4))
    two = _fsdp(preference_config(tiny, data, val, tmp_path / "two", batch_size=2), "full")
    torchrun("dpo", two, tmp_path, port=29643)
    assert_same_numbers(tmp_path / "one", tmp_path / "two", steps=2)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    for key in ("val_loss", "val_reward_margin", "val_reward_accuracy"):
        assert summary[key] == pytest.approx(one[key], abs=1e-4), key


def test_a_run_resumes_on_other_processes_only_at_the_same_global_batch(tmp_path, monkeypatch):
    """A checkpoint of 2 processes x batch 4: on 1 process, batch 8 or batch 4 x grad_accum 2
    resume; batch 2 (2 examples a step, not 8) is another config, refused as any other. (The
    unchanged config resumes too, as before, with a note that the global batch changed.)"""
    from instructkit.config import SFTConfig, dump_yaml, from_dict

    run = tmp_path / "run"
    saved = {"model": "m", "out": str(run), "train": {"batch_size": 4, "max_steps": 3}}
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "checkpoints" / "step-000002" / "state.json").write_text(json.dumps({"step": 2, "world_size": 2}))
    (run / "config.yaml").write_text(dump_yaml(from_dict(SFTConfig, saved)))
    monkeypatch.setenv("WORLD_SIZE", "1")

    def state(**train):
        return rerun_state(run, from_dict(SFTConfig, {**saved, "train": {"max_steps": 3, **train}}))

    assert state(batch_size=8) is RunState.RESUME
    assert state(batch_size=4, grad_accum=2) is RunState.RESUME
    assert state(batch_size=8, fsdp="full") is RunState.RESUME  # sharding changes no number
    with pytest.raises(InputError, match="train.batch_size"):
        state(batch_size=2)  # 2 examples a step where the checkpoint took 8
    with pytest.raises(InputError, match="train.max_steps"):
        state(batch_size=8, max_steps=4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert state(batch_size=2) is RunState.RESUME  # 4 processes x 2


def test_ppo_refuses_fsdp_before_loading_anything():
    from instructkit.config import PPOConfig, from_dict

    with pytest.raises(InputError, match="train.fsdp"):
        from_dict(PPOConfig, {"train": {"fsdp": "full", "batch_size": 4}, "rollout_batch_size": 4})
