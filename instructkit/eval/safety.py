"""What the ``refusal`` and ``injection`` suites share: a set of prompts (the prompts format, one
record per prompt with its own fields), matched to responses made elsewhere or answered by the
model, and rates over groups of verdicts.

A prompt set is a file :func:`instructkit.data.prompts.read_prompts` reads: ``prompt`` (a string
or a message list ending with a user turn) plus the fields the suite needs (``kind`` and
``category`` for refusal, ``canary`` and ``answer`` for injection), each checked at its line
before any model loads. A record's key is its ``key`` field, else its 0-based position; a row of
``--responses`` answers it by ``key`` or by the text of its last user turn
(:mod:`instructkit.eval.responses`). Pure Python until the model generates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from instructkit.eval.responses import Answers, HeldOut, match_responses

if TYPE_CHECKING:
    from instructkit.data.prompts import PromptRecord
    from instructkit.eval.request import EvalRequest


Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class PromptSet:
    """The prompts of a safety suite, with what ``--responses`` rows match them by."""

    path: str
    records: list[PromptRecord]
    held_out: HeldOut


def read_prompt_set(
    data: str,
    limit: int | None,
    suite: str,
    required: dict[str, Check],
    optional: dict[str, Check] | None = None,
    across: Callable[[PromptRecord], tuple[str, str] | None] | None = None,
) -> PromptSet:
    """The records of ``data`` (a path or ``shipped:NAME/SPLIT``), the first ``limit`` of them.

    ``required`` maps each field a record must have, and ``optional`` each field it may have, to
    a check returning None when the value is good, else what is wrong; ``across`` checks a
    whole record, returning ``(field, problem)`` or None. A record without a required field, or
    failing a check, is an InputError at its line naming the field. Keys must be unique (a
    response would answer two records).
    """
    from instructkit.data.readers import read_rows
    from instructkit.datasets import resolve_data_path

    path = resolve_data_path(data)
    rows = read_rows(path)
    rows = rows[:limit] if limit else rows
    records = _read_prompts(path)[: len(rows)]
    seen: dict[str, int] = {}
    for i, (row, record) in enumerate(zip(rows, records)):
        checks = [(name, check, True) for name, check in required.items()]
        checks += [(name, check, False) for name, check in (optional or {}).items()]
        for name, check, needed in checks:
            if name not in row.data:
                if needed:
                    raise row.error(f"a {suite} prompt needs '{name}'", field=name)
                continue
            problem = check(row.data[name])
            if problem:
                raise row.error(problem, field=name)
        wrong = across(record) if across else None
        if wrong:
            raise row.error(wrong[1], field=wrong[0])
        key = str(row.data["key"]) if row.data.get("key") is not None else str(i)
        if key in seen:
            raise row.error(f"key {key!r} is also the key of record {seen[key]}: keys must be unique", field="key")
        seen[key] = i
    keys = list(seen)
    names = [f"the {suite} prompt {k!r} of {path}" for k in keys]
    return PromptSet(path, records, HeldOut(path, keys, [r.text for r in records], names))


def _read_prompts(path: str) -> list[PromptRecord]:
    from instructkit.data.prompts import read_prompts

    return read_prompts(path)


def answers(request: EvalRequest, prompts: PromptSet) -> Answers:
    """Every row of ``--responses`` matched to its prompt, or one greedy response per prompt."""
    if request.responses is not None:
        return match_responses(request.responses, prompts.held_out)
    chats = [[{"role": m.role, "content": m.content} for m in r.messages] for r in prompts.records]
    return Answers.generated(request.generate(request.model_and_tokenizer(), chats))


def rate(flags: Sequence[bool]) -> float | None:
    """The fraction of ``flags`` that are true; None for no flags (a rate of nothing is no number)."""
    return sum(map(bool, flags)) / len(flags) if flags else None


def one_of(allowed: Sequence[str]) -> Callable[[Any], str | None]:
    """A field check: the value is one of ``allowed``."""
    return lambda v: None if v in allowed else f"expected one of {', '.join(allowed)}, got {v!r}"


def nonempty_string(v: Any) -> str | None:
    """A field check: the value is a string with more than whitespace."""
    return None if isinstance(v, str) and v.strip() else f"expected a non-empty string, got {v!r}"


def string(v: Any) -> str | None:
    """A field check: the value is a string."""
    return None if isinstance(v, str) else f"expected a string, got {v!r}"
