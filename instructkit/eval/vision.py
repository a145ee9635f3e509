"""The recipe's eval stage for vision runs: their held-out numbers are the ones the vision stages
measured themselves (``heldout.json`` in each run folder: greedy answers to the same test
records, exact match and BLEU, before and after training), so an ``eval`` stage after
``vision_projector`` and ``vision`` makes its table from those files without loading a model again:
a row for the untuned model (the first vision run's "before": a new projector, the decoder as it
came), and a row per vision stage. Each run's samples are copied beside, ``<name>.heldout.json``.
The text suites do not apply (their records have no images) and are not run for these models.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HELDOUT_FILE = "heldout.json"  # train/vision.HELDOUT_FILE (eval/ does not import train/)
VISION_FILE = "final/vision.json"  # models/vision.VISION_FILE inside a run's final/


def vision_runs(models: Sequence[tuple[str, str]]) -> list[tuple[str, dict[str, Any]]]:
    """``(name, held-out scores)`` of every model that is a finished vision run folder."""
    found = []
    for name, spec in models:
        folder = Path(spec)
        if (
            (folder / VISION_FILE).is_file()
            and (folder / HELDOUT_FILE).is_file()
            and (folder / "summary.json").is_file()
        ):
            found.append((name, json.loads((folder / HELDOUT_FILE).read_text())))
    return found


def headline(scores: dict[str, Any]) -> dict[str, float]:
    """The table's numbers of one run: exact match, BLEU, and exact match per question kind."""
    row = {"exact_match": scores["exact_match"], "bleu": scores["bleu"]}
    row.update({f"exact_match_{k}": v for k, v in scores.get("exact_match_by_kind", {}).items()})
    return row


def vision_eval_stage(models: Sequence[tuple[str, str]], out: str | Path) -> dict[str, Any]:
    """The eval stage's table for vision runs; writes ``out/summary.json`` and ``<name>.heldout.json``."""
    from instructkit.fileio import atomic_dir, atomic_write_json

    runs = vision_runs(models)
    table: dict[str, dict[str, Any]] = {}
    with atomic_dir(out) as tmp:
        first = runs[0][1]
        if first.get("before"):
            table["untuned"] = headline(first["before"])
        for name, held in runs:
            print(f"   {name}: held-out answers measured by the stage ({held['split']})", flush=True)
            if held.get("after"):
                table[name] = headline(held["after"])
            atomic_write_json(tmp / f"{name}.{HELDOUT_FILE}", held)
        summary = {"stage": "eval", "data": first.get("split"), "table": table}
        atomic_write_json(tmp / "summary.json", summary)
    return summary
