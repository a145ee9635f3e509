"""GGUF export: the file transformers reads back is the model that was written."""

from __future__ import annotations

import pytest
import torch

from instructkit.errors import InputError
from instructkit.models.gguf_export import _permute, write_gguf
from tests.tiny import real_tokenizer, tiny_llama


def _reload(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


@pytest.fixture(scope="module")
def source():
    tokenizer = real_tokenizer()
    model = tiny_llama(len(tokenizer), seed=3, hidden_size=64, intermediate_size=128).eval()
    model.config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def test_permute_is_llama_cpp_interleaving():
    # one head of dimension 4: rows (r0, r1 | r2, r3) in halves become (r0, r2, r1, r3)
    w = torch.arange(8.0).reshape(4, 2).numpy()
    assert _permute(w, 1)[:, 0].tolist() == [0.0, 4.0, 2.0, 6.0]


@pytest.mark.parametrize("quant,tol", [("f16", 2e-2), ("q8_0", 1e-1)])
def test_round_trip_logits_and_greedy_text(tmp_path, source, quant, tol):
    model, tokenizer = source
    path = write_gguf(model, tokenizer, tmp_path / f"tiny-{quant}.gguf", quant=quant)
    assert not list(tmp_path.glob("*.tmp"))
    back, back_tok = _reload(path)
    assert back.config.num_hidden_layers == model.config.num_hidden_layers
    text = "Ada ordered three lamps in Oslo."
    assert back_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert back_tok.chat_template == tokenizer.chat_template
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        diff = (back(ids).logits - model(ids).logits).abs().max().item()
    assert diff < tol, diff
    assert diff > 0 or quant == "f16"  # q8_0 really is quantised
    with torch.no_grad():
        ours = model.generate(ids, max_new_tokens=8, do_sample=False)
        theirs = back.generate(ids, max_new_tokens=8, do_sample=False)
    if quant == "f16":
        assert theirs.tolist() == ours.tolist()


def test_q8_0_matrices_take_34_bytes_per_32_values(tmp_path, source):
    import gguf

    model, tokenizer = source

    def matrix_bytes(path):
        tensors = gguf.GGUFReader(str(path)).tensors
        return {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in tensors if len(t.shape) == 2}

    f16 = matrix_bytes(write_gguf(model, tokenizer, tmp_path / "a.gguf", quant="f16"))
    q8 = matrix_bytes(write_gguf(model, tokenizer, tmp_path / "b.gguf", quant="q8_0"))
    assert f16.keys() == q8.keys() and "token_embd.weight" in f16
    for name, (kind, size) in q8.items():
        assert (kind, f16[name][0]) == ("Q8_0", "F16"), name
        assert size * 64 == f16[name][1] * 34, name  # f16: 2 bytes a value; Q8_0: 34 bytes a block of 32


def test_unknown_quant_and_architecture(tmp_path, source):
    model, tokenizer = source
    with pytest.raises(InputError, match="one of f16"):
        write_gguf(model, tokenizer, tmp_path / "x.gguf", quant="q3")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100))
    with pytest.raises(InputError, match="Llama-architecture"):
        write_gguf(gpt2, tokenizer, tmp_path / "y.gguf")
    assert not list(tmp_path.iterdir())
