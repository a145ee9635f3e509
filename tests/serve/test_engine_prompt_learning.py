"""The batcher serving peft prompt tuning, p-tuning and prefix tuning: every greedy answer, batched
with prompts of other lengths and with rows that join mid-decode, is token for token what peft's
own ``generate`` gives that prompt alone. The reference is peft's generate (peft 0.21), never the
engine's own code path."""

from __future__ import annotations

import asyncio

import pytest

peft = pytest.importorskip("peft")
import torch  # noqa: E402

from instructkit.data.templates import encode_prompt  # noqa: E402
from instructkit.errors import InputError  # noqa: E402
from instructkit.generation import stop_tokens  # noqa: E402
from instructkit.serve.engine import Batcher, Choice, Piece, Sampling  # noqa: E402
from tests.tiny import real_tokenizer, tiny_llama, tiny_model_dir  # noqa: E402

VIRTUAL = 5
NEW = 12
# Eight prompts of eight different lengths once templated, so a batch of them is left-padded.
PROMPTS = [
    "Hi",
    "x y",
    "What is two plus two?",
    "Hello there, how are you today?",
    "Name three colours of the rainbow, please.",
    "Tell me a story about " + "a cat and a dog " * 3,
    "Explain why the sky is blue in one short sentence for a child.",
    "Tell me a long story about " + "a red fish and a green bird " * 5,
]
CONFIGS = {
    "prompt_tuning": lambda: peft.PromptTuningConfig(num_virtual_tokens=VIRTUAL, task_type="CAUSAL_LM"),
    "p_tuning": lambda: peft.PromptEncoderConfig(
        num_virtual_tokens=VIRTUAL, encoder_hidden_size=16, task_type="CAUSAL_LM"
    ),
    "prefix_tuning": lambda: peft.PrefixTuningConfig(num_virtual_tokens=VIRTUAL, task_type="CAUSAL_LM"),
}


def prompt_ids(text: str) -> list[int]:
    return encode_prompt(real_tokenizer(), [{"role": "user", "content": text}])


def with_adapter(base, method: str, seed: int = 1):
    """``base`` wrapped with ``method``, its virtual tokens (or prefix, or prompt encoder) drawn
    from N(0, 0.5^2) with ``seed``: the scale of the tiny model's own embeddings, so the adapter
    moves the answers."""
    model = peft.get_peft_model(base, CONFIGS[method]())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model.eval()


