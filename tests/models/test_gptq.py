"""GPTQ rounding into Q8_0 blocks: against an independent step-by-step solve, against gguf's own
round-to-nearest, and written into a GGUF file that transformers reads back as those weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instructkit.models.gptq import (
    dequantize,
    gptq_q8_0,
    q8_0_bytes,
    q8_0_nearest,
    sequential_gptq,
)


def _correlated_inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) * 0.3 + torch.eye(cols, dtype=torch.float64)
    return torch.randn(n, cols, generator=g, dtype=torch.float64) @ mix


def _reference(w0: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal Brain Quantisation one column at a time, without GPTQ's Cholesky trick: once columns
    0..j are rounded, the rest of each row is the exact minimiser of (w - w0)^T H (w - w0) given
    them, solved directly. A block's scale comes from the weights as they stand at its start."""
    rows, cols = w0.shape
    w = w0.clone()
    q = torch.zeros(rows, cols, dtype=torch.float64)
    d = torch.zeros(rows, cols // 32, dtype=torch.float64)
    for j in range(cols):
        if j % 32 == 0:
            d[:, j // 32] = (w[:, j : j + 32].abs().amax(1).float() / 127).half().double()
        scale = d[:, j // 32]
        q[:, j] = (w[:, j] / scale).round().clamp(-127, 127)
        fixed, rest = slice(0, j + 1), slice(j + 1, cols)
        if j + 1 < cols:
            shift = (q[:, fixed] * d.repeat_interleave(32, 1)[:, fixed]) - w0[:, fixed]
            w[:, rest] = w0[:, rest] - torch.linalg.solve(H[rest, rest], H[rest, fixed] @ shift.T).T
    return q, d


def test_gptq_equals_the_step_by_step_solve():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 64, generator=g, dtype=torch.float64) * 0.1
    X = _correlated_inputs(200, 64, seed=1)
    H = X.T @ X
    q, d = gptq_q8_0(w, H, damp=0.01, block=32)  # two lazy-update blocks
    damped = H + 0.01 * torch.diag(H).mean() * torch.eye(64, dtype=torch.float64)
    q_ref, d_ref = _reference(w, damped)
    assert torch.equal(d.double(), d_ref)
    assert torch.equal(q.double(), q_ref)
    assert not torch.equal(q, q8_0_nearest(w)[0])  # the updates changed some roundings


def test_lazy_batch_size_does_not_change_the_result():
    w = torch.randn(5, 128, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    X = _correlated_inputs(300, 128, seed=3)
    a = gptq_q8_0(w, X.T @ X, block=32)
    b = gptq_q8_0(w, X.T @ X, block=128)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_uncorrelated_inputs_give_round_to_nearest_and_nearest_is_gguf_s_q8_0():
    import gguf

    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(4)) * 0.05
    H = torch.diag(torch.rand(96, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5)
    q, d = gptq_q8_0(w, H)
    q_n, d_n = q8_0_nearest(w)
    assert torch.equal(q, q_n) and torch.equal(d, d_n)
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0).reshape(64, 3, 34)
    ours = q8_0_bytes(q_n.numpy(), d_n.numpy()).reshape(64, 3, 34)
    assert np.array_equal(ours[..., :2], theirs[..., :2])  # the same f16 scales
    q_theirs = theirs[..., 2:].copy().view(np.int8).reshape(64, 96).astype(np.int64)
    q_ours = q_n.numpy().astype(np.int64)
    differ = q_ours != q_theirs
    assert np.abs(q_ours - q_theirs).max() <= 1 and differ.mean() < 0.01
    # where gguf (rounding against the unrounded float32 scale) lands elsewhere, ours is nearer
    scale = np.repeat(d_n.numpy().astype(np.float64), 32, axis=1)
    x = w.numpy().astype(np.float64)
    assert (np.abs(x - q_ours * scale) <= np.abs(x - q_theirs * scale) + 1e-12)[differ].all()


def test_gptq_moves_the_layer_output_less_than_round_to_nearest():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 0.02
    X = _correlated_inputs(1000, 256, seed=7)
    q, d = gptq_q8_0(w, X.T @ X)
    q_n, d_n = q8_0_nearest(w)
    out = X @ w.T
    err_gptq = (X @ dequantize(q, d).double().T - out).pow(2).sum()
    err_nearest = (X @ dequantize(q_n, d_n).double().T - out).pow(2).sum()
    assert err_gptq < 0.8 * err_nearest, (err_gptq, err_nearest)
    assert q.abs().max() <= 127 and q.dtype == torch.int8 and d.dtype == torch.float16


def test_bytes_dequantize_with_gguf_to_the_blocks():
    import gguf

    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    X = _correlated_inputs(100, 64, seed=9)
    q, d = gptq_q8_0(w, X.T @ X)
    raw = q8_0_bytes(q.numpy(), d.numpy())
    assert raw.shape == (6, 2 * 34)
    back = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).reshape(6, 64)
    assert np.array_equal(back, dequantize(q, d).numpy())


@pytest.fixture(scope="module")
def tiny():
    from tests.tiny import real_tokenizer, tiny_llama

    tokenizer = real_tokenizer()
    model = tiny_llama(len(tokenizer), seed=3, hidden_size=64, intermediate_size=128).eval()
    model.config.eos_token_id = tokenizer.eos_token_id
    texts = ["Ada ordered three lamps in Oslo.", "Bo wants 2 chairs.", "Send nine cups to Lima, please."]
    b = tokenizer(texts, return_tensors="pt", padding=True)
    return model, tokenizer, [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}]


def test_sequential_gptq_rounds_every_decoder_linear_and_leaves_them_in_place(tiny):
    import copy

    model, _, batches = tiny
    copy_ = copy.deepcopy(model)
    blocks = sequential_gptq(copy_, batches)
    linears = [n for n, p in model.named_parameters() if ".layers." in n and p.ndim == 2]
    assert sorted(blocks) == sorted(linears)
    params = dict(copy_.named_parameters())
    for name, (q, d) in blocks.items():
        assert torch.equal(params[name].detach(), dequantize(q, d))
    # the first layer's blocks are GPTQ on that layer's own inputs: not simply nearest rounding
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(blocks[q_proj][0], q8_0_nearest(dict(model.named_parameters())[q_proj])[0])


def test_the_gguf_file_holds_the_gptq_blocks(tmp_path, tiny):
    import copy

    from transformers import AutoModelForCausalLM

    from instructkit.models.gguf_export import write_gguf

    model, tokenizer, batches = tiny
    blocks = sequential_gptq(copy.deepcopy(model), batches)
    path = write_gguf(model, tokenizer, tmp_path / "tiny.gguf", quant="q8_0", blocks=blocks)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    got = dict(back.named_parameters())
    for name, (q, d) in blocks.items():  # q and k come back un-permuted: every row in its place
        assert torch.equal(got[name].detach(), dequantize(q, d)), name
