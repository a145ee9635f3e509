"""`instructkit data inspect`: what a data source holds and what the loss will see of it.

This module loads things (the records, with a format, a column mapping or a LLaMA-Factory
``dataset_info.json`` entry; a model's tokenizer) and hands them to
:func:`instructkit.data.inspect.describe`, which only formats. It sits at the floor of the other
tools (:mod:`instructkit.chat`) because it loads a tokenizer, which the data layer must not.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from instructkit.errors import InputError, did_you_mean

DEFAULT_MODEL = "smollm2-135m-instruct"
COLUMNS_SYNTAX = "KEY=COLUMN[,KEY=COLUMN...]"


def parse_columns(text: str) -> dict[str, str]:
    """``"prompt=question,response=answer"`` -> ``{"prompt": "question", "response": "answer"}``:
    the ``--columns`` flag. Keys are those of ``data.columns`` (LLaMA-Factory's); a column name
    cannot itself hold ``,`` or ``=``."""
    from instructkit.data.formats import COLUMN_KEYS, MEDIA_KEYS

    columns: dict[str, str] = {}
    for item in text.split(","):
        key, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not key or not column:
            raise InputError(
                f"expected {COLUMNS_SYNTAX}, e.g. prompt=question,response=answer; got {item.strip()!r}",
                field="--columns",
            )
        if key not in COLUMN_KEYS + MEDIA_KEYS:
            raise InputError(
                f"unknown column key '{key}'{did_you_mean(key, COLUMN_KEYS)}; expected one of "
                + ", ".join(COLUMN_KEYS),
                field="--columns",
            )
        if key in columns:
            raise InputError(f"key '{key}' is given twice", field="--columns")
        columns[key] = column
    return columns


def inspect_data(
    path: str,
    *,
    format: str | None = None,
    columns: Mapping[str, str] | None = None,
    dataset_info: str | Path | None = None,
    model: str = DEFAULT_MODEL,
    template: str | None = None,
    max_length: int = 512,
    color: bool = False,
    example: int = 0,
) -> str:
    """A readable report: format, counts, token lengths and one example with trained tokens marked.

    ``path`` is a data file, a Hub dataset id in the local cache, or ``shipped:NAME/SPLIT``; with
    ``dataset_info`` (a LLaMA-Factory ``dataset_info.json``) it is the name of a dataset in that
    file, whose entry supplies the file, format, columns and tags. ``format`` and ``columns``
    override detection and the entry, as in a stage's ``data.format`` and ``data.columns``.
    Bad input raises :class:`~instructkit.errors.InputError`.
    """
    from instructkit.data.formats import load_records
    from instructkit.data.inspect import describe
    from instructkit.datasets import resolve_data_path
    from instructkit.models.loading import load_tokenizer

    if dataset_info is not None:
        loaded = load_records(dataset_info=dataset_info, name=path, format=format, columns=columns)
        source = f"{path} (from {dataset_info})"
    else:
        loaded = load_records(resolve_data_path(path), format=format, columns=columns)
        source = path
    tokenizer = load_tokenizer(model)
    return describe(
        loaded,
        tokenizer,
        source=source,
        tokenizer_name=model,
        format_given=format is not None,
        template=template,
        max_length=max_length,
        color=color,
        example=example,
    )
