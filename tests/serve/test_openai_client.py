"""The official ``openai`` client against a real uvicorn server on 127.0.0.1 (a free port, in a
thread) serving a tiny random Llama with SmolLM2's real tokenizer: what a user's code sees."""

from __future__ import annotations

import threading
import time

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from instructkit.serve import create_app
from tests.tiny import real_tokenizer, tiny_llama

NAME = "tiny"
KEY = "test-key"
HELLO = [{"role": "user", "content": "Hello there!"}]


class LiveServer:
    """``create_app(...)`` under uvicorn in a daemon thread; ``port`` is the one the OS picked."""

    def __init__(self, app) -> None:
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, api_key: str = KEY):
        # max_retries=0: the client would otherwise retry 503s and hide them.
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model():
    # initializer_range 0.5: varied tokens (at the default 0.02 a random model repeats "\n")
    return tiny_llama(len(real_tokenizer()), initializer_range=0.5)


@pytest.fixture(scope="module")
def live(model):
    with LiveServer(create_app(model, real_tokenizer(), NAME, api_key=KEY)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return live.client()


def greedy(client, messages=HELLO, **kwargs) -> str:
    r = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=16, **kwargs)
    return r.choices[0].message.content


def test_chat_completion(client):
    r = client.chat.completions.create(model=NAME, messages=HELLO, temperature=0, max_tokens=8)
    assert r.object == "chat.completion" and r.model == NAME
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in {"stop", "length"}
    assert 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_completion_concatenates_to_the_whole_text(client):
    whole = greedy(client)
    stream = client.chat.completions.create(model=NAME, messages=HELLO, temperature=0, max_tokens=16, stream=True)
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    pieces = [c.choices[0].delta.content or "" for c in chunks]
    assert sum(bool(p) for p in pieces) > 1 and "".join(pieces) == whole


def test_n_choices_are_distinct_and_seeded(client):
    def sample():
        r = client.chat.completions.create(model=NAME, messages=HELLO, n=3, temperature=1.0, seed=5, max_tokens=10)
        return [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]

    first = sample()
    assert len(first) == 3 and len(set(first)) == 3
    assert sample() == first
    # Streamed with n=2: deltas carry each choice's index.
    stream = client.chat.completions.create(
        model=NAME, messages=HELLO, n=2, temperature=1.0, seed=5, max_tokens=10, stream=True
    )
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[0], texts[1]] == first[:2]


def test_stop_sequences(client):
    text = greedy(client)
    assert len(text) >= 6
    one, two = text[2:4], text[len(text) // 2 : len(text) // 2 + 2]
    assert greedy(client, stop=two) == text[: text.find(two)]
    assert greedy(client, stop=[two, one]) == text[: min(text.find(one), text.find(two))]


def test_completions_endpoint(client):
    r = client.completions.create(model=NAME, prompt=HELLO[0]["content"], temperature=0, max_tokens=16)
    assert r.object == "text_completion" and r.choices[0].text == greedy(client)
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model=NAME, prompt=HELLO[0]["content"], temperature=0, max_tokens=16, stream=True
        )
    ]
    assert "".join(pieces) == r.choices[0].text


def test_models_list(client):
    assert [m.id for m in client.models.list()] == [NAME]


def test_concurrent_clients_share_a_batch(live, client):
    prompts = ["Hi", "Name three colours, please.", "Tell me about " + "cats and dogs " * 6, "ok"]
    alone = [greedy(client, [{"role": "user", "content": p}]) for p in prompts]
    engine = live.app.state.engine
    engine.step_sizes.clear()
    engine.pause()
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        answers[i] = greedy(live.client(), [{"role": "user", "content": prompts[i]}])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while engine.waiting < len(prompts) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.resume()
        for t in threads:
            t.join()
    assert [answers.get(i) for i in range(len(prompts))] == alone
    assert max(engine.step_sizes) == len(prompts)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "word " * 300}]}, "messages"),  # past the 256-token context
        ({"messages": HELLO, "max_tokens": 10_000}, "messages"),
        ({"messages": HELLO, "temperature": 5}, "temperature"),
        ({"messages": HELLO, "presence_penalty": 0.5}, "presence_penalty"),
    ],
)
def test_bad_requests_raise_bad_request_error(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=NAME, **kwargs)
    assert caught.value.status_code == 400 and caught.value.param == param


def test_missing_or_wrong_key_raises_authentication_error(live):
    wrong, missing = {}, {"extra_headers": {"Authorization": openai.omit}}  # omit: no header sent at all
    for headers in (wrong, missing):
        with pytest.raises(openai.AuthenticationError) as caught:
            live.client(api_key="wrong").chat.completions.create(model=NAME, messages=HELLO, max_tokens=2, **headers)
        assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"


@pytest.mark.parametrize(
    "call",
    [
        lambda client: client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2),
        lambda client: client.completions.create(model="gpt-4o", prompt="Hello", max_tokens=2),
        lambda client: client.models.retrieve("gpt-4o"),
    ],
    ids=["chat", "completions", "models.retrieve"],
)
def test_unknown_model_raises_not_found_error(client, call):
    with pytest.raises(openai.NotFoundError) as caught:
        call(client)
    error = caught.value
    assert error.status_code == 404 and error.type == "invalid_request_error"
    assert error.code == "model_not_found" and error.param is None and "gpt-4o" in error.message


def test_known_model_retrieved_by_id(client):
    card = client.models.retrieve(NAME)
    assert card.id == NAME and card == client.models.list().data[0]


def test_unknown_endpoint_raises_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model=NAME, input="Hello")  # an OpenAI endpoint this server does not have
    error = caught.value
    assert error.status_code == 404 and error.type == "invalid_request_error" and error.code is None
    assert "POST /v1/embeddings" in error.message


def test_full_queue_answers_503(model):
    app = create_app(model, real_tokenizer(), NAME, api_key=KEY, max_batch=1, max_queue=0)
    with LiveServer(app) as server:
        engine = app.state.engine
        engine.pause()  # the first request holds the one batch slot; max_queue=0 lets none wait
        first: list = []
        sender = threading.Thread(target=lambda: first.append(greedy(server.client())))
        sender.start()
        try:
            while engine.waiting == 0:
                time.sleep(0.01)
            with pytest.raises(openai.InternalServerError) as caught:
                server.client().chat.completions.create(model=NAME, messages=HELLO, max_tokens=2)
            assert caught.value.status_code == 503 and caught.value.code == "server_busy"
        finally:
            engine.resume()
            sender.join()
        assert first and first[0]


def test_stream_options_include_usage(client):
    whole = client.chat.completions.create(model=NAME, messages=HELLO, temperature=0, max_tokens=12)
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=HELLO,
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
