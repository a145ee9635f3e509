"""instructkit.decoding against HF ``generate`` as the peer, on tiny random Llamas with the real
SmolLM2 tokenizer: greedy tokens identical (left-padded batches of different lengths, batch 1,
stop ids ending rows mid-batch), sampled tokens identical for the same seed, stop strings, the
preallocated cache, what falls back to HF, and that generation.generate takes the new path."""

from __future__ import annotations

import pytest
import torch

from instructkit import decoding
from instructkit.data.schema import Message
from instructkit.data.templates import encode_prompt
from instructkit.errors import InputError
from instructkit.generation import generate, left_pad, stop_tokens
from tests.tiny import real_tokenizer, tiny_llama

PROMPTS = [
    [Message("user", "hi")],
    [Message("system", "Be brief."), Message("user", "a much longer prompt with many words in it, " * 3)],
    [Message("user", "what is two plus two?")],
    [Message("user", "name three colours")],
    [Message("user", "ok")],
]


@pytest.fixture(scope="module")
def tokenizer():
    return real_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    """Untied embeddings, so the random model's greedy text varies with the prompt (a tied one
    echoes its last input token, see tests/test_generation.py)."""
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return tiny_llama(len(tokenizer), tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, **ids).eval()


def batch(tokenizer, prompts):
    return left_pad([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id, "cpu")


def hf(model, ids, mask, stop_ids, pad_id, new, **sampling):
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, eos_token_id=list(stop_ids), pad_token_id=pad_id,
            repetition_penalty=1.0, **(sampling or {"do_sample": False}),
        )  # fmt: skip
    return out[:, ids.shape[1] :]


def test_greedy_tokens_equal_hf_on_a_left_padded_batch_and_alone(model, tokenizer):
    """Rows with 0 to 17 columns of left padding in one batch: wrong positions or a leaking pad
    column would change the padded rows' tokens. Batch 1 has no mask at all (HF drops an
    all-ones mask)."""
    ids, mask = batch(tokenizer, PROMPTS)
    assert (mask == 0).sum(dim=1).max() > 10  # a lot of left padding
    stop_ids, _ = stop_tokens(model, tokenizer, None, None)
    pad = tokenizer.pad_token_id
    ours = decoding.decode(model, ids, mask, max_new_tokens=12, stop_ids=stop_ids, pad_id=pad)
    assert torch.equal(ours, hf(model, ids, mask, stop_ids, pad, 12))
    assert len({tuple(r) for r in ours.tolist()}) > 1  # the rows really differ
    one, one_mask = batch(tokenizer, PROMPTS[1:2])
    alone = decoding.decode(model, one, one_mask, max_new_tokens=12, stop_ids=stop_ids, pad_id=pad)
    assert torch.equal(alone, hf(model, one, one_mask, stop_ids, pad, 12))


def test_a_stop_id_ends_one_row_mid_batch_and_the_others_go_on(model, tokenizer):
    """The stop id is the 4th token row 1 writes when nothing stops it (so the model itself
    reaches it): row 1 ends there, later columns are pad, other rows run on, as in HF."""
    ids, mask = batch(tokenizer, PROMPTS)
    pad = tokenizer.pad_token_id
    free = hf(model, ids, mask, [pad], pad, 10)
    stop = int(free[1, 3])
    assert any(stop not in r for r in free.tolist())  # some row runs to the end
    ours = decoding.decode(model, ids, mask, max_new_tokens=10, stop_ids=[stop, pad], pad_id=pad)
    assert torch.equal(ours, hf(model, ids, mask, [stop, pad], pad, 10))
    row = ours[1].tolist()
    assert row[3] == stop and row[4:] == [pad] * (len(row) - 4)


def test_sampling_equals_hf_for_the_same_seed(model, tokenizer):
    """Temperature and top-p through HF's own warpers, one multinomial over the batch a step:
    the same seed gives HF's tokens, and two batches in a row consume the stream as HF does."""
    ids, mask = batch(tokenizer, PROMPTS)
    stop_ids, _ = stop_tokens(model, tokenizer, None, None)
    pad = tokenizer.pad_token_id
    settings = {"temperature": 0.7, "top_p": 0.9}
    torch.manual_seed(11)
    ours = [decoding.decode(model, ids, mask, max_new_tokens=8, stop_ids=stop_ids, pad_id=pad, **settings)]
    ours.append(decoding.decode(model, ids[:2], mask[:2], max_new_tokens=8, stop_ids=stop_ids, pad_id=pad, **settings))
    torch.manual_seed(11)
    peer = [hf(model, ids, mask, stop_ids, pad, 8, do_sample=True, top_k=0, **settings)]
    peer.append(hf(model, ids[:2], mask[:2], stop_ids, pad, 8, do_sample=True, top_k=0, **settings))
    assert all(torch.equal(a, b) for a, b in zip(ours, peer))
    greedy = decoding.decode(model, ids, mask, max_new_tokens=8, stop_ids=stop_ids, pad_id=pad)
    assert not torch.equal(ours[0], greedy)  # it really sampled


