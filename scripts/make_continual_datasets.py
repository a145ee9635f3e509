"""Make the shipped continual-learning data: two tasks over the ``extract`` orders, and generic prose.

The continual recipe trains ``extract`` and then these two tasks in turn. Each reads the same
kind of input as ``extract`` (a one-sentence order, written with the extract script's names,
cities, items and phrasings) and asks for a different answer in a different format, so that
tuning on one really interferes with the others: the model must read the instruction to know
which format the answer takes.

* ``label`` (a shipping label): ``CITY / NAME / N x ITEM``, e.g. ``Oslo / Ada / 9 x shirt``.
* ``keysort`` (the extract fields with the keys in alphabetical order):
  ``city: CITY; count: N; item: ITEM; name: NAME``. The same keys and values as ``extract``, in
  another order: the format a sequentially tuned model most readily confuses with extract's.

Both keep extract's normalisations (count in digits, item singular), stated in the prompt, so
the zero-shot baseline is fair; the default model gets neither exactly right zero-shot.

``generic_text``: plain English prose (not the tasks' format) whose perplexity, before and after
each task, measures how much general ability the tuning costs.

Pure Python and seeded: the same arguments always write byte-identical files.

    python scripts/make_continual_datasets.py              # into instructkit/datasets/
    python scripts/make_continual_datasets.py --out /tmp/x --seed 1

Held out, as in the extract script: a fifth of the names and cities never occur in a task's
train split (only in its val/test), and no (name, item, count, city) of a task's val or test
occurs in its train.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "instructkit" / "datasets"


def _extract_script():
    spec = importlib.util.spec_from_file_location("make_extract_dataset", HERE / "make_extract_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXTRACT = _extract_script()
SPLITS = ("train", "val", "test")
SIZES = {"train": 400, "val": 50, "test": 100}


def label_answer(name: str, item: str, qty: int, city: str) -> str:
    return f"{city} / {name} / {qty} x {item}"


def keysort_answer(name: str, item: str, qty: int, city: str) -> str:
    return f"city: {city}; count: {qty}; item: {item}; name: {name}"


# name -> (system, instruction, answer)
TASKS: dict[str, tuple[str, str, Callable[[str, str, int, str], str]]] = {
    "label": (
        "You write shipping labels.",
        "Reply as CITY / NAME / N x ITEM (item singular, count in digits).",
        label_answer,
    ),
    "keysort": (
        "You extract fields from text.",
        "Reply as city: CITY; count: N; item: ITEM; name: NAME (keys in alphabetical order, item singular, "
        "count in digits).",
        keysort_answer,
    ),
}
SEEDS = {"label": 101, "keysort": 202}  # each task its own held-out names and cities


def record(rng: random.Random, task: str, names: list[str], cities: list[str]) -> tuple[tuple, dict]:
    system, instruction, answer = TASKS[task]
    name, city = rng.choice(names), rng.choice(cities)
    item = rng.choice(EXTRACT.ITEMS)
    qty = rng.randint(1, 12) if rng.random() < 0.8 else rng.randint(13, 40)
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": f"{instruction}\n{EXTRACT.sentence(rng, name, item, qty, city)}"},
        {"role": "assistant", "content": answer(name, item[0], qty, city)},
    ]
    return (name, item[0], qty, city), {"messages": messages}


def build_task(task: str, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """One task's splits: train uses only the seen names and cities, val and test all of them and
    never a (name, item, count, city) that train has."""
    sizes = sizes or SIZES
    rng = random.Random(seed * 1_000 + SEEDS[task])
    names, cities = EXTRACT.NAMES[:], EXTRACT.CITIES[:]
    rng.shuffle(names)
    rng.shuffle(cities)
    seen_names = names[int(len(names) * EXTRACT.HELD_OUT_FRACTION) :]
    seen_cities = cities[int(len(cities) * EXTRACT.HELD_OUT_FRACTION) :]
    used: set[tuple] = set()
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        pool = (seen_names, seen_cities) if split == "train" else (EXTRACT.NAMES, EXTRACT.CITIES)
        rows: list[dict] = []
        while len(rows) < sizes[split]:
            key, rec = record(rng, task, *pool)
            if key not in used:
                used.add(key)
                rows.append(rec)
        out[split] = rows
    return out


# Generic prose: sentences about everyday subjects, none of them an order or a field list.
SUBJECTS = [
    "The old bridge",
    "A small garden",
    "The river",
    "Our neighbour",
    "The library",
    "A quiet village",
    "The morning train",
    "The market square",
    "A young teacher",
    "The mountain path",
    "The museum",
    "An old farmer",
]
VERBS = [
    "has changed a great deal over the years",
    "is busiest in the early spring",
    "reminds many visitors of their childhood",
    "was described in a famous novel",
    "looks different after a heavy rain",
    "draws people from the nearby towns",
    "is quieter than it used to be",
    "has a long and curious history",
]
DETAILS = [
    "In the evening the light turns golden and the air grows cool.",
    "Children often stop to watch the birds along the water.",
    "Some people say it was built more than two hundred years ago.",
    "The smell of fresh bread drifts from a bakery around the corner.",
    "Most of the year the weather is mild, though winters can be long.",
    "Local artists have painted it many times, each in a different way.",
    "A narrow road winds past fields of wheat and rows of tall trees.",
    "On weekends families walk there slowly and talk about the week.",
    "Nobody remembers exactly when the first stones were laid.",
    "Travellers write about it in letters to friends far away.",
    "The sound of church bells carries across the valley at noon.",
    "In autumn the leaves cover the ground in red and yellow.",
]
CLOSINGS = [
    "It is a good place to think.",
    "Few places feel so calm.",
    "That is why people keep coming back.",
    "Many hope it will stay the same.",
    "It has become part of everyday life here.",
]


def paragraph(rng: random.Random) -> str:
    subject, verb = rng.choice(SUBJECTS), rng.choice(VERBS)
    details = rng.sample(DETAILS, 3)
    return f"{subject} {verb}. " + " ".join(details) + " " + rng.choice(CLOSINGS)


def build_generic(seed: int = 0, n: int = 40) -> list[dict]:
    rng = random.Random(seed * 1_000 + 303)
    return [{"text": paragraph(rng)} for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write(out_dir: Path, seed: int = 0, sizes: dict[str, int] | None = None) -> list[Path]:
    paths = []
    for task in TASKS:
        for split, rows in build_task(task, seed, sizes).items():
            paths.append(write_jsonl(out_dir / f"{task}_{split}.jsonl", rows))
    paths.append(write_jsonl(out_dir / "generic_text_test.jsonl", build_generic(seed)))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    for split, n in SIZES.items():
        parser.add_argument(f"--{split}", type=int, default=n, help=f"records in each task's {split} split")
    args = parser.parse_args(argv)
    for path in write(args.out, args.seed, {split: getattr(args, split) for split in SPLITS}):
        print(path)


if __name__ == "__main__":
    main()
