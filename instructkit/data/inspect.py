"""What `instructkit data inspect` reports about loaded records, given a tokenizer object.

Records are encoded the way training encodes them (prompts the way sampling renders them), and
the report gives counts, token-length statistics and one example with its trained tokens
marked. Loading the file and the tokenizer is the caller's (:mod:`instructkit.inspect`), so this
module imports no model code.
"""

from __future__ import annotations

import statistics
from typing import Any

from instructkit.data.formats import LoadedData
from instructkit.data.prompts import PromptRecord
from instructkit.data.schema import Conversation, Preference, Ranking, Text, Unpaired
from instructkit.data.templates import (
    IGNORE_INDEX,
    Encoded,
    encode_conversation,
    encode_prompt,
    encode_prompt_response,
    encode_text,
    render_trained,
)


def encode_for_report(tokenizer: Any, record: Any, template: str | None = None) -> Encoded | None:
    """The record as the loss sees it, untruncated (so lengths over the limit can be counted);
    for preference data the chosen response, for rankings the best one. None for records no
    language-model loss reads (classification)."""
    if isinstance(record, Conversation):
        return encode_conversation(tokenizer, record.messages, template=template, tools=record.tools)
    if isinstance(record, Preference):
        return encode_prompt_response(tokenizer, record.prompt, record.chosen, template=template)
    if isinstance(record, Ranking):
        best = min(range(len(record.responses)), key=lambda i: record.ranks[i] if record.ranks else i)
        return encode_prompt_response(tokenizer, record.prompt, record.responses[best], template=template)
    if isinstance(record, Unpaired):
        return encode_prompt_response(tokenizer, record.prompt, record.completion, template=template)
    if isinstance(record, Text):
        return encode_text(tokenizer, record.text)
    if isinstance(record, PromptRecord):
        # What sampling feeds the model: the prompt and the generation prompt; nothing trains.
        ids = encode_prompt(tokenizer, record.messages, template)
        return Encoded(ids, [IGNORE_INDEX] * len(ids), prompt_length=len(ids))
    return None


def length_stats(values: list[int]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return (
        f"min {ordered[0]}, mean {statistics.mean(ordered):.1f}, median {statistics.median(ordered):g}, "
        f"p95 {p95}, max {ordered[-1]}"
    )


def describe(
    loaded: LoadedData,
    tokenizer: Any,
    *,
    source: str,
    tokenizer_name: str,
    format_given: bool = False,
    template: str | None = None,
    max_length: int = 512,
    color: bool = False,
    example: int = 0,
) -> str:
    """The report: source, format, counts, token lengths, and record ``example`` rendered with
    its trained tokens marked (green when ``color``, else between « and »)."""
    records = loaded.records
    encoded = [encode_for_report(tokenizer, r, template) for r in records]
    lengths = [len(e) for e in encoded if e is not None]
    lines: list[str] = [f"file:     {source}"]
    if loaded.path != source:
        lines.append(f"read:     {loaded.path}")
    lines += [
        f"format:   {loaded.format}" + (" (given)" if format_given else ""),
        f"records:  {len(records)}",
    ]
    if isinstance(records[0], Conversation):
        turns = [sum(1 for m in r.messages if m.role == "assistant") for r in records]
        lines.append(f"assistant turns per record: {length_stats(turns)}")
        untrained = sum(1 for r in records for m in r.messages if m.role == "assistant" and not m.trained)
        if untrained:
            lines.append(f"assistant turns not trained (loss_weight 0): {untrained} of {sum(turns)}")
    prompts = isinstance(records[0], PromptRecord)
    if prompts:
        lines.append(f"other fields: {_field_counts(records)}")
        lines.append(f"prompt tokens with the generation prompt ({tokenizer_name}): {length_stats(lengths)}")
        lines.append("trained tokens:   none (prompts are sampled from, not trained on)")
    else:
        lines.append(f"tokens ({tokenizer_name}): {length_stats(lengths)}")
        lines.append(f"trained tokens:   {length_stats([e.num_trained for e in encoded if e is not None])}")
    over = sum(1 for n in lengths if n > max_length)
    lines.append(f"over max_length {max_length}: {over} of {len(lengths)}")
    index = min(example, len(records) - 1)
    shown = encoded[index]
    lines.append("")
    if prompts:
        lines.append(f"record {index}, as sampling renders it (nothing is trained):")
    else:
        lines.append(f"record {index}, trained tokens marked {'in green' if color else 'as «…»'}:")
    lines.append(render_trained(tokenizer, shown, color=color) if shown is not None else "(not encodable)")
    return "\n".join(lines)


def _field_counts(records: list[PromptRecord]) -> str:
    """The fields beside the prompt (what reward functions receive) and how many records have each."""
    counts: dict[str, int] = {}
    for record in records:
        for key in record.data:
            counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{key} ({n} of {len(records)})" for key, n in counts.items()) or "none"
