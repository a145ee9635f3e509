"""Reading data files into rows: plain dicts that remember where in the file they came from.

This module owns the file level only: extensions, UTF-8, JSON / CSV / Parquet syntax and the
Hugging Face cache. What the keys mean is :mod:`instructkit.data.formats`' business. Every
problem is an :class:`~instructkit.errors.InputError` that names the file and the place: the
physical line (JSONL, CSV, text, and JSON arrays too) and/or the 0-based record index (JSON
arrays, Parquet, Hub datasets).

Pure Python: pyarrow is imported only to read Parquet and ``datasets`` only for Hub ids.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructkit.errors import InputError, did_you_mean


@dataclass(frozen=True)
class Row:
    """One record as read, with its place in the source for error messages.

    ``line`` is the 1-based physical line where the record starts (as an editor counts);
    ``record`` is the 0-based index among the source's records (``data[record]`` in Python).
    """

    data: dict[str, Any]
    file: str
    line: int | None = None
    record: int | None = None

    def error(self, problem: str, field: str | None = None) -> InputError:
        """An InputError about this row (and optionally one field of it)."""
        return InputError(problem, file=self.file, line=self.line, record=self.record, field=field)


def read_rows(path: str | Path, *, split: str = "train", subset: str | None = None) -> list[Row]:
    """Read every record of a data file, or of a Hugging Face dataset already in the local cache.

    Files: ``.json`` (an array of objects, one object per line, or a single object), ``.jsonl``, ``.csv`` (a header
    row; every cell is a string), ``.parquet`` and ``.txt`` (one text record per non-blank line).
    Anything else that looks like ``owner/name`` and is not a file is read as a Hub dataset id,
    offline; ``split`` and ``subset`` apply to Hub datasets only.
    """
    source = Path(path)
    if source.is_file():
        rows = _read_file(source)
    elif source.is_dir():
        raise InputError("is a folder; give a data file", file=str(path))
    elif _looks_like_hub_id(str(path)):
        rows = _read_hub(str(path), split=split, subset=subset)
    else:
        raise InputError("no such file", file=str(path))
    if not rows:
        raise InputError("no records (the file is empty)", file=str(path))
    return rows


# ---------------------------------------------------------------------------------------------
# Files


def _read_file(path: Path) -> list[Row]:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        known = ", ".join(_READERS)
        raise InputError(
            f"unsupported file type '{path.suffix or '(none)'}'{did_you_mean(path.suffix, _READERS)}"
            f"; expected one of {known}",
            file=str(path),
        )
    return reader(path)


def _read_text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are an error naming the line and byte offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # -sig: tolerate the BOM some editors write
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(
            f"not valid UTF-8: byte 0x{data[err.start]:02x} at byte offset {err.start} (save the file as UTF-8)",
            file=str(path),
            line=line,
        ) from None


def _read_jsonl(path: Path) -> list[Row]:
    return _parse_json_lines(_read_text(path), str(path))


def _read_json(path: Path) -> list[Row]:
    """A JSON array of records; JSON lines saved under a .json name, and a file holding one
    object (one record, pretty-printed or not), are accepted too."""
    text = _read_text(path)
    file = str(path)
    body = text.lstrip()
    if not body:
        return []
    if body.startswith("["):
        return _parse_json_array(text, file)
    if _first_line_is_json_object(text):
        return _parse_json_lines(text, file)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise _json_error(err, file) from None
    if isinstance(value, dict):  # one record saved as a (pretty-printed) object
        return [Row(value, file, line=text[: len(text) - len(body)].count("\n") + 1)]
    raise InputError(
        f"expected a JSON array of records ([{{...}}, ...]) or one JSON object per line, got {_json_type(value)}",
        file=file,
    )


def _read_csv(path: Path) -> list[Row]:
    file = str(path)
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return []
        _check_csv_header(header, file)
        rows = []
        start = reader.line_num + 1  # a quoted cell may span lines: a row starts after the last
        for values in reader:
            if values:  # csv yields [] for a blank line
                if len(values) != len(header):
                    raise InputError(
                        f"{len(values)} values but the header has {len(header)} columns",
                        file=file,
                        line=start,
                    )
                rows.append(Row(dict(zip(header, values)), file, line=start))
            start = reader.line_num + 1
    except csv.Error as err:
        raise InputError(f"invalid CSV: {err}", file=file, line=reader.line_num) from None
    return rows


def _check_csv_header(header: list[str], file: str) -> None:
    seen: set[str] = set()
    for name in header:
        if not name.strip():
            raise InputError("the header has an empty column name", file=file, line=1)
        if name in seen:
            raise InputError(f"the header names column '{name}' twice", file=file, line=1)
        seen.add(name)


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"not a readable Parquet file: {err}", file=str(path)) from None
    return [Row(data, str(path), record=i) for i, data in enumerate(table.to_pylist())]


def _read_txt(path: Path) -> list[Row]:
    """Plain text, one record per non-blank line, as LLaMA-Factory reads .txt pre-training data."""
    file = str(path)
    lines = _read_text(path).split("\n")
    return [
        Row({"text": line.rstrip("\r")}, file, line=number)
        for number, line in enumerate(lines, start=1)
        if line.strip()
    ]


_READERS: dict[str, Callable[[Path], list[Row]]] = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".txt": _read_txt,
}


# ---------------------------------------------------------------------------------------------
# JSON syntax

_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _parse_json_lines(text: str, file: str) -> list[Row]:
    rows = []
    # split on "\n" only: str.splitlines also breaks at U+2028 and friends, which JSON strings
    # may hold raw, and that would shift every line number after them.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"invalid JSON: {err.msg} (column {err.colno})", file=file, line=number) from None
        rows.append(_as_row(value, file, line=number))
    return rows


def _parse_json_array(text: str, file: str) -> list[Row]:
    """Parse ``[obj, obj, ...]`` element by element so each row knows the line it starts on."""
    decoder = json.JSONDecoder()
    rows: list[Row] = []
    lines = _LineCounter(text)
    pos = _skip_whitespace(text, text.index("[") + 1)
    closed = text.startswith("]", pos)
    while not closed:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise _json_error(err, file) from None
        rows.append(_as_row(value, file, line=lines.at(pos), record=len(rows)))
        pos = _skip_whitespace(text, end)
        closed = text.startswith("]", pos)
        if not closed:
            if not text.startswith(",", pos):
                raise _syntax_error("expecting ',' or ']' after a record", text, pos, file)
            pos = _skip_whitespace(text, pos + 1)
    pos = _skip_whitespace(text, pos + 1)  # past the ']'
    if pos < len(text):
        raise _syntax_error("extra data after the closing ']'", text, pos, file)
    return rows


class _LineCounter:
    """Line numbers of increasing offsets in one text, without rescanning from the start."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._line = 1

    def at(self, pos: int) -> int:
        self._line += self._text.count("\n", self._pos, pos)
        self._pos = pos
        return self._line


