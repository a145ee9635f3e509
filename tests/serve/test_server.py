"""The OpenAI-compatible server on a tiny random Llama with SmolLM2's real tokenizer, through
Starlette's TestClient (no network port)."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from instructkit.data.templates import encode_prompt
from instructkit.serve import create_app
from tests.tiny import real_tokenizer, tiny_llama

NAME = "tiny"
HELLO = [{"role": "user", "content": "Hello there!"}]


@pytest.fixture(scope="module")
def model():
    # initializer_range 0.5: varied tokens (at the default 0.02 a random model repeats "\n")
    return tiny_llama(len(real_tokenizer()), initializer_range=0.5)


def make_client(model, **kwargs) -> TestClient:
    return TestClient(create_app(model, real_tokenizer(), NAME, **kwargs))


@pytest.fixture(scope="module")
def client(model):
    with make_client(model) as c:
        yield c


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": NAME, "messages": HELLO, **body})


def greedy(client, **body) -> str:
    r = chat(client, temperature=0, max_tokens=16, **body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def assert_openai_error(r, status: int, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param != "any":
        assert error["param"] == param
    return error


def test_chat_completion_has_choices_and_consistent_usage(client):
    tokenizer = real_tokenizer()
    r = chat(client, temperature=0, max_tokens=12)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == NAME
    (choice,) = body["choices"]
    text = choice["message"]["content"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(encode_prompt(tokenizer, HELLO))
    assert 0 < usage["completion_tokens"] <= 12
    assert (usage["completion_tokens"] == 12) == (choice["finish_reason"] == "length")
    # The count is of generated tokens; re-tokenizing the text gives about as many.
    assert abs(len(tokenizer(text, add_special_tokens=False)["input_ids"]) - usage["completion_tokens"]) <= 2
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_n_gives_that_many_choices(client):
    body = chat(client, n=2, temperature=1.0, seed=3, max_tokens=8).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]


def test_seed_makes_sampling_reproducible(client):
    def sample(seed):
        return chat(client, temperature=1.0, seed=seed, max_tokens=12).json()["choices"][0]["message"]["content"]

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1  # a random 49k-token model: different seeds differ


def test_stop_string_cuts_the_text(client):
    text = greedy(client)
    assert len(text) >= 4
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert greedy(client, stop=[stop]) == text[: text.find(stop)]
    assert greedy(client, stop=stop) == text[: text.find(stop)]


def test_completions_endpoint_matches_chat_with_one_user_message(client):
    r = client.post("/v1/completions", json={"prompt": HELLO[0]["content"], "temperature": 0, "max_tokens": 16})
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "text_completion"
    assert r.json()["choices"][0]["text"] == greedy(client)


def sse_events(r) -> list:
    lines = [line for line in r.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_stream_concatenates_to_the_whole_greedy_text(client):
    for stop in (None, [greedy(client)[3:5]]):
        whole = greedy(client, stop=stop)
        r = chat(client, temperature=0, max_tokens=16, stop=stop, stream=True)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = sse_events(r)
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole


def test_stream_with_n_sends_each_choice_by_index(client):
    body = {"temperature": 1.0, "seed": 11, "max_tokens": 10, "n": 2}
    whole = [c["message"]["content"] for c in chat(client, **body).json()["choices"]]
    chunks = sse_events(chat(client, stream=True, **body))
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant" and mine[-1]["finish_reason"] in {"stop", "length"}
        assert "".join(c["delta"].get("content", "") for c in mine) == whole[index]
    assert whole[0] != whole[1]


def test_completions_stream(client):
    r = client.post(
        "/v1/completions", json={"prompt": HELLO[0]["content"], "temperature": 0, "max_tokens": 16, "stream": True}
    )
    assert "".join(c["choices"][0]["text"] for c in sse_events(r)) == greedy(client)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": HELLO, "temperature": "hot"}, "temperature"),
        ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": HELLO, "presence_penalty": 1.0}, "presence_penalty"),
        ({"messages": HELLO, "max_tokens": 10_000}, "messages"),
        ({"messages": [{"role": "user", "content": "word " * 300}]}, "messages"),
        ({"messages": HELLO, "n": 17}, "n"),
    ],
)
def test_bad_requests_are_400_in_openai_shape(client, body, param):
    error = assert_openai_error(client.post("/v1/chat/completions", json=body), 400, param)
    assert error["type"] == "invalid_request_error"


def test_malformed_json_is_400(client):
    r = client.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert "JSON" in assert_openai_error(r, 400)["message"]


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/v1/chat/completions", {"model": "gpt-4o", "messages": HELLO}),
        ("POST", "/v1/completions", {"model": "gpt-4o", "prompt": "Hello"}),
        ("GET", "/v1/models/gpt-4o", None),
    ],
)
def test_unknown_model_is_404_as_openai_answers_it(client, method, path, body):
    """OpenAI's API: HTTP 404, type invalid_request_error, code model_not_found, param null."""
    error = assert_openai_error(client.request(method, path, json=body), 404, param=None)
    assert error["type"] == "invalid_request_error" and error["code"] == "model_not_found"
    assert "gpt-4o" in error["message"] and f"'{NAME}'" in error["message"]  # what was asked, what is served


@pytest.mark.parametrize("method, path", [("POST", "/v1/embeddings"), ("GET", "/v1/chat"), ("GET", "/v1")])
def test_unknown_route_is_404_not_found_error_naming_the_api(client, method, path):
    error = assert_openai_error(client.request(method, path, json={}), 404, param=None)
    assert error["type"] == "invalid_request_error" and error["code"] is None
    assert f"{method} {path}" in error["message"] and "POST /v1/chat/completions" in error["message"]


