"""Make the shipped visual instruction dataset ``vision``: rendered scenes with verifiable answers.

Each scene is a 96x96 PNG split into four quadrants (top left, top right, bottom left, bottom
right); one to four quadrants hold a shape (circle, square, triangle) in a colour (red, green,
blue, yellow), drawn at a jittered size and place inside its quadrant. Each record asks one
question about its scene, in LLaMA-Factory's ``mllm_demo.json`` shape (``messages`` with an
``<image>`` tag, ``images`` with the file path relative to the data file):

- ``count``: "How many shapes are in the image?" -> "3"
- ``colour``: "What colour is the shape at the top left?" -> "red"
- ``shape``: "What shape is at the bottom right?" -> "triangle"
- ``where``: "Where is the blue circle?" -> "top left" (asked only of a colour-shape unique in its scene)
- ``caption``: "Describe the image." -> "red circle top left, blue square bottom right"
  (shapes in reading order; scored with BLEU as well as exact match)

Held out: no test or validation scene has the same layout (quadrant contents) as a training
scene. Seeded and pure Python + Pillow, so the files regenerate byte for byte:
``python scripts/make_vision_dataset.py`` writes ``instructkit/datasets/vision/``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 96
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (240, 200, 20)}
KINDS = ("count", "colour", "shape", "where", "caption")
SPLITS = {"train": 1200, "val": 100, "test": 200}
OUT = Path(__file__).resolve().parents[1] / "instructkit" / "datasets" / "vision"
BACKGROUND = (245, 245, 240)


def draw(layout: dict[int, tuple[str, str]], rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    d = ImageDraw.Draw(image)
    half = SIZE // 2
    for q, (colour, shape) in layout.items():
        size = rng.randint(22, 34)
        x0 = (q % 2) * half + rng.randint(3, half - size - 3)
        y0 = (q // 2) * half + rng.randint(3, half - size - 3)
        box = (x0, y0, x0 + size, y0 + size)
        fill = COLOURS[colour]
        if shape == "circle":
            d.ellipse(box, fill=fill)
        elif shape == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    return image


def caption(layout: dict[int, tuple[str, str]]) -> str:
    """Each shape in reading order as ``colour shape place``, joined by commas (short: at most 4 x 4 words)."""
    return ", ".join(f"{c} {s} {QUADRANTS[q]}" for q, (c, s) in sorted(layout.items()))


def question(layout: dict[int, tuple[str, str]], rng: random.Random) -> tuple[str, str, str]:
    """(kind, question, answer) for the scene."""
    unique = [q for q, item in layout.items() if list(layout.values()).count(item) == 1]
    kinds = [k for k in KINDS if k != "where" or unique]
    kind = rng.choice(kinds)
    if kind == "count":
        return kind, "How many shapes are in the image?", str(len(layout))
    if kind == "caption":
        return kind, "Describe the image.", caption(layout)
    if kind == "where":
        q = rng.choice(unique)
        colour, shape = layout[q]
        return kind, f"Where is the {colour} {shape}?", QUADRANTS[q]
    q = rng.choice(sorted(layout))
    colour, shape = layout[q]
    if kind == "colour":
        return kind, f"What colour is the shape at the {QUADRANTS[q]}?", colour
    return kind, f"What shape is at the {QUADRANTS[q]}?", shape


def random_layout(rng: random.Random) -> dict[int, tuple[str, str]]:
    count = rng.randint(1, 4)
    return {q: (rng.choice(sorted(COLOURS)), rng.choice(SHAPES)) for q in sorted(rng.sample(range(4), count))}


def make(out: Path = OUT, seed: int = 15) -> dict[str, int]:
    rng = random.Random(seed)
    seen: set[str] = set()
    counts = {}
    for split, n in SPLITS.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        records = []
        while len(records) < n:
            layout = random_layout(rng)
            key = json.dumps(sorted(layout.items()))
            if key in seen:  # train layouts never reappear in val/test (nor any layout twice)
                continue
            seen.add(key)
            name = f"{split}/{len(records):04d}.png"
            draw(layout, rng).save(out / name, optimize=True)
            kind, text, answer = question(layout, rng)
            records.append(
                {
                    "messages": [
                        {"role": "user", "content": f"<image>{text}"},
                        {"role": "assistant", "content": answer},
                    ],
                    "images": [name],
                    "kind": kind,
                }
            )
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        counts[split] = len(records)
    return counts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    print(make(args.out))
