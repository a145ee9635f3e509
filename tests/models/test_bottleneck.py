"""Bottleneck adapters (houlsby, pfeiffer) on tiny models built from configs: where they sit, that
the adapted model starts equal to its base, that only they train and lower the loss, the saved
layout and save -> load, generation through the KV cache, every stage (SFT, RM, DPO over SFT,
PPO), and the inputs refused with an InputError that names the field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from instructkit.config import PeftConfig, SFTConfig, load_config
from instructkit.data.collate import pad_batch
from instructkit.data.schema import Message
from instructkit.errors import InputError
from instructkit.generation import generate
from instructkit.models import bottleneck
from instructkit.models.lm import CausalLMLoss
from instructkit.models.loading import load_model, resolve
from instructkit.models.peft_methods import METHODS, apply_method
from instructkit.models.reward_model import reward_model_from_causal_lm, sequence_scores
from instructkit.runs import RunDir
from instructkit.train.setup import save_final
from tests.tiny import (
    hf_greedy_alone,
    real_tokenizer,
    tiny_llama,
    tiny_model_dir,
    toy_conversations,
    toy_preferences,
    write_jsonl,
)

METHODS_HERE = ["houlsby", "pfeiffer"]
LAYERS = 2  # tests/tiny.py's Llama: 2 layers, hidden 32
HIDDEN = 32


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("base") / "model")


def _adapted(base, method, **kw):
    return apply_method(load_model(base, device="cpu", dtype="fp32"), PeftConfig(method=method, **kw))


def _batch():
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1000, 1100, (n,), generator=g).tolist() for n in (12, 9, 6)]
    return pad_batch([{"input_ids": r, "labels": r} for r in rows], pad_id=real_tokenizer().pad_token_id)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _perturb(model, scale=0.1, seed=1):
    """Move every adapter tensor off its start (up = 0 would make save/load trivially equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _save(model, folder, base_spec):
    run = RunDir(folder)
    run.path.mkdir(parents=True, exist_ok=True)
    save_final(model, real_tokenizer(), run, base_spec=str(base_spec), merged=False)
    return run


# ----------------------------------------------------------------------------------------------
# Where the adapters sit and how they start


@pytest.mark.parametrize(
    ("method", "places"), [("houlsby", ("self_attn", "mlp")), ("pfeiffer", ("mlp",))], ids=METHODS_HERE
)
@pytest.mark.parametrize("reduction_factor", [16, 4])
def test_adapters_sit_after_the_sublayers_the_paper_names(base, method, places, reduction_factor):
    """Houlsby: after attention and after the FFN of every layer; Pfeiffer: after the FFN only.
    Bottleneck width 32 / 16 = 2 or 32 / 4 = 8; parameters per adapter 2*32*w + w + 32."""
    model = _adapted(base, method, reduction_factor=reduction_factor)
    spec = bottleneck.spec_of(model)
    assert spec.layers == tuple(f"model.layers.{i}.{p}" for i in range(LAYERS) for p in places)
    width = HIDDEN // reduction_factor
    for path in spec.layers:
        adapter = model.get_submodule(f"{path}.bottleneck")
        assert adapter.down.weight.shape == (width, HIDDEN) and adapter.up.weight.shape == (HIDDEN, width)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == len(spec.layers) * (2 * HIDDEN * width + width + HIDDEN)


@pytest.mark.parametrize("method", METHODS_HERE)
def test_the_adapted_model_starts_equal_to_its_base(base, method):
    """up = 0 and its bias 0: each adapter adds exactly 0, so the logits are the base's, bit for bit."""
    batch = _batch()
    plain = _logits(load_model(base, device="cpu", dtype="fp32"), batch)
    assert torch.equal(_logits(_adapted(base, method), batch), plain)


def test_the_ffn_output_goes_through_the_adapter(base):
    """The adapted FFN gives f(x) + up(act(down(f(x)))), with f the base FFN, computed here by hand
    from the adapter's weights (gelu, so the activation is the one configured)."""
    model = _adapted(base, "houlsby", reduction_factor=4, adapter_act="gelu")
    _perturb(model)
    mlp = model.model.layers[1].mlp
    adapter = mlp.bottleneck
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        f = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))  # Llama's FFN
        hand = f + (torch.nn.functional.gelu(f @ adapter.down.weight.T + adapter.down.bias)) @ adapter.up.weight.T
        hand = hand + adapter.up.bias
        torch.testing.assert_close(mlp(x), hand, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS_HERE)