def test_generate_takes_the_new_path_and_gives_the_hf_paths_text(model, tokenizer, monkeypatch):
    """generation.generate with the loop and with HF generate (forced by a reason to fall back):
    the same texts greedy, sampled over several batches, and with a stop string."""
    calls = []
    real_decode = decoding.decode
    monkeypatch.setattr(decoding, "decode", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    greedy = generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=2)
    sampled = generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=2, temperature=1.0, seed=5)
    stop = greedy[2][4:7]
    stopped = generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=5, stop=[stop])
    assert len(calls) == 3 + 3 + 1  # every batch went through the loop
    monkeypatch.setattr(decoding, "unsupported_reason", lambda model: "forced for the test")
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=2) == greedy
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=2, temperature=1.0, seed=5) == sampled
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=5, stop=[stop]) == stopped
    assert stopped[2] == greedy[2][: greedy[2].index(stop)]
    assert len(calls) == 7  # the forced runs did not use the loop


def test_min_new_tokens_forbids_the_stop_ids_until_then(model, tokenizer):
    ids, mask = batch(tokenizer, PROMPTS[:2])
    pad = tokenizer.pad_token_id
    free = hf(model, ids, mask, [pad], pad, 6)
    stop = int(free[0, 1])  # row 0 would stop at its 2nd token
    ours = decoding.decode(model, ids, mask, max_new_tokens=6, min_new_tokens=6, stop_ids=[stop], pad_id=pad)
    with torch.inference_mode():
        peer = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
            eos_token_id=[stop], pad_token_id=pad,
        )[:, ids.shape[1] :]  # fmt: skip
    assert ours.shape == (2, 6) and torch.equal(ours, peer)


def test_preallocated_layer_returns_what_concatenation_returns():
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    ours, theirs = decoding.PreallocatedLayer(max_len=7), DynamicLayer()
    for n in (4, 1, 1, 1):
        k, v = torch.randn(2, 3, n, 5), torch.randn(2, 3, n, 5)  # (B, H, n, D)
        a, b = ours.update(k, v), theirs.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert ours.get_seq_length() == 7
    with pytest.raises(RuntimeError, match="holds 7 positions"):
        ours.update(torch.randn(2, 3, 1, 5), torch.randn(2, 3, 1, 5))


def test_what_falls_back_to_hf_is_named(model, tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    assert decoding.unsupported_reason(model) is None
    sliding = MistralForCausalLM(
        MistralConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, sliding_window=4,
        )
    )  # fmt: skip
    assert "sliding" in decoding.unsupported_reason(sliding)
    other = tiny_llama(len(tokenizer), seed=1)
    other.generation_config.no_repeat_ngram_size = 2
    assert "no_repeat_ngram_size" in decoding.unsupported_reason(other)

    class Seq2Seq:  # encoder-decoders are told by their config alone
        config = type("C", (), {"is_encoder_decoder": True})()

    assert decoding.unsupported_reason(Seq2Seq()) == "encoder-decoder"


def test_a_lora_model_decodes_through_the_loop_as_hf(model, tokenizer):
    """A peft LoRA wrapper (not prompt learning) goes through the loop; non-zero B matrices make
    the adapter change the output, and the tokens equal peft's own generate."""
    import copy

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    lora.eval()
    assert decoding.unsupported_reason(lora) is None
    ids, mask = batch(tokenizer, PROMPTS)
    stop_ids, _ = stop_tokens(model, tokenizer, None, None)
    pad = tokenizer.pad_token_id
    ours = decoding.decode(lora, ids, mask, max_new_tokens=8, stop_ids=stop_ids, pad_id=pad)
    assert torch.equal(ours, hf(lora, ids, mask, stop_ids, pad, 8))
    assert not torch.equal(ours, decoding.decode(model, ids, mask, max_new_tokens=8, stop_ids=stop_ids, pad_id=pad))


