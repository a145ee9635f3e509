"""A seq2seq run's final/ served over the OpenAI API: the official ``openai`` client against a
real uvicorn server (tests/serve/test_openai_client.py's LiveServer) serving a tiny BART trained
a few steps by the seq2seq recipe. /v1/completions and /v1/chat/completions answer; a greedy
answer is the text :func:`instructkit.generation.generate` gives the same prompt (the source
text, no chat template); streaming concatenates to it; concurrent requests batch and still
answer as alone; a seeded sampled request repeats."""

from __future__ import annotations

import threading

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from instructkit.generation import generate
from instructkit.models.loading import load_model_and_tokenizer
from instructkit.serve import create_app
from instructkit.serve.engine import Seq2SeqBatcher
from instructkit.train.seq2seq import seq2seq
from tests.serve.test_openai_client import LiveServer
from tests.tiny import tiny_bart_dir, toy_conversations, write_jsonl

NAME = "tiny-seq2seq"
KEY = "test-key"
PROMPTS = ["reverse: red blue", "reverse: cat dog sun moon", "reverse: tree", "reverse: fish bird red"]


@pytest.fixture(scope="module")
def final(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq2seq_serve")
    data = write_jsonl(root / "train.jsonl", toy_conversations(32))
    seq2seq(
        {
            "model": str(tiny_bart_dir(root / "bart")),
            "out": str(root / "run"),
            "data": {"path": str(data), "val_fraction": 0.0},
            "optim": {"lr": 3e-3, "scheduler": "constant"},
            "train": {"batch_size": 8, "max_steps": 8, "progress": False},
        }
    )
    return root / "run" / "final"


@pytest.fixture(scope="module")
def loaded(final):
    return load_model_and_tokenizer(final, device="cpu")


@pytest.fixture(scope="module")
def live(loaded):
    model, tokenizer = loaded
    app = create_app(model, tokenizer, NAME, api_key=KEY)
    assert isinstance(app.state.engine, Seq2SeqBatcher)
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return live.client(KEY)


def expected(loaded, prompt: str, max_new_tokens: int = 8) -> str:
    model, tokenizer = loaded
    return generate(model, tokenizer, [[{"role": "user", "content": prompt}]], max_new_tokens=max_new_tokens)[0]


def test_completion_is_generate_s_greedy_text(client, loaded):
    r = client.completions.create(model=NAME, prompt=PROMPTS[1], temperature=0, max_tokens=8)
    (choice,) = r.choices
    assert choice.text == expected(loaded, PROMPTS[1])
    assert choice.finish_reason in {"stop", "length"}
    assert 0 < r.usage.completion_tokens <= 8
    assert r.usage.prompt_tokens == len(loaded[1](PROMPTS[1])["input_ids"])  # the source text, [CLS] ... [SEP]


def test_chat_completion_is_generate_s_greedy_text(client, loaded):
    messages = [{"role": "user", "content": PROMPTS[0]}]
    r = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=8)
    assert r.object == "chat.completion" and r.model == NAME
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected(loaded, PROMPTS[0])


def test_streamed_chat_concatenates_to_the_whole_text(client, loaded):
    messages = [{"role": "user", "content": PROMPTS[3]}]
    stream = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=8, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == expected(loaded, PROMPTS[3])


def test_concurrent_requests_each_answer_as_alone(live, client, loaded):
    answers: dict[str, str] = {}

    def ask(prompt: str) -> None:
        r = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=8)
        answers[prompt] = r.choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == {p: expected(loaded, p) for p in PROMPTS}


def test_a_seeded_sampled_request_repeats(client):
    def ask() -> list[str]:
        r = client.completions.create(model=NAME, prompt=PROMPTS[1], temperature=1.0, max_tokens=8, seed=5, n=2)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first = ask()
    assert len(first) == 2 and first == ask()


def test_a_wrong_key_is_401(live):
    with pytest.raises(openai.AuthenticationError):
        live.client("wrong").completions.create(model=NAME, prompt="x", max_tokens=2)