def test_every_adapter_is_in_the_forward_pass(base, method):
    """Moving one adapter alone off its start changes the logits, for each place in turn (a
    hook that did not fire, e.g. on the attention output, would leave them equal)."""
    batch = _batch()
    plain = _logits(load_model(base, device="cpu", dtype="fp32"), batch)
    model = _adapted(base, method, reduction_factor=4)
    for path in bottleneck.spec_of(model).layers:
        adapter = model.get_submodule(f"{path}.bottleneck")
        with torch.no_grad():
            adapter.down.weight.normal_(0, 0.5)
            adapter.up.weight.normal_(0, 0.5)
        assert (_logits(model, batch) - plain).abs().max() > 1e-3, path
        with torch.no_grad():
            adapter.up.weight.zero_()
        assert torch.equal(_logits(model, batch), plain), path  # back to the start


# ----------------------------------------------------------------------------------------------
# Training and the saved layout


@pytest.mark.parametrize("method", METHODS_HERE)
def test_only_the_adapters_train_and_the_loss_falls(base, method):
    model = _adapted(base, method, reduction_factor=4)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".bottleneck." in name for name in trainable)
    batch = _batch()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(10):
        total, count = CausalLMLoss(model)(**batch)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((total / count).item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("method", METHODS_HERE)
def test_save_holds_only_the_adapters_and_loads_back_to_the_same_logits(base, method, tmp_path):
    model = _adapted(base, method, reduction_factor=4, adapter_act="silu")
    _perturb(model)
    batch = _batch()
    before = _logits(model, batch)
    run = _save(model, tmp_path / "run", base)

    tensors = load_file(run.final / bottleneck.WEIGHTS_NAME)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(tensors) == expected  # no base tensor is saved
    record = json.loads((run.final / bottleneck.CONFIG_NAME).read_text())
    assert record["method"] == method and record["reduction_factor"] == 4 and record["activation"] == "silu"
    assert record["hidden_size"] == HIDDEN and record["bottleneck_size"] == 8 and record["base"] == str(base)
    assert record["layers"] == list(bottleneck.spec_of(model).layers)
    assert not (run.final / "config.json").exists() and not (run.final / "model.safetensors").exists()

    loaded = load_model(run.path, device="cpu", dtype="fp32")  # the run folder, as a user names it
    torch.testing.assert_close(_logits(loaded, batch), before, rtol=0, atol=1e-6)
    plain = _logits(load_model(base, device="cpu", dtype="fp32"), batch)
    assert (before - plain).abs().max() > 1e-2  # the adapters mattered


def test_gpt2_blocks_take_adapters_too(tmp_path):
    """GPT-2's blocks are transformer.h[i] with attn and mlp; the same code path places, saves
    and loads the adapters there."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    real_tokenizer().save_pretrained(tmp_path / "gpt2")
    model = _adapted(tmp_path / "gpt2", "houlsby", reduction_factor=8)
    assert bottleneck.spec_of(model).layers == tuple(
        f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn", "mlp")
    )
    ids = torch.randint(0, 64, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    plain = _logits(load_model(tmp_path / "gpt2", device="cpu", dtype="fp32"), batch)
    assert torch.equal(_logits(model, batch), plain)
    _perturb(model)
    before = _logits(model, batch)
    run = _save(model, tmp_path / "run", tmp_path / "gpt2")
    torch.testing.assert_close(
        _logits(load_model(run.path, device="cpu", dtype="fp32"), batch), before, rtol=0, atol=1e-6
    )


WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
PROMPTS = [[Message("user", " ".join(WORDS[: 1 + i]))] for i in range(6)]


@pytest.mark.parametrize("method", METHODS_HERE)
def test_generate_through_the_kv_cache_equals_hf_generate(tmp_path, method):
    """instructkit.generation.generate (batched, left-padded, KV cache) on the reloaded adapted
    model gives HF generate's greedy text, prompt by prompt; the adapters change the text."""

    tokenizer = real_tokenizer()
    sharp = tiny_model_dir(tmp_path / "base", initializer_range=0.5)  # greedy text differs by prompt
    model = _adapted(sharp, method, reduction_factor=4)
    _perturb(model, scale=1.0)
    model = load_model(_save(model, tmp_path / "run", sharp).path, device="cpu", dtype="fp32").eval()

    ours = generate(model, tokenizer, PROMPTS, max_new_tokens=8)
    assert ours == hf_greedy_alone(model, tokenizer, PROMPTS, max_new_tokens=8)
    plain = generate(load_model(sharp, device="cpu", dtype="fp32"), tokenizer, PROMPTS, max_new_tokens=8)
    assert ours != plain


def test_the_serving_engine_batches_the_adapted_model_as_generate_does_alone(tmp_path):
    """serve's Batcher (one left-padded prefill, KV caches merged across requests) gives each
    prompt the greedy text that generate gives it alone."""
    import asyncio

    from instructkit.data.templates import encode_prompt
    from instructkit.serve.engine import Batcher, Sampling

    tokenizer = real_tokenizer()
    sharp = tiny_model_dir(tmp_path / "base", initializer_range=0.5)
    model = _adapted(sharp, "houlsby", reduction_factor=4)
    _perturb(model, scale=1.0)
    model = load_model(_save(model, tmp_path / "run", sharp).path, device="cpu", dtype="fp32").eval()
    ids = [encode_prompt(tokenizer, p, None) for p in PROMPTS]
    alone = [generate(model, tokenizer, [p], max_new_tokens=8)[0] for p in ids]

    async def main():
        engine = Batcher(model, tokenizer)
        try:
            engine.pause()
            subs = [engine.submit(p, Sampling(max_new_tokens=8)) for p in ids]
            engine.resume()
            return [(await s.choices())[0].text for s in subs], max(engine.step_sizes)
        finally:
            engine.close()

    got, widest = asyncio.run(main())
    assert got == alone and widest == len(ids)


# ----------------------------------------------------------------------------------------------
# Reward and value models, chained stages


def test_reward_head_and_adapters_train_for_seq_cls():
    tokenizer = real_tokenizer()
    causal_lm = tiny_llama(len(tokenizer))
    model = apply_method(
        reward_model_from_causal_lm(causal_lm, tokenizer),
        PeftConfig(method="pfeiffer", reduction_factor=4),
        task="SEQ_CLS",
    )
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and all(".bottleneck." in n or n.startswith("score.") for n in trainable)
    ids = torch.randint(1000, 1100, (2, 6))
    sequence_scores(model, ids, torch.ones_like(ids)).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)


