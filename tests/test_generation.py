"""Batched generation on a tiny random Llama with the real SmolLM2 tokenizer: padding and
positions, order, stopping, seeding."""

from __future__ import annotations

import pytest
import torch

from instructkit.data.schema import Message
from instructkit.data.templates import encode_prompt
from instructkit.errors import InputError
from instructkit.generation import decode_response, generate
from tests.tiny import real_tokenizer

# Prompts of very different lengths, so a batch holds a lot of left padding.
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
    """A 2-layer, 32-wide random Llama. Untied embeddings: with tied ones a random model
    echoes its last input token, every prompt gives the same text and the tests prove nothing."""
    from tests.tiny import tiny_llama

    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return tiny_llama(len(tokenizer), tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, **ids)


def test_batched_left_padded_greedy_equals_each_prompt_alone(model, tokenizer):
    """If padding leaked into attention or shifted positions, the padded rows would differ."""
    alone = [generate(model, tokenizer, [p], max_new_tokens=10)[0] for p in PROMPTS]
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=5)
    assert batched == alone
    assert len(set(alone)) > 1  # the prompts really lead to different text


def test_results_come_back_in_the_callers_order_whatever_the_batching(model, tokenizer):
    """Batches of 2 over length-sorted prompts, and the reversed list, give the same mapping."""
    reference = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=5)
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2) == reference
    assert generate(model, tokenizer, PROMPTS[::-1], max_new_tokens=6, batch_size=2) == reference[::-1]


def test_token_id_prompts_match_message_prompts(model, tokenizer):
    ids = [encode_prompt(tokenizer, p) for p in PROMPTS]
    assert generate(model, tokenizer, ids, max_new_tokens=6) == generate(model, tokenizer, PROMPTS, max_new_tokens=6)


def test_sampling_is_reproducible_with_a_seed_and_leaves_global_rng_alone(model, tokenizer):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = generate(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=1.0, seed=7)
    c = generate(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=1.0, seed=8)
    greedy = generate(model, tokenizer, PROMPTS, max_new_tokens=10)
    assert a == b
    assert a != c and a != greedy  # near-uniform logits: sampling really samples


def test_stop_string_cuts_the_response_before_it(model, tokenizer):
    """Stopping on a piece of the greedy text gives exactly the text before that piece."""
    full = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=12)[0]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=12, stop=[stop])[0]
    assert cut == full[: full.index(stop)]


def test_generation_stops_at_eos_and_drops_it(model, tokenizer):
    """A hook makes <|im_end|> win from the 3rd forward pass (prefill + 2 steps) on, so the
    response is the 2 tokens greedy decoding gives anyway, and no 4th pass runs."""
    two_tokens = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2)[0]
    calls = []

    def favour_eos(module, inputs, logits):
        calls.append(1)
        if len(calls) >= 3:
            logits = logits.clone()
            logits[..., tokenizer.eos_token_id] = 1e4
        return logits

    handle = model.lm_head.register_forward_hook(favour_eos)
    try:
        out = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=10)[0]
    finally:
        handle.remove()
    assert out == two_tokens
    assert len(calls) == 3


def test_decode_cuts_at_first_stop_id_and_first_stop_string(tokenizer):
    eos = tokenizer.eos_token_id
    hello = tokenizer("Hello world. Bye", add_special_tokens=False)["input_ids"]
    assert decode_response(tokenizer, hello + [eos] + hello, [eos], []) == "Hello world. Bye"
    assert decode_response(tokenizer, hello, [eos], [".", "Bye"]) == "Hello world"
    assert decode_response(tokenizer, [eos, *hello], [eos], []) == ""


def test_bad_arguments_are_input_errors(model, tokenizer):
    with pytest.raises(InputError, match="temperature"):
        generate(model, tokenizer, PROMPTS, temperature=-1)
    with pytest.raises(InputError, match="top_p"):
        generate(model, tokenizer, PROMPTS, temperature=1, top_p=0)
    with pytest.raises(InputError, match="empty"):
        generate(model, tokenizer, [[]])
    assert generate(model, tokenizer, []) == []


def test_model_mode_is_restored(model, tokenizer):
    model.train()
    generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2)
    assert model.training
    model.eval()


def test_a_one_token_stop_string_that_starts_in_the_previous_token_is_cut_there():
    """ "\\n" then the single token "\\n\\n": the text "\\n\\n\\n" holds the stop "\\n\\n" from its
    first character, so nothing is returned (before the fix: "\\n")."""
    from instructkit.generation import decode_response
    from tests.tiny import real_tokenizer

    tok = real_tokenizer()
    nl, nlnl = tok.encode("\n", add_special_tokens=False), tok.encode("\n\n", add_special_tokens=False)
    assert len(nl) == 1 and len(nlnl) == 1
    hi = tok.encode("hi", add_special_tokens=False)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    stops = ["<|im_end|>", "\n\n"]
    assert decode_response(tok, nl + nlnl + hi, [eot, nlnl[0]], stops) == ""
    assert decode_response(tok, hi + nlnl + hi, [eot, nlnl[0]], stops) == "hi"
    assert decode_response(tok, hi + [eot] + hi, [eot, nlnl[0]], stops) == "hi"
    assert decode_response(tok, hi + hi, [eot, nlnl[0]], stops) == "hihi"
