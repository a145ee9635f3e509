"""QLoRA on a tiny Llama (64 wide: bitsandbytes' 4-bit block is 64 inputs) on the CPU: the base's
linear layers really are stored in 4 bits, LoRA trains and lowers the loss, the adapter saved by
save_final loads back onto the re-quantised base with the same logits, an SFT run does it end to
end, and what cannot run is refused with an InputError naming the field."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytest.importorskip("bitsandbytes")

from instructkit.config import PeftConfig, SFTConfig, load_config
from instructkit.data.collate import pad_batch
from instructkit.errors import InputError
from instructkit.models import qlora
from instructkit.models.lm import CausalLMLoss
from instructkit.models.loading import load_model
from instructkit.models.peft_methods import METHODS, apply_method, is_peft
from instructkit.runs import RunDir
from instructkit.train.setup import save_final
from tests.tiny import real_tokenizer, tiny_llama, tiny_model_dir, toy_conversations, write_jsonl

WIDE = {"hidden_size": 64, "intermediate_size": 128}
# The 16 NF4 levels, Dettmers et al. 2023, Appendix E (the quantiles of N(0, 1) scaled to [-1, 1]).
NF4 = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("base") / "model", **WIDE)


def _qlora(base, **kw):
    return apply_method(load_model(base, device="cpu", dtype="fp32"), PeftConfig(method="qlora", r=4, alpha=8, **kw))


def _batch():
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1000, 1100, (n,), generator=g).tolist() for n in (12, 9, 6)]
    return pad_batch([{"input_ids": r, "labels": r} for r in rows], pad_id=real_tokenizer().pad_token_id)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _four_bit_layers(model):
    import bitsandbytes as bnb

    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_the_base_is_stored_in_four_bits(base):
    """Every decoder linear layer (7 per layer x 2 layers) holds in*out/2 bytes of uint8 (two
    4-bit codes a byte), its block absmaxes quantised again (double quantisation); the tied
    output head stays fp32; dequantised, every block is absmax times one of the 16 NF4 levels."""
    import bitsandbytes.functional as F

    fp32 = load_model(base, device="cpu", dtype="fp32")
    originals = {n: m.weight.detach().clone() for n, m in fp32.named_modules() if type(m) is torch.nn.Linear}
    model = _qlora(base)
    layers = _four_bit_layers(model)
    assert len(layers) == 7 * 2
    for name, layer in layers:
        w = layer.weight
        assert w.dtype == torch.uint8 and w.numel() * w.element_size() == layer.in_features * layer.out_features // 2
        assert w.quant_state.quant_type == "nf4" and w.quant_state.nested and w.quant_state.blocksize == 64
        deq = F.dequantize_4bit(w.data, w.quant_state).float()
        original = originals[name.removeprefix("base_model.model.").removesuffix(".base_layer")]
        blocks = deq.reshape(-1, 64)
        scale = blocks.abs().amax(dim=1, keepdim=True)
        levels = blocks / scale
        assert (levels.unsqueeze(-1) - NF4).abs().amin(-1).max() < 1e-5  # each value is a level
        true_scale = original.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
        # Rounding to the nearest level errs by at most half the widest gap, (1 - 0.696) / 2 = 0.152
        # of the absmax, plus a little for the absmax's own 8-bit quantisation.
        assert ((blocks - original.reshape(-1, 64)).abs() <= 0.16 * true_scale).all()
    head = model.get_output_embeddings()
    assert head.weight.dtype == torch.float32 and head.weight is model.get_input_embeddings().weight


def test_only_lora_trains_and_the_loss_falls(base):
    model = _qlora(base)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    batch = _batch()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    model.train()
    for _ in range(10):
        total, count = CausalLMLoss(model)(**batch)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((total / count).item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_the_adapter_loads_back_onto_the_requantised_base(base, tmp_path):
    model = _qlora(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch = _batch()
    before = _logits(model, batch)
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    save_final(model, real_tokenizer(), run, base_spec=str(base), merged=False)
    assert json.loads((run.final / qlora.RECORD_NAME).read_text())["method"] == "bitsandbytes-nf4"
    loaded = load_model(run.path, device="cpu", dtype="fp32")
    assert is_peft(loaded) and len(_four_bit_layers(loaded)) == 7 * 2
    torch.testing.assert_close(_logits(loaded, batch), before, rtol=0, atol=1e-6)
    plain = _logits(load_model(base, device="cpu", dtype="fp32"), batch)
    assert (before - plain).abs().max() > 1e-3


def test_an_sft_run_trains_and_saves_a_qlora_adapter(base, tmp_path):
    from instructkit.train.sft import sft

    data = write_jsonl(tmp_path / "train.jsonl", toy_conversations(16))
    summary = sft(
        {
            "model": str(base),
            "out": str(tmp_path / "sft"),
            "data": {"path": str(data), "val_fraction": 0.0, "max_length": 64},
            "peft": {"method": "qlora", "r": 4, "alpha": 8},
            "optim": {"lr": 1e-2, "scheduler": "constant"},
            "train": {"batch_size": 8, "max_steps": 3, "progress": False},
        }
    )
    assert summary["method"] == "qlora" and summary["steps"] == 3
    final = tmp_path / "sft" / "final"
    assert (final / "adapter_config.json").is_file() and (final / qlora.RECORD_NAME).is_file()
    assert len(_four_bit_layers(load_model(tmp_path / "sft", device="cpu"))) == 7 * 2


# ----------------------------------------------------------------------------------------------
# Bad input


def test_without_bitsandbytes_qlora_is_refused_at_config_load(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(InputError) as err:
        load_config(SFTConfig, overrides=["peft.method=qlora"])
    assert "'peft.method=qlora'" in str(err.value) and "bitsandbytes" in str(err.value) and "lora" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "field", "says"),
    [
        (["peft.method=qlora", "save_merged=true"], "save_merged", "do not merge"),
        (["peft.method=qlora", "peft.init=pissa"], "peft.init", "lora, dora, rslora"),
        (["peft.method=qlora", "peft.reduction_factor=4"], "peft.reduction_factor", "houlsby"),
    ],
)
def test_settings_qlora_cannot_use_are_refused_at_config_load(overrides, field, says):
    with pytest.raises(InputError) as err:
        load_config(SFTConfig, overrides=overrides)
    assert f"'{field}=" in str(err.value) and says in str(err.value)


def test_layers_narrower_than_a_block_are_refused():
    """tests/tiny.py's 32-wide Llama: 32 inputs is half a 4-bit block."""
    with pytest.raises(InputError) as err:
        apply_method(tiny_llama(64), PeftConfig(method="qlora"))
    assert err.value.field == "peft.method" and "multiple of" in str(err.value) and "64" in str(err.value)