def test_a_stage_over_a_bottleneck_stage_keeps_training_its_adapters(base, tmp_path):
    """What DPO, RM and PPO do with cfg.model = an SFT run: load it as the start (merge asked,
    impossible here: the adapters come back unmerged) and apply the same method: the loaded
    adapters train on; the next save names the original base, not the SFT run."""
    sft = _adapted(base, "houlsby", reduction_factor=4)
    _perturb(sft)
    run = _save(sft, tmp_path / "sft", base)
    start = load_model(run.path, device="cpu", dtype="fp32", merge_adapter=True)
    loaded = {k: v.clone() for k, v in bottleneck.adapter_state(start).items()}
    model = apply_method(start, PeftConfig(method="houlsby", reduction_factor=4))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(loaded)
    assert all(torch.equal(bottleneck.adapter_state(model)[k], v) for k, v in loaded.items())
    again = _save(model, tmp_path / "dpo", run.path)
    assert json.loads((again.final / bottleneck.CONFIG_NAME).read_text())["base"] == str(base)
    assert resolve(again.path).base == str(base)


@pytest.mark.parametrize(
    ("cfg", "says"),
    [
        (PeftConfig(method="lora"), "peft.method houlsby"),
        (PeftConfig(method="pfeiffer", reduction_factor=4), "peft.method houlsby"),
        (PeftConfig(method="houlsby", reduction_factor=8), "peft.reduction_factor 4"),
    ],
)
def test_other_settings_over_a_bottleneck_stage_are_refused(base, tmp_path, cfg, says):
    run = _save(_adapted(base, "houlsby", reduction_factor=4), tmp_path / "sft", base)
    start = load_model(run.path, device="cpu", dtype="fp32", merge_adapter=True)
    with pytest.raises(InputError) as err:
        apply_method(start, cfg)
    assert err.value.field == "peft.method" and says in str(err.value) and "cannot merge" in str(err.value)


