"""Make the shipped seq2seq instruction data ``transform``: instructed string transforms.

Each record is alpaca (``instruction``, ``input``, ``output``): one of four instructions over a
short lowercase input, and the one right answer (scored by exact match):

* ``Reverse the order of the words.``: 3 to 5 words -> the same words, last first;
* ``Sort the words alphabetically.``: 3 or 4 words -> in alphabetical order;
* ``Extract the number.``: a short sentence with one number (1-999, digits) -> the number;
* ``List the animals.``: 4 or 5 words, 1 to 3 of them animals -> the animals, in input order.

The same words appear under several instructions, so the model has to read the instruction to
know what it owes. Everything is lowercase and each word is one WordPiece token of the embedded
encoder's uncased vocabulary (MiniLM: ``bert-base-uncased``'s), so a BERT2BERT can write back
exactly what it read. Splits: no input occurs in two splits (checked); the records of a split
cycle through the four instructions, so the first four training records (the decoder's 4-shot
demonstrations) show each instruction once.

Pure Python and seeded: the same arguments always write byte-identical files.

    python scripts/make_seq2seq_dataset.py                   # into instructkit/datasets/
    python scripts/make_seq2seq_dataset.py --out /tmp/x --seed 1 --sizes 8000 200 300
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SPLITS = ("train", "val", "test")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "instructkit" / "datasets"
SIZES = {"train": 4000, "val": 200, "test": 300}

ANIMALS = [
    "cat", "dog", "horse", "cow", "pig", "sheep", "goat", "mouse", "rabbit", "fox", "wolf", "bear",
    "lion", "tiger", "snake", "frog", "duck", "owl", "eagle", "fish", "shark", "whale", "monkey", "deer",
]  # fmt: skip
THINGS = [
    "chair", "table", "lamp", "door", "window", "book", "pen", "cup", "plate", "bottle", "phone", "clock",
    "bread", "apple", "cheese", "rice", "soup", "cake", "river", "hill", "cloud", "stone", "tree", "road",
    "red", "blue", "green", "black", "white", "yellow", "shirt", "hat", "shoe", "coat", "key", "box",
]  # fmt: skip
WORDS = ANIMALS + THINGS
NUMBER_TEMPLATES = [
    "there are {n} books on the shelf",
    "the train leaves at platform {n}",
    "she paid {n} dollars for the lamp",
    "we walked {n} miles today",
    "room {n} is on the left",
    "he has {n} friends in the city",
    "the box weighs {n} pounds",
    "my bus number is {n}",
    "they planted {n} trees in the park",
    "the page count is {n}",
    "about {n} people came to the show",
    "order {n} was sent yesterday",
]

REVERSE = "Reverse the order of the words."
SORT = "Sort the words alphabetically."
NUMBER = "Extract the number."
ANIMALS_ONLY = "List the animals."
INSTRUCTIONS = (REVERSE, SORT, NUMBER, ANIMALS_ONLY)


def make(instruction: str, rng: random.Random) -> tuple[str, str]:
    """(input, output) of one record under ``instruction``."""
    if instruction == REVERSE:
        words = rng.sample(WORDS, rng.randint(3, 5))
        return " ".join(words), " ".join(reversed(words))
    if instruction == SORT:
        words = rng.sample(WORDS, rng.randint(3, 4))
        return " ".join(words), " ".join(sorted(words))
    if instruction == NUMBER:
        n = str(rng.randint(1, 999))
        return rng.choice(NUMBER_TEMPLATES).format(n=n), n
    k = rng.randint(4, 5)
    animals = rng.sample(ANIMALS, rng.randint(1, 3))
    words = animals + rng.sample(THINGS, k - len(animals))
    rng.shuffle(words)
    return " ".join(words), " ".join(w for w in words if w in ANIMALS)


def make_splits(sizes: dict[str, int], seed: int) -> dict[str, list[dict[str, str]]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict[str, str]]] = {}
    for split in SPLITS:
        rows = []
        while len(rows) < sizes[split]:
            instruction = INSTRUCTIONS[len(rows) % len(INSTRUCTIONS)]
            text, answer = make(instruction, rng)
            if text in seen:
                continue
            seen.add(text)
            rows.append({"instruction": instruction, "input": text, "output": answer})
        out[split] = rows
    inputs = {split: {r["input"] for r in rows} for split, rows in out.items()}
    for a in SPLITS:
        for b in SPLITS:
            assert a == b or not inputs[a] & inputs[b], f"an input in both {a} and {b}"
    return out


def write(out: Path, splits: dict[str, list[dict[str, str]]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out / f"transform_{split}.jsonl").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"), default=list(SIZES.values()))
    args = parser.parse_args(argv)
    write(args.out, make_splits(dict(zip(SPLITS, args.sizes)), args.seed))


if __name__ == "__main__":
    main()
