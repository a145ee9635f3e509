"""The recipe's eval stage for classifiers and taggers: their numbers are read from the head on
the held-out split (no generation), and the classify stage has measured them, with the same
split, the same encoding and the same head before training (``heldout.json`` in its run folder;
scores: :func:`instructkit.models.heads.head_scores`).

So an ``eval`` stage after a ``classify`` stage makes its table from those files: a row for the
untrained head (the starting point) and a row per classify stage, the headline numbers of
:func:`instructkit.models.heads.headline`; each run's full scores (per-label report, confusion
matrix) are copied beside, ``<name>.heldout.json``. The generation suites do not apply to an
encoder and are not run for these models.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HELDOUT_FILE = "heldout.json"  # train/classify.HELDOUT_FILE (eval/ does not import train/)


def classifier_runs(models: Sequence[tuple[str, str]]) -> list[tuple[str, dict[str, Any]]]:
    """``(name, held-out scores)`` of every model that is a finished classify run folder."""
    found = []
    for name, spec in models:
        path = Path(spec) / HELDOUT_FILE
        if path.is_file() and (Path(spec) / "summary.json").is_file():
            found.append((name, json.loads(path.read_text())))
    return found


def head_eval_stage(models: Sequence[tuple[str, str]], out: str | Path) -> dict[str, Any]:
    """The eval stage's table for classify runs: ``untrained head`` (the first run's ``before``)
    and each run's ``after``; writes ``out/summary.json`` and ``<name>.heldout.json``."""
    from instructkit.fileio import atomic_dir, atomic_write_json
    from instructkit.models.heads import headline

    runs = classifier_runs(models)
    table: dict[str, dict[str, Any]] = {}
    heads: dict[str, Any] = {}
    with atomic_dir(out) as tmp:
        first = runs[0][1]
        if first.get("before"):
            table["untrained head"] = headline(first["before"])
        for name, held in runs:
            print(f"   {name}: held-out scores of its head ({held['split']})", flush=True)
            if held.get("after"):
                table[name] = headline(held["after"])
            heads[name] = held
            atomic_write_json(tmp / f"{name}.{HELDOUT_FILE}", held)
        summary = {"stage": "eval", "data": first.get("split"), "table": table, "heads": heads}
        atomic_write_json(tmp / "summary.json", summary)
    return summary
