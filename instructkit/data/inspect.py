"""`instructkit data inspect`: what a data file holds and what the loss will see of it."""

from __future__ import annotations

import statistics
from typing import Any

from instructkit.data.schema import Conversation, Preference, Ranking, Text, Unpaired


def _encode(tokenizer, record, template, max_length):
    from instructkit.data.templates import encode_conversation, encode_prompt_response, encode_text

    if isinstance(record, Conversation):
        return encode_conversation(tokenizer, record.messages, template=template, tools=record.tools)
    if isinstance(record, Preference):
        return encode_prompt_response(tokenizer, record.prompt, record.chosen, template=template)
    if isinstance(record, Ranking):
        return encode_prompt_response(tokenizer, record.prompt, record.responses[0], template=template)
    if isinstance(record, Unpaired):
        return encode_prompt_response(tokenizer, record.prompt, record.completion, template=template)
    if isinstance(record, Text):
        return encode_text(tokenizer, record.text)
    return None


def _stats(values: list[int]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return (f"min {ordered[0]}, mean {statistics.mean(ordered):.1f}, median {statistics.median(ordered):g}, "
            f"p95 {p95}, max {ordered[-1]}")


def inspect_data(path: str, *, format: str | None = None, model: str = "smollm2-135m-instruct",
                 template: str | None = None, max_length: int = 512, color: bool = False,
                 example: int = 0) -> str:
    """A readable report: format, counts, token lengths and one example with trained tokens marked."""
    from instructkit.data.formats import load_records
    from instructkit.data.templates import render_trained
    from instructkit.datasets import resolve_data_path
    from instructkit.models.loading import load_tokenizer

    loaded = load_records(resolve_data_path(path), format=format)
    records = loaded.records
    tokenizer = load_tokenizer(model)
    encoded = [_encode(tokenizer, r, template, max_length) for r in records]
    lengths = [len(e.input_ids) for e in encoded if e is not None]
    trained = [e.num_trained for e in encoded if e is not None]
    over = sum(1 for n in lengths if n > max_length)
    lines: list[str] = [
        f"file:     {path}",
        f"format:   {loaded.format}" + ("" if format is None else " (given)"),
        f"records:  {len(records)}",
    ]
    kinds: dict[str, int] = {}
    for r in records:
        kinds[type(r).__name__] = kinds.get(type(r).__name__, 0) + 1
    if isinstance(records[0], Conversation):
        turns = [sum(1 for m in r.messages if m.role == "assistant") for r in records]
        lines.append(f"assistant turns per record: {_stats(turns)}")
    lines += [
        f"tokens ({model}): {_stats(lengths)}",
        f"trained tokens:   {_stats(trained)}",
        f"over max_length {max_length}: {over} of {len(lengths)}",
    ]
    index = min(example, len(records) - 1)
    shown: Any = encoded[index]
    lines.append("")
    lines.append(f"record {index}, trained tokens marked {'in green' if color else 'as «…»'}:")
    lines.append(render_trained(tokenizer, shown, color=color) if shown is not None else "(not encodable)")
    return "\n".join(lines)
