"""The one error type for bad user input, and how it is shown.

Anything the user can fix (a malformed file, a missing field, an unknown config key) raises
:class:`InputError`. The CLI prints its one-line message to stderr and exits with status 2;
no traceback, nothing half-written.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_BAD_INPUT = 2


class InputError(ValueError):
    """Bad input from the user: a file, record, field or config key that cannot be used.

    The message names the place (file, line or record, field) and the problem, e.g.
    ``data.jsonl:7: field 'messages[2].role': unknown role 'bot' (expected one of ...)``.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str | None = None,
        line: int | None = None,
        record: int | None = None,
        field: str | None = None,
    ) -> None:
        self.problem = problem
        self.file = file
        self.line = line
        self.record = record
        self.field = field
        super().__init__(self.format())

    def format(self) -> str:
        where = ""
        if self.file is not None:
            where = str(self.file)
            if self.line is not None:
                where += f":{self.line}"
        if self.record is not None:
            where += (", " if where else "") + f"record {self.record}"
        if self.field is not None:
            where += (", " if where else "") + f"field '{self.field}'"
        return f"{where}: {self.problem}" if where else self.problem


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The valid choice closest to a misspelled ``name``, or None if nothing is close."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a close valid choice exists, else ``''``."""
    best = closest(name, choices)
    return f" (did you mean '{best}'?)" if best else ""
