"""Model specs: embedded default, GGUF file, HF folder, run folder, adapter, cached Hub id."""

from __future__ import annotations

from pathlib import Path

import pytest

from instructkit.errors import InputError
from instructkit.models import embedded
from instructkit.models.loading import load_model, load_tokenizer, resolve
from tests.tiny import tiny_model_dir


def test_embedded_default_is_converted_once_into_a_hash_keyed_cache():
    folder = Path(resolve("smollm2-135m-instruct").base)
    gguf = embedded.embedded_gguf()
    assert folder.name == f"gguf-{embedded._file_hash(gguf)}"
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    # The same GGUF given by path resolves to the same converted folder (no second conversion).
    assert resolve(str(gguf)).base == str(folder)
    tok = load_tokenizer("smollm2-135m-instruct")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None and tok.chat_template


def test_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    import transformers

    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    out = tmp_path / "models" / "gguf-x"
    with pytest.raises(RuntimeError):
        embedded.convert_gguf(embedded.embedded_gguf(), out)
    assert not out.exists() and list((tmp_path / "models").iterdir()) == []


def test_folder_and_defaults(tmp_path):
    import torch

    folder = tiny_model_dir(tmp_path / "tiny")
    model = load_model(folder)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert load_model(folder, dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(InputError, match="unknown dtype 'fp33'"):
        load_model(folder, dtype="fp33")


def test_bad_specs_are_input_errors(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no model"):
        resolve(tmp_path / "empty")
    with pytest.raises(InputError, match="no such model"):
        resolve(tmp_path / "missing-folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        load_tokenizer("some-org/not-cached-model")


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTRUCTKIT_CACHE", str(tmp_path))
    assert embedded.cache_root() == tmp_path
    monkeypatch.delenv("INSTRUCTKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_root() == tmp_path / "xdg" / "instructkit"


def test_adapter_over_an_adapter_run_loads_both(tmp_path):
    """A DPO adapter trained on top of a LoRA SFT run: loading it applies the SFT adapter
    (merged) and then its own, so its logits equal base + both deltas computed by hand."""
    import peft
    import torch

    base_dir = tiny_model_dir(tmp_path / "base")
    base = load_model(base_dir, device="cpu")

    def lora_run(model, run: Path, base_spec: str, seed: int):
        torch.manual_seed(seed)
        m = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        for name, p in m.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)  # a non-zero delta
        (run / "final").mkdir(parents=True)
        m.save_pretrained(run / "final")
        (run / "final" / "instructkit_base.txt").write_text(base_spec)
        return m

    sft = lora_run(base, tmp_path / "sft", str(base_dir), seed=1)
    merged_sft = sft.merge_and_unload()
    dpo = lora_run(merged_sft, tmp_path / "dpo", str(tmp_path / "sft"), seed=2)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        expected = dpo(input_ids=ids).logits
        resolved = resolve(tmp_path / "dpo")
        assert resolved.base == str(base_dir) and resolved.merged_first == (str(tmp_path / "sft" / "final"),)
        loaded = load_model(tmp_path / "dpo", device="cpu")
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        plain = load_model(base_dir, device="cpu")(input_ids=ids).logits
    assert not torch.allclose(plain, expected, atol=1e-3)