def peft_greedy(model, ids: list[int], stop_ids: list[int], max_new_tokens: int = NEW) -> list[int]:
    """peft's own greedy tokens for one prompt alone (no padding), stopping where the engine stops."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=real_tokenizer().pad_token_id,
        )
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module", params=list(CONFIGS))
def adapted(request):
    # initializer_range 0.5: varied tokens (at the default 0.02 a random model repeats "\n")
    return request.param, with_adapter(tiny_llama(len(real_tokenizer()), initializer_range=0.5), request.param)


def test_batched_rows_and_late_joiners_equal_peft_generate_alone(adapted):
    method, model = adapted
    tokenizer = real_tokenizer()
    ids = [prompt_ids(p) for p in PROMPTS]
    assert len(set(map(len, ids))) == len(ids)
    stop_ids, _ = stop_tokens(model, tokenizer, [], None)
    alone = [peft_greedy(model, p, stop_ids) for p in ids]
    # The adapter matters: the base model alone answers every prompt otherwise.
    base = [peft_greedy(model.get_base_model(), p, stop_ids) for p in ids]
    assert all(a != b for a, b in zip(alone, base)), method

    async def body():
        engine = Batcher(model, tokenizer, max_batch=9)
        try:
            engine.pause()
            first = [engine.submit(p, Sampling(max_new_tokens=NEW)) for p in ids[:5]]
            engine.resume()
            started = first[0].events()
            assert isinstance(await started.__anext__(), Piece)  # the first five are decoding
            engine.pause()
            # The last three join the running five; one asks for two (greedy, so equal) choices.
            later = [
                engine.submit(p, Sampling(max_new_tokens=NEW), n=2 if i == 1 else 1) for i, p in enumerate(ids[5:])
            ]
            engine.resume()
            # ``started`` holds the first request's events: its choice comes from there.
            (done,) = [e async for e in started if isinstance(e, Choice)]
            return [[done], *[await s.choices() for s in first[1:] + later]], engine
        finally:
            engine.close()

    got, engine = asyncio.run(body())
    assert [list(choices[0].token_ids) for choices in got] == alone
    assert list(got[6][1].token_ids) == alone[6]
    assert [choices[0].text for choices in got] == [tokenizer.decode(a, skip_special_tokens=True) for a in alone]
    # The late three (four rows) joined five running rows: some step ran all nine.
    assert max(engine.step_sizes) == 9


def multitask_prompt_tuning():
    config = peft.MultitaskPromptTuningConfig(num_virtual_tokens=VIRTUAL, num_tasks=2, task_type="CAUSAL_LM")
    return peft.get_peft_model(tiny_llama(len(real_tokenizer())), config)


def prompt_tuning_for_scores():
    from transformers import LlamaForSequenceClassification

    from tests.tiny import tiny_llama_config

    base = LlamaForSequenceClassification(tiny_llama_config(len(real_tokenizer()), num_labels=1))
    return peft.get_peft_model(base, peft.PromptTuningConfig(num_virtual_tokens=VIRTUAL, task_type="SEQ_CLS"))


def gemma2_prefix_tuning():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # Gemma 2 alternates sliding-window and global layers: peft's prefix cache has both kinds.
    config = Gemma2Config(
        vocab_size=len(real_tokenizer()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=16,
    )
    return peft.get_peft_model(Gemma2ForCausalLM(config), CONFIGS["prefix_tuning"]())


@pytest.mark.parametrize(
    "build, problem",
    [
        (multitask_prompt_tuning, "peft MULTITASK_PROMPT_TUNING adapter"),
        (prompt_tuning_for_scores, "PeftModelForSequenceClassification"),
        (gemma2_prefix_tuning, "DynamicSlidingWindowLayer"),
    ],
)
def test_an_adapter_the_batch_cannot_run_exactly_is_refused_at_start(build, problem):
    model = build()
    with pytest.raises(InputError, match=problem) as err:
        Batcher(model, real_tokenizer())
    assert err.value.field == "model"
    pytest.importorskip("fastapi")
    from instructkit.serve import create_app

    with pytest.raises(InputError, match=problem):  # the server does not start
        create_app(model, real_tokenizer(), "tiny")


@pytest.mark.parametrize("method", list(CONFIGS))
def test_server_over_a_saved_adapter_folder_answers_as_peft_does(tmp_path, method):
    """save_pretrained, load through instructkit's model spec (an adapter folder naming its base
    folder), serve over HTTP: the greedy answer is peft's generate on the model before saving."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from transformers import AutoModelForCausalLM

    from instructkit.generation import decode_response
    from instructkit.models.loading import load_model_and_tokenizer
    from instructkit.serve import create_app

    base_dir = tiny_model_dir(tmp_path / "base", initializer_range=0.5)
    trained = with_adapter(AutoModelForCausalLM.from_pretrained(base_dir), method)
    trained.save_pretrained(tmp_path / "adapter")
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / "adapter"), device="cpu")
    assert type(model).__name__ == "PeftModelForCausalLM"  # the adapter over its base, not merged
    messages = [{"role": "user", "content": "Hello there, how are you today?"}]
    ids = encode_prompt(tokenizer, messages)
    stop_ids, stop_strings = stop_tokens(model, tokenizer, [], None)
    expected = decode_response(tokenizer, peft_greedy(trained, ids, stop_ids), stop_ids, stop_strings)
    base_answer = decode_response(
        tokenizer, peft_greedy(trained.get_base_model(), ids, stop_ids), stop_ids, stop_strings
    )
    assert expected != base_answer

    with TestClient(create_app(model, tokenizer, "tiny")) as client:
        r = client.post("/v1/chat/completions", json={"messages": messages, "temperature": 0, "max_tokens": NEW})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected
        # The virtual tokens take VIRTUAL of the 256 positions: what would fit the base model
        # alone is past the adapter's context.
        too_long = 256 - len(ids) - VIRTUAL + 1
        r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": too_long})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
