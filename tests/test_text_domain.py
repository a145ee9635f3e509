"""The shipped ``orders_text`` dataset (the pretrain recipe's text domain): reproducible from its
script, plain text the text reader takes, and holding no order of the extraction splits it is
measured against."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

from instructkit.datasets import SHIPPED, resolve_data_path, shipped_path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_text_domain.py"
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]


def _vocabulary():
    """The extraction script's names, cities and items (the words the notes are made of)."""
    spec = importlib.util.spec_from_file_location("make_extract_dataset", REPO / "scripts" / "make_extract_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VOCAB = _vocabulary()


def _texts(split: str) -> list[str]:
    lines = shipped_path("orders_text", split).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


def test_script_regenerates_the_shipped_files_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True, capture_output=True)
    for split in SHIPPED["orders_text"]:
        name = f"orders_text_{split}.jsonl"
        assert (tmp_path / name).read_bytes() == shipped_path("orders_text", split).read_bytes(), name


def test_text_records_read_as_the_text_format():
    from instructkit.data.formats import load_records

    records = load_records(resolve_data_path("shipped:orders_text/train"), format="text").records
    assert len(records) == 300 and all(r.text for r in records)
    assert len(_texts("test")) == 40


def _orders(split: str) -> list[tuple[str, str, int, str]]:
    out = []
    for line in shipped_path("extract", split).read_text(encoding="utf-8").splitlines():
        answer = json.loads(line)["messages"][-1]["content"]
        name, item, count, city = re.fullmatch(r"name: (.+); item: (.+); count: (\d+); city: (.+)", answer).groups()
        out.append((name, item, int(count), city))
    return out


def _order_of(sentence: str) -> tuple[str, str, int, str] | None:
    """The (name, item, count, city) a sentence states, read back from its words (the item
    singular: the vocabulary item whose plural or singular form occurs); None for small talk."""
    words = re.findall(r"[A-Za-z0-9]+", sentence)
    names, cities = [w for w in words if w in VOCAB.NAMES], [w for w in words if w in VOCAB.CITIES]
    counts = [int(w) if w.isdigit() else NUMBER_WORDS.index(w) + 1 for w in words if w.isdigit() or w in NUMBER_WORDS]
    items = [singular for singular, plural in VOCAB.ITEMS if singular in words or plural in words]
    if not names:
        return None
    assert len(names) == len(cities) == len(counts) == len(items) == 1, sentence
    return names[0], items[0], counts[0], cities[0]


def _note_orders(split: str) -> list[tuple[str, str, int, str]]:
    sentences = [s for t in _texts(split) for s in re.split(r"(?<=[.!?])\s+", t)]
    return [o for o in map(_order_of, sentences) if o is not None]


def test_no_note_states_an_extract_val_or_test_order():
    held_out = set(_orders("val")) | set(_orders("test"))
    train, test = _note_orders("train"), _note_orders("test")
    assert len(train) > 900 and len(test) > 120  # 3 to 5 orders a note
    assert not (set(train) | set(test)) & held_out


def test_the_two_splits_share_no_order():
    train, test = _note_orders("train"), _note_orders("test")
    assert len(set(train + test)) == len(train + test)


def test_notes_are_the_tasks_words_as_prose():
    """Every note mentions several orders (names and counts) and none carries the answer format."""
    for text in _texts("train") + _texts("test"):
        assert "name:" not in text and "count:" not in text
        assert len(re.findall(r"\b(?:\d+|" + "|".join(NUMBER_WORDS) + r")\b", text)) >= 3
