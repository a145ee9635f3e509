"""Check a data file before any stage starts: it exists, parses, and holds the kind of records
the stage reads. ``instructkit run`` calls this for every data file of every stage of a recipe,
so a missing or malformed file in the last stage fails in seconds, not after the first stage
has trained. The records are read and converted exactly as the stage will read them; nothing is
tokenized.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from instructkit.errors import InputError, closest

KINDS = ("demonstrations", "comparisons", "pairs", "unpaired", "prompts", "conversations", "any", "task")


def missing_file_problem(path: str) -> str | None:
    """``no such file`` with the closest name in the same folder, when ``path`` looks like a
    local file that is not there (Hub dataset ids and ``shipped:`` names are left to their readers)."""
    p = Path(path)
    if path.startswith("shipped:") or p.exists() or not (p.suffix or "/" in path):
        return None
    folder = p.parent
    if not folder.is_dir():
        return f"no such file '{path}' (no folder '{folder}')"
    best = closest(p.name, [c.name for c in folder.iterdir()])
    return f"no such file '{path}'" + (f" (did you mean '{folder / best}'?)" if best else "")


def check_data_file(
    path: str | None,
    kind: str,
    *,
    format: str | None = None,
    columns: dict[str, str] | None = None,
    dataset_info: str | None = None,
) -> int:
    """Read ``path`` as the stage will; returns the number of records. Raises InputError."""
    from instructkit.data import encoders
    from instructkit.data.formats import load_records
    from instructkit.data.schema import Conversation, Text
    from instructkit.datasets import resolve_data_path

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    if not path:
        raise InputError("no data file given")
    problem = missing_file_problem(dataset_info or path)
    if problem:
        raise InputError(problem)
    if kind == "prompts":
        from instructkit.data.prompts import read_prompts

        return len(read_prompts(resolve_data_path(path)))
    if kind == "task":  # encoder task records (a classify stage); format is its task, when set
        return len(_read_task_records(resolve_data_path(path), format))
    if kind == "any":
        from instructkit.data.readers import read_rows

        return len(read_rows(resolve_data_path(path)))
    if dataset_info:
        records = load_records(
            dataset_info=resolve_data_path(dataset_info), name=path, format=format, columns=columns
        ).records
    else:
        records = load_records(resolve_data_path(path), format=format, columns=columns).records
    where = str(path)
    converted: list[Any]
    if kind == "comparisons":
        converted = encoders.as_rankings(records, where)
    elif kind == "pairs":
        converted = encoders.as_pairs(records, where)
    elif kind == "unpaired":
        converted = encoders.as_unpaired(records, where)
    else:
        allowed = (Conversation, Text) if kind == "demonstrations" else (Conversation,)
        for i, record in enumerate(records):
            if not isinstance(record, allowed):
                names = " or ".join(t.__name__ for t in allowed)
                raise InputError(
                    f"expected {kind} ({names} records), not {type(record).__name__}", file=where, record=i
                )
        converted = records
    return len(converted)


def _read_task_records(path: str, task: str | None) -> list[Any]:
    """Classification records or tagged sentences (data/tasks), as ``task`` says; without a task,
    CoNLL files and records with ``tokens`` are tagged sentences."""
    from instructkit.data.readers import read_rows
    from instructkit.data.tasks import CONLL_SUFFIXES, read_classification, read_tagged

    tagged = task == "token_classification" or Path(path).suffix.lower() in CONLL_SUFFIXES
    if task is None and not tagged:
        rows = read_rows(path)
        tagged = bool(rows) and "tokens" in rows[0].data
    return read_tagged(path) if tagged else read_classification(path)