def test_wrong_method_is_405_with_allow(client):
    r = client.get("/v1/chat/completions")
    error = assert_openai_error(r, 405, param=None)
    assert r.headers["allow"] == "POST" and "answers POST" in error["message"]


def test_model_card_by_id(model):
    name = "runs/quickstart/sft"  # ids are --model specs: slashes included
    with TestClient(create_app(model, real_tokenizer(), name)) as c:
        (listed,) = c.get("/v1/models").json()["data"]
        assert c.get(f"/v1/models/{name}").json() == listed
        assert c.get("/v1/models/runs%2Fquickstart%2Fsft").json() == listed  # as clients that quote it send it
        assert_openai_error(c.get("/v1/models/runs/quickstart"), 404, param=None)


def test_openapi_documents_404_as_not_found_error(client):
    schema = client.get("/openapi.json").json()
    for path, method in [("/v1/chat/completions", "post"), ("/v1/completions", "post"), ("/v1/models/{model}", "get")]:
        ref = schema["paths"][path][method]["responses"]["404"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == "#/components/schemas/NotFoundResponse", (path, ref)
    detail = schema["components"]["schemas"]["NotFoundDetail"]["properties"]
    assert detail["type"]["const"] == "invalid_request_error"


def test_docs_pages_load_nothing_from_other_hosts(client):
    import re

    for page in ("/docs", "/redoc"):
        r = client.get(page)
        assert r.status_code == 200 and "default-src 'self'" in r.headers["content-security-policy"]
        urls = re.findall(r'(?:src|href)="([^"]+)"', r.text)
        assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), (page, urls)
        for url in urls:
            asset = client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 1000, url
    assert client.get("/static/docs/../app.py").status_code == 404
    assert client.get("/static/docs/index.html").status_code == 404


def test_api_key(model):
    with make_client(model, api_key="sekret") as c:
        assert_openai_error(c.get("/v1/models"), 401)
        assert_openai_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        r = c.post(
            "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}, headers={"Authorization": "Bearer wrong"}
        )
        assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert c.get("/health").status_code == 200  # liveness stays open


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [NAME]
    assert client.get("/health").json()["status"] == "ok"
    assert "/v1/chat/completions" in client.get("/openapi.json").json()["paths"]


def test_503_when_the_queue_is_full(model):
    with make_client(model, max_queue=0, max_batch=1) as c:
        engine = c.app.state.engine
        engine.pause()  # nothing is scheduled: the first request holds the one batch slot
        first: list = []
        sender = threading.Thread(target=lambda: first.append(chat(c, max_tokens=2)))
        sender.start()
        try:
            while engine.waiting == 0:
                time.sleep(0.01)
            error = assert_openai_error(chat(c, max_tokens=2), 503)
            assert error["type"] == "server_error" and error["code"] == "server_busy"
        finally:
            engine.resume()
            sender.join()
        assert first[0].status_code == 200
        assert chat(c, max_tokens=2).status_code == 200


def test_concurrent_requests_share_a_batch_and_each_gets_its_own_answer(model):
    prompts = ["Hi", "What is the capital of France? Answer in one word.", "Say something long " * 8]
    with make_client(model) as c:
        alone = [greedy(c, messages=[{"role": "user", "content": p}]) for p in prompts]
        engine = c.app.state.engine
        engine.step_sizes.clear()
        engine.pause()
        answers: dict[int, str] = {}
        senders = [
            threading.Thread(
                target=lambda i=i, p=p: answers.__setitem__(i, greedy(c, messages=[{"role": "user", "content": p}]))
            )
            for i, p in enumerate(prompts)
        ]
        for t in senders:
            t.start()
        while engine.waiting < len(prompts):
            time.sleep(0.01)
        engine.resume()
        for t in senders:
            t.join()
        assert [answers[i] for i in range(len(prompts))] == alone
        assert max(engine.step_sizes) == len(prompts)
        assert c.get("/health").json()["waiting"] == 0


def test_cli_serve_defaults_are_local():
    from instructkit.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "m"])
    assert (args.host, args.port, args.api_key, args.max_queue, args.max_batch) == ("127.0.0.1", 8000, None, 16, 8)


# ----------------------------------------------------------------------------------------------
# The runs page's list


def test_runs_list_holds_only_folders_with_results(model, tmp_path):
    """A run has a summary.json (done) or a checkpoints/step-N (under way); a stage that failed
    before its first checkpoint (config.yaml only), an atomic_dir temporary and a checkpoint
    still being written are not runs."""
    runs = tmp_path / "runs"
    for folder, files in {
        "done": ["config.yaml", "summary.json"],
        "going": ["config.yaml", "metrics.jsonl", "checkpoints/step-000010/state.json"],
        "pipe/sft": ["summary.json"],
        "pipe/dpo": ["config.yaml"],  # failed at once
        "pipe/eval.tmp-k2j3": ["summary.json"],  # atomic_dir writing it
        "half": ["config.yaml", "checkpoints/step-000010.tmp-x9/state.json", "checkpoints/best/state.json"],
    }.items():
        for name in files:
            (runs / folder / name).parent.mkdir(parents=True, exist_ok=True)
            (runs / folder / name).write_text("{}" if name.endswith(".json") else "")
    (runs / "done" / "summary.json").write_text(json.dumps({"stage": "sft", "loss": 0.5}))

    with make_client(model, runs_dir=str(runs)) as c:
        r = c.get("/runs/list")
    assert r.status_code == 200, r.text
    listed = {run["path"]: run for run in r.json()["runs"]}
    assert set(listed) == {"done", "going", "pipe/sft"}
    assert listed["done"]["finished"] and listed["done"]["numbers"] == {"loss": 0.5}
    assert not listed["going"]["finished"] and listed["going"]["files"] == ["config.yaml", "metrics.jsonl"]
