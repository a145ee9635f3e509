"""The ``--responses`` contract: responses made elsewhere, read and matched to held-out records.

A responses file (JSONL, or any file :func:`~instructkit.data.readers.read_rows` reads) has one
row per response: ``response`` (a string) and the ``key`` or the ``prompt`` text of the held-out
record it answers. Any other field (``model``, ``sample``, ...) identifies the row and is carried
to its line of the samples file, with the row's ``line`` in the responses file.

Every row is scored. Several rows answering one record (two models in one file, n samples per
prompt) are each scored and reported on lines of their own; the metrics are over all rows and
:meth:`Answers.coverage` says how many rows each prompt got. A row that answers no held-out
record is counted (``unmatched_rows``) and warned about on stderr, never dropped silently. A
record that no row answers is an :class:`~instructkit.errors.InputError` naming it.

Every suite that scores responses reads them here: the conversation suites, ``ifeval`` and
winrate's ``--baseline-responses``. Pure Python, no model.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructkit.errors import InputError

# Fields that say what a row answers; the rest of a row identifies it (model, sample, ...).
_MATCHING = ("key", "prompt", "response")


@dataclass(frozen=True)
class ResponseRow:
    """One row of a responses file: the response, what it answers, and where it stands."""

    response: str
    key: str | None  # compared as a string: ``1`` and ``"1"`` name the same record
    prompt: str | None  # the text of the last prompt turn it answers
    place: dict[str, int]  # {"line": 1-based line} or {"record": 0-based index}
    fields: dict[str, Any]  # the row's other fields


def read_responses(path: str | Path) -> list[ResponseRow]:
    """Every row of a responses file, in order; a row without a string ``response``, or with
    neither a ``key`` nor a string ``prompt``, is an InputError naming its line and field."""
    from instructkit.data.readers import read_rows

    out = []
    for row in read_rows(str(path)):
        response = row.data.get("response")
        if not isinstance(response, str):
            raise row.error("expected a string 'response'", field="response")
        key = row.data.get("key")
        prompt = row.data.get("prompt")
        if key is None and not isinstance(prompt, str):
            raise row.error("a response needs the 'key' or the 'prompt' text it answers", field="key")
        place = {"line": row.line} if row.line is not None else {"record": row.record}
        out.append(
            ResponseRow(
                response,
                None if key is None else str(key),
                prompt if isinstance(prompt, str) else None,
                place,
                {k: v for k, v in row.data.items() if k not in _MATCHING},
            )
        )
    return out


@dataclass(frozen=True)
class HeldOut:
    """What responses answer: each held-out record's key and prompt text, and its name in errors."""

    data: str
    keys: list[str | None]
    prompts: list[str]
    names: list[str]  # e.g. "held-out record 2 of test.jsonl (key '2', prompt 'review 2')"


@dataclass
class Answers:
    """Responses to held-out records, one entry per response row: what every suite scores.

    ``records[i]`` is the held-out record that ``responses[i]`` answers and ``sources[i]`` the
    fields that identify its row (``{}`` for a generated response); ``file`` is the responses
    file they were read from (None when generated).
    """

    records: list[int]
    responses: list[str]
    sources: list[dict[str, Any]]
    n_records: int
    file: str | None = None
    unmatched: list[dict[str, int]] = field(default_factory=list)  # places of rows answering nothing

    @classmethod
    def generated(cls, responses: Sequence[str]) -> Answers:
        """One generated response per held-out record, in record order."""
        return cls(list(range(len(responses))), list(responses), [{} for _ in responses], len(responses))

    def coverage(self) -> dict[str, Any]:
        """How many rows were scored, per prompt, and how many answered no held-out record (and
        where: their lines, or 0-based record indices for files without lines)."""
        per_record = [0] * self.n_records
        for record in self.records:
            per_record[record] += 1
        return {
            "rows": len(self.records),
            "prompts_answered": sum(1 for c in per_record if c),
            "rows_per_prompt": {"min": min(per_record, default=0), "max": max(per_record, default=0)},
            "unmatched_rows": len(self.unmatched),
            "unmatched_lines": [p.get("line", p.get("record")) for p in self.unmatched],
        }

    def one_per_record(self, held_out: HeldOut, why: str) -> list[str]:
        """The response to each record, in record order, when every record has exactly one row;
        else an InputError naming the first record with several, and their lines."""
        places: dict[int, list[dict[str, int]]] = {}
        for record, source in zip(self.records, self.sources):
            places.setdefault(record, []).append(source)
        for record, rows in sorted(places.items()):
            if len(rows) > 1:
                lines = ", ".join(str(s.get("line", s.get("record"))) for s in rows)
                raise InputError(
                    f"{len(rows)} rows (lines {lines}) answer {held_out.names[record]}; {why}",
                    file=self.file,
                    field="response",
                )
        by_record = dict(zip(self.records, self.responses))
        return [by_record[i] for i in range(self.n_records)]


def match_responses(path: str | Path, held_out: HeldOut) -> Answers:
    """Each row of the responses file at ``path`` matched to the held-out record it answers.

    A row answers the record whose key equals its ``key``; failing that (no key, or one no
    record has), the record whose last prompt turn is its ``prompt`` text. A row that could
    answer two records (their keys or prompt texts are equal) is an InputError: it would be
    scored twice against different references. Rows answering nothing are counted and warned
    about (see the module docstring); a record no row answers is an InputError naming it.
    """
    by_key = _index(held_out.keys)
    by_prompt = _index(held_out.prompts)
    answers = Answers([], [], [], len(held_out.prompts), file=str(path))
    for row in read_responses(path):
        candidates = by_key.get(row.key, []) if row.key is not None else []
        if not candidates and row.prompt is not None:
            candidates = by_prompt.get(row.prompt, [])
        if not candidates:
            answers.unmatched.append(row.place)
            continue
        if len(candidates) > 1:
            names = " and ".join(held_out.names[i] for i in candidates)
            raise InputError(
                f"the row answers both {names}; give it the 'key' of the one it answers",
                file=str(path),
                line=row.place.get("line"),
                field="key",
            )
        answers.records.append(candidates[0])
        answers.responses.append(row.response)
        answers.sources.append({**row.place, **row.fields})
    answered = set(answers.records)
    missing = next((i for i in range(answers.n_records) if i not in answered), None)
    if missing is not None:
        raise InputError(f"no response for {held_out.names[missing]}", file=str(path), field="response")
    if answers.unmatched:
        count = len(answers.unmatched)
        lines = ", ".join(str(line) for line in answers.coverage()["unmatched_lines"][:10])
        print(
            f"instructkit: warning: {count} row{'s' if count > 1 else ''} of {path} (line{'s' if count > 1 else ''} "
            f"{lines}{', ...' if count > 10 else ''}) answer{'s' if count == 1 else ''} no held-out record of "
            f"{held_out.data}: not scored, "
            f"counted in unmatched_rows",
            file=sys.stderr,
            flush=True,
        )
    return answers


def _index(values: Sequence[str | None]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, value in enumerate(values):
        if value is not None:
            out.setdefault(value, []).append(i)
    return out


def with_source(sample: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """A samples-file line: the row's identifying fields first, then the sample. A row field
    whose name the sample uses itself (``reference``, ``correct``, ...) is kept as ``row_<name>``."""
    head = {(k if k not in sample else f"row_{k}"): v for k, v in source.items()}
    return {**head, **sample}
