"""The shipped seq2seq data (``transform``): the script makes it byte for byte, every answer is
right by an independent reading of its instruction, no input is in two splits, and every word
is one token of the encoder's WordPiece (so a BERT2BERT can write back what it read)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instructkit.datasets import SHIPPED, shipped_path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_seq2seq_dataset.py"


def rows(split: str) -> list[dict]:
    return [json.loads(line) for line in shipped_path("transform", split).read_text().splitlines()]


def test_the_script_writes_the_shipped_files(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True)
    for split in SHIPPED["transform"]:
        assert (tmp_path / f"transform_{split}.jsonl").read_bytes() == shipped_path("transform", split).read_bytes()


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_every_answer_follows_its_instruction(split):
    animals = {"cat", "dog", "horse", "cow", "pig", "sheep", "goat", "mouse", "rabbit", "fox", "wolf", "bear"}
    animals |= {"lion", "tiger", "snake", "frog", "duck", "owl", "eagle", "fish", "shark", "whale", "monkey", "deer"}
    seen = set()
    for row in rows(split):
        words = row["input"].split()
        seen.add(row["instruction"])
        if row["instruction"].startswith("Reverse"):
            assert row["output"].split() == words[::-1]
        elif row["instruction"].startswith("Sort"):
            assert row["output"].split() == sorted(words)
        elif row["instruction"].startswith("Extract"):
            (number,) = [w for w in words if w.isdigit()]
            assert row["output"] == number
        else:
            assert row["instruction"] == "List the animals."
            assert row["output"].split() == [w for w in words if w in animals] != []
    assert len(seen) == 4


def test_no_input_is_in_two_splits_and_the_first_four_show_each_instruction():
    inputs = {split: {r["input"] for r in rows(split)} for split in SHIPPED["transform"]}
    assert not inputs["train"] & inputs["val"] and not inputs["train"] & inputs["test"]
    assert not inputs["val"] & inputs["test"]
    assert len({r["instruction"] for r in rows("train")[:4]}) == 4  # the decoder's 4-shot demonstrations


def test_every_word_is_one_wordpiece_token():
    from instructkit.models.loading import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    words = {w for split in SHIPPED["transform"] for r in rows(split) for w in (r["input"] + " " + r["output"]).split()}
    several = [w for w in words if not w.isdigit() and len(tokenizer.tokenize(w)) != 1]
    assert several == []
