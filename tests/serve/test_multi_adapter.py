"""Several LoRA adapters behind one server: a tiny Llama base saved as a folder, two LoRA adapters
on it saved as folders (seeded, nonzero B, so each moves the answers), served together through the
official ``openai`` client. The reference for every answer is ``instructkit.generation.generate``
(HF ``generate``) on that adapter loaded alone from its folder by ``models.loading.load_model``, or on
the base alone: never the server's own path.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

openai = pytest.importorskip("openai")
peft = pytest.importorskip("peft")
httpx = pytest.importorskip("httpx")
import torch  # noqa: E402

from instructkit import cli  # noqa: E402
from instructkit.errors import InputError  # noqa: E402
from instructkit.generation import generate  # noqa: E402
from instructkit.models.loading import load_model, lora_adapter_folder  # noqa: E402
from instructkit.serve import create_app  # noqa: E402
from tests.serve.test_openai_client import LiveServer  # noqa: E402
from tests.tiny import real_tokenizer, tiny_model_dir  # noqa: E402

KEY = "test-key"
NEW = 12
PROMPTS = [
    "Hi",
    "What is two plus two?",
    "Name three colours of the rainbow, please.",
    "Tell me a story about " + "a cat and a dog " * 3,
    "ok",
    "Hello there, how are you today?",
    "Explain why the sky is blue in one short sentence.",
    "x y",
]
# Two LoRA adapters on different modules with different ranks; "b" uses rank-stabilised scaling.
LORAS = {  # served as "a" and "b" (names peft itself would warn about: they are in "lora_")
    "a": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "b": {"r": 2, "lora_alpha": 4, "target_modules": ["o_proj", "down_proj", "up_proj"], "use_rslora": True},
}


def save_lora(base_dir, out, seed: int, **config) -> str:
    """A LoRA adapter on the model in ``base_dir``, saved to ``out``: A and B drawn from
    N(0, 0.5^2) with ``seed`` (B nonzero, unlike a fresh adapter, so it changes the answers)."""
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), peft.LoraConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    # initializer_range 0.5: varied tokens (at the default 0.02 a random model repeats "\n")
    base = str(tiny_model_dir(root / "base", initializer_range=0.5))
    other = str(tiny_model_dir(root / "other", seed=1, initializer_range=0.5))
    folders = {name: save_lora(base, root / name, seed=10 + i, **c) for i, (name, c) in enumerate(LORAS.items())}
    return {"root": root, "base": base, "other": other, **folders}


def messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


@pytest.fixture(scope="module")
def alone(world) -> dict[str, list[str]]:
    """Each model's greedy answers to PROMPTS, that model loaded alone, one prompt at a time."""
    out = {}
    for name, spec in (("base", world["base"]), ("a", world["a"]), ("b", world["b"])):
        model = load_model(spec, device="cpu")
        out[name] = [
            generate(model, real_tokenizer(), [messages(p)], max_new_tokens=NEW, batch_size=1)[0] for p in PROMPTS
        ]
    return out


def serve(world, **kwargs):
    model = load_model(world["base"], device="cpu")
    return create_app(model, real_tokenizer(), world["base"], api_key=KEY, **kwargs)


def greedy(client, model: str, prompt: str) -> str:
    r = client.chat.completions.create(model=model, messages=messages(prompt), temperature=0, max_tokens=NEW)
    assert r.model == model
    return r.choices[0].message.content


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{server.port}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_the_adapters_change_the_answers(alone):
    """Guards the tests below: were an adapter a no-op, serving the wrong one would pass them."""
    for i in range(len(PROMPTS)):
        assert len({alone["base"][i], alone["a"][i], alone["b"][i]}) == 3, PROMPTS[i]


@pytest.fixture(scope="module")
def live(world):
    with LiveServer(serve(world, adapters={"a": world["a"], "b": world["b"]}, max_queue=32)) as server:
        yield server


def test_models_lists_the_base_and_each_adapter_with_its_parent(live, world):
    cards = live.client().models.list().data
    assert [c.id for c in cards] == [world["base"], "a", "b"]
    base, *adapters = cards
    assert not hasattr(base, "parent") or base.parent is None
    assert [(c.parent, c.root) for c in adapters] == [(world["base"], world["a"]), (world["base"], world["b"])]
    assert live.client().models.retrieve("b").root == world["b"]


