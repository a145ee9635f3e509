"""Deterministic train / validation / test splits of a list of records.

Records are ordered by a SHA-256 key of (seed, record contents) and the test and validation
sets are the first records in that order. So the split is the same in every process and Python
version (``hash()`` is salted per process and would not be), and a record's part depends on what
it says, not where it sits: shuffling the file, or adding a few records, moves few records
across parts. Within each part records keep their original order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

from instructkit.errors import InputError

T = TypeVar("T")


def split_records(
    records: Sequence[T], val_fraction: float = 0.1, test_fraction: float = 0.0, seed: int = 0
) -> tuple[list[T], list[T], list[T]]:
    """Split ``records`` into (train, validation, test).

    A part gets ``round(len(records) * fraction)`` records (halves round up), but at least one
    when its fraction is above zero, and train must keep at least one. The same records, seed
    and fractions always give the same split.
    """
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    n_val = _part_size(len(records), val_fraction)
    n_test = _part_size(len(records), test_fraction)
    if n_val + n_test >= len(records):
        raise InputError(
            f"cannot hold out {n_val} validation and {n_test} test records from {len(records)}:"
            " nothing would be left to train on"
        )
    order = sorted(range(len(records)), key=lambda i: _key(seed, records[i]))
    test = sorted(order[:n_test])
    val = sorted(order[n_test : n_test + n_val])
    train = sorted(order[n_test + n_val :])
    return [records[i] for i in train], [records[i] for i in val], [records[i] for i in test]


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise InputError(f"must be at least 0 and below 1, got {value}", field=name)


def _part_size(total: int, fraction: float) -> int:
    if fraction == 0.0:
        return 0
    return max(1, int(total * fraction + 0.5))


def _key(seed: int, record: object) -> bytes:
    """Sort key of one record; repr() of the schema dataclasses (and of plain dicts, lists and
    strings) is the same in every process. Identical records tie and keep their file order."""
    return hashlib.sha256(f"{seed}\x00{record!r}".encode()).digest()