def test_stages_train_save_and_chain_with_bottleneck_adapters(base, tmp_path):
    """SFT -> RM and DPO over it -> PPO (GAE: a value model over the SFT's adapters), each a
    few steps with houlsby; each final/ loads back to the model it saved."""
    from instructkit.models.reward_model import load_reward_model
    from instructkit.train.dpo import dpo
    from instructkit.train.ppo import ppo
    from instructkit.train.reward import rm
    from instructkit.train.sft import sft

    peft = {"method": "houlsby", "reduction_factor": 4}
    train = {"batch_size": 8, "max_steps": 3, "progress": False}
    data = write_jsonl(tmp_path / "sft.jsonl", toy_conversations(16))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", toy_preferences(16))
    common = {"peft": peft, "optim": {"lr": 1e-2, "scheduler": "constant"}, "train": train}
    data_cfg = {"val_fraction": 0.0, "max_length": 64}
    s = sft({"model": str(base), "out": str(tmp_path / "sft"), "data": {"path": str(data), **data_cfg}, **common})
    assert s["method"] == "houlsby" and s["trainable_parameters"] == 4 * (2 * 32 * 8 + 8 + 32)
    assert (tmp_path / "sft" / "final" / bottleneck.CONFIG_NAME).is_file()

    sft_adapters = load_file(tmp_path / "sft" / "final" / bottleneck.WEIGHTS_NAME)
    assert all(v.abs().sum() > 0 for v in sft_adapters.values())  # up moved off 0 too

    d = dpo(
        {
            "model": str(tmp_path / "sft"),
            "out": str(tmp_path / "dpo"),
            "data": {"path": str(pairs), **data_cfg},
            **common,
        }
    )
    assert d["steps"] == 3 and resolve(tmp_path / "dpo").base == str(base)
    dpo_adapters = load_file(tmp_path / "dpo" / "final" / bottleneck.WEIGHTS_NAME)
    assert set(dpo_adapters) == set(sft_adapters)  # the same adapters, trained on
    assert any(not torch.equal(dpo_adapters[k], sft_adapters[k]) for k in sft_adapters)

    rm(
        {
            "model": str(tmp_path / "sft"),
            "out": str(tmp_path / "rm"),
            "data": {"path": str(pairs), **data_cfg},
            **common,
        }
    )
    reward, _, _ = load_reward_model(tmp_path / "rm", device="cpu")
    assert bottleneck.spec_of(reward).method == "houlsby"  # put back beside the whole weights
    whole = load_file(tmp_path / "rm" / "final" / "model.safetensors")  # the trained model's own state
    assert all(torch.equal(v, whole[k]) for k, v in bottleneck.adapter_state(reward).items())
    assert any(not torch.equal(v, sft_adapters[k]) for k, v in bottleneck.adapter_state(reward).items())

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "say blue", "target": "blue"}] * 8)
    p = ppo(
        {
            "model": str(tmp_path / "sft"),
            "out": str(tmp_path / "ppo"),
            "data": {"path": str(prompts)},
            "reward": {"function": "tests.train.test_ppo:contains_target"},
            "peft": peft,
            "optim": {"lr": 1e-3, "scheduler": "constant"},
            "train": {"batch_size": 4, "max_steps": 2, "progress": False},
            "rollout_batch_size": 4,
            "max_new_tokens": 3,
            "ppo_epochs": 1,
        }
    )
    assert p["steps"] == 2 and bottleneck.spec_of(load_model(tmp_path / "ppo", device="cpu")).method == "houlsby"


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("overrides", "field", "says"),
    [
        (["peft.method=lora", "peft.reduction_factor=8"], "peft.reduction_factor", "houlsby, pfeiffer"),
        (["peft.method=full", "peft.adapter_act=gelu"], "peft.adapter_act", "not full"),
        (["peft.method=houlsby", "peft.reduction_factor=0"], "peft.reduction_factor", "at least 1"),
        (["peft.method=pfeiffer", "peft.adapter_act=tanh"], "peft.adapter_act", "relu, gelu, silu"),
        (["peft.method=houlsby", "save_merged=true"], "save_merged", "do not merge"),
    ],
)
def test_bad_settings_are_refused_at_config_load(overrides, field, says):
    with pytest.raises(InputError) as err:
        load_config(SFTConfig, overrides=overrides)
    assert f"'{field}=" in str(err.value) and says in str(err.value)


