"""Make the shipped ``orders_text`` dataset: plain prose about shop orders, for pre-training.

The text domain of the quickstart's extraction task: a shop's daily notes in which customers
(names), items, counts and cities occur as running prose, several orders to a note, with the
small talk of a shop log around them. It is the text a continued pre-training (clm) stage reads
before the extraction SFT (``recipes/pretrain.yaml``, docs/pretrain.md): the task's words in
their context, with no prompt and no ``name: ..; item: ..`` answers.

Disjoint from the extraction data it precedes: no (name, item, count, city) order of
``shipped:extract/val`` or ``shipped:extract/test`` occurs in any note, and the two splits here
share no order either, so the held-out perplexity (``test``) is measured on notes whose orders
the training notes never mention. The names, cities and items are the extraction script's.

Pure Python and seeded: the same arguments always write byte-identical files.

    python scripts/make_text_domain.py                 # into instructkit/datasets/
    python scripts/make_text_domain.py --out /tmp/x --seed 0 --train 300 --test 40
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_extract_dataset import CITIES, ITEMS, NAMES, NUMBER_WORDS  # noqa: E402

# {name} {city} {q} (count as written) {it} (item, plural unless the count is one).
ORDER_SENTENCES = [
    "{name} from {city} ordered {q} {it}.",
    "{name} called from {city} and asked for {q} {it}.",
    "The {city} shop packed {q} {it} for {name} this morning.",
    "We sent {q} {it} to {name} in {city}.",
    "{name} in {city} wrote to say the {q} {it} arrived safely.",
    "A parcel of {q} {it} left for {city}; {name} will collect it.",
    "{name}, who lives in {city}, came back for {q} {it}.",
    "In {city}, {name} paid for {q} {it} in cash.",
    "{name} wants {q} {it} delivered to {city} before Friday.",
    "The courier to {city} took {q} {it} for {name}.",
    "{name} from {city} changed the order to {q} {it}.",
    "Our {city} store reserved {q} {it} for {name}.",
]
OPENINGS = [
    "Shop notes, {day}.",
    "Order log for {day}.",
    "{day}: a busy day at the counter.",
    "Notes from the front desk, {day}.",
    "{day}. The van was late again.",
]
FILLERS = [
    "The van was loaded by noon.",
    "Two returns came in, both fine.",
    "The printer ran out of labels twice.",
    "It rained all afternoon and the shop was quiet.",
    "Stock was counted after closing.",
    "The phone rang more than usual.",
    "A supplier visited with new samples.",
    "Everything was wrapped and labelled before five.",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
_ANSWER = re.compile(r"name: (.+); item: (.+); count: (\d+); city: (.+)")


def extract_orders(path: Path) -> set[tuple[str, str, int, str]]:
    """The (name, item, count, city) orders of an extract split, read from its answers."""
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        answer = json.loads(line)["messages"][-1]["content"]
        name, item, count, city = _ANSWER.fullmatch(answer).groups()
        out.add((name, item, int(count), city))
    return out


def order_sentence(rng: random.Random, name: str, item: tuple[str, str], qty: int, city: str) -> str:
    q = NUMBER_WORDS[qty - 1] if qty <= len(NUMBER_WORDS) and rng.random() < 0.5 else str(qty)
    it = item[0] if qty == 1 else item[1]
    return rng.choice(ORDER_SENTENCES).format(name=name, city=city, q=q, it=it)


def note(rng: random.Random, orders: list[tuple[str, tuple[str, str], int, str]]) -> str:
    """One shop note: an opening, the orders as sentences, a filler sentence somewhere."""
    sentences = [order_sentence(rng, *o) for o in orders]
    sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(FILLERS))
    return " ".join([rng.choice(OPENINGS).format(day=rng.choice(DAYS)), *sentences])


def make(seed: int, n_train: int, n_test: int, excluded: set[tuple[str, str, int, str]]) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    used = set(excluded)
    splits: dict[str, list[dict]] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for _ in range(n):
            orders, wanted = [], rng.randint(3, 5)
            while len(orders) < wanted:
                name, item, city = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CITIES)
                qty = rng.randint(1, 20)
                key = (name, item[0], qty, city)
                if key in used:  # an extract val/test order, or one the other split has
                    continue
                used.add(key)
                orders.append((name, item, qty, city))
            rows.append({"text": note(rng, orders)})
        splits[split] = rows
    return splits


def main() -> None:
    here = Path(__file__).resolve().parent.parent / "instructkit" / "datasets"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=here)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--test", type=int, default=40)
    args = parser.parse_args()
    excluded = extract_orders(here / "extract_val.jsonl") | extract_orders(here / "extract_test.jsonl")
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in make(args.seed, args.train, args.test, excluded).items():
        path = args.out / f"orders_text_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} notes")


if __name__ == "__main__":
    main()
