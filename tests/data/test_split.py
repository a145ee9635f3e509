"""split_records: sizes, disjointness, determinism across processes, stability under reordering."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from instructkit.data.schema import Conversation, Message
from instructkit.data.split import split_records
from instructkit.errors import InputError

RECORDS = [f"record {i}" for i in range(100)]


def test_parts_are_disjoint_and_cover_everything():
    train, val, test = split_records(RECORDS, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert sorted(train + val + test) == sorted(RECORDS)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)


def test_parts_keep_the_original_order():
    for part in split_records(RECORDS, val_fraction=0.3, test_fraction=0.3):
        assert part == sorted(part, key=RECORDS.index)


@pytest.mark.parametrize(
    "total,fraction,expected",
    [
        (10, 0.1, 1),  # exact
        (15, 0.1, 2),  # 1.5 rounds up
        (14, 0.1, 1),  # 1.4 rounds down
        (3, 0.1, 1),  # 0.3 would round to 0, but a requested part gets at least one record
        (10, 0.0, 0),
    ],
)
def test_part_sizes(total, fraction, expected):
    _, val, _ = split_records(RECORDS[:total], val_fraction=fraction)
    assert len(val) == expected


def test_same_seed_same_split_and_other_seed_other_split():
    assert split_records(RECORDS, seed=7) == split_records(RECORDS, seed=7)
    # 10 of 100 drawn twice: the chance that two seeds pick the same 10 is 1 / C(100, 10)
    assert split_records(RECORDS, seed=7)[1] != split_records(RECORDS, seed=8)[1]


def test_a_record_lands_in_the_same_part_when_the_file_is_shuffled():
    shuffled = RECORDS[:]
    random.Random(0).shuffle(shuffled)
    original = split_records(RECORDS, val_fraction=0.2, test_fraction=0.1, seed=1)
    reordered = split_records(shuffled, val_fraction=0.2, test_fraction=0.1, seed=1)
    assert [set(part) for part in original] == [set(part) for part in reordered]


def test_split_does_not_depend_on_the_python_hash_seed():
    """str hashes are salted per process; the split must not be."""
    code = (
        "import json\n"
        "from instructkit.data.split import split_records\n"
        "print(json.dumps(split_records([f'record {i}' for i in range(100)], 0.1, 0.1, seed=5)))\n"
    )
    outputs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        ).stdout
        for hash_seed in ("1", "2")
    ]  # fmt: skip
    assert outputs[0] == outputs[1]
    assert json.loads(outputs[0]) == [list(part) for part in split_records(RECORDS, 0.1, 0.1, seed=5)]


def test_schema_records_split_by_content():
    records = [Conversation([Message("user", f"q{i}"), Message("assistant", f"a{i}")]) for i in range(20)]
    train, val, test = split_records(records, val_fraction=0.25, seed=0)
    assert (len(train), len(val), len(test)) == (15, 5, 0)
    assert split_records(list(reversed(records)), val_fraction=0.25, seed=0)[1] == val[::-1]


@pytest.mark.parametrize("kwargs", [{"val_fraction": 1.0}, {"val_fraction": -0.1}, {"test_fraction": 1.5}])
def test_fractions_out_of_range(kwargs):
    with pytest.raises(InputError, match="must be at least 0 and below 1"):
        split_records(RECORDS, **kwargs)


def test_nothing_left_to_train_on():
    with pytest.raises(InputError, match="nothing would be left to train on"):
        split_records(RECORDS[:2], val_fraction=0.5, test_fraction=0.4)