def test_a_stage_cannot_start_from_a_qlora_adapter(base, tmp_path):
    """DPO, RM and PPO merge the earlier stage's adapter into their start; a qlora adapter does
    not merge exactly into its 4-bit base, so that is refused when the start loads."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    save_final(_qlora(base), real_tokenizer(), run, base_spec=str(base), merged=False)
    with pytest.raises(InputError) as err:
        load_model(run.path, device="cpu", dtype="fp32", merge_adapter=True)
    assert "does not merge" in str(err.value) and str(run.final) in str(err.value)


def test_the_registry_says_it_does_not_merge():
    assert METHODS["qlora"].adapter and not METHODS["qlora"].merges


def test_an_sft_run_resumes_exactly(base, tmp_path):
    """A rerun after a crash re-quantises the base, rebuilds LoRA, loads the checkpoint's LoRA
    tensors and reproduces the uninterrupted curve."""
    from instructkit.train.sft import sft
    from tests.train.invariants import assert_resumes_exactly, losses

    data = write_jsonl(tmp_path / "train.jsonl", toy_conversations(16))

    def config(out, **train):
        return {
            "model": str(base),
            "out": str(out),
            "data": {"path": str(data), "val_fraction": 0.0, "max_length": 64},
            "peft": {"method": "qlora", "r": 4, "alpha": 8},
            "optim": {"lr": 1e-2, "scheduler": "constant"},
            "train": {"batch_size": 4, "max_steps": 6, "progress": False, **train},
        }

    assert_resumes_exactly(sft, config, tmp_path)
    curve = losses(tmp_path / "full")
    assert curve[-1] != curve[3]  # the steps after the crash move the weights


def test_export_hf_keeps_the_quantisation_record(base, tmp_path):
    """instructkit export --format hf copies the adapter with instructkit_quantization.json, so
    the export loads onto the 4-bit base again (same logits); merged is refused."""
    from instructkit.export import export

    model = _qlora(base)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    save_final(model, real_tokenizer(), run, base_spec=str(base), merged=False)
    export(str(run.path), tmp_path / "hf", fmt="hf")
    assert (tmp_path / "hf" / qlora.RECORD_NAME).is_file()
    batch = _batch()
    torch.testing.assert_close(
        _logits(load_model(tmp_path / "hf", device="cpu", dtype="fp32"), batch),
        _logits(model, batch),
        rtol=0,
        atol=1e-6,
    )
    with pytest.raises(InputError):
        export(str(run.path), tmp_path / "merged", fmt="merged")


def test_dpo_reference_from_the_disabled_adapter_equals_precomputed(base, tmp_path):
    """DPO's reference: adapter (the 4-bit base with LoRA switched off, per batch) gives the
    curve of reference: precompute (log-probs of the starting model, once)."""
    from instructkit.train.dpo import dpo
    from tests.tiny import toy_preferences
    from tests.train.invariants import losses

    pairs = write_jsonl(tmp_path / "pairs.jsonl", toy_preferences(16))
    for mode in ("precompute", "adapter"):
        dpo(
            {
                "model": str(base),
                "out": str(tmp_path / mode),
                "data": {"path": str(pairs), "val_fraction": 0.0, "max_length": 64},
                "peft": {"method": "qlora", "r": 4, "alpha": 8},
                "optim": {"lr": 1e-2, "scheduler": "constant"},
                "train": {"batch_size": 8, "max_steps": 4, "progress": False},
                "reference": mode,
            }
        )
    assert losses(tmp_path / "precompute") == pytest.approx(losses(tmp_path / "adapter"), abs=1e-5)
    assert losses(tmp_path / "adapter")[-1] < losses(tmp_path / "adapter")[0]


def test_an_eval_pass_leaves_training_and_its_gradients_unchanged(base):
    """bitsandbytes' CPU backend would repack the weights at the first no-grad eval forward and
    then train through a kernel without a backward (no gradient reaches earlier layers) and give
    other logits than training does; quantize_nf4 keeps one path. Gradients before and after an
    eval pass agree, and eval logits equal training-mode logits."""
    model = _qlora(base)
    batch = _batch()

    def grads():
        model.train()
        model.zero_grad()
        total, count = CausalLMLoss(model)(**batch)
        (total / count).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)  # B = 0 would leave the A gradients 0 whatever the base path does
    before = grads()
    model.train()
    with torch.no_grad():
        training = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    evaluated = _logits(model, batch)  # eval mode, no grad
    torch.testing.assert_close(evaluated, training, rtol=0, atol=1e-6)
    after = grads()
    assert all(torch.allclose(after[n], before[n], rtol=0, atol=1e-6) for n in before)
    assert all(g.abs().sum() > 0 for g in after.values())