def test_the_compiled_step_gives_hfs_greedy_tokens(tokenizer):
    """The StaticCache + 4-D mask + torch.compile path on a 1-layer model (compiling is the slow
    part), a left-padded batch of 3."""
    ids_ = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    small = tiny_llama(len(tokenizer), seed=2, tie_word_embeddings=False, num_hidden_layers=1, **ids_).eval()
    ids, mask = batch(tokenizer, PROMPTS[:3])
    stop_ids, _ = stop_tokens(small, tokenizer, None, None)
    pad = tokenizer.pad_token_id
    ours = decoding.decode(small, ids, mask, max_new_tokens=6, stop_ids=stop_ids, pad_id=pad, compile=True)
    assert torch.equal(ours, hf(small, ids, mask, stop_ids, pad, 6))


def test_ppo_rollouts_sample_through_the_loop_with_hfs_tokens_and_log_probs(model, tokenizer, monkeypatch):
    """train.rollout.sample through the loop and through HF generate (forced): the same sampled
    tokens and the same log-probs and entropies, which it computes from each step's raw logits."""
    from instructkit.train import rollout

    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS]
    stop_ids, _ = stop_tokens(model, tokenizer, None, None)
    kwargs = {"stop_ids": stop_ids, "pad_id": tokenizer.pad_token_id, "max_new_tokens": 8, "batch_size": 3}
    ours = rollout.sample(model, prompts, temperature=0.8, top_p=0.95, seed=3, **kwargs)
    monkeypatch.setattr(decoding, "unsupported_reason", lambda model: "forced for the test")
    peer = rollout.sample(model, prompts, temperature=0.8, top_p=0.95, seed=3, **kwargs)
    assert torch.equal(ours.query_responses, peer.query_responses)
    assert torch.equal(ours.response_mask, peer.response_mask)
    assert torch.equal(ours.logprobs, peer.logprobs) and torch.equal(ours.entropy, peer.entropy)


def test_reduced_precision_copies_decode_through_the_loop_as_hf_does_on_them(model, tokenizer):
    """bf16 and torchao int8 copies: the original stays fp32, the copies hold the precision, and
    the loop gives the tokens HF generate gives on the same copy."""
    ids, mask = batch(tokenizer, PROMPTS[:3])
    stop_ids, _ = stop_tokens(model, tokenizer, None, None)
    pad = tokenizer.pad_token_id
    assert decoding.reduced_precision(model, "fp32") is model
    for precision in ("bf16", "int8"):
        low = decoding.reduced_precision(model, precision)
        weight = low.model.layers[0].self_attn.q_proj.weight
        assert (weight.dtype == torch.bfloat16) if precision == "bf16" else (type(weight).__name__ != "Parameter")
        ours = decoding.decode(low, ids, mask, max_new_tokens=6, stop_ids=stop_ids, pad_id=pad)
        assert torch.equal(ours, hf(low, ids, mask, stop_ids, pad, 6))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(InputError, match="unknown precision 'fp16'"):
        decoding.reduced_precision(model, "fp16")


def test_the_eval_stage_reports_each_precision_beside_fp32(tmp_path):
    from instructkit.config import EvalStageConfig, from_dict
    from instructkit.eval.stage import eval_stage
    from tests.tiny import tiny_model_dir, toy_conversations, write_jsonl

    model = str(tiny_model_dir(tmp_path / "tiny"))
    data = str(write_jsonl(tmp_path / "convs.jsonl", toy_conversations(4)))
    cfg = EvalStageConfig(suites=["exact_match"], data=data, max_new_tokens=4, batch_size=2, precisions=["bf16"])
    table = eval_stage(cfg, [("base", model)], tmp_path / "eval")["table"]
    assert list(table) == ["base", "base bf16"]
    assert set(table["base bf16"]) == set(table["base"])
    with pytest.raises(InputError, match="precisions"):  # a typed field: the config loader checks it
        from_dict(EvalStageConfig, {"precisions": ["fp16"]})


def test_the_compiled_step_is_reused_across_prompt_lengths(tokenizer):
    """Batches of other prompt widths fall in the same cache bucket: the same StaticCache object
    (reset, not rebuilt), so the compiled step sees tensors of the same shapes at the same
    addresses; the tokens still equal HF's."""
    ids_ = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    small = tiny_llama(len(tokenizer), seed=3, tie_word_embeddings=False, num_hidden_layers=1, **ids_).eval()
    stop_ids, _ = stop_tokens(small, tokenizer, None, None)
    pad = tokenizer.pad_token_id
    seen = []
    for prompt in (PROMPTS[0], PROMPTS[2]):
        ids, mask = batch(tokenizer, [prompt])
        ours = decoding.decode(small, ids, mask, max_new_tokens=5, stop_ids=stop_ids, pad_id=pad, compile=True)
        assert torch.equal(ours, hf(small, ids, mask, stop_ids, pad, 5))
        seen.append(set(map(id, decoding.compiled_step(small).caches.values())))
    assert len(seen[0]) == 1 and seen[0] == seen[1]
