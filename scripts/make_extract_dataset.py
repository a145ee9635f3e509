"""Make the shipped ``extract`` dataset: order sentences -> ``name: ..; item: ..; count: ..; city: ..``.

The skill: read a one-sentence order written in one of many phrasings and fill a fixed,
compact record. Three small normalisations make the format exact rather than guessable: the
count is written in digits (sentences say "three" or "3"), the item is singular (sentences
say "lamps", "knives"), and the keys always come in the same order. The prompt states all of
this, so the zero-shot baseline is fair. Each value follows ": ", so it is the same token as
in the sentence (" Nora", " towel") and is copied rather than respelled: the skill stays
within reach of a 135M model and a few hundred LoRA steps.

Pure Python and seeded: the same arguments always write byte-identical files.

    python scripts/make_extract_dataset.py                 # into instructkit/datasets/
    python scripts/make_extract_dataset.py --out /tmp/x --seed 0 --train 2000 --val 100 --test 100

Held out: a fifth of the names and cities never occur in train (only in val/test), and no
(name, item, qty, city) combination of val or test occurs in train.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = "You extract fields from text."
INSTRUCTION = "Reply as name: NAME; item: ITEM; count: N; city: CITY (item singular, count in digits)."

NAMES = [
    "Ada",
    "Ben",
    "Cara",
    "Dev",
    "Elif",
    "Finn",
    "Gia",
    "Hugo",
    "Ines",
    "Jon",
    "Kira",
    "Leo",
    "Mila",
    "Nils",
    "Omar",
    "Pia",
    "Quinn",
    "Rosa",
    "Sami",
    "Tara",
    "Uma",
    "Viktor",
    "Wren",
    "Xena",
    "Yuki",
    "Zane",
    "Amir",
    "Bea",
    "Carl",
    "Dina",
    "Emil",
    "Fay",
    "Gus",
    "Hana",
    "Ivan",
    "Jade",
    "Karl",
    "Lena",
    "Marco",
    "Nora",
    "Olga",
    "Paul",
    "Rhea",
    "Sven",
    "Tom",
    "Vera",
    "Will",
    "Yara",
    "Zoe",
    "Anton",
]
CITIES = [
    "Oslo",
    "Lima",
    "Cairo",
    "Perth",
    "Quito",
    "Riga",
    "Seoul",
    "Tunis",
    "Porto",
    "Dakar",
    "Leeds",
    "Lyon",
    "Kyoto",
    "Hanoi",
    "Bern",
    "Cork",
    "Delhi",
    "Graz",
    "Nice",
    "Turin",
    "Boston",
    "Denver",
    "Austin",
    "Dublin",
    "Madrid",
    "Prague",
    "Vienna",
    "Warsaw",
    "Zurich",
    "Athens",
    "Berlin",
    "Lisbon",
    "Milan",
    "Naples",
    "Paris",
    "Rome",
    "Sofia",
    "Tokyo",
    "Toronto",
    "Malmo",
]
# (singular, plural): mostly regular, a few -es and irregular plurals to learn.
ITEMS = [
    ("lamp", "lamps"),
    ("chair", "chairs"),
    ("table", "tables"),
    ("mug", "mugs"),
    ("book", "books"),
    ("pen", "pens"),
    ("plate", "plates"),
    ("towel", "towels"),
    ("candle", "candles"),
    ("kettle", "kettles"),
    ("blanket", "blankets"),
    ("pillow", "pillows"),
    ("jacket", "jackets"),
    ("shirt", "shirts"),
    ("sock", "socks"),
    ("hat", "hats"),
    ("bottle", "bottles"),
    ("basket", "baskets"),
    ("mirror", "mirrors"),
    ("clock", "clocks"),
    ("box", "boxes"),
    ("glass", "glasses"),
    ("brush", "brushes"),
    ("dress", "dresses"),
    ("watch", "watches"),
    ("bench", "benches"),
    ("knife", "knives"),
    ("shelf", "shelves"),
    ("battery", "batteries"),
    ("puppy", "puppies"),
]
NUMBER_WORDS = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
]
# {name} {city} {q} (quantity as written) {it} (item, plural unless q is one).
TEMPLATES = [
    "{name} from {city} ordered {q} {it}.",
    "{Q} {it} were ordered by {name} in {city}.",
    "In {city}, {name} bought {q} {it}.",
    "{name} ({city}) wants {q} {it}.",
    "Order: {q} {it} for {name}, shipping to {city}.",
    "{name} asked for {q} {it} to be sent to {city}.",
    "Ship {q} {it} to {city} for {name}.",
    "A customer named {name} in {city} needs {q} {it}.",
    "Please deliver {q} {it} to {name} at the {city} store.",
    "{city} order: {name} wants {q} {it}.",
    "Send {name} {q} {it}; the address is in {city}.",
    "{name} picked up {q} {it} at our {city} shop.",
]
HELD_OUT_FRACTION = 0.2
SPLITS = ("train", "val", "test")


def answer(name: str, item: str, qty: int, city: str) -> str:
    return f"name: {name}; item: {item}; count: {qty}; city: {city}"


def sentence(rng: random.Random, name: str, item: tuple[str, str], qty: int, city: str) -> str:
    if qty <= len(NUMBER_WORDS) and rng.random() < 0.5:
        q = NUMBER_WORDS[qty - 1]
    else:
        q = str(qty)
    it = item[0] if qty == 1 else item[1]
    template = rng.choice(TEMPLATES)
    if qty == 1:
        template = template.replace(" were ", " was ")
    return template.format(name=name, city=city, q=q, Q=q[0].upper() + q[1:], it=it)


def record(rng: random.Random, names: list[str], cities: list[str]) -> tuple[tuple, dict]:
    name, city = rng.choice(names), rng.choice(cities)
    item = rng.choice(ITEMS)
    qty = rng.randint(1, 12) if rng.random() < 0.8 else rng.randint(13, 40)
    user = f"{INSTRUCTION}\n{sentence(rng, name, item, qty, city)}"
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer(name, item[0], qty, city)},
    ]
    return (name, item[0], qty, city), {"messages": messages}


def build(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """The records of every split. Train uses only the seen names and cities; val and test
    use all of them, and never a combination that train has."""
    sizes = sizes or {"train": 2000, "val": 100, "test": 100}
    rng = random.Random(seed)
    shuffled_names, shuffled_cities = NAMES[:], CITIES[:]
    rng.shuffle(shuffled_names)
    rng.shuffle(shuffled_cities)
    seen_names = shuffled_names[int(len(NAMES) * HELD_OUT_FRACTION) :]
    seen_cities = shuffled_cities[int(len(CITIES) * HELD_OUT_FRACTION) :]

    used: set[tuple] = set()
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        names, cities = (seen_names, seen_cities) if split == "train" else (NAMES, CITIES)
        records: list[dict] = []
        while len(records) < sizes[split]:
            key, rec = record(rng, names, cities)
            if key in used:
                continue
            used.add(key)
            records.append(rec)
        out[split] = records
    return out


def write(out_dir: Path, splits: dict[str, list[dict]]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, records in splits.items():
        path = out_dir / f"extract_{split}.jsonl"
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = Path(__file__).resolve().parent.parent / "instructkit" / "datasets"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--seed", type=int, default=0)
    for split, n in (("train", 2000), ("val", 100), ("test", 100)):
        parser.add_argument(f"--{split}", type=int, default=n, help=f"records in {split}")
    args = parser.parse_args(argv)
    sizes = {split: getattr(args, split) for split in SPLITS}
    for path in write(args.out, build(args.seed, sizes)):
        print(path)


if __name__ == "__main__":
    main()