def test_a_bottleneck_wider_than_the_model_is_refused():
    """reduction_factor 64 on a 32-wide model would be a bottleneck of 0.5 units; known only
    once the model is there (its hidden size)."""
    with pytest.raises(InputError) as err:
        apply_method(tiny_llama(64), PeftConfig(method="houlsby", reduction_factor=64))
    assert err.value.field == "peft.reduction_factor" and "hidden size 32" in str(err.value)


def test_an_unknown_architecture_is_refused():
    class NoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"hidden_size": 8})()
            self.proj = torch.nn.Linear(8, 8)

    with pytest.raises(InputError) as err:
        apply_method(NoLayers(), PeftConfig(method="pfeiffer", reduction_factor=2))
    assert err.value.field == "peft.method" and "NoLayers" in str(err.value) and "lora" in str(err.value)


def test_the_registry_says_they_do_not_merge():
    assert all(not METHODS[m].merges and METHODS[m].bottleneck and not METHODS[m].adapter for m in METHODS_HERE)


def test_config_choices_equal_the_registries():
    """config.py imports no torch, so it spells the choices out; they agree with the registry."""
    import typing

    from instructkit import config

    assert set(typing.get_args(config.AdapterAct)) == set(bottleneck.ACTIVATIONS)
    assert set(config.BOTTLENECK_METHODS) == {m for m in METHODS if METHODS[m].bottleneck} == set(bottleneck.PLACES)
    # Adapters of either kind that do not merge (whole-weight methods have nothing to merge).
    unmerged = {m for m, spec in METHODS.items() if not spec.merges and (spec.adapter or spec.bottleneck)}
    assert set(config.NOT_MERGING) == unmerged


def _sft_config(base, data, out, **train):
    return {
        "model": str(base),
        "out": str(out),
        "data": {"path": str(data), "val_fraction": 0.0, "max_length": 64},
        "peft": {"method": "houlsby", "reduction_factor": 4},
        "optim": {"lr": 1e-2, "scheduler": "constant"},
        "train": {"batch_size": 4, "max_steps": 6, "progress": False, **train},
    }


def test_an_sft_run_resumes_exactly_and_checkpointing_changes_nothing(base, tmp_path):
    """The engine's checkpoints hold the trainable tensors by name: a rerun after a crash rebuilds
    the adapters, loads them and reproduces the uninterrupted curve; recomputing activations
    (gradient checkpointing) runs the hooks again and gives the same curve."""
    from instructkit.train.sft import sft
    from tests.train.invariants import assert_resumes_exactly, losses

    data = write_jsonl(tmp_path / "train.jsonl", toy_conversations(16))
    assert_resumes_exactly(sft, lambda out, **train: _sft_config(base, data, out, **train), tmp_path)
    curve = losses(tmp_path / "full")
    assert curve[-1] < curve[0] - 0.05, curve  # the adapters train (a resume that lost them would show)
    sft(_sft_config(base, data, tmp_path / "ckpt", gradient_checkpointing=True))
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "full"), abs=1e-5)


def test_export_keeps_the_layout_and_refuses_to_merge(base, tmp_path):
    """instructkit export --format hf writes the same two files (logits unchanged, the command's
    own check); merged and gguf are refused before anything loads."""
    from instructkit.export import export

    model = _adapted(base, "pfeiffer", reduction_factor=4)
    _perturb(model)
    run = _save(model, tmp_path / "run", base)
    report = export(str(run.path), tmp_path / "hf", fmt="hf")
    assert (tmp_path / "hf" / bottleneck.WEIGHTS_NAME).is_file() and report["max_abs_logit_diff"] == 0
    batch = _batch()
    exported = load_model(tmp_path / "hf", device="cpu", dtype="fp32")
    torch.testing.assert_close(_logits(exported, batch), _logits(model, batch), rtol=0, atol=1e-6)
    for fmt, out in (("merged", tmp_path / "merged"), ("gguf", tmp_path / "m.gguf")):
        with pytest.raises(InputError) as err:
            export(str(run.path), out, fmt=fmt)
        assert err.value.field == "format" and "cannot merge" in str(err.value) and not out.exists()