def _skip_whitespace(text: str, pos: int) -> int:
    match = _WHITESPACE.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _first_line_is_json_object(text: str) -> bool:
    first = next(line for line in text.split("\n") if line.strip())
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _as_row(value: Any, file: str, *, line: int | None = None, record: int | None = None) -> Row:
    if not isinstance(value, dict):
        raise InputError(
            f"expected a JSON object (one record), got {_json_type(value)}",
            file=file,
            line=line,
            record=record,
        )
    return Row(value, file, line=line, record=record)


def _json_error(err: json.JSONDecodeError, file: str) -> InputError:
    return InputError(f"invalid JSON: {err.msg} (column {err.colno})", file=file, line=err.lineno)


def _syntax_error(problem: str, text: str, pos: int, file: str) -> InputError:
    line = text.count("\n", 0, pos) + 1
    column = pos - text.rfind("\n", 0, pos)
    return InputError(f"invalid JSON: {problem} (column {column})", file=file, line=line)


def _json_type(value: Any) -> str:
    """How JSON would name the type of ``value``: 'an array', 'a string', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------
# Hugging Face Hub datasets, from the local cache only

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and Path(name).suffix.lower() not in _READERS


def _read_hub(dataset_id: str, *, split: str, subset: str | None) -> list[Row]:
    try:
        import datasets
    except ImportError:
        raise InputError(
            "no such file (reading a Hugging Face dataset id needs the 'datasets' package)",
            file=dataset_id,
        ) from None
    with _offline(datasets):
        try:
            dataset = datasets.load_dataset(dataset_id, name=subset, split=split)
        except (OSError, ValueError) as err:  # ConnectionError and FileNotFoundError are OSErrors
            raise InputError(
                "no such file, and not a Hugging Face dataset in the local cache"
                f" (split '{split}'{f', subset {subset!r}' if subset else ''}): {err}."
                " instructkit reads Hub datasets offline (HF_HUB_OFFLINE=1 /"
                " HF_DATASETS_OFFLINE=1); download it once where there is network access"
                f" (datasets.load_dataset('{dataset_id}')) with the same HF_HOME, or save it as"
                " a .jsonl or .parquet file",
                file=dataset_id,
            ) from None
    return [Row(dict(data), dataset_id, record=i) for i, data in enumerate(dataset)]


@contextlib.contextmanager
def _offline(datasets: Any) -> Iterator[None]:
    """Offline mode for one call, even when ``datasets`` was imported before the flag was set.

    Both libraries read HF_HUB_OFFLINE from the environment once, at import, so setting the
    variable now would be too late; their module-level flags are what they consult per call.
    """
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