def test_24_interleaved_requests_share_batches_and_each_equals_its_model_alone(live, world, alone):
    engine = live.app.state.engine
    # Which adapters each forward ran with: the rows of a step are the rows of the batch.
    seen: list[list] = []
    forward = engine.adapters.forward

    def recording(adapters, **inputs):
        seen.append(list(adapters))
        return forward(adapters, **inputs)

    engine.adapters.forward = recording
    models = {"base": world["base"], "a": "a", "b": "b"}
    order = ["base", "a", "b"]
    asks = [(order[i % 3], PROMPTS[(i // 3 + i) % len(PROMPTS)]) for i in range(24)]  # interleaved models
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        name, prompt = asks[i]
        answers[i] = greedy(live.client(), models[name], prompt)

    engine.step_sizes.clear()
    engine.pause()  # all 24 wait, then run 8 at a time, later ones joining as rows finish
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(24)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: engine.waiting == 24, "24 waiting requests")
    finally:
        engine.resume()
        for t in threads:
            t.join()
        engine.adapters.forward = forward
    expected = [alone[name][PROMPTS.index(prompt)] for name, prompt in asks]
    assert [answers.get(i) for i in range(24)] == expected
    assert max(engine.step_sizes) == 8
    assert any({None, "a", "b"} <= set(step) for step in seen)  # base and both adapters in one forward


def test_streamed_adapter_answer_concatenates_to_the_whole(live, alone):
    stream = live.client().chat.completions.create(
        model="b", messages=messages(PROMPTS[2]), temperature=0, max_tokens=NEW, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == alone["b"][2]


def test_unknown_adapter_is_openais_404(live):
    with pytest.raises(openai.NotFoundError) as caught:
        live.client().chat.completions.create(model="c", messages=messages("Hi"), max_tokens=2)
    body = caught.value.body  # the "error" object of the answer
    assert caught.value.status_code == 404
    assert {k: body[k] for k in ("type", "param", "code")} == {
        "type": "invalid_request_error",
        "param": None,  # what OpenAI's API (and this app for any other unknown model) sends
        "code": "model_not_found",
    }
    assert "`c`" in body["message"] and "'a'" in body["message"]
    r = post(live, "/v1/completions", {"model": "c", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_load_and_unload_endpoints_and_max_loras(world, alone):
    with LiveServer(serve(world, max_loras=1)) as server:
        client = server.client()
        assert [c.id for c in client.models.list().data] == [world["base"]]
        r = post(server, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": world["a"]})
        assert r.status_code == 200, r.text
        assert [c.id for c in client.models.list().data] == [world["base"], "a"]
        assert greedy(client, "a", PROMPTS[1]) == alone["a"][1]
        assert greedy(client, world["base"], PROMPTS[1]) == alone["base"][1]

        r = post(server, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": world["b"]})
        assert r.status_code == 400 and "max_loras=1" in r.json()["error"]["message"]
        r = post(server, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": world["b"]})
        assert r.status_code == 400 and "already" in r.json()["error"]["message"]
        r = post(server, "/v1/load_lora_adapter", {"lora_name": world["base"], "lora_path": world["b"]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"

        r = post(server, "/v1/unload_lora_adapter", {"lora_name": "a"})
        assert r.status_code == 200, r.text
        with pytest.raises(openai.NotFoundError):
            greedy(client, "a", PROMPTS[1])
        r = post(server, "/v1/unload_lora_adapter", {"lora_name": "a"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

        # The freed place takes another adapter, which serves its own answers, under any name
        # (one with a dot and a slash, which peft's own adapter names could not hold).
        r = post(server, "/v1/load_lora_adapter", {"lora_name": "team/b-v1.2", "lora_path": world["b"]})
        assert r.status_code == 200, r.text
        assert greedy(client, "team/b-v1.2", PROMPTS[1]) == alone["b"][1]
        assert client.models.retrieve("team/b-v1.2").parent == world["base"]
        assert greedy(client, world["base"], PROMPTS[1]) == alone["base"][1]
        r = httpx.post(f"http://127.0.0.1:{server.port}/v1/load_lora_adapter", json={"lora_name": "x"}, timeout=60)
        assert r.status_code == 401  # same auth as the rest of /v1


def test_load_refuses_an_adapter_on_another_base_or_not_lora(world):
    wrong = save_lora(world["other"], world["root"] / "on-other", seed=3, **LORAS["a"])
    with LiveServer(serve(world)) as server:
        r = post(server, "/v1/load_lora_adapter", {"lora_name": "w", "lora_path": wrong})
        assert r.status_code == 400 and "not on the served base" in r.json()["error"]["message"]
        r = post(server, "/v1/load_lora_adapter", {"lora_name": "w", "lora_path": world["base"]})
        assert r.status_code == 400 and "not a peft adapter" in r.json()["error"]["message"]
        # "~0": the home of a user named 0, who does not exist (schemathesis found the 500 it gave)
        r = post(server, "/v1/load_lora_adapter", {"lora_name": "w", "lora_path": "~0"})
        assert r.status_code == 400 and "cannot expand the '~'" in r.json()["error"]["message"]
        assert [c.id for c in server.client().models.list().data] == [world["base"]]


def test_unloading_lets_requests_in_flight_finish_and_refuses_new_ones(world, alone):
    with LiveServer(serve(world, adapters={"a": world["a"]})) as server:
        engine = server.app.state.engine
        answers: dict[int, str] = {}
        unloaded: list[httpx.Response] = []

        def ask(i: int) -> None:
            answers[i] = greedy(server.client(), "a", PROMPTS[i])

        engine.pause()
        askers = [threading.Thread(target=ask, args=(i,)) for i in (0, 3)]
        unloader = threading.Thread(
            target=lambda: unloaded.append(post(server, "/v1/unload_lora_adapter", {"lora_name": "a"}))
        )
        try:
            for t in askers:
                t.start()
            wait_for(lambda: engine.waiting == 2, "2 waiting requests")
            unloader.start()
            wait_for(lambda: "a" not in engine.served_adapters, "the unload to start")
            with pytest.raises(openai.NotFoundError):  # at once, while the others still wait
                greedy(server.client(), "a", PROMPTS[1])
            assert [c.id for c in server.client().models.list().data] == [world["base"]]
            time.sleep(0.2)
            assert unloader.is_alive() and not unloaded  # it waits for the two requests
        finally:
            engine.resume()
            for t in [*askers, unloader]:
                t.join()
        assert answers == {0: alone["a"][0], 3: alone["a"][3]}
        assert unloaded[0].status_code == 200, unloaded[0].text
        assert engine.adapters.folders == {}
        assert greedy(server.client(), world["base"], PROMPTS[0]) == alone["base"][0]


# -- instructkit serve: refused before the model loads, exit 2


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the adapters were checked")

    monkeypatch.setattr("instructkit.models.loading.load_model_and_tokenizer", refuse)


def test_serve_refuses_an_adapter_on_another_base(world, no_loading, capsys):
    wrong = save_lora(world["other"], world["root"] / "on-other-cli", seed=4, **LORAS["a"])
    code = cli.main(["serve", "--model", world["base"], "--adapter", f"a={world['a']}", "--adapter", f"w={wrong}"])
    err = capsys.readouterr().err
    assert code == 2 and "on-other-cli" in err and "not on the served base" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adapter", "a={a}", "--adapter", "b={b}", "--max-loras", "1"], "max_loras is 1"),
        (["--adapter", "a"], "NAME=PATH"),
        (["--adapter", "a={a}", "--adapter", "a={b}"], "given twice"),
        (["--adapter", "__base__={a}"], "__base__"),
        (["--adapter", "d={dora}"], "DoRA"),
    ],
    ids=["max-loras", "no-path", "twice", "reserved-name", "dora"],
)
def test_serve_refuses_bad_adapter_options(world, no_loading, capsys, args, message):
    dora = world["root"] / "dora"
    if not dora.exists():
        save_lora(world["base"], dora, seed=5, use_dora=True, **LORAS["a"])
    argv = [a.format(a=world["a"], b=world["b"], dora=dora) for a in args]
    assert cli.main(["serve", "--model", world["base"], *argv]) == 2
    assert message in capsys.readouterr().err


def test_adapter_folder_from_a_run_folder_and_its_marker(world, tmp_path):
    """A run folder's final/ is the adapter; instructkit_base.txt names the base (not the cache
    path in adapter_config.json), so an adapter trained from the base's spec matches it."""
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (final / f).write_bytes((world["root"] / "a" / f).read_bytes())
    config = json.loads((final / "adapter_config.json").read_text())
    (final / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/nowhere"}))
    (final / "instructkit_base.txt").write_text(world["base"] + "/")  # another spelling of the same folder
    assert lora_adapter_folder(tmp_path / "run", world["base"]) == str(final)
    with pytest.raises(InputError, match="not on the served base"):
        lora_adapter_folder(tmp_path / "run", world["other"])
