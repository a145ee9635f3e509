"""``instructkit serve`` on a vision run, through the official ``openai`` client on a live server:
an ``image_url`` part (a data: URL, as the client sends a local file) gets the greedy answer that
``instructkit generate --image`` gives for the same image and text; what is not honoured is a 400."""

from __future__ import annotations

import base64

import pytest

openai = pytest.importorskip("openai")

from instructkit.cli import main
from instructkit.datasets import shipped_path
from tests.serve.test_openai_client import LiveServer
from tests.tiny import tiny_model_dir
from tests.train.test_vision import config

QUESTION = "What colour is the shape at the top left?"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from instructkit.train.vision import vision_projector

    root = tmp_path_factory.mktemp("vision_serve")
    # initializer_range 0.5: a random decoder that says varied tokens (at 0.02 it repeats one)
    decoder = tiny_model_dir(root / "tiny", initializer_range=0.5)
    vision_projector(config(root / "run", decoder, max_steps=2))
    return root / "run"


@pytest.fixture(scope="module")
def live(run):
    from instructkit.models.vision import load_vision_model
    from instructkit.serve.vision import create_vision_app

    model, tokenizer = load_vision_model(run)
    with LiveServer(create_vision_app(model, tokenizer, "vision")) as server:
        yield server


def image_file(i: int):
    return shipped_path("vision", "test").parent / "test" / f"{i:04d}.png"


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize("i", [1, 2, 3])
def test_client_image_url_answer_equals_generate(live, run, capsys, i):
    client = live.client()
    answer = client.chat.completions.create(
        model="vision",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(image_file(i))}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
        temperature=0,
        max_tokens=8,
    )
    capsys.readouterr()
    code = main(
        ["generate", "--model", str(run), "--image", str(image_file(i)), "--prompt", QUESTION, "--max-new-tokens", "8"]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert answer.choices[0].message.content == printed[:-1]  # print adds one newline
    assert answer.choices[0].message.content  # the random decoder says something


def test_refused_fields(live):
    client = live.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="vision", messages=[{"role": "user", "content": "hi"}], temperature=0.7, max_tokens=4
        )
    assert "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="vision",
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}
            ],
            max_tokens=4,
        )
    assert "cannot read the image" in str(e.value)
